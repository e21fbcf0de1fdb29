#!/usr/bin/python3
"""Drive a real spice-gtk client (SpiceClientGLib via GObject introspection) against a SPICE server.

Runs under Debian's /usr/bin/python3 (python3-gi + gir1.2-spiceclientglib-2.0); the project venv
cannot import ``gi``.  No GTK, no display: only a GLib main loop.

    /usr/bin/python3 tests/peers/spicegtk_driver.py --host 127.0.0.1 --port P \
        [--password PW] [--port-name NAME] [--send-bytes N] [--expect-echo] [--timeout S] [--hold S]
        [--stream-seconds S [--stream-rate B] [--max-inflight B] [--resync] [--write-sizes N,...]]
        [--trace-spice]

Flow: create a SpiceSession, connect it (that links MAIN), connect every non-main channel from the
``channel-new`` handler (spice-gtk leaves that to the application), find the SpicePortChannel whose
``port-name`` matches, optionally wait until it is opened, write N deterministic bytes (see
``make_payload``) in chunks, optionally read them back through ``port-data`` and compare.  Prints
exactly ONE JSON line on stdout (the report) and exits 0 on success, 1 on failure, 2 when the
environment cannot run spice-gtk at all.

Streaming mode (``--stream-seconds S --expect-echo``, for migration tests): instead of a fixed
payload, keep writing the echo stream (``stream_bytes``) for S seconds (SIGUSR1 stops it earlier),
at most ``--max-inflight`` bytes written but not yet echoed and at most ``--stream-rate`` bytes/s,
checking every echoed byte as it arrives; then stop writing and wait (``--drain-timeout``) for the
rest of the echo.  Every 8-byte word of the stream says which stream (epoch) and which word it is,
so a loss, a repeat or a reorder is caught at the first byte and the report says what came instead
(``stream.mismatch``).  By default the echo must be byte-exact end to end (seamless migration).
``--write-sizes`` makes every write exactly the next of the given sizes in turn (1 MiB, 4 MiB, ...),
each waiting until it fits the window, so the server sees messages of those sizes.

``--resync`` (semi-seamless migration, which loses in-flight data by design): when the port is
initialised again (a second PORT_INIT: the channel was reset and now runs on s2) the driver closes
the current epoch and starts writing epoch n+1 from offset 0.  Echoed bytes that still arrive before
the start of epoch n+1 (writes spice-gtk queued around the reset) are *stale*: counted and located
in epoch n (``stale_ranges``: from, bytes, exact).  From the first byte of epoch n+1 the check is
byte-exact again.  Per epoch the report gives written, echoed (verified in order), stale and lost
(= written - echoed - exact stale bytes).
A mismatch that is not at such a re-initialisation still fails the run.

Migration events are recorded in ``events`` with timestamps (seconds since start): the session's
``migration-state`` / ``host`` / ``port`` notifications (with the remote address each channel's
socket is connected to at that moment, ``peers``), ``migration-started`` and the channel events of
spice-gtk's hidden migration session, port re-initialisations.  ``--trace-spice`` turns on spice-gtk
debug logging and keeps its migration lines (timestamped; e.g. the MIGRATE each channel receives).
The report ends with ``session_host`` / ``session_port`` and ``peers`` (channel -> "host:port").

Implementation notes (spice-gtk / PyGObject traps):

* ``SpicePortChannel.write_async`` called through PyGObject sends freed memory: spice-gtk keeps a
  pointer to the caller's buffer until the write completes, PyGObject frees its temporary copy as
  soon as the call returns.  We call the C functions ``spice_port_channel_write_async`` /
  ``spice_port_channel_write_finish`` with ctypes and keep each chunk alive until its callback.
* The C pointer of a PyGObject comes from its ``__gpointer__`` attribute, a PyCapsule wrapping the
  ``GObject *`` (read with ``PyCapsule_GetPointer``); it is cross-checked with
  ``g_type_check_instance_is_a`` against the GType of the class before use.
* ``Session.connect()`` / ``Channel.connect()`` are the SPICE calls (``spice_session_connect`` /
  ``spice_channel_connect``); signals are connected with ``GObject.Object.connect(obj, sig, cb)``.

This file is also importable from the project venv (``gi`` is only imported inside ``main``), so
tests can reuse ``make_payload`` and ``DEFAULT_*``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from array import array

DEFAULT_CHUNK = 64 * 1024
PAYLOAD_SEED = b"spicewire-peer-payload"

# SpiceChannelEvent values (spice-gtk spice-channel.h)
_EVENT_NAMES = {
    0: "none",
    10: "opened",
    11: "switching",
    12: "closed",
    20: "error-connect",
    21: "error-tls",
    22: "error-link",
    23: "error-auth",
    24: "error-io",
}
_EVENT_OPENED = 10
_EVENT_CLOSED = 12
_EVENT_ERRORS = (20, 21, 22, 23, 24)

# SPICE channel types (spice-protocol enums.h), used only if spice-gtk cannot name one.
_CHANNEL_NAMES = {
    1: "main", 2: "display", 3: "inputs", 4: "cursor", 5: "playback", 6: "record",
    7: "tunnel", 8: "smartcard", 9: "usbredir", 10: "port", 11: "webdav",
}
_TYPE_MAIN = 1
_TYPE_PORT = 10

# spice-gtk debug lines --trace-spice keeps (channel-base.c, channel-main.c, spice-session.c)
_TRACE_KEYS = ("migrat", "handle_migrate", "switching", "swap")


def make_payload(n: int, seed: bytes = PAYLOAD_SEED) -> bytes:
    """Deterministic, non-periodic test bytes: SHA-256 in counter mode over ``seed``."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


STREAM_TAG = 0xA5 << 56  # high byte of every stream word: stream bytes are never all-zero


def stream_bytes(epoch: int, start: int, n: int) -> bytes:
    """Bytes [start, start + n) of echo stream ``epoch``: little-endian u64 words, word i being
    ``STREAM_TAG | epoch << 40 | i``, so any 8 received bytes tell where they belong."""
    first, last = start // 8, (start + n + 7) // 8
    base = STREAM_TAG | (epoch << 40)
    words = array("Q", range(base + first, base + last))
    if sys.byteorder != "little":
        words.byteswap()
    skip = start - first * 8
    return words.tobytes()[skip:skip + n]


def stream_word(data: bytes) -> dict | None:
    """Decode one 8-byte stream word: ``{"epoch", "offset"}``, or None if it is no stream word."""
    if len(data) < 8:
        return None
    value = int.from_bytes(data[:8], "little")
    if value >> 56 != STREAM_TAG >> 56:
        return None
    return {"epoch": (value >> 40) & 0xFFFF, "offset": (value & ((1 << 40) - 1)) * 8}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _channel_error(channel) -> str | None:
    """A spice-gtk channel's GError, as text, if it has one."""
    try:
        err = channel.get_error()
    except Exception:
        return None
    return None if err is None else f"{err.domain}:{err.code}: {err.message}"


def _emit(report: dict) -> None:
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="plain SPICE port")
    p.add_argument("--tls-port", type=int, help="SPICE over TLS port (the session's tls-port)")
    p.add_argument("--ca-file", help="CA certificate(s) spice-gtk verifies the server with")
    p.add_argument("--cert-subject", help="the server certificate's subject, spice-gtk's k=v,k=v form "
                   "(without it spice-gtk checks the host name)")
    p.add_argument("--secure-channels", help="comma-separated channel names or 'all': these only over TLS")
    p.add_argument("--password", default=None)
    p.add_argument("--port-name", default=None,
                   help="port channel to use (default: the first port channel that reports a name)")
    p.add_argument("--send-bytes", type=int, default=0, help="bytes to write to the port channel")
    p.add_argument("--expect-echo", action="store_true",
                   help="read back --send-bytes bytes via port-data and compare them")
    p.add_argument("--wait-opened", action="store_true",
                   help="require the port to be opened even when sending nothing")
    p.add_argument("--no-port", action="store_true",
                   help="only link the session (MAIN + the other channels); no port channel needed")
    p.add_argument("--main-only", action="store_true",
                   help="do not connect non-main channels (implies --no-port)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds until giving up")
    p.add_argument("--hold", type=float, default=0.0,
                   help="keep the session open this many seconds after success")
    p.add_argument("--settle", type=float, default=0.3,
                   help="after the echo completed, wait this long for unexpected extra bytes")
    p.add_argument("--debug", action="store_true", help="spice-gtk debug output on stderr")
    p.add_argument("--stream-seconds", type=float, default=0.0,
                   help="streaming mode: write the echo stream this long (SIGUSR1 stops earlier)")
    p.add_argument("--stream-rate", type=float, default=0.0,
                   help="streaming mode: at most this many bytes/s (0: as fast as the echo allows)")
    p.add_argument("--max-inflight", type=int, default=1 << 20,
                   help="streaming mode: at most this many bytes written but not yet echoed")
    p.add_argument("--drain-timeout", type=float, default=15.0,
                   help="streaming mode: seconds to wait for the rest of the echo after writing stopped")
    p.add_argument("--resync", action="store_true",
                   help="streaming mode: a port re-initialisation starts a new epoch (semi-seamless)")
    p.add_argument("--write-sizes", type=lambda v: tuple(int(n) for n in v.split(",")), default=(),
                   help="streaming mode: each write_async exactly the next of these sizes (comma "
                        "separated), in turn; needs --max-inflight >= the largest, no --stream-rate")
    p.add_argument("--trace-spice", action="store_true",
                   help="record spice-gtk's migration debug lines in the events, timestamped")
    args = p.parse_args(argv)
    if args.port is None and args.tls_port is None:
        p.error("--port, --tls-port or both")
    if args.stream_seconds > 0:
        if not args.expect_echo or args.send_bytes:
            p.error("--stream-seconds needs --expect-echo and no --send-bytes")
        if args.max_inflight < 1:
            p.error("--max-inflight must be positive")
        if args.write_sizes and (min(args.write_sizes) < 1 or max(args.write_sizes) > args.max_inflight
                                 or args.stream_rate):
            p.error("--write-sizes must be positive, at most --max-inflight, without --stream-rate")
    elif args.expect_echo and args.send_bytes <= 0:
        p.error("--expect-echo needs --send-bytes > 0 (or --stream-seconds)")
    if args.main_only:
        args.no_port = True
    if args.no_port and (args.send_bytes or args.expect_echo or args.stream_seconds):
        p.error("--no-port/--main-only cannot send bytes")
    return args


class EchoStream:
    """The streaming echo check, without GLib (see the module docstring): what to write next, and
    whether what came back is right.  ``mismatch`` is set (and stays) at the first wrong byte."""

    def __init__(self, chunk: int, max_inflight: int, rate: float, resync: bool,
                 write_sizes: tuple[int, ...] = ()) -> None:
        self.chunk, self.max_inflight, self.rate, self.resync = chunk, max_inflight, rate, resync
        # Each write exactly the next of these sizes in turn, issued once it fits the window: a
        # large write must reach the server as one message of that size, never cut by the window.
        self.write_sizes = write_sizes
        self.writes = 0
        self.epochs: list[dict] = []
        self.pending: bytearray | None = None  # bytes received while looking for the new epoch
        self.mismatch: dict | None = None
        self.issued_total = 0
        self.started: float | None = None
        self.stopped: float | None = None
        self.last_data: float | None = None
        self.gaps: list[dict] = []  # pauses of the echo while writing, longer than GAP_S
        self._new_epoch(None)

    GAP_S = 0.05

    @property
    def current(self) -> dict:
        return self.epochs[-1]

    def _new_epoch(self, now) -> None:
        self.epochs.append({"epoch": len(self.epochs), "issued": 0, "written": 0, "echoed": 0,
                            "stale": 0, "started_t": now})

    def next_write(self, now: float):
        """``(epoch, data)`` to write now, else the seconds to wait (None: wait for the echo)."""
        ep = self.current
        room = self.max_inflight - (ep["issued"] - ep["echoed"])
        if room <= 0:
            return None
        n = min(self.chunk, room)
        if self.write_sizes:
            n = self.write_sizes[self.writes % len(self.write_sizes)]
            if n > room:
                return None  # the echo of earlier writes makes room
            self.writes += 1
        if self.rate > 0:
            allowed = int(self.rate * (now - self.started)) + self.chunk // 4 - self.issued_total
            if allowed <= 0:
                return max(0.001, -allowed / self.rate)
            n = min(n, allowed)
        data = stream_bytes(ep["epoch"], ep["issued"], n)
        ep["issued"] += n
        self.issued_total += n
        return ep["epoch"], data

    def written(self, epoch: int, n: int) -> None:
        self.epochs[epoch]["written"] += n

    def reinit(self, now: float) -> bool:
        """The port was initialised again: in resync mode, a new epoch starts."""
        if not self.resync:
            return False
        self.current["closed_t"] = now
        self._new_epoch(now)
        self.pending = bytearray()
        return True

    def received(self, chunk: bytes, now: float, writing: bool) -> bool:
        """Check echoed bytes; False once a mismatch is found."""
        if self.mismatch is not None:
            return False
        if writing and self.last_data is not None and now - self.last_data > self.GAP_S:
            self.gaps.append({"t": round(self.last_data, 4), "s": round(now - self.last_data, 4)})
        self.last_data = now
        if self.pending is not None:
            self.pending += chunk
            if not self._find_epoch_start():
                return True
            chunk, self.pending = bytes(self.pending), None
        return self._check(chunk)

    def _find_epoch_start(self) -> bool:
        ep = self.current
        marker = stream_bytes(ep["epoch"], 0, min(16, ep["issued"]))
        at = self.pending.find(marker) if marker else -1
        if at < 0:
            return False
        prev = self.epochs[-2]
        stale = bytes(self.pending[:at])
        if stale:
            # Where in the old epoch do these bytes come from?  Any whole word says it.
            start = None
            for a in range(min(8, len(stale) - 7) if len(stale) >= 8 else 0):
                word = stream_word(stale[a:a + 8])
                if word and word["epoch"] == prev["epoch"]:
                    start = word["offset"] - a
                    break
            exact = start is not None and stale == stream_bytes(prev["epoch"], start, len(stale))
            prev["stale"] += len(stale)
            prev["stale_ranges"] = [*prev.get("stale_ranges", []),
                                    {"from": start, "bytes": len(stale), "exact": exact}]
        del self.pending[:at]
        return True

    def _check(self, chunk: bytes) -> bool:
        ep = self.current
        if not chunk:
            return True
        expect = stream_bytes(ep["epoch"], ep["echoed"], len(chunk))
        if chunk == expect and ep["echoed"] + len(chunk) <= ep["issued"]:
            ep["echoed"] += len(chunk)
            return True
        at = next((i for i in range(len(chunk)) if chunk[i] != expect[i]), len(chunk))
        offset = ep["echoed"] + at
        # the received word that holds the mismatch (or the next whole one in this chunk)
        back = offset % 8
        word = at - back if at >= back else at + 8 - back
        self.mismatch = {
            "epoch": ep["epoch"], "offset": offset, "issued": ep["issued"],
            "kind": "wrong byte" if at < len(chunk) else "more echoed than written",
            "expected_word_at": ep["echoed"] + word,
            "received_word": stream_word(chunk[word:word + 8]),
        }
        ep["echoed"] += at
        return False

    def drained(self) -> bool:
        ep = self.current
        return self.pending is None and ep["echoed"] == ep["issued"] == ep["written"]

    def report(self) -> dict:
        epochs = []
        for ep in self.epochs:
            ep = dict(ep)
            stale = sum(r["bytes"] for r in ep.get("stale_ranges", []) if r["exact"])
            ep["lost"] = ep["written"] - ep["echoed"] - stale
            epochs.append(ep)
        written = sum(e["written"] for e in epochs)
        echoed = sum(e["echoed"] for e in epochs)
        seconds = (self.stopped or self.last_data or 0.0) - (self.started or 0.0)
        return {
            "epochs": epochs,
            "bytes_written": written,
            "bytes_echoed": echoed,
            "bytes_stale": sum(e["stale"] for e in epochs),
            "bytes_lost": sum(e["lost"] for e in epochs),
            "writes_of_sizes": self.writes,  # writes made with --write-sizes
            "byte_exact": self.mismatch is None and len(epochs) == 1 and echoed == written,
            "mismatch": self.mismatch,
            "seconds": round(seconds, 4),
            "rate_MiB_s": round(written / seconds / (1 << 20), 2) if seconds > 0 else None,
            "gaps": self.gaps,
            "max_gap_s": max((g["s"] for g in self.gaps), default=0.0),
        }


class Driver:
    def __init__(self, args, gi_mods, clib):
        self.a = args
        self.S, self.GLib, self.GObject, self.Gio = gi_mods
        self.clib = clib
        self.loop = self.GLib.MainLoop()
        self.t0 = time.monotonic()
        self.t0_wall = time.time()  # event times + t0_wall = wall-clock times (to align with QMP)
        self.timings: dict[str, float] = {}
        self.events: list[dict] = []
        self.channels: dict[tuple[int, int], dict] = {}
        self.chan_objs = []  # keep Python wrappers alive
        self.port = None
        self.port_candidates: list[dict] = []
        self.payload = make_payload(args.send_bytes) if args.send_bytes else b""
        self.sent = 0
        self.received = bytearray()
        self.inflight = {}  # id -> ctypes buffer kept alive until the write callback fires
        self.error: str | None = None
        self.ok = False
        self.phase = "connecting"
        self.finished = False
        self.write_started = False
        self.extra_after_echo = 0
        self.chan_by_key = {}  # (type, id) -> SpiceChannel
        self.port_inits = 0  # PORT_INITs seen on the chosen port (2+: it was re-initialised)
        self.stream = (EchoStream(args.chunk_size, args.max_inflight, args.stream_rate, args.resync,
                                  args.write_sizes)
                       if args.stream_seconds > 0 else None)
        self.stream_writing = False
        self.write_busy = False
        self.wake_scheduled = False
        self.migration_sessions = []  # spice-gtk's hidden migration sessions, kept alive

    # -- helpers -----------------------------------------------------------------------------
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def mark(self, name: str) -> None:
        self.timings.setdefault(name, self.now())

    def type_name(self, t: int) -> str:
        try:
            return self.S.Channel.type_to_string(t)
        except Exception:  # pragma: no cover - depends on the spice-gtk build
            return _CHANNEL_NAMES.get(t, str(t))

    def fail(self, msg: str) -> None:
        if self.finished:
            return
        if self.error is None:
            self.error = msg
        self.ok = False
        self.finish()

    def succeed(self) -> None:
        """Success, once every channel we asked to connect has linked (complete report)."""
        if self.finished or self.error:
            return
        pending = self.pending_channels()
        if pending:
            if self.phase != "waiting-channels":
                self.phase_before_wait = self.phase
                self.phase = "waiting-channels"
                self.GLib.timeout_add(20, self._retry_succeed)
            return
        self.ok = True
        self.mark("success")
        if self.a.hold > 0:
            self.phase = "holding"
            self.GLib.timeout_add(int(self.a.hold * 1000), self._hold_done)
        else:
            self.finish()

    def pending_channels(self) -> list[str]:
        if self.a.main_only:
            return []
        return [f"{i['type_name']}:{i['id']}" for i in self.channels.values()
                if not i["opened"]]

    def _retry_succeed(self):
        if self.finished or self.error:
            return False
        if self.pending_channels():
            return True
        self.phase = "linked"
        self.succeed()
        return False

    def _hold_done(self):
        self.finish()
        return False

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.mark("finished")
        self.loop.quit()

    # -- session / channels ------------------------------------------------------------------
    def start(self) -> None:
        s = self.S.Session()
        s.set_property("host", self.a.host)
        if self.a.port is not None:
            s.set_property("port", str(self.a.port))
        if self.a.tls_port is not None:
            s.set_property("tls-port", str(self.a.tls_port))
        if self.a.ca_file is not None:
            s.set_property("ca-file", self.a.ca_file)
        if self.a.cert_subject is not None:
            s.set_property("cert-subject", self.a.cert_subject)
        if self.a.secure_channels is not None:
            s.set_property("secure-channels", self.a.secure_channels.split(","))
        if self.a.password is not None:
            s.set_property("password", self.a.password)
        for prop, val in (("enable-audio", False), ("enable-usbredir", False),
                          ("enable-smartcard", False)):
            try:
                s.set_property(prop, val)
            except TypeError as exc:
                # a spice-gtk built without this feature has no such property, and the feature is off
                self.events.append({"t": self.now(), "what": "note", "text": str(exc)})
        self.session = s
        self.GObject.Object.connect(s, "channel-new", self.on_channel_new)
        self.GObject.Object.connect(s, "channel-destroy", self.on_channel_destroy)
        for prop in ("migration-state", "host", "port"):
            self.GObject.Object.connect(s, f"notify::{prop}", self.on_session_notify)
        self.GLib.timeout_add(int(self.a.timeout * 1000), self.on_timeout)
        self.mark("connect_called")
        if not s.connect():  # spice_session_connect
            self.fail("spice_session_connect returned FALSE")

    def on_timeout(self):
        if not self.finished and self.phase not in ("holding", "streaming", "draining", "settling"):
            extra = ""
            if self.phase == "waiting-channels":
                extra = f" (not linked: {self.pending_channels()})"
            self.fail(f"timeout after {self.a.timeout}s in phase {self.phase!r}{extra}")
        return False

    def on_channel_new(self, session, channel):
        t = channel.get_property("channel-type")
        cid = channel.get_property("channel-id")
        info = {"type": t, "type_name": self.type_name(t), "id": cid,
                "opened": False, "last_event": None, "created_at": self.now()}
        self.channels[(t, cid)] = info
        self.chan_objs.append(channel)
        self.chan_by_key[(t, cid)] = channel
        if t == _TYPE_MAIN:
            self.GObject.Object.connect(channel, "migration-started", self.on_migration_started)
        self.GObject.Object.connect(channel, "channel-event", self.on_channel_event, info)
        if t == _TYPE_PORT:
            pinfo = {"id": cid, "name": None, "opened": False, "channel": channel}
            self.port_candidates.append(pinfo)
            self.GObject.Object.connect(channel, "notify::port-name", self.on_port_notify, pinfo)
            self.GObject.Object.connect(channel, "notify::port-opened", self.on_port_notify, pinfo)
            self.GObject.Object.connect(channel, "port-data", self.on_port_data, pinfo)
            self.GObject.Object.connect(channel, "port-event", self.on_port_event, pinfo)
        if t == _TYPE_MAIN or self.a.main_only:
            return
        if not channel.connect():  # spice_channel_connect
            self.fail(f"spice_channel_connect({info['type_name']}:{cid}) returned FALSE")

    # -- migration events --------------------------------------------------------------------
    def peers(self) -> dict:
        """channel -> "host:port" its socket is connected to now (None without a socket)."""
        out = {}
        for (t, cid), channel in sorted(self.chan_by_key.items()):
            name = f"{self.type_name(t)}:{cid}"
            try:
                sock = channel.get_property("socket")
                addr = sock.get_remote_address() if sock is not None else None
                out[name] = f"{addr.get_address().to_string()}:{addr.get_port()}" if addr else None
            except Exception as exc:  # a closed socket has no remote address
                out[name] = f"error: {exc}"
        return out

    def on_session_notify(self, session, pspec):
        value = session.get_property(pspec.name)
        value = getattr(value, "value_nick", value)
        rec = {"t": self.now(), "what": "session-notify", "prop": pspec.name, "value": value}
        if pspec.name == "migration-state":
            rec["peers"] = self.peers()
            rec["session_port"] = session.get_property("port")
        self.events.append(rec)

    def on_migration_started(self, channel, mig_session):
        self.events.append({"t": self.now(), "what": "migration-started",
                            "host": mig_session.get_property("host"),
                            "port": mig_session.get_property("port")})
        self.migration_sessions.append(mig_session)
        self.GObject.Object.connect(mig_session, "channel-new", self.on_migration_channel_new)

    def on_migration_channel_new(self, session, channel):
        self.chan_objs.append(channel)
        name = f"{self.type_name(channel.get_property('channel-type'))}:{channel.get_property('channel-id')}"
        self.GObject.Object.connect(channel, "channel-event", self.on_migration_channel_event, name)

    def on_migration_channel_event(self, channel, event, name):
        rec = {"t": self.now(), "what": "migration-channel-event", "channel": name,
               "event": _EVENT_NAMES.get(int(event), str(int(event)))}
        err = _channel_error(channel)
        if err is not None:
            rec["error"] = err
        self.events.append(rec)

    def on_spice_log(self, domain, level, message, data):
        if any(key in message for key in _TRACE_KEYS):
            self.events.append({"t": self.now(), "what": "spice-log", "text": message})

    def on_channel_destroy(self, session, channel):
        self.events.append({"t": self.now(), "what": "channel-destroy",
                            "channel": f"{self.type_name(channel.get_property('channel-type'))}:"
                                       f"{channel.get_property('channel-id')}"})

    def on_channel_event(self, channel, event, info):
        ev = int(event)
        name = _EVENT_NAMES.get(ev, str(ev))
        info["last_event"] = name
        rec = {"t": self.now(), "what": "channel-event",
               "channel": f"{info['type_name']}:{info['id']}", "event": name}
        if ev in _EVENT_ERRORS or ev == _EVENT_CLOSED:
            err = _channel_error(channel)
            if err is not None:
                rec["error"] = err
        self.events.append(rec)
        if ev == _EVENT_OPENED:
            info["opened"] = True
            self.mark(f"{info['type_name']}_{info['id']}_linked")
            if info["type"] == _TYPE_MAIN:
                self.phase = "main-linked"
                if self.a.no_port:
                    # give spice-gtk a moment to create/connect the other channels it was told about
                    self.GLib.timeout_add(500, self._link_only_done)
        elif ev in _EVENT_ERRORS:
            detail = f" ({rec['error']})" if "error" in rec else ""
            self.fail(f"channel {info['type_name']}:{info['id']} event {name}{detail}")
        elif ev == _EVENT_CLOSED and self.phase not in ("holding",) and not self.finished:
            self.fail(f"channel {info['type_name']}:{info['id']} closed in phase {self.phase!r}")
        elif ev == _EVENT_CLOSED and self.phase == "holding" and info["type"] == _TYPE_MAIN:
            # the server went away while we were holding: report it, but success stands
            self.events.append({"t": self.now(), "what": "note", "text": "main closed during hold"})

    def _link_only_done(self):
        self.succeed()
        return False

    # -- port channel ------------------------------------------------------------------------
    def on_port_notify(self, channel, pspec, pinfo):
        pinfo["name"] = channel.get_property("port-name")
        pinfo["opened"] = bool(channel.get_property("port-opened"))
        self.events.append({"t": self.now(), "what": "port-notify", "id": pinfo["id"],
                            "prop": pspec.name, "name": pinfo["name"], "opened": pinfo["opened"]})
        if self.a.no_port or pinfo["name"] is None:
            return
        if self.port is None and (self.a.port_name is None or pinfo["name"] == self.a.port_name):
            self.port = pinfo
            self.mark("port_init")
            self.phase = "port-found"
        if self.port is pinfo and pspec.name == "port-name":
            self.port_inits += 1
            if self.port_inits > 1:
                self.events.append({"t": self.now(), "what": "port-reinit", "id": pinfo["id"]})
                if self.stream is not None and self.stream_writing:
                    self.stream.reinit(self.now())
                    self.GLib.idle_add(self._stream_pump_idle)
        if self.port is pinfo:
            if pinfo["opened"]:
                self.mark("port_opened")
            # PORT_INIT sets name and opened together: decide after both notifies ran.
            self.GLib.idle_add(self._port_progress)

    def on_port_event(self, channel, event, pinfo):
        self.events.append({"t": self.now(), "what": "port-event", "id": pinfo["id"],
                            "event": int(event)})

    def _port_progress(self):
        if self.finished or self.port is None or self.write_started:
            return False
        need_open = self.a.send_bytes > 0 or self.a.expect_echo or self.a.wait_opened or self.stream
        if not need_open:
            self.succeed()
            return False
        if not self.port["opened"]:
            self.phase = "waiting-port-opened"
            return False
        if self.stream is not None:
            self.write_started = True
            self._stream_start()
        elif self.a.send_bytes > 0:
            self.write_started = True
            self.phase = "writing"
            self.mark("write_start")
            self._write_next()
        else:
            self.succeed()
        return False

    def _write_next(self) -> None:
        if self.finished:
            return
        if self.sent >= len(self.payload):
            self.mark("write_done")
            if self.a.expect_echo:
                self.phase = "reading-echo"
                self._check_echo()
            else:
                self.succeed()
            return
        chunk = self.payload[self.sent:self.sent + self.a.chunk_size]
        buf = self.clib.make_buffer(chunk)
        key = id(buf)
        self.inflight[key] = (buf, len(chunk))
        self.clib.write_async(self.port["channel"], buf, len(chunk), key, self._on_written)

    def _on_written(self, key: int, nwritten: int, err: str | None) -> None:
        buf, n = self.inflight.pop(key)
        del buf
        if err is not None:
            self.fail(f"spice_port_channel_write_finish: {err}")
            return
        if nwritten != n:
            self.fail(f"short write: {nwritten} of {n}")
            return
        self.sent += nwritten
        self._write_next()

    # -- streaming (EchoStream) -----------------------------------------------------------------
    def _stream_start(self) -> None:
        self.phase = "streaming"
        self.stream_writing = True
        self.stream.started = self.now()
        self.stream.current["started_t"] = self.stream.started
        self.mark("stream_start")
        self.GLib.timeout_add(int(self.a.stream_seconds * 1000), self.stop_stream)
        self._stream_pump()

    def stop_stream(self, *_):
        """Stop writing (timer or SIGUSR1); the echo of what was written is still awaited."""
        if self.finished or not self.stream_writing:
            return False
        self.stream_writing = False
        self.stream.stopped = self.now()
        self.phase = "draining"
        self.mark("stream_stop")
        self.GLib.timeout_add(int(self.a.drain_timeout * 1000), self._drain_timeout)
        self._stream_check_drained()
        return False

    def _drain_timeout(self):
        if not self.finished and self.phase == "draining":
            ep = self.stream.current
            self.fail(f"echo incomplete {self.a.drain_timeout}s after writing stopped: epoch "
                      f"{ep['epoch']} echoed {ep['echoed']} of {ep['written']} written")
        return False

    def _stream_pump_idle(self):
        self._stream_pump()
        return False

    def _stream_wake(self):
        self.wake_scheduled = False
        self._stream_pump()
        return False

    def _stream_pump(self) -> None:
        if self.finished or not self.stream_writing or self.write_busy:
            return
        nxt = self.stream.next_write(self.now())
        if nxt is None:
            return  # the window is full: port-data calls again
        if isinstance(nxt, float):
            if not self.wake_scheduled:
                self.wake_scheduled = True
                self.GLib.timeout_add(max(1, int(nxt * 1000)), self._stream_wake)
            return
        epoch, data = nxt
        buf = self.clib.make_buffer(data)
        key = id(buf)
        self.inflight[key] = (buf, len(data), epoch)
        self.write_busy = True
        self.clib.write_async(self.port["channel"], buf, len(data), key, self._on_stream_written)

    def _on_stream_written(self, key: int, nwritten: int, err: str | None) -> None:
        buf, n, epoch = self.inflight.pop(key)
        del buf
        self.write_busy = False
        if err is not None:
            if self.stream.resync:
                # a reset channel may fail the writes it held: they count as lost
                self.events.append({"t": self.now(), "what": "write-error", "error": err})
                nwritten = 0
            else:
                self.fail(f"spice_port_channel_write_finish: {err}")
                return
        elif nwritten != n:
            # spice-gtk reports a write done only when all of it is queued: a short count loses bytes
            self.fail(f"spice_port_channel_write_finish: {nwritten} of {n} bytes written")
            return
        self.stream.written(epoch, nwritten)
        self._stream_pump()
        self._stream_check_drained()

    def _stream_check_drained(self) -> None:
        if self.phase == "draining" and not self.write_busy and self.stream.drained():
            self.mark("echo_done")
            self.phase = "settling"
            self.GLib.timeout_add(int(self.a.settle * 1000), self._stream_settled)

    def _stream_settled(self):
        if self.stream.mismatch is None and self.stream.drained():
            self.succeed()
        elif self.stream.mismatch is None:
            self.fail("echo changed while settling")
        return False

    def _stream_data(self, chunk: bytes) -> None:
        if self.finished or not self.write_started:
            self.extra_after_echo += len(chunk)
            return
        if not self.stream.received(chunk, self.now(), self.stream_writing):
            mm = self.stream.mismatch
            self.fail(f"echo {mm['kind']} at epoch {mm['epoch']} offset {mm['offset']} "
                      f"(received {mm['received_word']})")
            return
        self._stream_pump()
        self._stream_check_drained()

    def on_port_data(self, channel, data, size, pinfo):
        if self.port is not None and pinfo is not self.port:
            return
        chunk = self.clib.string_at(data, size)
        if self.stream is not None:
            self.mark("first_data")
            self._stream_data(chunk)
            return
        if self.phase == "holding" or self.ok:
            self.extra_after_echo += len(chunk)
        start = len(self.received)
        self.received += chunk
        self.mark("first_data")
        if self.a.expect_echo and self.write_started and not self.finished and not self.ok:
            # compare only the new bytes (incremental: O(total), not O(total^2))
            expect = self.payload[start:start + len(chunk)]
            if chunk[:len(expect)] != expect:
                self.fail(f"echo mismatch at offset {self.first_mismatch()}")
                return
            self._check_echo()

    def _check_echo(self) -> None:
        if self.finished or self.ok:
            return
        n = len(self.payload)
        got = len(self.received)
        if got > n:
            self.fail(f"echo returned {got - n} more bytes than sent")
            return
        if got == n and self.sent == n:
            self.mark("echo_done")
            self.phase = "settling"
            self.GLib.timeout_add(int(self.a.settle * 1000), self._settled)

    def _settled(self):
        if len(self.received) != len(self.payload):
            self.fail(f"echo returned {len(self.received) - len(self.payload)} extra bytes")
        else:
            self.succeed()
        return False

    def first_mismatch(self):
        n = min(len(self.received), len(self.payload))
        if bytes(self.received[:n]) != self.payload[:n]:
            lo, hi = 0, n  # binary search over prefixes for the first differing byte
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if bytes(self.received[:mid]) == self.payload[:mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        if len(self.received) != len(self.payload):
            return min(len(self.received), len(self.payload))
        return None

    # -- report ------------------------------------------------------------------------------
    def report(self) -> dict:
        linked = [{"type": i["type"], "type_name": i["type_name"], "id": i["id"]}
                  for i in sorted(self.channels.values(), key=lambda x: (x["type"], x["id"]))
                  if i["opened"]]
        port = self.port
        r = {
            "ok": bool(self.ok and self.error is None),
            "error": self.error,
            "host": self.a.host,
            "port": self.a.port,
            "spice_gtk_version": self.S.util_get_version_string(),
            "t0_wall": self.t0_wall,
            "linked_channels": linked,
            "channels": [dict(i) for i in
                         sorted(self.channels.values(), key=lambda x: (x["type"], x["id"]))],
            "port_channels": [{"id": p["id"], "name": p["name"], "opened": p["opened"]}
                              for p in self.port_candidates],
            "port_name": port["name"] if port else None,
            "port_id": port["id"] if port else None,
            "port_opened": port["opened"] if port else None,
            "bytes_requested": len(self.payload),
            "bytes_sent": self.sent,
            "bytes_received": len(self.received),
            "bytes_received_after_success": self.extra_after_echo,
            "sha256_sent": _sha256(self.payload[:self.sent]),
            "sha256_received": _sha256(bytes(self.received)),
            "echo_checked": bool(self.a.expect_echo),
            "first_mismatch": self.first_mismatch() if self.a.expect_echo and not self.stream else None,
            "phase": self.phase,
            "timings": dict(self.timings),
            "events": list(self.events),  # snapshot: our own disconnect's events are not reported
            "session_host": self.session.get_property("host") if hasattr(self, "session") else None,
            "session_port": self.session.get_property("port") if hasattr(self, "session") else None,
            "peers": self.peers(),
            "port_inits": self.port_inits,
            "writer": {"write_started": self.write_started, "write_busy": self.write_busy,
                       "stream_writing": self.stream_writing, "in_flight": len(self.inflight)},
        }
        if self.stream is not None:
            r["stream"] = self.stream.report()
            r["first_mismatch"] = self.stream.mismatch["offset"] if self.stream.mismatch else None
            r["bytes_sent"] = r["stream"]["bytes_written"]
            r["bytes_received"] = r["stream"]["bytes_echoed"]
        if self.a.send_bytes and self.timings.get("write_start") is not None:
            end = self.timings.get("echo_done") or self.timings.get("write_done")
            if end:
                dt = max(end - self.timings["write_start"], 1e-6)
                r["throughput_MiB_s"] = round(self.sent / dt / (1 << 20), 2)
        return r

    def shutdown(self) -> None:
        # start() may have failed before it made the session; disconnecting a made one cannot fail
        if hasattr(self, "session"):
            self.session.disconnect()
        # let spice-gtk run its disconnect idles a little
        ctx = self.GLib.MainContext.default()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline and ctx.pending():
            ctx.iteration(False)


class CPort:
    """ctypes access to spice_port_channel_write_async/_finish (see module docstring)."""

    def __init__(self):
        import ctypes
        self.ct = ctypes
        self.lib = ctypes.CDLL("libspice-client-glib-2.0.so.8")
        self.gobj = ctypes.CDLL("libgobject-2.0.so.0")
        self.glib = ctypes.CDLL("libglib-2.0.so.0")
        vp = ctypes.c_void_p
        self.CB = ctypes.CFUNCTYPE(None, vp, vp, vp)  # GAsyncReadyCallback
        self.lib.spice_port_channel_write_async.argtypes = [vp, vp, ctypes.c_size_t, vp, self.CB, vp]
        self.lib.spice_port_channel_write_async.restype = None
        self.lib.spice_port_channel_write_finish.argtypes = [vp, vp, ctypes.POINTER(vp)]
        self.lib.spice_port_channel_write_finish.restype = ctypes.c_ssize_t
        self.lib.spice_port_channel_get_type.restype = ctypes.c_size_t
        self.gobj.g_type_check_instance_is_a.argtypes = [vp, ctypes.c_size_t]
        self.gobj.g_type_check_instance_is_a.restype = ctypes.c_int
        self.glib.g_error_free.argtypes = [vp]

        class GError(ctypes.Structure):
            _fields_ = [("domain", ctypes.c_uint32), ("code", ctypes.c_int),
                        ("message", ctypes.c_char_p)]
        self.GError = GError
        self.capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        self.capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        self.capsule_ptr.restype = vp
        self._pending = {}  # key -> python callback
        self._cb = self.CB(self._trampoline)  # one C callback for all writes, kept alive

    def gobject_pointer(self, obj) -> int:
        """C ``GObject *`` of a PyGObject wrapper, checked to really be a SpicePortChannel."""
        ptr = self.capsule_ptr(obj.__gpointer__, None)
        if not ptr:
            raise RuntimeError("PyGObject __gpointer__ capsule is NULL")
        if not self.gobj.g_type_check_instance_is_a(ptr, self.lib.spice_port_channel_get_type()):
            raise RuntimeError("pointer from __gpointer__ is not a SpicePortChannel")
        return ptr

    def make_buffer(self, data: bytes):
        return self.ct.create_string_buffer(data, len(data))

    def string_at(self, addr, size: int) -> bytes:
        if not size:
            return b""
        if not isinstance(addr, int):  # some PyGObject versions hand gpointer over differently
            addr = self.ct.cast(addr, self.ct.c_void_p).value
        return self.ct.string_at(addr, size)

    def write_async(self, channel, buf, n: int, key: int, done) -> None:
        ptr = self.gobject_pointer(channel)
        self._pending[key] = (ptr, done)
        self.lib.spice_port_channel_write_async(ptr, self.ct.addressof(buf), n, None, self._cb,
                                                self.ct.c_void_p(key))

    def _trampoline(self, source, result, user_data):
        key = user_data
        ptr, done = self._pending.pop(key)
        err = self.ct.c_void_p()
        n = self.lib.spice_port_channel_write_finish(ptr, result, self.ct.byref(err))
        msg = None
        if err.value:
            e = self.GError.from_address(err.value)
            msg = f"code {e.code}: {(e.message or b'').decode('utf-8', 'replace')}"
            self.glib.g_error_free(err)
        elif n < 0:
            msg = f"write_finish returned {n}"
        try:
            done(key, n, msg)
        except Exception as exc:  # never let an exception unwind into C
            sys.stderr.write(f"spicegtk_driver: write callback raised {exc!r}\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    base = {"ok": False, "host": args.host, "port": args.port}
    # A hard stop in case the main loop is wedged in C: the process must end on its own.
    hard = int(args.timeout + args.hold + args.settle + 10
               + (args.stream_seconds + args.drain_timeout if args.stream_seconds > 0 else 0))
    signal.signal(signal.SIGALRM, lambda *_: (_emit({**base, "error": "hard watchdog fired"}),
                                             os._exit(3)))
    signal.alarm(hard)
    os.environ.setdefault("GIO_USE_VFS", "local")       # no gvfs / D-Bus probing
    os.environ.setdefault("GSETTINGS_BACKEND", "memory")  # no dconf for proxy settings
    if args.debug:
        os.environ["SPICE_DEBUG"] = "1"
    try:
        import gi
        gi.require_version("SpiceClientGLib", "2.0")
        from gi.repository import Gio, GLib, GObject, SpiceClientGLib
    except Exception as exc:
        _emit({**base, "error": f"cannot import SpiceClientGLib: {exc!r}", "phase": "import"})
        return 2
    try:
        clib = CPort()
    except Exception as exc:
        _emit({**base, "error": f"cannot load libspice-client-glib via ctypes: {exc!r}",
               "phase": "import"})
        return 2
    if args.debug or args.trace_spice:
        SpiceClientGLib.util_set_debug(True)

    d = Driver(args, (SpiceClientGLib, GLib, GObject, Gio), clib)
    if args.trace_spice:
        levels = GLib.LogLevelFlags.LEVEL_DEBUG | GLib.LogLevelFlags.LEVEL_INFO | GLib.LogLevelFlags.LEVEL_MESSAGE
        if args.debug:
            def tee(domain, level, message, data):
                sys.stderr.write(f"{domain}: {message}\n")
                d.on_spice_log(domain, level, message, data)
            GLib.log_set_handler("GSpice", levels, tee, None)
        else:
            GLib.log_set_handler("GSpice", levels, d.on_spice_log, None)
    def on_signal(name):
        # SIGTERM/SIGINT while holding ends the hold (success stands); otherwise it is a failure
        if d.phase == "holding" and d.ok:
            d.events.append({"t": d.now(), "what": "note", "text": f"{name} ended the hold"})
            d.finish()
        else:
            d.fail(name)
        return False

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, on_signal, "SIGTERM")
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, on_signal, "SIGINT")
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGUSR1, d.stop_stream)
    try:
        d.start()
        if not d.finished:
            d.loop.run()
    except Exception as exc:
        d.error = d.error or f"driver exception: {exc!r}"
        d.ok = False
    rep = d.report()
    d.shutdown()
    rep["timings"]["total"] = d.now()
    _emit(rep)
    signal.alarm(0)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
