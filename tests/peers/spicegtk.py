"""Run ``spicegtk_driver.py`` (spice-gtk client) from the project venv and parse its report.

    from tests.peers.spicegtk import run_driver, start_driver
    rep = run_driver(port, port_name="org.test.echo", send_bytes=4096, expect_echo=True)
    rep["ok"], rep["error"], rep["linked_channels"], rep["bytes_received"], rep["timings"] ...

    proc = start_driver(port, hold=30)     # background (e.g. while a test migrates the server)
    rep = proc.report()                      # waits for the driver to end, returns the report

    # streaming echo for migration tests: writes for up to 30 s, checks every echoed byte
    proc = start_driver(port, port_name="org.test.echo", expect_echo=True, stream_seconds=30)
    proc.stop_stream()                       # SIGUSR1: stop writing now, wait for the echo
    rep = proc.report()                      # rep["stream"]: epochs, bytes, mismatch, gaps

The report is the driver's single JSON stdout line plus ``returncode`` and ``stderr`` (spice-gtk
warnings go there).  Pass ``debug=True`` for SPICE_DEBUG output on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from . import DRIVER, SYSTEM_PYTHON


def driver_argv(port: int | None, host: str = "127.0.0.1", password: str | None = None,
                port_name: str | None = None, send_bytes: int = 0, expect_echo: bool = False,
                timeout: float = 20.0, hold: float = 0.0, wait_opened: bool = False,
                no_port: bool = False, main_only: bool = False, chunk_size: int | None = None,
                debug: bool = False, stream_seconds: float = 0.0, stream_rate: float = 0.0,
                max_inflight: int | None = None, drain_timeout: float | None = None,
                resync: bool = False, trace_spice: bool = False, tls_port: int | None = None,
                ca_file: str | None = None, cert_subject: str | None = None, secure_channels: str | None = None,
                extra: list[str] | None = None) -> list[str]:
    """``port`` None: no plain port (a TLS-only server, ``tls_port``)."""
    argv = [SYSTEM_PYTHON, DRIVER, "--host", host, "--timeout", str(timeout)]
    if port is not None:
        argv += ["--port", str(port)]
    for option, value in (("--tls-port", tls_port), ("--ca-file", ca_file), ("--cert-subject", cert_subject),
                          ("--secure-channels", secure_channels)):
        if value is not None:
            argv += [option, str(value)]
    if password is not None:
        argv += ["--password", password]
    if port_name is not None:
        argv += ["--port-name", port_name]
    if send_bytes:
        argv += ["--send-bytes", str(send_bytes)]
    if expect_echo:
        argv.append("--expect-echo")
    if hold:
        argv += ["--hold", str(hold)]
    if wait_opened:
        argv.append("--wait-opened")
    if no_port:
        argv.append("--no-port")
    if main_only:
        argv.append("--main-only")
    if chunk_size:
        argv += ["--chunk-size", str(chunk_size)]
    if debug:
        argv.append("--debug")
    if stream_seconds:
        argv += ["--stream-seconds", str(stream_seconds)]
    if stream_rate:
        argv += ["--stream-rate", str(stream_rate)]
    if max_inflight:
        argv += ["--max-inflight", str(max_inflight)]
    if drain_timeout is not None:
        argv += ["--drain-timeout", str(drain_timeout)]
    if resync:
        argv.append("--resync")
    if trace_spice:
        argv.append("--trace-spice")
    return argv + list(extra or [])


def tcp_peers(pid: int) -> list[tuple[str, int]]:
    """Remote (host, port) of each ESTABLISHED IPv4 TCP socket of process ``pid``, sorted: its
    socket inodes from /proc/PID/fd matched against /proc/PID/net/tcp (no psutil, no ss)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/tcp") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return []
    peers = []
    for row in rows:
        fields = row.split()
        if fields[3] != "01" or fields[9] not in inodes:  # 01: TCP_ESTABLISHED
            continue
        addr, port = fields[2].split(":")
        host = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))  # little-endian u32
        peers.append((host, int(port, 16)))
    return sorted(peers)


def _parse(stdout: str, stderr: str, rc: int) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"driver printed no report (rc={rc})", "returncode": rc,
                "stderr": stderr, "stdout": stdout}
    rep = json.loads(lines[-1])
    rep["returncode"] = rc
    rep["stderr"] = stderr
    return rep


def _env() -> dict:
    env = dict(os.environ)
    # the venv's variables must not leak into Debian's python
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


def _wall(kw: dict) -> float:
    """How long the driver may take at most (its own limits plus a margin)."""
    stream = kw.get("stream_seconds", 0.0)
    if stream:
        stream += kw.get("drain_timeout") or 15.0
    return kw.get("timeout", 20.0) + kw.get("hold", 0.0) + stream + 30


def run_driver(port: int | None, **kw) -> dict:
    """Run the driver to completion; returns its report dict (never raises on peer failure)."""
    timeout = _wall(kw)
    argv = driver_argv(port, **kw)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, env=_env())
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"driver did not exit within {timeout}s",
                "returncode": None, "stderr": str(exc.stderr or "")}
    return _parse(r.stdout, r.stderr, r.returncode)


class DriverProcess:
    """A driver running in the background (``start_driver``)."""

    def __init__(self, argv: list[str], wall: float):
        self.argv = argv
        self.wall = wall
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True, env=_env(),
                                     start_new_session=True)

    def report(self) -> dict:
        try:
            out, err = self.proc.communicate(timeout=self.wall)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            rep = _parse(out, err, self.proc.returncode)
            rep["ok"] = False
            rep["error"] = f"driver did not exit within {self.wall}s"
            return rep
        return _parse(out, err, self.proc.returncode)

    def last_words(self, events: int = 30) -> str:
        """SIGTERM, then what the driver was doing, for a failure message: its phase, the stream's
        epochs and write state, its error and last ``events`` events (a flake names its cause)."""
        self.terminate()
        rep = self.report()
        keep = ("error", "phase", "port_inits", "port_opened", "writer", "peers", "returncode")
        summary = {k: rep.get(k) for k in keep}
        if "stream" in rep:
            summary["epochs"] = rep["stream"].get("epochs")
        summary["events"] = rep.get("events", [])[-events:]
        summary["stderr"] = (rep.get("stderr") or "")[-2000:]
        return json.dumps(summary, default=str)

    def connections(self) -> list[tuple[str, int]]:
        """Remote (host, port) of every established TCP connection the driver has now."""
        return tcp_peers(self.proc.pid)

    def stop_stream(self) -> None:
        """SIGUSR1: a streaming driver stops writing and waits for the rest of the echo."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def terminate(self) -> None:
        """SIGTERM: the driver stops its loop and still prints its report."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        self.proc.wait(timeout=10)


def start_driver(port: int | None, **kw) -> DriverProcess:
    return DriverProcess(driver_argv(port, **kw), _wall(kw))


DISPLAY_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spicegtk_display_driver.py")


class DisplayDriverError(AssertionError):
    """The display driver answered a command with ``ok`` false, died, or said nothing in time."""


class DisplayDriver:
    """``spicegtk_display_driver.py`` (spice-gtk's display, inputs and cursor channels) in the
    background, one JSON command at a time (the driver's docstring lists them).

        with DisplayDriver(port, tmp_path) as drv:
            drv.ready()
            picture = drv.picture()            # (h, w, 4) uint8, B, G, R, X: spice-gtk's primary
            drv.keys([0x1E]); drv.motion([(1, 0)] * 1000)
            drv.state()["primary_surface_creates"]

    Pipes are gevent's, so a test with in-process servers keeps them running while it waits.
    spice-gtk's debug output goes to ``<tmp>/spicegtk-display-N.log`` (``log()``).
    """

    _count = 0

    def __init__(self, port: int, tmp_path, host: str = "127.0.0.1", lifetime: float = 300.0) -> None:
        from gevent import subprocess as gsubprocess

        DisplayDriver._count += 1
        self.tmp = tmp_path
        self.log_path = tmp_path / f"spicegtk-display-{DisplayDriver._count}.log"
        self.dumps = 0
        argv = [SYSTEM_PYTHON, DISPLAY_DRIVER, "--host", host, "--port", str(port), "--timeout", str(lifetime)]
        with open(self.log_path, "wb") as log:
            self.proc = gsubprocess.Popen(argv, stdin=gsubprocess.PIPE, stdout=gsubprocess.PIPE, stderr=log,
                                          env=_env(), start_new_session=True)

    def command(self, cmd: str, timeout: float = 30.0, check: bool = True, **fields) -> dict:
        import gevent

        line = json.dumps({"cmd": cmd, **fields}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise DisplayDriverError(f"the driver is gone (rc={self.proc.poll()}): {self.log()[-2000:]}") from None
        with gevent.Timeout(timeout, DisplayDriverError(f"no answer to {cmd} within {timeout} s")):
            while True:
                raw = self.proc.stdout.readline()
                if not raw:
                    raise DisplayDriverError(f"the driver ended during {cmd} (rc={self.proc.wait()}): "
                                             f"{self.log()[-2000:]}")
                reply = json.loads(raw)
                if reply.get("cmd") is None and not reply.get("ok"):
                    raise DisplayDriverError(f"the driver failed: {reply.get('error')}")
                if reply.get("cmd") == cmd:
                    break
        if check and not reply.get("ok"):
            raise DisplayDriverError(f"{cmd}: {reply.get('error')}; state {reply.get('state')}")
        return reply

    def ready(self, timeout: float = 20.0) -> dict:
        return self.command("ready", timeout=timeout + 5, within=timeout)["state"]

    def state(self) -> dict:
        return self.command("state")["state"]

    def picture(self):
        """spice-gtk's primary surface now, as an (h, w, 4) uint8 array (rows without padding)."""
        import numpy as np

        self.dumps += 1
        path = self.tmp / f"primary-{DisplayDriver._count}-{self.dumps % 2}.raw"
        reply = self.command("dump", path=str(path))
        data = np.fromfile(path, dtype=np.uint8)
        rows = data.reshape(reply["height"], reply["stride"])
        return rows[:, : reply["width"] * 4].reshape(reply["height"], reply["width"], 4)

    def keys(self, codes) -> dict:
        return self.command("keys", codes=[int(c) for c in codes])

    def motion(self, steps, buttons: int = 0, interval_ms: int = 0, timeout: float = 60.0) -> dict:
        return self.command("motion", timeout=timeout, steps=[[int(dx), int(dy)] for dx, dy in steps], buttons=buttons,
                            interval_ms=interval_ms)

    def position(self, points, buttons: int = 0, interval_ms: int = 0, timeout: float = 60.0) -> dict:
        return self.command("position", timeout=timeout, points=[[int(x), int(y)] for x, y in points],
                            buttons=buttons, interval_ms=interval_ms)

    def button(self, action: str, button: int, buttons: int) -> dict:
        return self.command("button", action=action, button=button, buttons=buttons)

    def quit(self) -> dict:
        reply = self.command("quit", check=False)
        self.proc.wait(timeout=10)
        return reply

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            pipe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
