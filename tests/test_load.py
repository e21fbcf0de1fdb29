"""Load: 200 concurrent raw clients, each linking main + an echo port and echoing 1 MiB, against
one server running as its own process (``python -m spicewire serve``), as in production: the
clients (gevent greenlets here) and the server do not share an event loop or a GIL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from tests.serverkit import ECHO, MainSession, echo_roundtrip, sha256

CLIENTS = 200
PAYLOAD = 1 << 20
STEP_TIMEOUT = 60.0  # per link / per round trip under load; the whole test has its own bound
TEST_TIMEOUT = 120.0

_LISTENING = re.compile(rb"serving SPICE on ([\d.]+):(\d+)")


def _start_server(log_path: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
    with open(log_path, "wb") as log:  # a file, not a pipe: nobody has to drain 400 links' logs
        proc = subprocess.Popen(
            [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", "--disable-ticketing",
             "--port-channel", "org.spicewire.echo=echo", "--log-level", "INFO"],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_bytes())
        if match:
            return proc, (match[1].decode(), int(match[2]))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(5)
    raise AssertionError(f"server did not start:\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def server_process(tmp_path):
    log_path = tmp_path / "server.log"
    proc, address = _start_server(log_path)
    try:
        yield address, proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _one_client(address, payload: bytes, expected: str) -> float:
    started = time.monotonic()
    with MainSession(address, timeout=STEP_TIMEOUT) as session:
        channels = session.attach_channels(STEP_TIMEOUT)
        assert any(c.id == ECHO for c in channels)
        echo = session.open_port(ECHO, timeout=STEP_TIMEOUT)
        back = echo_roundtrip(echo, payload, timeout=STEP_TIMEOUT)
        assert len(back) == len(payload)
        assert sha256(back) == expected
    return time.monotonic() - started


def test_200_clients_echo_1mib_each(server_process, capsys):
    address, proc, log_path = server_process
    # A different payload per client, so crossed streams could not pass the check.
    payloads = [os.urandom(PAYLOAD) for _ in range(CLIENTS)]
    expected = [sha256(p) for p in payloads]

    started = time.monotonic()
    with gevent.Timeout(TEST_TIMEOUT):
        greenlets = [gevent.spawn(_one_client, address, p, e) for p, e in zip(payloads, expected, strict=True)]
        gevent.joinall(greenlets, raise_error=False)
    elapsed = time.monotonic() - started

    failures = [g.exception for g in greenlets if not g.successful()]
    assert not failures, f"{len(failures)} of {CLIENTS} clients failed; first: {failures[0]!r}"
    per_client = sorted(g.value for g in greenlets)
    assert proc.poll() is None, "the server process died"
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    # The one expected WARNING is serve's own at start: this test runs without a password.
    problems = [line for line in log.splitlines() if (" WARNING " in line or " ERROR " in line)
                and "TICKETING IS DISABLED" not in line]
    assert not problems, "\n".join(problems[:20])
    with capsys.disabled():
        print(
            f"\n{CLIENTS} clients x {PAYLOAD >> 20} MiB echoed in {elapsed:.2f} s "
            f"({2 * CLIENTS * PAYLOAD / elapsed / 1e6:.0f} MB/s both ways); per client "
            f"median {per_client[len(per_client) // 2]:.2f} s, max {per_client[-1]:.2f} s"
        )
