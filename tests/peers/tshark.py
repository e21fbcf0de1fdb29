"""Capture SPICE traffic on loopback with tshark and decode it with Wireshark's SPICE dissector.

Usage::

    from tests.peers.tshark import Capture, decode_fields, spice_field_names, problems
    with Capture(port) as cap:           # tshark -i lo -f 'tcp port P' -w cap.path, in background
        ... run client/server ...
    # leaving the block stops tshark (SIGINT, flush) - cap.path is complete afterwards
    rows = decode_fields(cap.path, port, ["frame.number", "spice.magic"], display_filter="spice")
    names = spice_field_names(cap.path, port)       # {"spice.magic", "spice.channel_type", ...}
    bad = problems(cap.path, port)                  # malformed frames / expert errors

Decoding always passes ``-d tcp.port==P,spice`` so that any port is dissected as SPICE.  The
capture must contain each connection from its first packet: the dissector follows the link
handshake (per TCP conversation) to know which channel type it is looking at.

tshark runs under coreutils ``timeout`` and with ``-a duration:`` so it ends on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

TSHARK = "tshark"

# _ws.expert.severity values (epan/proto.h PI_*)
SEVERITY = {0x00200000: "chat", 0x00400000: "note", 0x00600000: "warn", 0x00800000: "error",
            0x00100000: "comment"}


# _ws.expert.group values (epan/proto.h PI_*), the ones that matter here
_GROUPS = {0x01000000: "checksum", 0x02000000: "sequence", 0x03000000: "response-code",
           0x04000000: "request-code", 0x05000000: "undecoded", 0x06000000: "reassemble",
           0x07000000: "malformed", 0x08000000: "debug", 0x09000000: "protocol",
           0x0a000000: "security", 0x0b000000: "comments-group", 0x0c000000: "decryption",
           0x0d000000: "assumption", 0x0e000000: "deprecated"}


def _group_name(value: str) -> str:
    try:
        v = int(value, 0)
    except ValueError:
        return value
    return _GROUPS.get(v, hex(v))


def _severity_name(value: str) -> str:
    try:
        v = int(value, 0)
    except ValueError:
        return value
    return SEVERITY.get(v, hex(v))


class CaptureError(RuntimeError):
    pass


class Capture:
    """Background ``tshark -i lo -f 'tcp port P' -w path`` (context manager)."""

    def __init__(self, port: int, path: str | None = None, iface: str = "lo",
                 lifetime: float = 300.0, start_timeout: float = 15.0, extra_filter: str = ""):
        self.port = port
        self.iface = iface
        self.lifetime = lifetime
        self.start_timeout = start_timeout
        self._own_dir = None
        if path is None:
            self._own_dir = tempfile.mkdtemp(prefix="sw-cap-")
            path = os.path.join(self._own_dir, f"spice-{port}.pcapng")
        self.path = path
        self.bpf = f"tcp port {port}" + (f" and ({extra_filter})" if extra_filter else "")
        self.proc: subprocess.Popen | None = None
        self.stderr_path = path + ".stderr"

    def start(self) -> Capture:
        if shutil.which(TSHARK) is None:
            raise CaptureError("tshark not found")
        argv = ["timeout", "--signal=INT", "--kill-after=5", str(int(self.lifetime) + 5),
                TSHARK, "-i", self.iface, "-f", self.bpf, "-w", self.path,
                "-a", f"duration:{int(self.lifetime)}"]
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115  tshark writes it until stop() closes it
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err, start_new_session=True)
        # tshark announces "Capturing on 'Loopback: lo'" once the capture is live
        deadline = time.monotonic() + self.start_timeout
        while True:
            err = self.stderr()
            if "Capturing on" in err:
                break
            if self.proc.poll() is not None:
                raise CaptureError(f"tshark exited {self.proc.returncode}: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise CaptureError(f"tshark did not start capturing: {err.strip()}")
            time.sleep(0.05)
        time.sleep(0.2)  # the message precedes the first poll of the socket slightly
        return self

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, settle: float = 0.3) -> str:
        """Stop capturing (SIGINT so tshark flushes the file); returns the capture path."""
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(settle)  # let the last packets (FIN/ACK) reach the capture
            # signal the whole group: `timeout` forwards nothing we send to it alone reliably
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_err", None) is not None:
            self._err.close()
            self._err = None
        return self.path

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _read(path: str, port: int, *args: str, timeout: float = 60.0) -> str:
    argv = [TSHARK, "-r", path, "-d", f"tcp.port=={port},spice", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise CaptureError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def decode_fields(path: str, port: int, fields: list[str], display_filter: str | None = None,
                  ) -> list[dict[str, list[str]]]:
    """``tshark -T fields``: one dict per frame, each field -> list of its occurrences."""
    args = ["-T", "fields", "-E", "header=n", "-E", "separator=\t", "-E", "occurrence=a",
            "-E", "aggregator=\x1f", "-E", "quote=n"]
    for f in fields:
        args += ["-e", f]
    if display_filter:
        args += ["-Y", display_filter]
    rows = []
    for line in _read(path, port, *args).splitlines():
        cols = line.split("\t")
        cols += [""] * (len(fields) - len(cols))
        rows.append({f: (c.split("\x1f") if c else []) for f, c in zip(fields, cols, strict=True)})
    return rows


def decode_json(path: str, port: int, display_filter: str | None = None) -> list[dict]:
    args = ["-T", "json", "--no-duplicate-keys"] + (["-Y", display_filter] if display_filter else [])
    out = _read(path, port, *args)
    return json.loads(out) if out.strip() else []


def spice_field_names(path: str, port: int) -> set[str]:
    """Every ``spice.*`` field name the dissector produced anywhere in the capture."""
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k.startswith("spice."):
                    names.add(k.split("_tree")[0] if k.endswith("_tree") else k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(decode_json(path, port, "spice"))
    return names


def problems(path: str, port: int, min_severity: str = "error") -> list[dict]:
    """Frames with ``_ws.malformed`` or expert info at ``min_severity`` or worse.

    Returns dicts ``{frame, protocols, malformed, messages, severities}``; empty = clean.
    """
    order = ["chat", "note", "warn", "error"]
    want = set(order[order.index(min_severity):])
    rows = decode_fields(path, port, ["frame.number", "frame.protocols", "_ws.malformed",
                                      "_ws.expert.message", "_ws.expert.severity",
                                      "_ws.expert.group"],
                         display_filter="_ws.malformed || _ws.expert")
    out = []
    for r in rows:
        sev = [_severity_name(s) for s in r["_ws.expert.severity"]]
        malformed = bool(r["_ws.malformed"]) or "_ws.malformed" in "".join(r["frame.protocols"])
        if malformed or want.intersection(sev):
            out.append({"frame": int(r["frame.number"][0]), "protocols": r["frame.protocols"],
                        "malformed": malformed, "messages": r["_ws.expert.message"],
                        "severities": sev,
                        "groups": [_group_name(g) for g in r["_ws.expert.group"]]})
    return out
