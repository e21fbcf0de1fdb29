"""The control API, against a live SpiceServer on the same gevent hub."""

from __future__ import annotations

import hashlib
import http.client
import json
import os

import gevent
import gevent.socket
import pytest

from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType
from spicewire.server.control import ControlServer, HttpError, Router, parse_session_id
from spicewire.server.net import ServerConfig, SpiceServer
from tests.rawclient import RawChannel, open_session

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
    control = ControlServer(spice, "127.0.0.1", 0, token=token)
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
    """(status, headers, JSON body) of one request."""
    conn = _GeventHTTP(*control.address, timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
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
    spice.config.password = "hunter2"
    status, _, body = call(control, "GET", "/status")
    assert body["config"]["ticketing"] is True
    assert "hunter2" not in json.dumps(body)


def test_sessions_lists_every_session_with_its_channels(spice, control):
    first, first_id = open_session(spice.address)
    second, second_id = open_session(spice.address)
    sessions = {s["session_id"]: s for s in get(control, "/sessions")["sessions"]}
    assert set(sessions) == {first_id, second_id}
    session = sessions[first_id]
    assert session["id"] == f"{first_id:08x}"
    assert session["main"]["serial_out"] >= 1  # MAIN_INIT
    assert [p["name"] for p in session["ports"]] == [SINK, ECHO]
    assert session["ports"][0]["connected"] is False and session["ports"][0]["channel"] is None
    first.close()
    second.close()


def _decimal(session_id: int) -> str:
    text = str(session_id)
    return "0" + text if len(text) == 8 else text  # eight digits would read as hex


@pytest.mark.parametrize("spelling", [lambda i: f"{i:08x}", lambda i: f"{i:08X}", _decimal])
def test_session_is_found_by_hex_or_decimal_id(spice, control, spelling):
    main, session_id = open_session(spice.address)
    assert get(control, f"/sessions/{spelling(session_id)}")["session_id"] == session_id
    main.close()


def test_session_disappears_when_its_main_channel_closes(spice, control):
    main, session_id = open_session(spice.address)
    main.close()
    wait_for(lambda: call(control, "GET", f"/sessions/{session_id:08x}")[0] == 404, "session gone")


def test_paused_sink_buffers_and_resumed_sink_digests_everything(spice, control):
    main, session_id = open_session(spice.address)
    base = f"/sessions/{session_id:08x}/ports/{SINK}"
    status, _, paused = call(control, "POST", f"{base}/pause")
    assert status == 200 and paused["device"]["paused"] is True

    port = RawChannel(spice.address, session_id, ChannelType.PORT, 0)
    assert port.expect(m.MsgPortInit).name == SINK
    payload = os.urandom(300_000)
    chunks = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
    for chunk in chunks:
        port.send(m.MsgcSpicevmcData(chunk))

    wait_for(lambda: port_view(control, session_id, SINK)["to_device_bytes"] == len(payload), "all buffered")
    view = port_view(control, session_id, SINK)
    assert view["connected"] is True
    assert view["to_client_bytes"] == 0
    channel = view["channel"]
    assert channel["bytes_in"] >= len(payload)
    assert channel["serial_in"] >= len(chunks)
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


def test_a_device_that_cannot_pause_answers_409(spice, control):
    main, session_id = open_session(spice.address)
    status, _, body = call(control, "POST", f"/sessions/{session_id:08x}/ports/{ECHO}/pause")
    assert status == 409 and "cannot be paused" in body["error"]
    main.close()


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


@pytest.mark.parametrize("bad", ["xyz", "deadbeeg", "4294967296", "-1", "0x12"])
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


@pytest.mark.parametrize(
    "text, value",
    [("0000000c", 12), ("DEADBEEF", 0xDEADBEEF), ("12", 12), ("012345678", 12345678), ("4294967295", 2**32 - 1)],
)
def test_session_id_spellings(text, value):
    assert parse_session_id(text) == value
