"""``spicewire serve`` as a subprocess, for tests that need it in a process of its own (real peers
driven with blocking subprocess calls, CLI behaviour, migration between two servers)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gevent
import pytest

TOKEN = "cli-token"
ECHO = ("--port-channel", "org.test.echo=echo")
# What serve logs (INFO, its default level) once each listener is bound: with port 0 asked for,
# the only place to learn the port the kernel gave it.
SPICE_LISTENING = re.compile(r"serving SPICE on ([\d.]+):(\d+)")
CONTROL_LISTENING = re.compile(r"control API on http://([\d.]+):(\d+)")
TLS_LISTENING = re.compile(r"serving SPICE over TLS on ([\d.]+):(\d+)")
_logs = itertools.count()


def bound_addresses(proc: subprocess.Popen, log, timeout: float = 15.0,
                    listening: re.Pattern = SPICE_LISTENING) -> tuple[tuple[str, int], tuple[str, int]]:
    """The SPICE and control addresses a ``serve --listen H:0 --control H:0`` logged, once both
    are bound; fails with the log if serve exits or says nothing within ``timeout``. With
    ``listening=TLS_LISTENING``, the TLS listener's address instead of the plain one's."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        spice, control = listening.search(text), CONTROL_LISTENING.search(text)
        if spice and control:
            return (spice[1], int(spice[2])), (control[1], int(control[2]))
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=5)
            pytest.fail(f"serve did not log both listening addresses within {timeout} s:\n{text}")
        gevent.sleep(0.05)  # in a gevent test, in-process servers keep running meanwhile


class Served:
    """A ``spicewire serve`` subprocess with its SPICE and control addresses."""

    def __init__(self, tmp_path, *extra: str, plain: bool = True) -> None:
        """``extra`` arguments go to serve; without a --port-channel among them, org.test.echo=echo.
        ``plain=False`` leaves --listen out (a TLS-only server: ``address`` is then its TLS one)."""
        self.log = tmp_path / f"serve-{next(_logs)}.log"  # one each: a test may start several
        argv = [
            sys.executable, "-m", "spicewire", "serve", *(("--listen", "127.0.0.1:0") if plain else ()),
            "--control", "127.0.0.1:0", "--control-token", TOKEN,
            *(extra if any(a == "--port-channel" for a in extra) else (*ECHO, *extra)),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.address, self.control = bound_addresses(self.proc, self.log,
                                                     listening=SPICE_LISTENING if plain else TLS_LISTENING)
        tls = TLS_LISTENING.search(self.output())  # logged before the control API's line
        self.tls_address = (tls[1], int(tls[2])) if tls else None
        self._wait_until_up()

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 5) -> dict:
        request = urllib.request.Request(
            "http://{}:{}{}".format(*self.control, path), method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def output(self) -> str:
        return self.log.read_text()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                self.get("/status")
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"serve did not come up within 15 s:\n{self.output()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def serve(tmp_path):
    """serve(*args) starts a ``spicewire serve``; every one started is killed at the end."""
    started = []

    def start(*extra: str, plain: bool = True) -> Served:
        started.append(Served(tmp_path, *extra, plain=plain))
        return started[-1]

    yield start
    for served in started:
        served.stop()
