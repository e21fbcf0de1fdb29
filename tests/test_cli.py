"""``spicewire serve`` as a user runs it: a subprocess on loopback ports, stopped by a signal."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest

from spicewire import cli
from spicewire.addresses import UnixAddress
from spicewire.client import ClientSession
from spicewire.demo import free_port
from spicewire.errors import LinkError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, LinkErr
from tests.rawclient import RawChannel, open_session
from tests.served import TOKEN
from tests.serverkit import wait_until


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_serves_sessions_and_stops_cleanly_on_a_signal(serve, signum):
    served = serve("--disable-ticketing")
    main, session_id = open_session(served.address)
    other, other_id = open_session(served.address)
    port = RawChannel(served.address, session_id, ChannelType.PORT, 0)
    assert port.expect(m.MsgPortInit).name == "org.test.echo"
    port.send(m.MsgcSpicevmcData(b"hello"))
    assert port.expect(m.MsgSpicevmcData).data == b"hello"
    assert {s["session_id"] for s in served.get("/sessions")["sessions"]} == {f"{session_id:08x}", f"{other_id:08x}"}

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
        argv = ["--listen", f"127.0.0.1:{taken.getsockname()[1]}", "--disable-ticketing"]
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
    assert "serve needs --password, --password-file, $SPICEWIRE_PASSWORD or --disable-ticketing" in result.stderr


SERVE = ["serve", "--listen", "127.0.0.1:0", "--disable-ticketing"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["serve", "--disable-ticketing"], "--listen"),
        (["serve", "--listen", "127.0.0.1:0"], "serve needs --password, --password-file, $SPICEWIRE_PASSWORD or"),
        (["serve", "--listen", "127.0.0.1:0", "--password", "x", "--disable-ticketing"], "not allowed with argument"),
        (["serve", "--listen", "127.0.0.1", "--disable-ticketing"], "expected HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:65536", "--disable-ticketing"], "expected HOST:PORT"),
        ([*SERVE, "--port-channel", "p"], "expected NAME=DEVICE"),
        ([*SERVE, "--port-channel", "p=tape"], "unknown device 'tape'"),
        ([*SERVE, "--port-channel", "a/b=echo"], "contains '/'"),
        ([*SERVE, "--port-channel", "p=echo", "--port-channel", "p=sink"], "duplicate name p"),
        ([*SERVE, "--control-token", "t"], "--control-token needs --control"),
        ([*SERVE, "--control", "0.0.0.0:0"], "needs --control-token"),
        ([*SERVE, "--control", "unix:"], "expected unix:PATH with a path"),
        ([*SERVE, "--control", "127.0.0.1:0", "--control-token", "t", "--control-token-file", "f"],
         "not allowed with argument"),
        (["migrate", "--control", "unix:", "--to", "127.0.0.1:5901", "--to-control", "127.0.0.1:5801"],
         "argument --control: expected unix:PATH with a path"),
        ([*SERVE, "--log-level", "loud"], "--log-level"),
        ([*SERVE, "--port-buffer-mib", "0"], "--port-buffer-mib: expected a finite number above 0, got '0'"),
        ([*SERVE, "--port-buffer-mib", "-1"], "--port-buffer-mib: expected a finite number above 0, got '-1'"),
        ([*SERVE, "--port-buffer-mib", "nan"], "--port-buffer-mib: expected a finite number above 0"),
        ([*SERVE, "--port-buffer-mib", "lots"], "--port-buffer-mib: expected a number, got 'lots'"),
        ([*SERVE, "--port-buffer-mib", "1e-9"], "--port-buffer-mib: expected at least one byte"),
        (["serve", "--listen", "[::1]", "--disable-ticketing"], "expected HOST:PORT"),
        (["connect", "127.0.0.1:0", "--port-channel", "p"], "port 1-65535"),
        (["connect", "127.0.0.1:70000", "--port-channel", "p"], "port 1-65535"),
        (["connect", "::1:5900", "--port-channel", "p"], "put an IPv6 address in brackets"),
        (["connect", "127.0.0.1:5900", "--port-channel", "p", "--send-mib", "-2"], "--send-mib: expected a finite"),
        (["connect", "127.0.0.1:5900", "--port-channel", "p", "--timeout", "0"], "--timeout: expected a finite"),
        (["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:70000", "--to-control", "127.0.0.1:5801"],
         "argument --to: expected HOST:PORT"),
        (["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:5901", "--to-control", "127.0.0.1:5801",
          "--timeout", "-1"], "--timeout: expected a finite number above 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)  # every one fails in parsing, before serve would monkey-patch this process
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("error:") == 1 and err.endswith("\n") and len(err.splitlines()[-1]) < 200


def test_listen_addresses_take_port_0_and_peer_addresses_do_not():
    assert cli.listen_address("[::1]:0") == ("::1", 0)
    assert cli.peer_address("127.0.0.1:5900") == ("127.0.0.1", 5900)
    with pytest.raises(argparse.ArgumentTypeError, match="port 1-65535"):
        cli.peer_address("127.0.0.1:0")


def test_control_addresses_are_host_port_or_a_unix_socket():
    assert cli.control_listen_address("unix:/run/s1.sock") == UnixAddress("/run/s1.sock")
    assert str(cli.control_address("unix:/run/s1.sock")) == "unix:/run/s1.sock"
    assert cli.control_listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"port 1-65535.*\(or unix:PATH\)"):
        cli.control_address("127.0.0.1:0")


def test_importing_spicewire_does_not_monkey_patch():
    code = (
        "import spicewire.cli, spicewire.control.server, gevent.monkey; "
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


# --- connect and migrate, as commands -------------------------------------------------------------

COMMAND_TIMEOUT = 60


def spicewire(*argv: str) -> tuple[int, dict | str, str]:
    """Run ``python -m spicewire ARGV`` without blocking this process's gevent hub (a client may
    live on it); (exit code, stdout as JSON, stderr)."""
    from gevent import subprocess as gsubprocess

    result = gsubprocess.run([sys.executable, "-m", "spicewire", *argv], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT)
    return result.returncode, json.loads(result.stdout), result.stderr


def address(pair) -> str:
    host, port = pair
    return f"{host}:{port}"


def test_connect_streams_through_an_echo_port_and_reports_matching_digests(serve):
    served = serve("--disable-ticketing")
    code, report, _ = spicewire("connect", address(served.address), "--port-channel", "org.test.echo",
                                "--send-mib", "1", "--expect-echo")
    assert code == 0, report
    assert report["ok"] is True and report["server"] == address(served.address)
    assert report["bytes_sent"] == report["bytes_received"] == 1 << 20
    assert report["sha256_sent"] == report["sha256_received"]
    assert len(report["session_id"]) == 8
    assert set(report["timings"]) == {"linked", "port_open", "done"}


def test_connect_with_a_password_links_and_a_wrong_one_is_reported(serve):
    served = serve("--password", "right")
    code, report, _ = spicewire("connect", address(served.address), "--password", "right",
                                "--port-channel", "org.test.echo", "--send-mib", "0.1", "--expect-echo")
    assert code == 0 and report["ok"], report
    code, report, _ = spicewire("connect", address(served.address), "--password", "wrong",
                                "--port-channel", "org.test.echo")
    assert code == 1 and report["ok"] is False
    assert report["error"].startswith("LinkError") and "PERMISSION_DENIED" in report["error"], report


def test_connect_to_an_unknown_port_channel_exits_1_and_says_which(serve):
    served = serve("--disable-ticketing")
    code, report, _ = spicewire("connect", address(served.address), "--port-channel", "org.nope")
    assert code == 1 and report["ok"] is False
    assert "org.nope" in report["error"], report


def test_connect_to_nobody_exits_1_with_the_reason():
    code, report, _ = spicewire("connect", f"127.0.0.1:{free_port()}", "--port-channel", "org.test.echo",
                                "--timeout", "5")
    assert code == 1 and report["error"].startswith("ConnectionRefusedError"), report


def test_concurrent_connects_that_leave_without_reading_their_echo_leave_the_server_clean(serve):
    # Each session ends with its echo still in flight: the server must let go of the devices
    # without a traceback (this once was an AttributeError in EchoDevice.write).
    served = serve("--disable-ticketing")
    argv = ("connect", address(served.address), "--port-channel", "org.test.echo", "--send-mib", "2")
    runs = [gevent.spawn(spicewire, *argv) for _ in range(6)]
    for code, report, _ in (run.get(timeout=COMMAND_TIMEOUT) for run in runs):
        assert code == 0 and report["bytes_sent"] == 2 << 20 and report["bytes_received"] == 0, report
    wait_until(lambda: served.get("/status")["sessions"] == 0, what="every session to end")
    assert "Traceback" not in served.output()


def test_migrate_moves_a_live_session_and_prints_the_report(serve):
    s1, s2 = serve("--disable-ticketing"), serve("--disable-ticketing")
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port("org.test.echo")
    echo.write(b"before")
    assert echo.read(6, timeout=10) == b"before"
    code, report, _ = spicewire("migrate", "--control", address(s1.control), "--token", TOKEN,
                                "--to", address(s2.address), "--to-control", address(s2.control),
                                "--to-token", TOKEN, "--timeout", "10")
    assert code == 0, report
    assert report["to"] == address(s2.address) and report["mode_requested"] == "seamless"
    assert report["migrated"] == 1 and report["stayed"] == report["lost"] == 0
    (entry,) = report["sessions"]
    assert entry["session_id"] == f"{session.session_id:08x}" and entry["migrated"] and entry["mode"] == "seamless"
    wait_until(lambda: session.connected_to == s2.address, what="the client on s2")
    echo.write(b"after")
    assert echo.read(5, timeout=10) == b"after"
    session.close()


def test_migrate_to_an_unreachable_destination_exits_1_and_the_session_stays_and_s1_logs_why(serve):
    s1 = serve("--disable-ticketing")
    session = ClientSession(*s1.address, timeout=10).connect()
    nobody = f"127.0.0.1:{free_port()}"
    code, report, _ = spicewire("migrate", "--control", address(s1.control), "--token", TOKEN,
                                "--to", address(s1.address), "--to-control", nobody, "--timeout", "5")
    assert code == 1
    assert f"502 cannot reach the destination's control API at {nobody}" in report["error"], report
    (view,) = s1.get("/sessions")["sessions"]
    assert view["session_id"] == f"{session.session_id:08x}" and view["migration"] is None
    # s1's log names the address that failed, without a traceback.
    out = s1.output()
    assert f"failed, every session stays here: cannot reach the destination's control API at {nobody}" in out
    assert "Traceback" not in out
    session.close()


def test_migrate_with_a_wrong_token_exits_1_with_the_401(serve):
    s1, s2 = serve("--disable-ticketing"), serve("--disable-ticketing")
    code, report, _ = spicewire("migrate", "--control", address(s1.control), "--token", "wrong",
                                "--to", address(s2.address), "--to-control", address(s2.control))
    assert code == 1 and "401" in report["error"], report


def test_migrate_with_nobody_at_the_source_control_exits_1_naming_it():
    nobody = f"127.0.0.1:{free_port()}"
    code, report, err = spicewire("migrate", "--control", nobody, "--to", "127.0.0.1:5901",
                                  "--to-control", "127.0.0.1:5801", "--timeout", "5")
    assert code == 1 and "refused" in report["error"].lower() and nobody in report["error"], report
    assert "Traceback" not in err


# --- the operator's view ----------------------------------------------------------------------


def test_connect_that_times_out_mid_write_prints_its_json_and_no_traceback(serve):
    # The echo cannot be read back in time: the writer is still sending when the timeout ends it.
    served = serve("--disable-ticketing")
    code, report, err = spicewire("connect", address(served.address), "--port-channel", "org.test.echo",
                                  "--send-mib", "256", "--expect-echo", "--timeout", "0.5")
    assert code == 1 and report["error"].startswith("TimeoutError"), report
    assert "Traceback" not in err and "failed with" not in err, err


def test_serve_logs_json_lines_with_session_and_channel(serve):
    served = serve("--disable-ticketing", "--log-format", "json")
    main, session_id = open_session(served.address)
    port = RawChannel(served.address, session_id, ChannelType.PORT, 0)
    port.expect(m.MsgPortInit)
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=5) == 0
    lines = [json.loads(line) for line in served.output().splitlines()]  # every line is one object
    assert all(line["ts"].endswith("Z") and line["level"] and line["logger"] for line in lines)
    assert any(line.get("session") == f"{session_id:08x}" and line.get("channel") == "port 0 (org.test.echo)"
               for line in lines)
    main.close()
    port.close()


def test_events_follows_the_stream_one_json_line_per_event(serve):
    served = serve("--disable-ticketing")
    follower = subprocess.Popen(
        [sys.executable, "-m", "spicewire", "events", "--control", address(served.control), "--token", TOKEN,
         "--count", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: served.get("/status")["event_subscribers"] == 1, what="the follower subscribed")
        main, session_id = open_session(served.address)
        out, err = follower.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["channel"], e["session_id"]) for e in events] == [
        ("connected", "main", f"{session_id:08x}"), ("initialized", "main", f"{session_id:08x}")]
    main.close()


def test_events_with_a_wrong_token_exits_1_with_the_401(serve):
    served = serve("--disable-ticketing")
    result = subprocess.run([sys.executable, "-m", "spicewire", "events", "--control", address(served.control),
                             "--token", "wrong"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    assert result.returncode == 1 and "401" in json.loads(result.stdout)["error"], result
    assert "Traceback" not in result.stderr
