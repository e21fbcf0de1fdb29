"""``spicewire serve`` as a subprocess, for tests that need it in a process of its own (real peers
driven with blocking subprocess calls, CLI behaviour, migration between two servers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

TOKEN = "cli-token"
ECHO = ("--port-channel", "org.test.echo=echo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A ``spicewire serve`` subprocess with its SPICE and control addresses."""

    def __init__(self, tmp_path, *extra: str) -> None:
        """``extra`` arguments go to serve; without a --port-channel among them, org.test.echo=echo."""
        self.address = ("127.0.0.1", free_port())
        self.control = ("127.0.0.1", free_port())
        self.log = tmp_path / f"serve-{self.address[1]}.log"  # one each: a test may start several
        argv = [
            sys.executable, "-m", "spicewire", "serve", "--listen", "%s:%d" % self.address,
            "--control", "%s:%d" % self.control, "--control-token", TOKEN,
            *(extra if any(a == "--port-channel" for a in extra) else (*ECHO, *extra)),
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_up()

    def get(self, path: str) -> dict:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 5) -> dict:
        request = urllib.request.Request(
            "http://%s:%d%s" % (*self.control, path), method=method,
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

    def start(*extra: str) -> Served:
        started.append(Served(tmp_path, *extra))
        return started[-1]

    yield start
    for served in started:
        served.stop()
