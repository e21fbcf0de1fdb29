"""The control API under hostile or careless clients: idle and slow connections, too many of them,
oversized and malformed requests, and where it listens (a Unix socket, a token on TCP)."""

from __future__ import annotations

import contextlib
import json
import os
import socket as std_socket
import stat
import subprocess
import sys

import gevent
import pytest
from gevent import socket

from spicewire import cli
from spicewire.control.client import ControlClient
from spicewire.control.events import follow
from spicewire.control.server import MAX_BODY, MAX_DEVICE_STATE, ControlLimits, ControlServer
from spicewire.errors import MigrationError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from spicewire.server.net import ServerConfig, SpiceServer
from tests.rawclient import RawChannel, open_session
from tests.served import TOKEN, bound_addresses
from tests.serverkit import wait_until

ECHO = "org.spicewire.echo"
SERVE = ["serve", "--listen", "127.0.0.1:0", "--disable-ticketing"]


@pytest.fixture(autouse=True)
def deadline():
    """Every test here ends within 30 s, even if the server never closes what it should."""
    with gevent.Timeout(30, AssertionError("the test took longer than 30 s")):
        yield


@pytest.fixture
def spice():
    server = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[(ECHO, "echo")]))
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def control_on(spice, **kwargs):
    control = ControlServer(spice, "127.0.0.1", 0, **kwargs)
    control.start()
    try:
        yield control
    finally:
        control.stop()


@contextlib.contextmanager
def connections(address, count: int):
    """``count`` TCP connections to ``address`` that send nothing; all closed at the end."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(address, timeout=10)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def read_all(sock) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return bytes(data)
    return bytes(data)


def exchange(address, request: bytes) -> tuple[int, dict]:
    """Send one raw request with Connection: close; the status and JSON body of the answer."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(request)
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(address, path: str, body: bytes) -> tuple[int, dict]:
    return exchange(address, b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))


def echo_works(spice) -> None:
    """A new SPICE session links and its echo port answers."""
    main, session_id = open_session(spice.address)
    port = RawChannel(spice.address, session_id, ChannelType.PORT, 0)
    try:
        assert port.expect(m.MsgPortInit).name == ECHO
        port.send(m.MsgcSpicevmcData(b"ping"))
        assert port.expect(m.MsgSpicevmcData).data == b"ping"
    finally:
        port.close()
        main.close()


# --- floods, deadlines, the cap -------------------------------------------------------------------


def test_spice_links_succeed_while_the_control_port_is_flooded(spice):
    with control_on(spice) as control:
        cap = control.limits.max_connections
        with connections(control.address, 200) as idle, connections(control.address, 20) as slow:
            for sock in slow:  # slow-loris: a request head begun and never finished
                sock.sendall(b"GET /status HTTP/1.1\r\nX-Slow: ")
            echo_works(spice)
            # Past the cap, connections are answered 503 and closed; the server holds no more than the cap.
            refused: set = set()
            everyone = idle + slow
            wait_until(lambda: len(refused.update(s for s in everyone if s not in refused and turned_away(s))
                                   or refused) >= len(everyone) - cap, what="the connections past the cap refused")
            assert control._wsgi.connections <= cap
            echo_works(spice)


def turned_away(sock) -> bool:
    """Whether the server answered 503 or closed (a slow-loris's unread head turns the close into a
    reset, which may come before the 503 is read); never waits."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(10)
    return data == b"" or b" 503 " in data


def test_idle_and_slow_connections_are_closed_after_the_head_deadline(spice):
    with control_on(spice, limits=ControlLimits(header_timeout=0.3)) as control:
        with connections(control.address, 2) as (idle, slow):
            dripping = gevent.spawn(drip, slow, b"GET /status HTTP/1.1\r\n" + b"X-Slow: y\r\n" * 1000)
            assert read_all(idle) == b""
            assert read_all(slow) == b""  # closed though a byte came every 20 ms
            assert dripping.get(timeout=10) < 1000 * 10  # the server stopped it, not the end of its head
        wait_until(lambda: control._wsgi.connections == 0, what="the server to let go of both")
        echo_works(spice)


def drip(sock, data: bytes) -> int:
    """Send ``data`` a byte at a time until the server closes; answers how many bytes went."""
    for sent in range(len(data)):
        try:
            sock.sendall(data[sent:sent + 1])
        except OSError:
            return sent
        gevent.sleep(0.02)
    return len(data)


def test_a_kept_alive_connection_that_goes_quiet_is_closed(spice):
    limits = ControlLimits(header_timeout=0.3)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(sock)  # the answer, then the close once the next head does not come
        assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_body_slower_than_its_deadline_is_a_408_and_the_connection_closes(spice):
    limits = ControlLimits(body_timeout=0.3, body_rate=1000.0)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        sock.sendall(b"POST /migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"to\"")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
        assert "did not arrive within 0.4 s" in json.loads(body)["error"]


def test_connections_past_the_cap_get_a_503_and_are_closed_at_once(spice):
    limits = ControlLimits(max_connections=4)
    with control_on(spice, limits=limits) as control, connections(control.address, 4) as held:
        wait_until(lambda: control._wsgi.connections == 4, what="four connections held")
        with connections(control.address, 1) as (extra,):
            head, _, body = read_all(extra).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 ")
            assert json.loads(body)["error"] == "too many control connections: retry later"
        held[0].close()
        wait_until(lambda: control._wsgi.connections == 3, what="a slot to free")
        status, _ = exchange(control.address, b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status == 200


# --- bodies ---------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_without_being_read(spice):
    with control_on(spice) as control, connections(control.address, 1) as (sock,):
        # 100 GiB declared, none sent: the answer comes at once and the connection closes.
        sock.sendall(b"POST /migrate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 << 30))
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in head
        assert "over the limit" in json.loads(body)["error"]


def test_bodies_past_the_memory_budget_wait_their_turn_with_a_503(spice):
    with control_on(spice, limits=ControlLimits(body_budget=1000, body_timeout=5)) as control:
        with connections(control.address, 1) as (first,):
            # The first body holds 800 bytes of the budget while it arrives.
            first.sendall(b"POST /migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 800\r\n\r\n{")
            wait_until(lambda: control._budget.held == 800, what="the first body to be taken")
            status, answer = post(control.address, "/migrate", b"{" + b" " * 299 + b"}")
            assert status == 503 and "retry later" in answer["error"]
        wait_until(lambda: control._budget.held == 0, what="the budget to be given back")


@pytest.mark.parametrize(
    "path, body, reason",
    [
        ("/migrate", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("/migrate", b'{"to": "127.0.0.1:5900", "to_control": "127.0.0.1:99999"}', "to_control"),
        ("/migrate", b'{"to": "127.0.0.1:5900", "to_control": "127.0.0.1:5901", "timeout": 1e999}', "timeout"),
    ],
)
def test_malformed_requests_are_a_400_with_a_one_line_reason(spice, path, body, reason):
    with control_on(spice) as control:
        status, answer = post(control.address, path, body)
    assert status == 400 and reason in answer["error"] and "\n" not in answer["error"], answer


@pytest.mark.parametrize("path", [b"/sessions/%s", b"/sessions/%s/ports/org.spicewire.echo/digest"])
def test_a_5000_digit_session_id_in_a_path_is_a_400(spice, path):
    # (A device-state index that is not a list is test_control.test_bad_device_state_is_a_400.)
    with control_on(spice) as control:
        status, answer = exchange(control.address, b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n"
                                  % (path % (b"7" * 5000)))
    assert status == 400 and "bad session id" in answer["error"]


# --- each threshold from just under and just over ----------------------------------------------------


def test_a_head_that_completes_within_its_deadline_is_answered(spice):
    limits = ControlLimits(header_timeout=2.0)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        gevent.sleep(0.3)  # a pause well inside the deadline (its other side: the idle test above)
        sock.sendall(b"Connection: close\r\n\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_a_body_slower_than_the_floor_but_within_its_size_at_the_rate_is_read(spice):
    # Deadline 0.2 s + 100 bytes at 50 bytes/s = 2.2 s; the body pauses past the floor alone.
    limits = ControlLimits(body_timeout=0.2, body_rate=50.0)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        body = b"{" + b" " * 98 + b"}"
        sock.sendall(b"POST /migrate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n"
                     + body[:50])
        gevent.sleep(0.6)
        sock.sendall(body[50:])
        head, _, answer = read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), head  # read and parsed: it only lacks its fields
        assert "to (HOST:PORT) is missing" in json.loads(answer)["error"]


def test_a_json_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(spice):
    with control_on(spice) as control:
        status, answer = post(control.address, "/migrate", b"{" + b" " * (MAX_BODY - 2) + b"}")
        assert status == 400 and "to (HOST:PORT) is missing" in answer["error"]
        status, answer = exchange(control.address, b"POST /migrate HTTP/1.1\r\nConnection: close\r\n"
                                  b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        assert status == 413 and "over the limit" in answer["error"]


def test_a_device_state_of_exactly_the_limit_is_taken_and_one_byte_more_is_413(spice):
    path = b"/migration/device-state?migration=0123456789abcdef"
    with control_on(spice, peer_token="peer") as control:
        for length, status, message in [(MAX_DEVICE_STATE, 400, "the body ended before"),
                                        (MAX_DEVICE_STATE + 1, 413, "over the limit")]:
            with socket.create_connection(control.address, timeout=10) as sock:
                sock.sendall(b"POST %s HTTP/1.1\r\nConnection: close\r\nAuthorization: Bearer peer\r\n"
                             b"Content-Length: %d\r\n\r\n" % (path, length))
                sock.shutdown(std_socket.SHUT_WR)  # no body comes: at the limit it is awaited, over it refused
                head, _, body = read_all(sock).partition(b"\r\n\r\n")
            assert int(head.split()[1]) == status and message in json.loads(body)["error"], (length, head)
        wait_until(lambda: control._budget.held == 0, what="the budget to be given back")


def test_a_body_that_fills_the_memory_budget_exactly_is_taken(spice):
    limits = ControlLimits(body_budget=1000, body_timeout=5)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (first,):
        first.sendall(b"POST /migrate HTTP/1.1\r\nHost: x\r\nContent-Length: 800\r\n\r\n{")
        wait_until(lambda: control._budget.held == 800, what="the first body to be taken")
        status, answer = post(control.address, "/migrate", b"{" + b" " * 198 + b"}")  # 800 + 200 = 1000
        assert status == 400 and "to (HOST:PORT) is missing" in answer["error"]


def sse_after_opening(sock) -> bytes:
    """Open GET /events on ``sock``; the first line the stream sends after its opening comment."""
    sock.sendall(b"GET /events HTTP/1.0\r\nHost: x\r\n\r\n")
    stream = sock.makefile("rb")
    while stream.readline() not in (b"\r\n", b""):
        pass
    assert stream.readline() == b": spicewire events\n" and stream.readline() == b"\n"
    return stream.readline()


def test_a_quiet_event_stream_gets_a_keep_alive_after_its_interval(spice):
    limits = ControlLimits(keepalive=0.2)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        assert sse_after_opening(sock) == b": keep-alive\n"


def test_an_event_within_the_keep_alive_interval_comes_without_one(spice):
    def emit_once_subscribed() -> None:
        wait_until(lambda: spice.events.subscribers == 1, what="the subscription")
        spice.events.emit("probe")

    limits = ControlLimits(keepalive=20.0)
    with control_on(spice, limits=limits) as control, connections(control.address, 1) as (sock,):
        gevent.spawn(emit_once_subscribed)
        assert sse_after_opening(sock) == b"event: probe\n"


def test_a_follower_outlasts_a_quiet_stream_on_its_keep_alives(spice):
    with control_on(spice, limits=ControlLimits(keepalive=0.1)) as control:
        first = gevent.spawn(lambda: next(follow(*control.address, silence=1.0)))
        wait_until(lambda: spice.events.subscribers == 1, what="the follower's subscription")
        gevent.sleep(1.5)  # quiet past the follower's silence: only keep-alives flow
        spice.events.emit("probe")
        assert first.get(timeout=10)["event"] == "probe"


def test_a_follower_gives_up_on_a_stream_silent_past_its_limit(spice):
    # Keep-alives every 15 s: far past this follower's 0.3 s.
    with control_on(spice) as control, pytest.raises(OSError):
        next(follow(*control.address, silence=0.3))


# --- where it listens, how it authenticates ------------------------------------------------------


def test_a_unix_socket_is_owner_only_and_serves_the_control_client(spice, tmp_path):
    path = str(tmp_path / "control.sock")
    control = ControlServer(spice, unix=path)
    control.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
        client = ControlClient("", 0, unix=path, timeout=10)
        assert client.get_json("/status")["sessions"] == 0
        assert client.address == f"unix:{path}"
    finally:
        control.stop()
    assert not os.path.exists(path)  # removed on stop


def test_a_unix_socket_replaces_only_a_stale_socket(spice, tmp_path):
    stale = str(tmp_path / "stale.sock")
    with std_socket.socket(std_socket.AF_UNIX) as left:
        left.bind(stale)  # bound, never listening: what a killed server leaves
    control = ControlServer(spice, unix=stale)
    control.start()
    try:
        with pytest.raises(OSError, match="another server is listening there"):
            ControlServer(spice, unix=stale)
    finally:
        control.stop()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket"):
        ControlServer(spice, unix=str(regular))
    assert regular.read_text() == "keep me"


def test_a_wrong_token_over_a_unix_socket_is_still_refused(spice, tmp_path):
    path = str(tmp_path / "control.sock")
    control = ControlServer(spice, token="right", unix=path)
    control.start()
    try:
        with pytest.raises(MigrationError, match="401"):
            ControlClient("", 0, token="wrong", unix=path, timeout=10).get_json("/status")
        assert ControlClient("", 0, token="right", unix=path, timeout=10).get_json("/status")["sessions"] == 0
    finally:
        control.stop()


def run(*argv: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spicewire", *argv], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


@contextlib.contextmanager
def serving(tmp_path, *argv: str, env: dict | None = None):
    """``spicewire serve ARGV`` in a subprocess with its log file; killed at the end."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spicewire", *SERVE, *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env})
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_serve_and_migrate_over_a_unix_socket(tmp_path, serve):
    path = str(tmp_path / "s1.sock")
    s2 = serve("--disable-ticketing")
    with serving(tmp_path, "--control", f"unix:{path}") as (proc, log):
        wait_until(lambda: os.path.exists(path) or proc.poll() is not None, timeout=15, what="the socket")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, log.read_text()
        result = run("migrate", "--control", f"unix:{path}", "--to", "{}:{}".format(*s2.address),
                     "--to-control", "{}:{}".format(*s2.control), "--to-token", TOKEN, "--timeout", "10")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["migrated"] == 0
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert not os.path.exists(path)
    assert "any local user" not in log.read_text()


def test_non_loopback_control_without_a_token_refuses_to_start_with_one_line():
    result = run(*SERVE, "--control", "0.0.0.0:0", env={"SPICEWIRE_CONTROL_TOKEN": ""})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "non-loopback address needs --control-token" in errors[0], result.stderr


def checked(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    args.check(args)
    return args


def test_the_token_comes_from_argv_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SPICEWIRE_CONTROL_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    remote = [*SERVE, "--control", "0.0.0.0:0"]
    assert checked([*remote, "--control-token-file", str(token_file)]).control_token == "from-file"
    assert checked([*remote, "--control-token", "from-argv"]).control_token == "from-argv"
    monkeypatch.setenv("SPICEWIRE_CONTROL_TOKEN", "from-env")
    assert checked(remote).control_token == "from-env"
    assert checked([*remote, "--control-token-file", str(token_file)]).control_token == "from-file"
    migrate = ["migrate", "--control", "127.0.0.1:1", "--to", "127.0.0.1:2", "--to-control", "127.0.0.1:3"]
    assert checked(migrate).token == "from-env"
    assert checked([*migrate, "--token-file", str(token_file)]).token == "from-file"


@pytest.mark.parametrize("content, message", [("", "has no token"), (None, "cannot read")])
def test_a_token_file_that_gives_no_token_is_refused(tmp_path, capsys, content, message):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        checked([*SERVE, "--control", "127.0.0.1:0", "--control-token-file", str(token_file)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_serve_reads_its_token_from_a_file_and_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    for argv, env, token in [(["--control-token-file", str(token_file)], None, "file-token"),
                             ([], {"SPICEWIRE_CONTROL_TOKEN": "env-token"}, "env-token")]:
        with serving(tmp_path, "--control", "127.0.0.1:0", *argv, env=env) as (proc, log):
            _, (host, port) = bound_addresses(proc, log)
            with pytest.raises(MigrationError, match="401"):
                ControlClient(host, port, timeout=10).get_json("/status")
            assert ControlClient(host, port, token=token, timeout=10).get_json("/status")["sessions"] == 0
            assert "any local user" not in log.read_text()


def test_loopback_without_a_token_warns_once(tmp_path):
    with serving(tmp_path, "--control", "127.0.0.1:0", env={"SPICEWIRE_CONTROL_TOKEN": ""}) as (proc, log):
        _, (host, port) = bound_addresses(proc, log)
        assert ControlClient(host, port, timeout=10).get_json("/status")["sessions"] == 0
        text = log.read_text()
    # Once about the control API (serve --disable-ticketing warns about the SPICE port too).
    assert text.count("WARNING") == 2 and text.count("any local user can move or pause every session") == 1, text
    assert text.count("TICKETING IS DISABLED") == 1, text


def test_a_server_with_few_descriptors_keeps_linking_spice_clients_under_a_control_flood(tmp_path):
    """What once failed: idle control connections took every descriptor and SPICE links timed out.
    serve at 256 open files caps control connections at 32 and keeps the rest for SPICE."""
    import resource

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spicewire", *SERVE, "--port-channel", f"{ECHO}=echo",
                                 "--control", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=few_files, env={**os.environ, "SPICEWIRE_CONTROL_TOKEN": ""})
    try:
        spice_address, control_address = bound_addresses(proc, log)
        with connections(control_address, 300) as flood:
            turned = set()
            wait_until(lambda: len(turned.update(s for s in flood if s not in turned and turned_away(s))
                                   or turned) >= 300 - 32, what="the control connections past 32 refused")
            for _ in range(3):
                main, session_id = open_session(spice_address)
                port = RawChannel(spice_address, session_id, ChannelType.PORT, 0)
                assert port.expect(m.MsgPortInit).name == ECHO
                port.send(m.MsgcSpicevmcData(b"still here"))
                assert port.expect(m.MsgSpicevmcData).data == b"still here"
                port.close()
                main.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    "head, status, reason",
    [
        (b"GET /status HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 400, "more than 100 headers"),
        (b"GET /status HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 400, "Line too long"),
        (b"POST /migrate HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "Invalid Content-Length"),
        (b"\x00\xff garbage\r\n\r\n", 400, "bad request"),
        (b"POST /migrate HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
         411, "needs a Content-Length"),
    ],
)
def test_a_head_gevent_cannot_parse_is_a_4xx_with_its_reason_and_no_traceback(spice, capfd, head, status, reason):
    with control_on(spice) as control:
        answered, answer = exchange(control.address, head)
    assert answered == status and reason in answer["error"] and "\n" not in answer["error"], answer
    assert "Traceback" not in capfd.readouterr().err
