"""The README's "Use" section, run as written, and ``spicewire demo``.

The section's ```sh blocks each start with a ``# terminal N`` line. Every command in them runs here
as its own process, as a reader would type it, with one change: each port of the section (5900,
5901, 5800, 5801) becomes a free port, the same one everywhere it appears, since those well-known
ports may be taken on the machine running the tests. ``remote-viewer`` lines are left out:
remote-viewer needs a display, and is not installed where the tests run.

What a reader does and this test does too: start s1 and s2 (the ``serve`` blocks; each runs until
it is stopped), start the client (it waits to be migrated), then run ``migrate``; read the JSON that
``migrate`` and ``connect`` print. The test waits for each server's control API and for the client's
session on s1 before going on, where a reader would look at the terminals.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from spicewire.demo import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent  # the venv's `spicewire` console script
ADDRESS = re.compile(r"127\.0\.0\.1:(\d+)")


def use_section() -> str:
    text = README.read_text()
    start = text.index("\n## Use\n")
    end = text.index("\n### ", start)  # its subsections (TLS, the client library...) are not the walk-through
    return text[start:end]


def terminal_blocks(section: str) -> dict[int, list[str]]:
    """``{terminal number: [command, ...]}``, continuation lines joined, remote-viewer left out."""
    blocks: dict[int, list[str]] = {}
    for body in re.findall(r"```sh\n(.*?)```", section, re.S):
        first, _, rest = body.partition("\n")
        heading = re.fullmatch(r"# terminal (\d+)\b.*", first)
        assert heading, f"a ```sh block in README's Use section must start with '# terminal N': {first!r}"
        commands = [line.strip() for line in rest.replace("\\\n", " ").splitlines()]
        blocks[int(heading[1])] = [c for c in commands if c and not c.startswith(("#", "remote-viewer"))]
    return blocks


def get_json(address: str, path: str) -> dict:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as answer:
        return json.load(answer)


def wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Polls ``ready`` (a control API answer) until it holds; fails at once if ``proc`` has died."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what}: {shlex.join(proc.args)} exited with {proc.returncode}"
        try:
            done = ready()
        except OSError:  # not listening yet: what we are waiting for
            done = False
        if done:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stderr_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """The next line ``proc`` writes to stderr (a binary pipe), or a failure after ``timeout``."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.stderr], [], [], left)[0], f"no line from {shlex.join(proc.args)}"
        byte = os.read(proc.stderr.fileno(), 1)  # one at a time: nothing read past the line is lost
        assert byte, f"{shlex.join(proc.args)} closed stderr after {line!r}"
        line += byte
    return line.decode()


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Every process the test starts; whatever is still running at the end is stopped."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_readme_use_runs_as_written(processes: list[subprocess.Popen], tmp_path: Path) -> None:
    section = use_section()
    ports = {port: free_port() for port in sorted(set(ADDRESS.findall(section)))}
    assert set(ports) == {"5800", "5801", "5900", "5901"}, f"the test maps these ports: {sorted(ports)}"
    blocks = terminal_blocks(ADDRESS.sub(lambda m: f"127.0.0.1:{ports[m[1]]}", section))
    assert sorted(blocks) == [1, 2, 3, 4], f"terminals in README's Use section: {sorted(blocks)}"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("SPICEWIRE_PURE", None)

    def start(command: str, log: Path) -> subprocess.Popen:
        # A server's log goes to a file: nobody reads a pipe while it runs, and a full one would stop it.
        with log.open("w") as out:
            proc = subprocess.Popen(shlex.split(command), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        processes.append(proc)
        return proc

    # Terminals 1 and 2: s1 and s2, each a server that runs until it is stopped.
    servers = []
    for terminal in (1, 2):
        [command] = blocks[terminal]
        assert command.startswith("spicewire serve "), command
        server = start(command, log=tmp_path / f"terminal{terminal}.log")
        control = option(shlex.split(command), "--control")
        wait_until(lambda control=control: "listen" in get_json(control, "/status"), f"terminal {terminal}", server)
        servers.append((server, control))
    (s1, s1_control), (s2, s2_control) = servers

    # Terminal 3: the client. Its JSON report comes at the end; on stderr it says when its first
    # transfer is done and it waits to be migrated, which is when the README's reader goes on.
    [command] = blocks[3]
    assert command.startswith("spicewire connect "), command
    client = subprocess.Popen(shlex.split(command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    processes.append(client)
    assert "waiting up to 600 s for the session to be migrated" in stderr_line(client)
    assert len(get_json(s1_control, "/sessions")["sessions"]) == 1

    # Terminal 4: the migration, which ends on its own.
    [command] = blocks[4]
    assert command.startswith("spicewire migrate "), command
    done = subprocess.run(shlex.split(command), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"migrate: {done.stdout}{done.stderr}"
    report = json.loads(done.stdout)
    assert report["migrated"] == 1 and report["lost"] == 0 and report["rolled_back"] == 0, report
    [session] = report["sessions"]
    assert session["migrated"] and session["mode"] == "seamless", session

    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, f"connect: {out!r} {err!r}"
    echo = json.loads(out)
    sent = 64 << 20
    assert echo["ok"] and echo["bytes_sent"] == echo["bytes_received"] == sent, echo
    assert echo["sha256_received"] == echo["sha256_sent"], echo
    assert echo["session_id"] == session["session_id"]
    assert echo["migration"]["result"] == "completed", echo["migration"]
    after = echo["after_migration"]
    assert after["server"] == option(shlex.split(blocks[4][0]), "--to"), after
    assert after["bytes_received"] == sent and after["sha256_received"] == after["sha256_sent"], after
    wait_until(lambda: get_json(s2_control, "/sessions")["sessions"] == [], "the client's session to end on s2", s2)

    # The servers stop as the README says (Ctrl-C), cleanly.
    for terminal, server in ((1, s1), (2, s2)):
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
        assert server.returncode == 0, (tmp_path / f"terminal{terminal}.log").read_text()


def test_spicewire_demo_runs_from_the_installed_command() -> None:
    done = subprocess.run([BIN / "spicewire", "demo", "--mib", "2"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}"
    results = json.loads(done.stdout[done.stdout.rindex("\n[") :])
    assert [r["mode"] for r in results] == ["seamless", "semi-seamless"]
    seamless, semi = results
    assert seamless["intact"] and seamless["sink_received_bytes"] == 2 << 20
    assert semi["dropped_bytes"] + semi["sink_received_bytes"] == 2 << 20
