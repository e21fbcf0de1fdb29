"""Run QEMU's spice-server as a SPICE peer (no guest OS, no disk, no display).

Usage::

    from tests.peers.qemu import QemuSpice, free_port
    with QemuSpice(ports=[SpicePort("org.test.echo", "virtio")]) as q:
        q.spice_port                # loopback TCP port spice-server listens on
        q.qmp_command("query-spice")  # -> the QMP "return" value (QMPError on "error")

``SpicePort(name, frontend)`` chooses what sits behind ``-chardev spiceport,name=NAME``:

* ``"virtio"`` - ``virtserialport`` on a ``virtio-serial-pci`` bus.  Without a guest driver nobody
  opens it: spice-gtk sees PORT_INIT(name, opened=0) and can never write.
* ``"isa"``    - ``isa-serial`` (a 16550A UART).  The serial device opens its chardev at realize,
  so the port is opened=1 immediately; with ``bios=echo_bios.build()`` the CPU echoes every byte.
* ``"qmp"``    - a QMP monitor (``-mon chardev=...,mode=control``): opened=1, and the port answers
  QMP JSON (greeting on open; replies to commands) - a request/response peer without a guest.
* ``"none"``   - no frontend at all.

Every QEMU is started under coreutils ``timeout`` (``lifetime`` seconds, then SIGKILL) so it ends
on its own even if a test leaks it; ``stop()`` / ``__exit__`` quit it through QMP and kill it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

QEMU_BINARY = "qemu-system-x86_64"


class QMPError(RuntimeError):
    """QMP answered ``{"error": ...}``; ``.error`` holds that object."""

    def __init__(self, command: str, error: dict):
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QemuStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class QMPClient:
    """Minimal QMP client over a unix socket: greeting, qmp_capabilities, commands, events."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.events: list[dict] = []
        self.greeting: dict | None = None
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._buf = b""
        # Events raised before we connected (e.g. SPICE_CONNECTED) can be queued ahead of the
        # greeting: keep them and read on until the {"QMP": ...} line.
        while True:
            msg = self._read_msg()
            if "QMP" in msg:
                self.greeting = msg
                break
            if "event" not in msg:
                raise QemuStartError(f"unexpected QMP greeting {msg!r}")
            self.events.append(msg)
        self.command("qmp_capabilities")

    def _read_msg(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("QMP read timed out")
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, **args):
        cid = f"sw-{next(self._ids)}"
        msg = {"execute": name, "id": cid}
        if args:
            msg["arguments"] = args
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            resp = self._read_msg()
            if "event" in resp:
                self.events.append(resp)
                continue
            if resp.get("id") != cid:
                continue
            if "error" in resp:
                raise QMPError(name, resp["error"])
            return resp.get("return")

    def poll_events(self, wait: float = 0.0) -> list[dict]:
        """Read events that arrived so far (waits up to ``wait`` seconds for the first one)."""
        self._sock.settimeout(max(wait, 0.001))
        try:
            while True:
                if b"\n" in self._buf:
                    m = self._read_msg()
                    if "event" in m:
                        self.events.append(m)
                    self._sock.settimeout(0.001)
                    continue
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                self._buf += chunk
        except (TimeoutError, BlockingIOError):
            # The socket ran dry: every event QEMU has sent so far is in self.events.
            return self.events
        finally:
            self._sock.settimeout(self.timeout)
        return self.events

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


@dataclass
class SpicePort:
    name: str = "org.test.echo"
    frontend: str = "virtio"  # virtio | isa | qmp | none


@dataclass
class QemuSpice:
    """A QEMU with spice-server on 127.0.0.1; use as a context manager."""

    ports: list[SpicePort] = field(default_factory=lambda: [SpicePort()])
    spice_port: int | None = None
    password: str | None = None
    plain: bool = True  # False: no plain port, spice-server listens on ``tls_port`` only
    x509_dir: str | None = None  # with it, a TLS port too (ca-cert.pem, server-cert.pem, server-key.pem)
    tls_port: int | None = None  # picked free when x509_dir is given and this is None
    bios: str | bytes | None = None  # path, or the image bytes (written to the temp dir)
    extra_args: list[str] = field(default_factory=list)
    spice_opts: str = ""  # appended to -spice
    lifetime: float = 300.0  # QEMU is SIGKILLed by `timeout` after this many seconds
    start_timeout: float = 20.0
    paused: bool = False  # -S: no CPU; the spice-server still answers
    incoming: bool = False  # wait for a migration, on a TCP port of its own (``incoming_port``)
    binary: str = QEMU_BINARY
    host: str = "127.0.0.1"

    proc: subprocess.Popen | None = field(default=None, init=False)
    tmpdir: str | None = field(default=None, init=False)
    qmp: QMPClient | None = field(default=None, init=False)
    argv: list[str] = field(default_factory=list, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    incoming_port: int | None = field(default=None, init=False)

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.tmpdir, "qmp.sock")

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmpdir, "qemu.log")

    def build_argv(self) -> list[str]:
        spice = f"port={self.spice_port},addr={self.host}" if self.plain else f"addr={self.host}"
        if self.x509_dir is not None:
            spice += f",tls-port={self.tls_port},x509-dir={self.x509_dir}"
        pre: list[str] = []
        if self.password is None:
            spice += ",disable-ticketing=on"
        else:
            pw_file = os.path.join(self.tmpdir, "spice.pw")
            with open(pw_file, "w") as f:
                f.write(self.password)
            pre += ["-object", f"secret,id=spicepw,file={pw_file}"]
            spice += ",password-secret=spicepw"
        if self.spice_opts:
            spice += "," + self.spice_opts.lstrip(",")
        argv = [self.binary, "-machine", "pc", "-accel", "tcg", "-nodefaults", "-no-user-config",
                "-display", "none", "-vga", "none", "-m", "16", "-spice", spice,
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *pre]
        if self.paused:
            argv.append("-S")
        if self.bios is not None:
            path = self.bios
            if isinstance(path, (bytes, bytearray)):
                path = os.path.join(self.tmpdir, "bios.bin")
                with open(path, "wb") as f:
                    f.write(self.bios)
            argv += ["-bios", path]
        if self.incoming:
            argv += ["-incoming", f"tcp:{self.host}:{self.incoming_port}"]
        if any(p.frontend == "virtio" for p in self.ports):
            argv += ["-device", "virtio-serial-pci,id=vser0"]
        isa_index = 0
        for i, p in enumerate(self.ports):
            cid = f"spport{i}"
            argv += ["-chardev", f"spiceport,id={cid},name={p.name}"]
            if p.frontend == "virtio":
                argv += ["-device", f"virtserialport,bus=vser0.0,chardev={cid},name={p.name}"]
            elif p.frontend == "isa":
                argv += ["-device", f"isa-serial,chardev={cid},index={isa_index}"]
                isa_index += 1
            elif p.frontend == "qmp":
                argv += ["-mon", f"chardev={cid},mode=control"]
            elif p.frontend != "none":
                raise ValueError(f"unknown frontend {p.frontend!r}")
        return argv + list(self.extra_args)

    def start(self) -> QemuSpice:
        if shutil.which(self.binary) is None:
            raise QemuStartError(f"{self.binary} not found")
        # Neither spice-server nor -incoming can listen on port 0 and say where; a port found free
        # can be taken by another process before QEMU binds it, so a lost race picks again.
        pick_spice = self.spice_port is None and self.plain
        pick_tls = self.tls_port is None and self.x509_dir is not None
        tries = 3
        while True:
            if pick_spice:
                self.spice_port = free_port(self.host)
            if pick_tls:
                self.tls_port = free_port(self.host)
            if self.incoming:
                self.incoming_port = free_port(self.host)
            try:
                return self._start()
            except QemuStartError as exc:
                lost = (pick_spice and f"binding socket to {self.host}:{self.spice_port} failed" in str(exc)) or (
                    pick_tls and f"binding socket to {self.host}:{self.tls_port} failed" in str(exc)) or (
                    self.incoming and f"tcp:{self.host}:{self.incoming_port}: Failed to find an available port"
                    in str(exc))
                tries -= 1
                if tries == 0 or not lost:
                    raise
                self.cleanup()

    def _start(self) -> QemuSpice:
        self.tmpdir = tempfile.mkdtemp(prefix="sw-qemu-")
        self.argv = self.build_argv()
        cmd = ["timeout", "--signal=KILL", str(int(self.lifetime)), *self.argv]
        t0 = time.monotonic()
        self._log = open(self.log_path, "wb")  # noqa: SIM115  QEMU writes it until stop() closes it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # QEMU sets up SPICE before it accepts QMP, so a working QMP + query-spice means the
            # SPICE port listens; no probe connection (it would show up as SPICE_CONNECTED and a
            # spice-server "incomplete link header" warning).
            deadline = time.monotonic() + self.start_timeout
            while True:
                if self.proc.poll() is not None:
                    raise QemuStartError(f"QEMU exited with {self.proc.returncode}")
                if os.path.exists(self.qmp_path):
                    # QEMU creates the socket file before it listens: refused means "not yet", so
                    # try again until the deadline.
                    with contextlib.suppress(ConnectionError, FileNotFoundError):
                        self.qmp = QMPClient(self.qmp_path)
                        break
                if time.monotonic() > deadline:
                    raise QemuStartError("QMP socket did not come up")
                time.sleep(0.02)
            info = self.qmp.command("query-spice")
            listening = (int(info.get("port", -1)) == self.spice_port if self.plain else "port" not in info) and (
                self.x509_dir is None or int(info.get("tls-port", -1)) == self.tls_port)
            if not info.get("enabled") or not listening:
                raise QemuStartError(f"query-spice: {info!r}")
        except Exception as exc:
            self.stop()
            raise QemuStartError(f"{exc}; argv={self.argv}; log={self.log()!r}") from exc
        self.startup_seconds = time.monotonic() - t0
        return self

    def qmp_command(self, name: str, **args):
        if self.qmp is None:
            raise QemuStartError("QEMU not running")
        return self.qmp.command(name, **args)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp._sock.settimeout(1.0)
                self.qmp.command("quit")
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            # `timeout` and QEMU share a new session/process group: make sure nothing lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        if self.tmpdir and os.path.isdir(self.tmpdir):
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> QemuSpice:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()
