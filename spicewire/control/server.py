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

import errno
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from typing import Any, cast
from wsgiref.types import StartResponse, WSGIEnvironment

import gevent
import gevent.event
import numpy as np
from gevent import socket
from gevent.pywsgi import Input, LoggingLogAdapter, WSGIHandler, WSGIServer

from spicewire import __version__
from spicewire.addresses import Address, parse_address
from spicewire.client.tls import parse_subject
from spicewire.control.client import HTTPS
from spicewire.errors import MigrationError, SpiceError
from spicewire.logs import iso_utc, parse_session_label, session_label
from spicewire.protocol.enums import MAX_PASSWORD_LENGTH
from spicewire.protocol.migration import MigrationMode
from spicewire.server.admission import host_of
from spicewire.server.events import Subscription
from spicewire.server.migration.orchestrator import PREPARED_WAIT_MAX, MigrationBusy, UnknownMigration
from spicewire.server.migration.precopy import PrecopyNoRoom, discard_body, receive_port_precopy
from spicewire.server.net import SpiceServer
from spicewire.server.session import PortState, Session
from spicewire.tlssocket import TlsSocket
from spicewire.turns import BulkTurns

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_DEVICE_STATE = 256 << 20
MAX_PRECOPY = 1 << 40  # a pre-copy round is read into the regions its index names, never held whole
MAX_IN_FLIGHT = 1 << 40  # an announced port backlog beyond this is a mistake, not a plan
_MIGRATION_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class ControlLimits:
    """What one client may take of the control server. The SPICE listener shares the process's
    descriptors and memory, so an idle, slow or greedy control client must run out first."""

    max_connections: int = 64  # more are answered 503 and closed at once
    header_timeout: float = 10.0  # s from a request's first byte awaited to its last header; also keep-alive idling
    body_timeout: float = 10.0  # s for any body, plus its size at body_rate
    body_rate: float = float(1 << 20)  # bytes/s: a slower sender is cut off (408)
    body_budget: int = 2 * MAX_DEVICE_STATE  # bytes of request bodies held at once, all connections together
    keepalive: float = 15.0  # s between SSE comments on a quiet stream: how a follower that left is noticed


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
    limits: ControlLimits = field(default_factory=ControlLimits)
    budget: _BodyBudget | None = None
    held: int = 0  # bytes of the budget this request holds until its answer is made
    consumed: bool = True  # False while a declared body is left unread

    def content_length(self, limit: int) -> int:
        """The declared body size: 400 unless a decimal number, 413 above ``limit``, 411 for a
        chunked body (its size is known only at its end, past any budget)."""
        if "chunked" in self.environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            raise HttpError(411, "a body needs a Content-Length; chunked bodies are not taken")
        text = (self.environ.get("CONTENT_LENGTH") or "0").strip()
        if not (text.isascii() and text.isdigit()):  # no sign, no spaces inside, no "1e3"
            raise HttpError(400, f"bad Content-Length {text[:40]!r}: expected a number of bytes")
        length = int(text)
        if length > limit:
            raise HttpError(413, f"body of {length} bytes is over the limit of {limit}")
        return length

    def body(self, limit: int) -> bytes | bytearray:
        """The whole body, read into one buffer of its declared size (never a list of chunks that
        is joined: twice the memory) within ``limits``' deadline for that size."""
        length = self.content_length(limit)
        if not length:
            return b""
        if self.budget is not None:
            self.budget.take(length)
            self.held = length
        buffer = bytearray(length)
        view = memoryview(buffer)
        stream = self.environ["wsgi.input"]
        seconds = self.limits.body_timeout + length / self.limits.body_rate
        got = 0
        turns = BulkTurns()  # a peer that always has bytes ready would keep the hub (turns.py)
        try:
            late = HttpError(408, f"the body of {length} bytes did not arrive within {seconds:g} s")
            with gevent.Timeout(seconds, late):
                while got < length:
                    chunk = stream.read(min(length - got, 1 << 20))
                    if not chunk:
                        break
                    view[got:got + len(chunk)] = chunk
                    got += len(chunk)
                    turns.share(len(chunk))
        except OSError:  # the client closed or reset before sending what it declared
            got = -1
        finally:
            view.release()
        if got != length:
            raise HttpError(400, f"the body ended before its Content-Length of {length} bytes")
        self.consumed = True
        return buffer

    def json(self) -> Any:
        """The body as JSON (None when empty); 400 when it is not JSON."""
        body = self.body(MAX_BODY)
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError) as err:
            raise HttpError(400, f"body is not JSON: {err}") from None
        except RecursionError:  # nesting deeper than the parser's stack
            raise HttpError(400, "body is not JSON this server takes: nested too deeply") from None


class _BodyBudget:
    """Bytes of request bodies in memory at once, over all connections: 503 past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise HttpError(503, f"{self.held} bytes of request bodies are in memory already; "
                            f"{size} more would pass the limit of {self.limit}: retry later")
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class _UndrainedInput(Input):
    """A body the application left unread is not drained after its answer (gevent's default
    reads it to the end, with no deadline): the answer closes the connection instead."""

    __slots__ = ()

    def _discard(self) -> None:
        if self.position >= (self.content_length or 0) and not self.chunked_input:
            super()._discard()  # type: ignore[misc]  # private to gevent, absent from its stubs


class _Handler(WSGIHandler):
    """gevent's handler with a deadline on reading a request's line and headers (and on idling
    between requests): a connection that sends them slowly, or nothing, is closed."""

    _deadline: gevent.Timeout | None = None

    def read_requestline(self) -> Any:
        limit = cast(_ControlWSGIServer, self.server).limits.header_timeout
        self._deadline = gevent.Timeout.start_new(limit, socket.timeout(f"no complete request head within {limit:g} s"))
        try:
            return super().read_requestline()
        except ssl.SSLError as err:  # an HTTPS API's handshake runs here; gevent drops the error unsaid
            log.info("control connection from %s ended: TLS: %s", self.client_address or "a Unix socket peer",
                     err.reason or err)
            raise

    def handle_one_request(self) -> Any:
        try:
            return super().handle_one_request()
        finally:
            self._end_deadline()

    def get_environ(self) -> Any:
        self._end_deadline()  # the head is in; the body has its own deadline (Request.body)
        environ = super().get_environ()
        self.wsgi_input.__class__ = _UndrainedInput  # same slots: only _discard differs
        return environ

    def _end_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    def _handle_client_error(self, ex: BaseException) -> Any:
        """A head gevent could not parse (too many headers, a bad Content-Length, not HTTP): a 400
        that says why, and one log line, instead of gevent's empty 400 and a traceback on stderr."""
        if isinstance(ex, OSError):  # the deadline or the peer ended the head: nothing to answer
            return None
        text = getattr(ex, "formatted_message", None) or str(ex) or type(ex).__name__
        reason = " ".join(str(text).split())[:200]  # one line, however the peer spelled it
        log.info("control request from %s refused: %s", self.client_address or "a Unix socket peer", reason)
        return "400", _closing_answer(400, f"bad request: {reason}")


def _closing_answer(status: int, message: str) -> bytes:
    """A whole HTTP answer, head and JSON body, for a connection that closes after it."""
    body = json.dumps({"error": message, "status": status}).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


_BUSY = _closing_answer(503, "too many control connections: retry later")


class _ControlWSGIServer(WSGIServer):
    """Counts its connections: past ``limits.max_connections`` a new one gets a 503 and is closed
    at once, so control clients never hold the descriptors SPICE links need."""

    handler_class = _Handler

    def __init__(self, listener: Any, application: Any, limits: ControlLimits,
                 tls: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        # The handshake happens at the first read, inside the handler's deadlines: a client that
        # stalls in it holds its own connection only.
        https: dict[str, Any] = {} if tls is None else {"ssl_context": tls, "do_handshake_on_connect": False}
        super().__init__(listener, application, **https, **kwargs)
        self.tls = tls
        self.limits = limits
        self.connections = 0

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> Any:
        # gevent's SSLSocket hands the reader one 16 KiB record a call; a TlsSocket decrypts all
        # the records one system call brought (a pre-copy body: 256 KiB of them).
        assert self.tls is not None  # gevent calls this only with an ssl_context
        with TlsSocket(client_socket, self.tls, server_side=True) as sock:
            return self.handle(sock, address)

    def handle(self, sock: Any, address: Any) -> None:
        if self.connections >= self.limits.max_connections:
            try:
                sock.settimeout(1.0)
                sock.sendall(_BUSY)
            except OSError:
                log.debug("a control connection over the cap left before its 503")
            finally:
                sock.close()
            return
        self.connections += 1
        try:
            super().handle(sock, address)
        finally:
            self.connections -= 1


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
    """Eight hex digits, the one spelling of a session id in logs, answers and reports; else 400."""
    try:
        return parse_session_label(text)
    except ValueError as err:
        raise HttpError(400, str(err)) from None


def unix_listener(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` that only its owner can connect to (mode 0600). An
    existing file there is replaced only when it is a socket nobody listens on (a stale one);
    anything else is an OSError that names it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a server that did not stop cleanly
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes the file 0600 from its creation: a chmod after bind would leave a window.
    umask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(umask)
    listener.listen(128)
    return listener


class ControlServer:
    """The control API of one SpiceServer, on ``(host, port)`` or on the Unix socket ``unix``
    (then host and port are unused); ``token`` demands a bearer token; with ``tls`` (a server
    context, as the SPICE TLS listener's) it is HTTPS.

    The server-to-server endpoints (``/migration/*``) always demand a bearer token, whatever
    ``token`` is: ``peer_token``, else ``token``; with neither, this server takes no migrations
    (403). They create sessions and hold memory for them, so an open operator API on loopback
    must not open them to every local user too."""

    def __init__(self, spice: SpiceServer, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 *, unix: str | None = None, limits: ControlLimits | None = None,
                 tls: ssl.SSLContext | None = None, peer_token: str | None = None) -> None:
        self.spice = spice
        self.token = token
        self.peer_token = peer_token
        self.unix = unix
        self.tls = tls
        self.limits = limits or ControlLimits()
        self._budget = _BodyBudget(self.limits.body_budget)
        self.router = Router()
        self.router.add("GET", "/status", self.get_status)
        self.router.add("GET", "/metrics", self.get_metrics)
        self.router.add("GET", "/events", self.get_events)
        self.router.add("GET", "/sessions", self.get_sessions)
        self.router.add("GET", "/sessions/{session}", self.get_session)
        self.router.add("POST", "/sessions/{session}/ports/{port}/pause", self.pause_port)
        self.router.add("POST", "/sessions/{session}/ports/{port}/resume", self.resume_port)
        self.router.add("GET", "/sessions/{session}/ports/{port}/digest", self.port_digest)
        self.router.add("GET", "/sessions/{session}/screen.png", self.screen_png)
        self.router.add("POST", "/password", self.set_password)
        self.router.add("POST", "/tickets", self.issue_ticket)
        self.router.add("POST", "/migrate", self.migrate)
        self.router.add("POST", "/migration/announce", self.announce)
        self.router.add("POST", "/migration/device-state", self.device_state)
        self.router.add("POST", "/migration/display-precopy", self.display_precopy)
        self.router.add("POST", "/migration/port-precopy", self.port_precopy)
        self.router.add("GET", "/migration/completed", self.completed)
        self.router.add("GET", "/migration/prepared", self.prepared)
        self.router.add("POST", "/migration/abort", self.abort)
        access = LoggingLogAdapter(logging.getLogger(f"{__name__}.access"), logging.DEBUG)
        listener: Any = (host, port) if unix is None else unix_listener(unix)
        self._wsgi = _ControlWSGIServer(listener, self, self.limits, tls, log=access, error_log=log)
        self._streams: set[Subscription] = set()
        self._stopping = gevent.event.Event()

    @property
    def address(self) -> tuple[str, int]:
        return cast(tuple[str, int], self._wsgi.address[:2])  # a TCP server's (host, port)

    @property
    def where(self) -> str:
        """What an operator types to reach it: ``unix:PATH`` or ``HOST:PORT``."""
        return f"unix:{self.unix}" if self.unix is not None else str(Address(*self.address))

    def start(self) -> None:
        self._wsgi.start()
        where = self.where if self.unix is not None else f"{'https' if self.tls else 'http'}://{self.where}"
        log.info("control API on %s%s", where, " (bearer token required)" if self.token else "")
        if self.peer_token is None and self.token is None:
            log.info("no peer token: this server refuses migrations to it (/migration/* answers 403)")

    def stop(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        for sub in list(self._streams):
            sub.end()  # an event stream would otherwise hold its request open until killed
        self._wsgi.stop(timeout=timeout)
        if self.unix is not None and os.path.exists(self.unix):
            os.unlink(self.unix)

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # PATH_INFO is the percent-decoded path as latin-1 (PEP 3333); names are UTF-8.
        path = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "replace")
        request = Request(environ["REQUEST_METHOD"], path, environ, limits=self.limits, budget=self._budget)
        declared = (environ.get("CONTENT_LENGTH") or "0").strip()
        request.consumed = declared in ("", "0") and "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "")
        headers: tuple[tuple[str, str], ...] = ()
        try:
            self._authorize(environ, path)
            handler, request.params = self.router.resolve(request.method, path)
            result = handler(request)
            status, body = result if isinstance(result, tuple) else (200, result)
        except HttpError as err:
            status, body, headers = err.status, {"error": err.message, "status": err.status}, err.headers
        except Exception:
            log.exception("control request %s %s failed", request.method, path)
            status, body = 500, {"error": "internal error (see the server log)", "status": 500}
        finally:
            if request.held:  # the handler is done with the body; the answer holds no reference to it
                self._budget.give(request.held)
        if not request.consumed:  # its unread rest would read as the next request: end the connection
            headers = (*headers, ("Connection", "close"))
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

    def _authorize(self, environ: dict, path: str) -> None:
        if _split(path)[:1] == ("migration",):
            secret = self.peer_token or self.token
            if secret is None:
                raise HttpError(403, "this server takes no migrations: it has no peer token "
                                "(serve --peer-token-file, $SPICEWIRE_PEER_TOKEN or --control-token)")
        elif self.token is None:
            return
        else:
            secret = self.token
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), secret.encode()):
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
        started = self.spice.started
        password, expiry = self.spice.password
        return {
            "version": __version__,
            "listen": _listener(lambda: self.spice.address),
            "tls_listen": _listener(lambda: self.spice.tls_address),
            "uptime": None if started is None else round(time.monotonic() - started, 3),
            "sessions": len(self.spice.sessions),
            "event_subscribers": self.spice.events.subscribers,
            # Links beyond the ready keys wait for one: a caller about to send a burst can wait for these.
            "link_keys": {"ready": self.spice.keys.ready, "pool": self.spice.keys.size,
                          "made_on_demand": self.spice.keys.made_on_demand},
            # What the sessions hold against --memory-budget, and what one client cost the others.
            "memory": {**self.spice.budget.status(), "flood_reads": self.spice.flood_reads,
                       "unread_closed": self.spice.unread_closed, "releasing": self.spice.releaser.pending},
            "config": {
                "ticketing": password is not None,
                "password_expiry": expiry,
                "secure_channels": sorted(cfg.secure_channels),
                "plaintext_channels": sorted(cfg.plaintext_channels),
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
                batch = sub.get(timeout=self.limits.keepalive)
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

    def screen_png(self, request: Request) -> Raw:
        """The session's screen as the server has it, as a PNG (what its client should show)."""
        session = self.session(request)
        if session.display is None:
            raise HttpError(404, f"session {session.id:08x} has no display")
        return Raw(screen_png(session.display.screen.framebuffer), "image/png")

    def port_digest(self, request: Request) -> dict:
        session, port = self.port(request)
        return {"session_id": session_label(session.id), "port": port.name, "device": port.device.status()}


    def set_password(self, request: Request) -> dict:
        """QMP's set_password and expire_password in one: ``{"password": str|null, "expires_in":
        s|null}``. A string sets the password (never expiring unless expires_in says otherwise),
        null turns ticketing off; without "password", only the expiry changes: seconds from now
        (0: at once), null: never. New links check it; linked channels stay."""
        body = _object(request.json(), "password request")
        unknown = sorted(set(body) - {"password", "expires_in"})
        if unknown or not body:
            raise HttpError(400, f"bad password request: {'unknown field ' + unknown[0] if unknown else 'empty'}; "
                            "expected {\"password\": str|null, \"expires_in\": seconds|null}")
        current, expiry = self.spice.password
        password = body.get("password", current)
        if password is not None and not _is_password(password):
            raise HttpError(400, f"bad password request: password must be a string of 1-{MAX_PASSWORD_LENGTH} "
                            "bytes without NUL, or null to turn ticketing off")
        if "password" in body:
            expiry = None  # a new password starts afresh, as a restarted server would
        if "expires_in" in body:
            seconds = body["expires_in"]
            if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                        or not 0 <= seconds < math.inf):
                raise HttpError(400, "bad password request: expires_in must be a finite number of seconds, "
                                f"0 or more, or null for never, not {seconds!r:.40}")
            if seconds is not None and password is None:
                raise HttpError(400, "bad password request: ticketing is off, there is no password to expire")
            expiry = None if seconds is None else time.time() + seconds
        self.spice.set_password(password, expiry)
        state = ("ticketing off" if password is None
                 else "it never expires" if expiry is None else f"it expires at {iso_utc(expiry)}")
        log.info("password %s over the control API; %s", "set" if "password" in body else "expiry changed", state)
        return {"ticketing": password is not None, "password_expiry": None if expiry is None else iso_utc(expiry)}

    def issue_ticket(self, request: Request) -> dict:
        """A one-time ticket, as management stacks issue console tickets: ``{"session_id":
        null|"8hex", "expires_in": s}``. It opens one main link, a new session (null) or the named
        one, before it expires; that session's other channels link with it while the session lives."""
        body = _object(request.json(), "ticket request")
        unknown = sorted(set(body) - {"session_id", "expires_in"})
        if unknown:
            raise HttpError(400, f"bad ticket request: unknown field {unknown[0]}; "
                            "expected {\"session_id\": null|\"8 hex digits\", \"expires_in\": seconds}")
        given = body.get("session_id")
        session_id = None if given is None else parse_session_id(given)
        if session_id == 0:
            raise HttpError(400, "bad ticket request: session_id 00000000 names no session; null opens a new one")
        lifetime = _seconds(body, "expires_in", 60.0, "ticket request")
        try:
            ticket = self.spice.session_tickets.issue(session_id, lifetime, time.monotonic())
        except OverflowError as err:
            raise HttpError(503, str(err)) from None
        log.info("ticket issued for %s, expiring in %g s",
                 "a new session" if session_id is None else f"session {session_label(session_id)}", lifetime)
        return {"ticket": ticket.secret, "session_id": given, "expires_at": iso_utc(time.time() + lifetime)}

    # --- migration ----------------------------------------------------------------------------

    def migrate(self, request: Request) -> dict:
        """Move every session to another server: ``{"to": "HOST:PORT", "to_control": "HOST:PORT",
        "mode": "seamless"|"semi-seamless", "timeout": s, "to_token": T, "to_peer_token": P}``
        (P, else T, authenticates s1 to s2's ``/migration/*``); answers with the report
        once the migration is over (this request waits; the SPICE traffic does not). A TLS
        destination adds ``"to_tls_port"`` (then ``to``'s port may be 0: TLS only) and
        ``"to_cert_subject"`` (``k=v,...``; without it clients check s2's host name); an
        ``https://`` to_control is reached over TLS."""
        body = _object(request.json(), "migrate request")
        tls_port = body.get("to_tls_port", 0)
        if not (isinstance(tls_port, int) and not isinstance(tls_port, bool) and 0 <= tls_port <= 65535):
            raise HttpError(400, f"bad migrate request: to_tls_port must be a port, 0-65535, not {tls_port!r:.40}")
        subject = body.get("to_cert_subject")
        try:
            if subject is not None and not (isinstance(subject, str) and parse_subject(subject)):
                raise ValueError("expected k=v,k=v (a certificate subject as spice-gtk reads it)")
        except ValueError as err:
            raise HttpError(400, f"bad migrate request: to_cert_subject: {err}") from None
        to = _address(body, "to", allow_port_zero=tls_port != 0)
        control = body.get("to_control")
        control_tls = isinstance(control, str) and control.startswith(HTTPS)
        if isinstance(control, str) and control_tls:
            body = {**body, "to_control": control.removeprefix(HTTPS)}
        to_control = _address(body, "to_control")
        modes = {mode.label: mode for mode in (MigrationMode.SEAMLESS, MigrationMode.SEMI_SEAMLESS)}
        mode_name = body.get("mode", MigrationMode.SEAMLESS.label)
        if mode_name not in modes:
            raise HttpError(400, f"bad migrate request: mode must be one of {', '.join(modes)}, not {mode_name!r}")
        timeout = _seconds(body, "timeout", 30.0, "migrate request")
        tokens = {key: body.get(key) for key in ("to_token", "to_peer_token")}
        for key, token in tokens.items():
            if token is not None and not isinstance(token, str):
                raise HttpError(400, f"bad migrate request: {key} must be a string")
        try:
            return self.spice.migration.migrate(to, to_control, modes[mode_name], timeout, tokens["to_token"],
                                                to_tls_port=tls_port, to_cert_subject=subject,
                                                to_control_tls=control_tls, to_peer_token=tokens["to_peer_token"])
        except MigrationBusy as err:
            raise HttpError(409, str(err)) from None
        except MigrationError as err:
            raise HttpError(502, str(err)) from None

    def announce(self, request: Request) -> dict:
        """s1 says which sessions its migration ``migration`` (16 hex digits it chose) will bring."""
        body = _object(request.json(), "announcement")
        sessions = _announced_sessions(body.get("sessions"))
        ttl = _seconds(body, "ttl", 90.0, "announcement")
        migration = _migration_id(body.get("migration"), "announcement")
        key = body.get("state_key")
        if key is not None and not (isinstance(key, str) and re.fullmatch(r"[0-9a-f]{64}", key)):
            raise HttpError(400, "bad announcement: state_key must be 64 hex digits (a 32-byte key)")
        try:
            count = self.spice.migration.announce(migration, sessions, ttl,
                                                  state_key=bytes.fromhex(key) if key is not None else None,
                                                  offered_auth=body.get("state_auth"),
                                                  offered_display=body.get("display_state"))
        except ValueError as err:  # an unknown device kind
            raise HttpError(400, f"bad announcement: {err}") from None
        except MigrationError as err:
            raise HttpError(409, str(err)) from None
        # What this server takes beyond the baseline, so s1 uses only that.
        return {"announced": count, **self.spice.migration.features(state_key=key is not None,
                                                                    offered_auth=body.get("state_auth"),
                                                                    offered_display=body.get("display_state"))}

    def device_state(self, request: Request) -> dict:
        """``?migration=ID``: the devices of sessions that migration announced; the answer names
        the entries it skipped."""
        return self._migration_body(request, "device state", self.spice.migration.receive_device_states)

    def display_precopy(self, request: Request) -> dict:
        """``?migration=ID``: the pictures of sessions that migration announced, sent while their
        screens still run; only the tiles changed since follow with the device state."""
        return self._migration_body(request, "display pre-copy", self.spice.migration.receive_display_precopy)

    def _migration_body(self, request: Request, what: str, receive: Callable[[str, bytes | bytearray], dict]) -> dict:
        """A body of at most MAX_DEVICE_STATE for ``receive``, for the migration in ``?migration=ID``."""
        request.content_length(MAX_DEVICE_STATE)  # a bad header is refused before anything else
        migration = _migration_id(_query(request).get("migration"), what)
        body = request.body(MAX_DEVICE_STATE)
        try:
            return receive(migration, body)
        except UnknownMigration as err:
            raise HttpError(404, str(err)) from None
        # The container and its JSON index are the peer's bytes all the way down: any shape
        # they do not have (a missing chunk, an index entry that is not an object) is its fault.
        except (SpiceError, ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
            raise HttpError(400, f"bad {what}: {err}") from None

    def port_precopy(self, request: Request) -> dict:
        """``?migration=ID``: one round of the pre-copy of queued port bytes (server/migration/
        precopy.py), read straight into the memory each port's region has here."""
        size = request.content_length(MAX_PRECOPY)
        migration = _migration_id(_query(request).get("migration"), "port pre-copy")
        manager = self.spice.migration
        if not self.spice.config.precopy:
            raise HttpError(409, "this server takes no port pre-copy (serve --no-precopy)")
        if not manager.in_progress(migration):
            raise HttpError(404, f"no migration {migration} in progress here")
        seconds = request.limits.body_timeout + size / request.limits.body_rate
        late = HttpError(408, f"the pre-copy of {size} bytes did not arrive within {seconds:g} s")
        stream = request.environ["wsgi.input"]
        try:
            with gevent.Timeout(seconds, late):
                try:
                    answer = receive_port_precopy(manager, migration, stream, size)
                except PrecopyNoRoom as err:
                    # s1 falls back on hearing it: the rest of the round is read and dropped
                    # first, or s1, still sending it, would see only the connection reset.
                    discard_body(stream, err.unread)
                    request.consumed = True
                    raise HttpError(507, str(err)) from None
        except HttpError:
            raise
        except (SpiceError, ValueError, KeyError, TypeError, OSError) as err:
            raise HttpError(400, f"bad port pre-copy: {err}") from None
        request.consumed = True
        return answer

    def completed(self, request: Request) -> dict:
        """``?ids=A,B``, and ``&migration=ID`` to hear only of the sessions that migration announced."""
        query = request.environ.get("QUERY_STRING", "")
        ids = [part for key, _, value in (p.partition("=") for p in query.split("&")) if key == "ids"
               for part in value.split(",") if part]
        given = _query(request).get("migration")
        migration = None if given is None else _migration_id(given, "completed query")
        manager = self.spice.migration
        answer = {}
        for text in ids:
            sid = parse_session_id(text)
            if migration is not None and manager.migration_of.get(sid) != migration:
                continue
            if sid in manager.completed:
                answer[text] = manager.completed[sid]
            elif sid in manager.failed:
                answer[text] = {"failed": manager.failed[sid]}
        return answer

    def prepared(self, request: Request) -> dict:
        """``?migration=ID&wait=S``: whether the memory the migration's big MIGRATE_DATA bodies
        land in is faulted in, answered once it is or S seconds passed (at most PREPARED_WAIT_MAX)."""
        query = _query(request)
        migration = _migration_id(query.get("migration"), "prepared query")
        try:
            wait = float(query.get("wait", "0"))
        except ValueError:
            wait = math.nan
        if not 0 <= wait <= PREPARED_WAIT_MAX:  # NaN fails this too
            raise HttpError(400, f"bad prepared query: wait must be 0 to {PREPARED_WAIT_MAX:g} seconds, "
                                 f"not {query.get('wait')!r:.40}")
        return {"prepared": self.spice.migration.prepared(migration, wait)}

    def abort(self, request: Request) -> dict:
        """s1 took these sessions of its migration back: drop whatever arrived of them here."""
        body = _object(request.json(), "abort")
        migration = _migration_id(body.get("migration"), "abort")
        texts = body.get("sessions")
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise HttpError(400, "bad abort: sessions must be a list of session ids (8 hex digits)")
        try:
            return {"aborted": self.spice.migration.abort(migration, [parse_session_id(text) for text in texts])}
        except UnknownMigration as err:
            raise HttpError(404, str(err)) from None


# --- request bodies: each field checked, so bad input is a 400 that names it, never a 500 ---------


def _migration_id(value: Any, what: str) -> str:
    """16 hex digits that the source chose at random for one migration: the proof, on every call
    between servers, that the caller is the source that announced it."""
    if isinstance(value, str) and _MIGRATION_ID.fullmatch(value):
        return value
    raise HttpError(400, f"bad {what}: migration must be the migration's id, 16 hex digits, not {value!r:.40}")


def _query(request: Request) -> dict[str, str]:
    query = request.environ.get("QUERY_STRING", "")
    return {key: value for key, _, value in (part.partition("=") for part in query.split("&")) if key}


def _is_password(value: Any) -> bool:
    """What a SPICE ticket can carry: 1-60 bytes of UTF-8 without NUL (an empty one matches nobody)."""
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_PASSWORD_LENGTH and "\0" not in value


def _listener(address: Callable[[], tuple[str, int]]) -> dict | None:
    """A listener's {"host", "port"}, or None for a server without that listener."""
    try:
        host, port = address()
    except LookupError:
        return None
    return {"host": host, "port": port}


def _object(body: Any, what: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise HttpError(400, f"bad {what}: the body must be a JSON object, not {type(body).__name__}")
    return body


def _address(body: dict, key: str, allow_port_zero: bool = False) -> Address:
    if key not in body:
        raise HttpError(400, f"bad migrate request: {key} (HOST:PORT) is missing")
    try:
        return parse_address(body[key], allow_port_zero=allow_port_zero)
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
        try:
            number = parse_session_label(sid)
        except ValueError:
            number = 0
        if not number:
            raise HttpError(400, f"bad announcement: {entry!r:.80} needs a session_id of 8 hex digits, not 00000000")
        ports = entry.get("ports")
        if not isinstance(ports, list) or not all(_announced_port(port) for port in ports):
            raise HttpError(400, f"bad announcement: session {sid} needs ports as "
                            "[[channel id, name, device kind, in-flight bytes], ...]")
        ticket = entry.get("ticket")
        if ticket is not None and not _is_password(ticket):
            raise HttpError(400, f"bad announcement: session {sid} has a ticket that is not a password "
                            f"(1-{MAX_PASSWORD_LENGTH} bytes, no NUL)")
        client = entry.get("client")
        if client is not None and not _is_host(client):
            raise HttpError(400, f"bad announcement: session {sid} has a client that is not an IP address: "
                            f"{client!r:.60}")
        # One spelling per host (an IPv4-mapped address as IPv4), as s2 compares it with its peers'.
        checked.append({**entry, "session_id": number, **({} if client is None else {"client": host_of(client)})})
    return checked


def _is_host(value: Any) -> bool:
    """An IP address in text (ip_address would take an int too)."""
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _announced_port(port: Any) -> bool:
    return (isinstance(port, list) and len(port) in (3, 4) and _whole(port[0], 0, 255)
            and isinstance(port[1], str) and isinstance(port[2], str)
            and (len(port) == 3 or _whole(port[3], 0, MAX_IN_FLIGHT)))


def screen_png(framebuffer: np.ndarray) -> bytes:
    """An (h, w, 4) B, G, R, X framebuffer as PNG bytes."""
    from PIL import Image  # only this endpoint needs it

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(framebuffer[:, :, 2::-1])).save(out, format="PNG")
    return out.getvalue()


def session_view(session: Session) -> dict:
    """Session.status() plus each socket's unsent bytes."""
    view = session.status()
    if session.main is not None:
        view["main"]["pending_write"] = session.main.transport.pending_write
    for port, port_view in zip(session.ports.values(), view["ports"], strict=True):
        if port.connection is not None:
            port_view["channel"]["pending_write"] = port.connection.transport.pending_write
    return view
