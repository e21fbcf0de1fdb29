"""The control API, against a live SpiceServer on the same gevent hub."""

from __future__ import annotations

import hashlib
import http.client
import json
import os

import gevent
import gevent.socket
import pytest

from spicewire import devices
from spicewire.control.server import ControlServer, HttpError, Router, parse_session_id
from spicewire.logs import parse_session_label, session_label
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from spicewire.server.net import ServerConfig, SpiceServer
from tests.rawclient import RawChannel, open_session
from tests.test_migration import PEER_TOKEN

SINK = "org.spicewire.sink"
ECHO = "org.spicewire.echo"
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def deadline():
    """Every test here ends within 20 s, even if the server never answers."""
    timeout = gevent.Timeout(20, TimeoutError("test took longer than 20 s"))
    timeout.start()
    yield
    timeout.close()


@pytest.fixture
def spice():
    server = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[(SINK, "sink"), (ECHO, "echo")]))
    server.start()
    yield server
    server.stop()


def _control(spice, token=None):
    # Without a control token, the peer token opens /migration/*, where these tests act as s1.
    control = ControlServer(spice, "127.0.0.1", 0, token=token, peer_token=None if token else PEER_TOKEN)
    control.start()
    return control


@pytest.fixture
def control(spice):
    control = _control(spice)
    yield control
    control.stop()


@pytest.fixture
def guarded(spice):
    control = _control(spice, token=TOKEN)
    yield control
    control.stop()


class _GeventHTTP(http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = gevent.socket.create_connection((self.host, self.port), self.timeout)


def call(control, method, path, *, token=None, body=None):
    """(status, headers, JSON body) of one request; without ``token`` it presents the peer token,
    which the server's /migration/* wants and its open operator endpoints ignore."""
    conn = _GeventHTTP(*control.address, timeout=5)
    headers = {"Authorization": f"Bearer {token or PEER_TOKEN}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, response, json.loads(response.read())
    finally:
        conn.close()


def get(control, path, **kw):
    status, _, body = call(control, "GET", path, **kw)
    assert status == 200, body
    return body


def wait_for(predicate, what):
    while not predicate():
        gevent.sleep(0.01)  # the autouse deadline bounds this
    return what


def port_view(control, session_id, name):
    session = get(control, f"/sessions/{session_id:08x}")
    return next(p for p in session["ports"] if p["name"] == name)


# --- the endpoints ----------------------------------------------------------------------------


def test_status_describes_the_server(spice, control):
    status = get(control, "/status")
    assert status["listen"] == {"host": "127.0.0.1", "port": spice.address[1]}
    assert status["uptime"] >= 0
    assert status["sessions"] == 0
    assert status["config"]["ticketing"] is False
    assert status["config"]["port_channels"] == [{"name": SINK, "device": "sink"}, {"name": ECHO, "device": "echo"}]
    assert "GET /sessions/{session}/ports/{port}/digest" in status["endpoints"]


def test_status_never_shows_the_password(control, spice):
    spice.set_password("hunter2", None)
    _, _, body = call(control, "GET", "/status")
    assert body["config"]["ticketing"] is True
    assert "hunter2" not in json.dumps(body)


def test_sessions_lists_every_session_with_its_channels(spice, control):
    first, first_id = open_session(spice.address)
    second, second_id = open_session(spice.address)
    sessions = {s["session_id"]: s for s in get(control, "/sessions")["sessions"]}
    assert set(sessions) == {f"{first_id:08x}", f"{second_id:08x}"}  # one spelling: 8 hex digits
    session = sessions[f"{first_id:08x}"]
    assert "id" not in session
    assert session["client"] == "{}:{}".format(*first.sock.getsockname()[:2])  # the main channel's peer
    assert session["created"].endswith("Z") and "T" in session["created"]  # ISO 8601, UTC
    assert session["main"]["serial_out"] >= 1  # MAIN_INIT
    assert [p["name"] for p in session["ports"]] == [SINK, ECHO]
    assert session["ports"][0]["connected"] is False and session["ports"][0]["channel"] is None
    first.close()
    second.close()


@pytest.mark.parametrize("spelling", [lambda i: f"{i:08x}", lambda i: f"{i:08X}"])
def test_session_is_found_by_its_hex_id(spice, control, spelling):
    main, session_id = open_session(spice.address)
    assert get(control, f"/sessions/{spelling(session_id)}")["session_id"] == f"{session_id:08x}"
    main.close()


def test_session_disappears_when_its_main_channel_closes(spice, control):
    main, session_id = open_session(spice.address)
    main.close()
    wait_for(lambda: call(control, "GET", f"/sessions/{session_id:08x}")[0] == 404, "session gone")


def paused_port_holding(spice, control, name: str, channel_id: int, payload: bytes):
    """A session whose port ``name`` has its device paused and holds all of ``payload``, written
    in 64 KiB messages: (main, session id, the port's channel, the device's endpoint path)."""
    main, session_id = open_session(spice.address)
    base = f"/sessions/{session_id:08x}/ports/{name}"
    status, _, paused = call(control, "POST", f"{base}/pause")
    assert status == 200 and paused["device"]["paused"] is True
    port = RawChannel(spice.address, session_id, ChannelType.PORT, channel_id)
    assert port.expect(m.MsgPortInit).name == name
    for i in range(0, len(payload), 65536):
        port.send(m.MsgcSpicevmcData(payload[i : i + 65536]))
    wait_for(lambda: port_view(control, session_id, name)["to_device_bytes"] == len(payload), "all held")
    return main, session_id, port, base


def test_paused_sink_buffers_and_resumed_sink_digests_everything(spice, control):
    payload = os.urandom(300_000)
    main, session_id, port, base = paused_port_holding(spice, control, SINK, 0, payload)
    view = port_view(control, session_id, SINK)
    assert view["connected"] is True
    assert view["to_client_bytes"] == 0
    channel = view["channel"]
    assert channel["bytes_in"] >= len(payload)
    assert channel["serial_in"] >= -(-len(payload) // 65536)
    assert channel["ack_window"] == 20 and channel["ack_generation"] == 1
    assert channel["pending_write"] == 0
    before = get(control, f"{base}/digest")["device"]
    assert before["bytes_in"] == 0 and before["sha256"] == hashlib.sha256().hexdigest()

    status, _, resumed = call(control, "POST", f"{base}/resume")
    assert status == 200 and resumed["device"]["paused"] is False
    digest = get(control, f"{base}/digest")
    assert digest["device"]["bytes_in"] == len(payload)
    assert digest["device"]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert port_view(control, session_id, SINK)["to_device_bytes"] == 0
    port.close()
    main.close()


def test_echo_keeps_flowing_while_the_control_api_is_polled(spice, control):
    main, session_id = open_session(spice.address)
    port = RawChannel(spice.address, session_id, ChannelType.PORT, 1)
    port.expect(m.MsgPortInit)
    poller = gevent.spawn(lambda: [get(control, "/sessions") for _ in range(20)])
    port.send(m.MsgcSpicevmcData(b"ping" * 1000))
    got = b""
    while len(got) < 4000:
        got += port.expect(m.MsgSpicevmcData).data
    assert got == b"ping" * 1000
    poller.get()
    assert port_view(control, session_id, ECHO)["device"]["bytes_out"] == 4000
    port.close()
    main.close()


def test_paused_echo_holds_what_the_client_writes_and_resumed_echoes_it_all_in_order(spice, control):
    payload = os.urandom(200_000)
    main, session_id, port, base = paused_port_holding(spice, control, ECHO, 1, payload)
    view = port_view(control, session_id, ECHO)
    assert view["to_client_bytes"] == 0 and view["device"]["bytes_in"] == view["device"]["bytes_out"] == 0

    status, _, resumed = call(control, "POST", f"{base}/resume")
    assert status == 200 and resumed["device"]["paused"] is False
    got = b""
    while len(got) < len(payload):
        got += port.expect(m.MsgSpicevmcData).data
    assert got == payload
    assert port_view(control, session_id, ECHO)["device"]["bytes_out"] == len(payload)
    port.close()
    main.close()


class UnpausableDevice(devices.Device):
    """A device that keeps the base class' pause and resume, which refuse."""

    kind = "test-unpausable"

    def write(self, data: memoryview) -> int:
        return len(data)


def test_a_device_that_cannot_pause_answers_409(monkeypatch):
    monkeypatch.setitem(devices._KINDS, UnpausableDevice.kind, UnpausableDevice)  # for this test only
    spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=[("fixed", "test-unpausable")]))
    spice.start()
    control = _control(spice)
    try:
        main, session_id = open_session(spice.address)
        for lever in ("pause", "resume"):
            status, _, body = call(control, "POST", f"/sessions/{session_id:08x}/ports/fixed/{lever}")
            assert status == 409 and f"cannot be {lever}d" in body["error"], body
        main.close()
    finally:
        control.stop()
        spice.stop()


# --- errors -----------------------------------------------------------------------------------


def test_unknown_session_is_404(control):
    status, _, body = call(control, "GET", "/sessions/deadbeef")
    assert status == 404 and body == {"error": "no session deadbeef", "status": 404}


def test_unknown_port_is_404(spice, control):
    main, session_id = open_session(spice.address)
    status, _, body = call(control, "GET", f"/sessions/{session_id:08x}/ports/org.nope/digest")
    assert status == 404 and "org.nope" in body["error"]
    main.close()


def test_unknown_endpoint_is_404(control):
    assert call(control, "GET", "/nope")[0] == 404
    assert call(control, "GET", "/sessions/deadbeef/ports")[0] == 404


@pytest.mark.parametrize("bad", ["xyz", "deadbeeg", "4294967296", "-1", "0x12", "12", "0deadbeef"])
def test_malformed_session_id_is_400(control, bad):
    status, _, body = call(control, "GET", f"/sessions/{bad}")
    assert status == 400 and "session id" in body["error"]


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("POST", "/status", "GET"),
        ("DELETE", "/sessions", "GET"),
        ("GET", "/sessions/deadbeef/ports/p/pause", "POST"),
        ("PUT", "/sessions/deadbeef/ports/p/resume", "POST"),
        ("POST", "/sessions/deadbeef/ports/p/digest", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(control, method, path, allow):
    status, response, body = call(control, method, path)
    assert status == 405 and body["status"] == 405
    assert response.getheader("Allow") == allow


# --- the bearer token -------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_without_the_token_every_endpoint_is_401(guarded, token):
    for method, path in [("GET", "/status"), ("GET", "/sessions"), ("POST", "/sessions/1/ports/p/pause")]:
        status, response, body = call(guarded, method, path, token=token)
        assert status == 401 and body["status"] == 401
        assert response.getheader("WWW-Authenticate").startswith("Bearer")


def test_with_the_token_requests_are_served(guarded):
    assert call(guarded, "GET", "/status", token=TOKEN)[0] == 200


def test_other_schemes_are_refused(guarded):
    conn = _GeventHTTP(*guarded.address, timeout=5)
    conn.request("GET", "/status", headers={"Authorization": f"Basic {TOKEN}"})
    assert conn.getresponse().status == 401
    conn.close()


# --- extending the API ------------------------------------------------------------------------


def test_a_later_endpoint_slots_in_and_reads_a_json_body(control):
    control.router.add("POST", "/extension", lambda request: (202, {"accepted": request.json()}))
    status, _, body = call(control, "POST", "/extension", body=json.dumps({"host": "127.0.0.1", "port": 5901}))
    assert status == 202 and body == {"accepted": {"host": "127.0.0.1", "port": 5901}}
    status, _, body = call(control, "POST", "/extension", body="{not json")
    assert status == 400 and "not JSON" in body["error"]


def test_a_failing_handler_is_500_and_the_server_goes_on(control):
    control.router.add("GET", "/boom", lambda request: 1 / 0)
    status, _, body = call(control, "GET", "/boom")
    assert status == 500 and body["status"] == 500
    assert get(control, "/status")["sessions"] == 0


def test_router_prefers_a_literal_segment_to_a_parameter():
    router = Router()
    router.add("GET", "/sessions/{session}", lambda r: "param")
    router.add("GET", "/sessions/latest", lambda r: "literal")
    handler, params = router.resolve("GET", "/sessions/latest")
    assert handler(None) == "literal" and params == {}
    assert router.resolve("GET", "/sessions/00000001")[1] == {"session": "00000001"}


def test_router_405_lists_methods_from_every_matching_route():
    router = Router()
    router.add("GET", "/sessions/{session}", lambda r: None)
    router.add("POST", "/sessions/announce", lambda r: None)
    with pytest.raises(HttpError) as err:
        router.resolve("DELETE", "/sessions/announce")
    assert err.value.status == 405 and dict(err.value.headers)["Allow"] == "GET, POST"


def test_router_refuses_a_route_twice():
    router = Router()
    router.add("GET", "/status", lambda r: None)
    with pytest.raises(ValueError):
        router.add("GET", "/status/", lambda r: None)


@pytest.mark.parametrize("text, value", [("0000000c", 12), ("DEADBEEF", 0xDEADBEEF), ("aadce55b", 0xAADCE55B)])
def test_session_id_spellings(text, value):
    assert parse_session_id(text) == value


@pytest.mark.parametrize("text", ["12", "4294967295", "0000000c0", 12])
def test_session_ids_have_one_spelling(text):
    with pytest.raises(HttpError):
        parse_session_id(text)


@pytest.mark.parametrize("value", [0, 12, 0xAADCE55B, 0xFFFFFFFF])
def test_a_session_label_reads_back_as_its_id(value):
    assert parse_session_label(session_label(value)) == value


# --- bad input is a 4xx that says what is wrong, never a 500 ---------------------------------------


def raw_call(control, head: str, body: bytes = b"") -> tuple[int, dict | None]:
    """One request written by hand, for headers http.client would not send; the request ends
    with a half close, so a server waiting for more body sees that none comes."""
    sock = gevent.socket.create_connection(control.address, timeout=5)
    try:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        sock.shutdown(gevent.socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    status_line, _, rest = data.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload) if payload else None


MIGRATION_POSTS = ["/migrate", "/migration/announce", "/migration/device-state?migration=0123456789abcdef",
                   "/migration/abort"]


def post_head(path: str, length: str) -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {PEER_TOKEN}\r\n"
            f"Content-Length: {length}")


@pytest.mark.parametrize("path", MIGRATION_POSTS)
@pytest.mark.parametrize("length", ["abc", "-5", "1e3"])
def test_a_content_length_that_is_no_number_is_a_400(control, path, length):
    # gevent's WSGI server refuses these itself, before any handler runs.
    assert raw_call(control, post_head(path, length))[0] == 400


@pytest.mark.parametrize("path", MIGRATION_POSTS)
@pytest.mark.parametrize(
    "length, body, status, message",
    [
        ("+5", b"{}", 400, "bad Content-Length '+5'"),
        ("1_0", b"{}", 400, "bad Content-Length '1_0'"),  # a number to int(), not to HTTP
        ("100", b"{}", 400, "the body ended before its Content-Length of 100 bytes"),
        (str(1 << 40), b"", 413, "body of 1099511627776 bytes is over the limit"),
    ],
)
def test_a_content_length_that_does_not_fit_is_a_4xx_that_says_so(control, path, length, body, status, message):
    got, answer = raw_call(control, post_head(path, length), body)
    assert got == status and answer["status"] == status and message in answer["error"], answer


def post_json(control, path, value) -> tuple[int, dict]:
    status, _, body = call(control, "POST", path, body=json.dumps(value))
    return status, body


@pytest.mark.parametrize(
    "request_body, message",
    [
        ([1, 2], "the body must be a JSON object, not list"),
        ("127.0.0.1:5901", "the body must be a JSON object, not str"),
        ({"to_control": "127.0.0.1:5801"}, "to (HOST:PORT) is missing"),
        ({"to": "127.0.0.1:70000", "to_control": "127.0.0.1:5801"}, "to: expected HOST:PORT"),
        ({"to": "127.0.0.1:5901", "to_control": 5801}, "to_control: expected HOST:PORT as a string"),
        ({"to": "127.0.0.1:5901", "to_control": "127.0.0.1:5801", "mode": "fast"}, "mode must be one of"),
        ({"to": "127.0.0.1:5901", "to_control": "127.0.0.1:5801", "timeout": -1}, "timeout must be a finite"),
        ({"to": "127.0.0.1:5901", "to_control": "127.0.0.1:5801", "timeout": "10"}, "timeout must be a finite"),
        ({"to": "127.0.0.1:5901", "to_control": "127.0.0.1:5801", "timeout": True}, "timeout must be a finite"),
        ({"to": "127.0.0.1:5901", "to_control": "127.0.0.1:5801", "to_token": 7}, "to_token must be a string"),
    ],
)
def test_a_bad_migrate_request_is_a_400_naming_the_field(spice, control, request_body, message):
    status, body = post_json(control, "/migrate", request_body)
    assert status == 400 and body["error"].startswith("bad migrate request: ") and message in body["error"], body
    assert "\n" not in body["error"]


# --- the server-to-server endpoints ----------------------------------------------------------------


MIGRATION = "0123456789abcdef"  # the id s1 would have chosen for its migration


def announcement(session_id="00001234", ports=None, **extra) -> dict:
    ports = [[0, SINK, "sink", 0], [1, ECHO, "echo", 0]] if ports is None else ports
    return {"migration": MIGRATION, "ttl": 30, "sessions": [{"session_id": session_id, "ports": ports}], **extra}


def test_announce_makes_the_server_expect_the_session(spice, control):
    status, body = post_json(control, "/migration/announce", announcement())
    # Beyond the count, s2 says which migration features it takes (an older one says none).
    assert status == 200 and body["announced"] == 1 and set(body) <= {"announced", "state_auth", "port_precopy",
                                                                        "port_precopy_digests", "prepared"}
    assert spice.migration.expects(0x1234)
    assert spice.migration.announcements[0x1234].ports == [(0, SINK, "sink"), (1, ECHO, "echo")]
    assert get(control, "/migration/completed?ids=00001234") == {}  # expected, not arrived


@pytest.mark.parametrize(
    "request_body, message",
    [
        ([], "the body must be a JSON object"),
        ({"ttl": 30}, "sessions must be a list"),
        ({"sessions": {"session_id": 1}}, "sessions must be a list"),
        ({"sessions": ["00001234"]}, "needs a session_id"),
        (announcement(session_id="00000000"), "needs a session_id"),
        (announcement(session_id="100000000"), "needs a session_id"),
        (announcement(session_id="1234"), "needs a session_id"),
        (announcement(session_id=0x1234), "needs a session_id"),
        (announcement(ports={"0": "sink"}), "needs ports as"),
        (announcement(ports=[[0, SINK]]), "needs ports as"),
        (announcement(ports=[["0", SINK, "sink", 0]]), "needs ports as"),
        (announcement(ports=[[0, SINK, "sink", -1]]), "needs ports as"),
        (announcement(ports=[[0, SINK, "tape", 0]]), "unknown device kind 'tape'"),
        (announcement(ttl=0), "ttl must be a finite number"),
        (announcement(ttl="soon"), "ttl must be a finite number"),
        (announcement(ttl=float("inf")), "ttl must be a finite number"),
        (announcement(ttl=float("nan")), "ttl must be a finite number"),
        (announcement(migration=None), "migration must be the migration's id"),
        (announcement(migration="0123"), "migration must be the migration's id"),
        ({**announcement(), "sessions": announcement()["sessions"] * 2}, "announced twice"),
    ],
)
def test_a_bad_announcement_is_a_400_and_announces_nothing(spice, control, request_body, message):
    status, body = post_json(control, "/migration/announce", request_body)
    assert status == 400 and body["error"].startswith("bad announcement") and message in body["error"], body
    assert not spice.migration.announcements


def test_announcing_a_session_that_lives_here_is_a_409(spice, control):
    main, session_id = open_session(spice.address)
    status, body = post_json(control, "/migration/announce", announcement(f"{session_id:08x}"))
    assert status == 409 and "in use" in body["error"]
    main.close()


def test_device_state_restores_into_the_announced_session(spice, control):
    from spicewire.devices import SinkDevice
    from spicewire.server.migration import pack_device_states

    post_json(control, "/migration/announce", announcement())
    sink = SinkDevice()
    sink.bytes_in = 42
    fake = type("Saved", (), {"id": 0x1234, "ports": {0: type("P", (), {"device": sink, "in_flight": 0})()}})()
    conn = _GeventHTTP(*control.address, timeout=5)
    conn.request("POST", f"/migration/device-state?migration={MIGRATION}", body=pack_device_states([fake]),
                 headers={"Authorization": f"Bearer {PEER_TOKEN}"})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"restored": 1, "skipped": []}
    conn.close()
    assert json.loads(spice.migration.announcements[0x1234].device_state[0][0])["bytes_in"] == 42


def post_bytes(control, path, data: bytes) -> tuple[int, dict]:
    conn = _GeventHTTP(*control.address, timeout=5)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/octet-stream",
                                                       "Authorization": f"Bearer {PEER_TOKEN}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _container(*chunks) -> bytes:
    from spicewire import codec

    return codec.pack_chunks(list(chunks)).tobytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a container",
        _container(b"not json"),
        _container(b'{"not": "a list"}'),
        _container(b'["an entry that is not an object"]'),
        _container(b'[{"session_id": "00001234", "port": 0}]'),
        _container(b'[{"session_id": 4660, "port": 0, "chunks": 0}]'),  # a number, not 8 hex digits
        _container(b'[{"session_id": "00001234", "port": 0, "chunks": 2}]', b"{}"),  # promises a missing chunk
        _container(b'[{"session_id": "00001234", "port": 0, "chunks": -1}]'),
        _container(b'[{"session_id": "00001234", "port": 0, "chunks": 0}]', b"{}"),  # a chunk nobody claims
        _container(b'[{"session_id": "00001234", "port": "0", "chunks": 0}]'),
        _container(b'[{"session_id": "00000001", "port": 0, "chunks": 1}]'),  # skippable, but promises a chunk
    ],
)
def test_bad_device_state_is_a_400(spice, control, data):
    post_json(control, "/migration/announce", announcement())
    status, body = post_bytes(control, f"/migration/device-state?migration={MIGRATION}", data)
    assert status == 400 and body["error"].startswith("bad device state"), body
    assert spice.migration.announcements[0x1234].device_state == {}  # nothing of a bad batch is kept


def test_completed_answers_only_for_sessions_it_knows(spice, control):
    spice.migration.completed[0x1234] = {"mode": "seamless"}
    spice.migration.failed[0x5678] = "the client left"
    answer = get(control, "/migration/completed?ids=00001234,00005678,00009999")
    assert answer == {"00001234": {"mode": "seamless"}, "00005678": {"failed": "the client left"}}
    assert get(control, "/migration/completed") == {}
    status, _, body = call(control, "GET", "/migration/completed?ids=00001234,nope")
    assert status == 400 and "session id" in body["error"]


def test_device_state_skips_entries_outside_the_migration_and_says_so(spice, control):
    from spicewire.devices import SinkDevice

    post_json(control, "/migration/announce", announcement())
    saved = SinkDevice().save()  # a state the announced sink can take: a batch is checked whole first
    data = _container(b'[{"session_id": "00000001", "port": 0, "chunks": 1},'
                      b' {"session_id": "00001234", "port": 7, "chunks": 0},'
                      b' {"session_id": "00001234", "port": 0, "chunks": 2}]', b'{"a": 1}', *saved)
    status, body = post_bytes(control, f"/migration/device-state?migration={MIGRATION}", data)
    assert status == 200 and body["restored"] == 1, body
    assert [(e["session_id"], e["port"]) for e in body["skipped"]] == [("00000001", 0), ("00001234", 7)]
    assert spice.migration.announcements[0x1234].device_state == {0: [bytes(c) for c in saved]}


def test_a_device_state_the_device_cannot_take_refuses_the_whole_batch(spice, control):
    post_json(control, "/migration/announce", announcement())
    data = _container(b'[{"session_id": "00001234", "port": 0, "chunks": 1}]', b'{"b": 2}')
    status, body = post_bytes(control, f"/migration/device-state?migration={MIGRATION}", data)
    assert status == 400 and "cannot restore" in body["error"], body
    assert spice.migration.announcements[0x1234].device_state == {}


def test_abort_forgets_the_announcement(spice, control):
    post_json(control, "/migration/announce", announcement())
    status, body = post_json(control, "/migration/abort", {"migration": MIGRATION, "sessions": ["00001234"]})
    assert status == 200 and body == {"aborted": 0}  # nothing had linked yet
    assert not spice.migration.expects(0x1234)


@pytest.mark.parametrize(
    "request_body, message",
    [
        ({}, "migration must be the migration's id"),
        ({"migration": MIGRATION}, "sessions must be a list"),
        ({"migration": MIGRATION, "sessions": "00001234"}, "sessions must be a list"),
        ({"migration": MIGRATION, "sessions": [4660]}, "sessions must be a list of session ids"),
        ({"migration": MIGRATION, "sessions": ["nope"]}, "bad session id"),
        ([], "the body must be a JSON object"),
    ],
)
def test_a_bad_abort_is_a_400(control, request_body, message):
    status, body = post_json(control, "/migration/abort", request_body)
    assert status == 400 and message in body["error"], body


@pytest.mark.parametrize("method, path", [("GET", "/migrate"), ("GET", "/migration/announce"),
                                          ("POST", "/migration/completed")])
def test_migration_endpoints_answer_405_to_the_wrong_method(control, method, path):
    assert call(control, method, path)[0] == 405
