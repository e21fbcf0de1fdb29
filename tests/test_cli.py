"""``spicewire serve`` as a user runs it: a subprocess on loopback ports, stopped by a signal."""

from __future__ import annotations

import signal
import time
import socket
import subprocess
import sys

import pytest

from spicewire import cli
from spicewire.errors import LinkError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, LinkErr
from tests.rawclient import RawChannel, open_session


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_serves_sessions_and_stops_cleanly_on_a_signal(serve, signum):
    served = serve("--disable-ticketing")
    main, session_id = open_session(served.address)
    other, other_id = open_session(served.address)
    port = RawChannel(served.address, session_id, ChannelType.PORT, 0)
    assert port.expect(m.MsgPortInit).name == "org.test.echo"
    port.send(m.MsgcSpicevmcData(b"hello"))
    assert port.expect(m.MsgSpicevmcData).data == b"hello"
    assert {s["session_id"] for s in served.get("/sessions")["sessions"]} == {session_id, other_id}

    served.proc.send_signal(signum)
    assert served.proc.wait(timeout=5) == 0
    out = served.output()
    assert f"{signum.name}: stopping (2 sessions open)" in out
    assert f"session {session_id:08x} port 0 (org.test.echo)" in out  # logs name session and channel
    assert port.sock.recv(1) == b""  # the server closed the session's connections
    for channel in (main, other, port):
        channel.close()


def test_serve_with_a_password_refuses_a_wrong_one(serve):
    served = serve("--password", "right")
    main, _ = open_session(served.address, password="right")
    with pytest.raises(LinkError) as err:
        open_session(served.address, password="wrong")
    assert err.value.code == LinkErr.PERMISSION_DENIED
    assert served.get("/status")["config"]["ticketing"] is True
    main.close()


def test_serve_exits_1_when_the_address_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        argv = ["--listen", "127.0.0.1:%d" % taken.getsockname()[1], "--disable-ticketing"]
        result = subprocess.run(
            [sys.executable, "-m", "spicewire", "serve", *argv], capture_output=True, text=True, timeout=15
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr


def test_python_dash_m_reports_bad_arguments_with_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=15,
    )
    assert result.returncode == 2
    assert "one of the arguments --password --disable-ticketing is required" in result.stderr


SERVE = ["serve", "--listen", "127.0.0.1:0", "--disable-ticketing"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["serve", "--disable-ticketing"], "--listen"),
        (["serve", "--listen", "127.0.0.1:0"], "one of the arguments --password --disable-ticketing is required"),
        (["serve", "--listen", "127.0.0.1:0", "--password", "x", "--disable-ticketing"], "not allowed with argument"),
        (["serve", "--listen", "127.0.0.1", "--disable-ticketing"], "expected HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:65536", "--disable-ticketing"], "expected HOST:PORT"),
        ([*SERVE, "--port-channel", "p"], "expected NAME=DEVICE"),
        ([*SERVE, "--port-channel", "p=tape"], "unknown device 'tape'"),
        ([*SERVE, "--port-channel", "a/b=echo"], "contains '/'"),
        ([*SERVE, "--port-channel", "p=echo", "--port-channel", "p=sink"], "duplicate name p"),
        ([*SERVE, "--control-token", "t"], "--control-token needs --control"),
        ([*SERVE, "--control", "0.0.0.0:0"], "needs --control-token"),
        ([*SERVE, "--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)  # every one fails in parsing, before serve would monkey-patch this process
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("text, address", [("127.0.0.1:5900", ("127.0.0.1", 5900)), ("[::1]:0", ("::1", 0))])
def test_host_port(text, address):
    assert cli.host_port(text) == address


def test_importing_spicewire_does_not_monkey_patch():
    code = (
        "import spicewire.cli, spicewire.server.control, gevent.monkey; "
        "assert not gevent.monkey.is_module_patched('socket')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=15)


def test_serve_refuses_the_password_once_its_ticket_lifetime_is_over(serve):
    served = serve("--password", "right", "--ticket-lifetime", "1")
    main, _ = open_session(served.address, password="right")
    main.close()
    time.sleep(1.2)
    with pytest.raises(LinkError) as err:
        open_session(served.address, password="right")
    assert err.value.code == LinkErr.PERMISSION_DENIED
