"""``python -m spicewire.demo`` and ``spicewire demo`` refuse the same options with the same words,
and the demo's (and the benchmarks') way of starting a ``spicewire serve``: up once its control API
answers, a failure once the process ended or the time ran out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spicewire import cli, demo
from spicewire.control.client import ControlClient


def refusal(main, argv: list[str], capsys) -> str:
    """What ``main(argv)`` said when it refused its options (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()[-1].split("error: ", 1)[1]


@pytest.mark.parametrize("argv", [
    ["--mib", "-1"], ["--mib", "0"], ["--mib", "1.5"],
    ["--modes", "seamless,bogus"], ["--modes", ""],
    ["--viewer", "--rounds", "0"], ["--viewer", "--interval", "0"], ["--viewer", "--interval", "inf"],
])
def test_the_demo_module_refuses_what_the_demo_command_refuses(argv, capsys):
    said = refusal(demo.main, argv, capsys)
    assert said == refusal(cli.main, ["demo", *argv], capsys)


def test_a_serve_that_exited_is_not_serving():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        assert not demo.serving(proc, ControlClient("127.0.0.1", demo.free_port(), timeout=1))
        assert proc.poll() is not None  # it was the end of the process, not the time, that said so
    finally:
        proc.wait()


def test_a_serve_whose_control_api_never_answers_is_not_serving():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not demo.serving(proc, ControlClient("127.0.0.1", demo.free_port(), timeout=1), timeout=0.2)
        assert proc.poll() is None  # it was the time that ran out
    finally:
        proc.kill()
        proc.wait()


def test_a_serve_that_came_up_answers_its_control_api():
    server = demo.Server("s", 1)
    try:
        assert demo.serving(server.proc, server.control)
        assert server.control.get_json("/status")["sessions"] == 0
    finally:
        server.stop()
