"""The HTTP/JSON control plane: what a server is doing, and levers on its devices.

It runs as a gevent WSGI server on the SPICE server's own hub. Every handler reads or changes the
server's state synchronously, without yielding, so an answer is a consistent snapshot and a slow
control client never holds up a SPICE connection.

Routes are a table of ``(method, pattern) -> handler``; a pattern's ``{name}`` segments become
``request.params``. A handler returns a JSON-able body (status 200) or ``(status, body)``, and
raises ``HttpError`` for anything else. More endpoints (migration's ``POST /migrate`` and
``POST /announce``) are added with ``ControlServer.router.add``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any, cast
from wsgiref.types import StartResponse, WSGIEnvironment

import gevent.event
from gevent.pywsgi import LoggingLogAdapter, WSGIServer

from spicewire import __version__
from spicewire.addresses import Address, parse_address
from spicewire.errors import MigrationError, SpiceError
from spicewire.logs import session_label
from spicewire.protocol.migration import MigrationMode
from spicewire.server.events import Subscription
from spicewire.server.net import SpiceServer
from spicewire.server.session import PortState, Session

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_DEVICE_STATE = 256 << 20
MAX_IN_FLIGHT = 1 << 40  # an announced port backlog beyond this is a mistake, not a plan
_HEX_ID = re.compile(r"[0-9a-fA-F]{8}")
KEEPALIVE = 15.0  # s between SSE comments on a quiet stream: how a follower that left is noticed


class HttpError(SpiceError):
    """A control request that gets an error status instead of its answer."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass
class Request:
    method: str
    path: str
    environ: dict
    params: dict[str, str] = field(default_factory=dict)

    def content_length(self, limit: int) -> int:
        """The declared body size: 400 unless a decimal number, 413 above ``limit``."""
        text = (self.environ.get("CONTENT_LENGTH") or "0").strip()
        if not (text.isascii() and text.isdigit()):  # no sign, no spaces inside, no "1e3"
            raise HttpError(400, f"bad Content-Length {text[:40]!r}: expected a number of bytes")
        length = int(text)
        if length > limit:
            raise HttpError(413, f"body of {length} bytes is over the limit of {limit}")
        return length

    def body(self, limit: int) -> bytes:
        length = self.content_length(limit)
        try:
            return self.environ["wsgi.input"].read(length) if length else b""
        except OSError:  # the client closed before sending what it declared
            raise HttpError(400, f"the body ended before its Content-Length of {length} bytes") from None

    def json(self) -> Any:
        """The body as JSON (None when empty); 400 when it is not JSON."""
        body = self.body(MAX_BODY)
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise HttpError(400, f"body is not JSON: {err}") from None


@dataclass
class Raw:
    """An answer that is not JSON: ``body`` is bytes, or an iterator of them that is streamed."""

    body: bytes | Iterable[bytes]
    content_type: str


Handler = Callable[[Request], Any]


class Router:
    """Exact segments and ``{param}`` segments; 404 for an unknown path, 405 for a known path
    asked with the wrong method."""

    def __init__(self) -> None:
        self._routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        segments = _split(pattern)
        for known, methods in self._routes:
            if known == segments:
                if method in methods:
                    raise ValueError(f"{method} {pattern} is already routed")
                methods[method] = handler
                return
        self._routes.append((segments, {method: handler}))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        parts = _split(path)
        allowed: set[str] = set()
        best = None
        for segments, methods in self._routes:
            params = _match(segments, parts)
            if params is None:
                continue
            allowed.update(methods)
            # A literal segment beats a parameter: /sessions/x may be routed beside /sessions/{id}.
            if method in methods and (best is None or len(params) < len(best[1])):
                best = methods[method], params
        if best is not None:
            return best
        if allowed:
            allow = ", ".join(sorted(allowed))
            raise HttpError(405, f"{method} not allowed on {path}; use {allow}", (("Allow", allow),))
        raise HttpError(404, f"no such endpoint: {path}")

    def endpoints(self) -> list[str]:
        return [f"{m} /{'/'.join(s)}" for s, methods in self._routes for m in methods]


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.strip("/").split("/")) if path.strip("/") else ()


def _match(segments: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params = {}
    for segment, part in zip(segments, parts, strict=True):
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params


def parse_session_id(text: Any) -> int:
    """Eight hex digits, the one spelling of a session id in logs, answers and reports."""
    if isinstance(text, str) and _HEX_ID.fullmatch(text):
        return int(text, 16)
    raise HttpError(400, f"bad session id {text!r:.40}: expected 8 hex digits, as in \"aadce55b\"")


class ControlServer:
    """The control API of one SpiceServer, on ``(host, port)``; ``token`` demands a bearer token."""

    def __init__(self, spice: SpiceServer, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> None:
        self.spice = spice
        self.token = token
        self.router = Router()
        self.router.add("GET", "/status", self.get_status)
        self.router.add("GET", "/metrics", self.get_metrics)
        self.router.add("GET", "/events", self.get_events)
        self.router.add("GET", "/sessions", self.get_sessions)
        self.router.add("GET", "/sessions/{session}", self.get_session)
        self.router.add("POST", "/sessions/{session}/ports/{port}/pause", self.pause_port)
        self.router.add("POST", "/sessions/{session}/ports/{port}/resume", self.resume_port)
        self.router.add("GET", "/sessions/{session}/ports/{port}/digest", self.port_digest)
        self.router.add("POST", "/migrate", self.migrate)
        self.router.add("POST", "/migration/announce", self.announce)
        self.router.add("POST", "/migration/device-state", self.device_state)
        self.router.add("GET", "/migration/completed", self.completed)
        self.router.add("POST", "/migration/abort", self.abort)
        access = LoggingLogAdapter(logging.getLogger(f"{__name__}.access"), logging.DEBUG)
        self._wsgi = WSGIServer((host, port), self, log=access, error_log=log)
        self._streams: set[Subscription] = set()
        self._stopping = gevent.event.Event()

    @property
    def address(self) -> tuple[str, int]:
        return cast(tuple[str, int], self._wsgi.address[:2])  # a TCP server's (host, port)

    def start(self) -> None:
        self._wsgi.start()
        log.info("control API on http://%s:%d%s", *self.address, " (bearer token required)" if self.token else "")

    def stop(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        for sub in list(self._streams):
            sub.end()  # an event stream would otherwise hold its request open until killed
        self._wsgi.stop(timeout=timeout)

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # PATH_INFO is the percent-decoded path as latin-1 (PEP 3333); names are UTF-8.
        path = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace")
        request = Request(environ["REQUEST_METHOD"], path, environ)
        headers: tuple[tuple[str, str], ...] = ()
        try:
            self._authorize(environ)
            handler, request.params = self.router.resolve(request.method, path)
            result = handler(request)
            status, body = result if isinstance(result, tuple) else (200, result)
        except HttpError as err:
            status, body, headers = err.status, {"error": err.message, "status": err.status}, err.headers
        except Exception:
            log.exception("control request %s %s failed", request.method, path)
            status, body = 500, {"error": "internal error (see the server log)", "status": 500}
        phrase = f"{status} {HTTPStatus(status).phrase}"
        if isinstance(body, Raw):
            if isinstance(body.body, bytes):
                start_response(phrase, [("Content-Type", body.content_type),
                                        ("Content-Length", str(len(body.body))), *headers])
                return [body.body]
            start_response(phrase, [("Content-Type", body.content_type), ("Cache-Control", "no-cache"), *headers])
            return body.body
        data = json.dumps(body, indent=1).encode() + b"\n"
        start_response(phrase, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
        return [data]

    def _authorize(self, environ: dict) -> None:
        if self.token is None:
            return
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            challenge = ("WWW-Authenticate", 'Bearer realm="spicewire"')
            raise HttpError(401, "a valid bearer token is required", (challenge,))

    # --- lookups ------------------------------------------------------------------------------

    def session(self, request: Request) -> Session:
        session_id = parse_session_id(request.params["session"])
        session = self.spice.sessions.get(session_id)
        if session is None:
            raise HttpError(404, f"no session {session_id:08x}")
        return session

    def port(self, request: Request) -> tuple[Session, PortState]:
        session = self.session(request)
        name = request.params["port"]
        for port in session.ports.values():
            if port.name == name:
                return session, port
        raise HttpError(404, f"session {session.id:08x} has no port {name!r}")

    # --- endpoints ----------------------------------------------------------------------------

    def get_status(self, request: Request) -> dict:
        cfg = self.spice.config
        host, port = self.spice.address
        started = self.spice.started
        return {
            "version": __version__,
            "listen": {"host": host, "port": port},
            "uptime": None if started is None else round(time.monotonic() - started, 3),
            "sessions": len(self.spice.sessions),
            "event_subscribers": self.spice.events.subscribers,
            "config": {
                "ticketing": cfg.password is not None,
                "password_expiry": cfg.password_expiry,
                "port_channels": [{"name": name, "device": kind} for name, kind in cfg.port_channels],
                "limits": asdict(cfg.limits),
                "link_timeout": cfg.link_timeout,
                "stall_timeout": cfg.stall_timeout,
            },
            "endpoints": self.router.endpoints(),
        }

    def get_metrics(self, request: Request) -> Raw:
        return Raw(self.spice.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")

    def get_events(self, request: Request) -> Raw:
        """Server-Sent Events: one ``event:``/``data:`` pair per event, the data a JSON object.
        Subscribed before the answer starts, so nothing that happens after the request is missed."""
        sub = self.spice.events.subscribe()
        self._streams.add(sub)
        return Raw(self._event_stream(sub), "text/event-stream")

    def _event_stream(self, sub: Subscription) -> Iterator[bytes]:
        try:
            yield b": spicewire events\n\n"  # the headers and this go out at once: the follower is subscribed
            while not sub.ended:
                batch = sub.get(timeout=KEEPALIVE)
                if not batch:
                    yield b": keep-alive\n\n"
                    continue
                yield b"".join(f"event: {e['event']}\ndata: {json.dumps(e)}\n\n".encode() for e in batch)
        finally:  # the follower left (the write failed) or the server stops
            sub.close()
            self._streams.discard(sub)

    def get_sessions(self, request: Request) -> dict:
        return {"sessions": [session_view(s) for s in list(self.spice.sessions.values())]}

    def get_session(self, request: Request) -> dict:
        return session_view(self.session(request))

    def pause_port(self, request: Request) -> dict:
        return self._lever(request, "pause")

    def resume_port(self, request: Request) -> dict:
        return self._lever(request, "resume")

    def _lever(self, request: Request, action: str) -> dict:
        session, port = self.port(request)
        if port.failed is not None:
            raise HttpError(409, f"session {session.id:08x} port {port.name}: {port.failed}")
        try:
            getattr(port.device, action)()
        except NotImplementedError as err:
            raise HttpError(409, str(err)) from None
        log.info("session %08x port %s: device %sd over the control API", session.id, port.name, action)
        return {"session_id": session_label(session.id), "port": port.name, "device": port.device.status()}

    def port_digest(self, request: Request) -> dict:
        session, port = self.port(request)
        return {"session_id": session_label(session.id), "port": port.name, "device": port.device.status()}


    # --- migration ----------------------------------------------------------------------------

    def migrate(self, request: Request) -> dict:
        """Move every session to another server: ``{"to": "HOST:PORT", "to_control": "HOST:PORT",
        "mode": "seamless"|"semi-seamless", "timeout": s, "to_token": T}``; answers with the report
        once the migration is over (this request waits; the SPICE traffic does not)."""
        body = _object(request.json(), "migrate request")
        to = _address(body, "to")
        to_control = _address(body, "to_control")
        modes = {mode.label: mode for mode in (MigrationMode.SEAMLESS, MigrationMode.SEMI_SEAMLESS)}
        mode_name = body.get("mode", MigrationMode.SEAMLESS.label)
        if mode_name not in modes:
            raise HttpError(400, f"bad migrate request: mode must be one of {', '.join(modes)}, not {mode_name!r}")
        timeout = _seconds(body, "timeout", 30.0, "migrate request")
        token = body.get("to_token")
        if token is not None and not isinstance(token, str):
            raise HttpError(400, "bad migrate request: to_token must be a string")
        try:
            return self.spice.migration.migrate(to, to_control, modes[mode_name], timeout, token)
        except MigrationError as err:
            raise HttpError(502, str(err)) from None

    def announce(self, request: Request) -> dict:
        body = _object(request.json(), "announcement")
        sessions = _announced_sessions(body.get("sessions"))
        ttl = _seconds(body, "ttl", 90.0, "announcement")
        try:
            count = self.spice.migration.announce(sessions, ttl)
        except ValueError as err:  # an unknown device kind
            raise HttpError(400, f"bad announcement: {err}") from None
        except MigrationError as err:
            raise HttpError(409, str(err)) from None
        return {"announced": count}

    def device_state(self, request: Request) -> dict:
        body = request.body(MAX_DEVICE_STATE)
        try:
            return {"restored": self.spice.migration.receive_device_states(body)}
        # The container and its JSON index are the peer's bytes all the way down: any shape
        # they do not have (a missing chunk, an index entry that is not an object) is its fault.
        except (SpiceError, ValueError, KeyError, TypeError, IndexError) as err:
            raise HttpError(400, f"bad device state: {err}") from None

    def completed(self, request: Request) -> dict:
        query = request.environ.get("QUERY_STRING", "")
        ids = [part for key, _, value in (p.partition("=") for p in query.split("&")) if key == "ids"
               for part in value.split(",") if part]
        manager = self.spice.migration
        answer = {}
        for text in ids:
            sid = parse_session_id(text)
            if sid in manager.completed:
                answer[text] = manager.completed[sid]
            elif sid in manager.failed:
                answer[text] = {"failed": manager.failed[sid]}
        return answer

    def abort(self, request: Request) -> dict:
        """s1 took these sessions back: drop whatever arrived of them here."""
        body = _object(request.json(), "abort")
        texts = body.get("sessions")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise HttpError(400, "bad abort: sessions must be a list of session ids (8 hex digits)")
        return {"aborted": self.spice.migration.abort([parse_session_id(text) for text in texts])}


# --- request bodies: each field checked, so bad input is a 400 that names it, never a 500 ---------


def _object(body: Any, what: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise HttpError(400, f"bad {what}: the body must be a JSON object, not {type(body).__name__}")
    return body


def _address(body: dict, key: str) -> Address:
    if key not in body:
        raise HttpError(400, f"bad migrate request: {key} (HOST:PORT) is missing")
    try:
        return parse_address(body[key])
    except ValueError as err:
        raise HttpError(400, f"bad migrate request: {key}: {err}") from None


def _seconds(body: dict, key: str, default: float, what: str) -> float:
    value = body.get(key, default)
    # bool is an int to Python, not a duration to anyone; NaN fails the comparison
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise HttpError(400, f"bad {what}: {key} must be a finite number of seconds above 0, not {value!r}")
    return float(value)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _announced_sessions(sessions: Any) -> list[dict]:
    """``[{"session_id": "8 hex digits", "ports": [[channel id, name, kind, in-flight bytes], ...]}]``;
    answers them with each session_id as its number."""
    if not isinstance(sessions, list):
        raise HttpError(400, "bad announcement: sessions must be a list")
    checked = []
    for entry in sessions:
        sid = entry.get("session_id") if isinstance(entry, dict) else None
        if not isinstance(sid, str) or not _HEX_ID.fullmatch(sid) or int(sid, 16) == 0:
            raise HttpError(400, f"bad announcement: {entry!r:.80} needs a session_id of 8 hex digits, not 00000000")
        ports = entry.get("ports")
        if not isinstance(ports, list) or not all(_announced_port(port) for port in ports):
            raise HttpError(400, f"bad announcement: session {sid} needs ports as "
                            "[[channel id, name, device kind, in-flight bytes], ...]")
        checked.append({**entry, "session_id": int(sid, 16)})
    return checked


def _announced_port(port: Any) -> bool:
    return (isinstance(port, list) and len(port) in (3, 4) and _whole(port[0], 0, 255)
            and isinstance(port[1], str) and isinstance(port[2], str)
            and (len(port) == 3 or _whole(port[3], 0, MAX_IN_FLIGHT)))


def session_view(session: Session) -> dict:
    """Session.status() plus each socket's unsent bytes."""
    view = session.status()
    if session.main is not None:
        view["main"]["pending_write"] = session.main.transport.pending_write
    for port, port_view in zip(session.ports.values(), view["ports"], strict=True):
        if port.connection is not None:
            port_view["channel"]["pending_write"] = port.connection.transport.pending_write
    return view
