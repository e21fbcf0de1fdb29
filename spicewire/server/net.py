"""gevent at the edge: accept sockets, run each link machine, then move bytes between sockets and
the sans-I/O channel machines (protocol/) and session logic (session.py). Nothing here decides
protocol; it reads, writes, waits and times out.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool
from cryptography.hazmat.primitives.asymmetric import rsa
from gevent.event import AsyncResult
from gevent.server import StreamServer

from spicewire import devices
from spicewire.errors import LinkError, LinkTimeout, PeerFault, PeerStalled, SpiceError
from spicewire.logs import context, session_label
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import LINK_HEADER_SIZE, ChannelType, LinkErr, MainCap
from spicewire.protocol.framing import FULL_HEADER, MINI_HEADER
from spicewire.protocol.link import LinkEstablished, LinkRequested, LinkState, ServerLink, SpiceLinkReply, new_link_key
from spicewire.server import events
from spicewire.server.events import EventBus
from spicewire.server.metrics import ServerMetrics
from spicewire.server.migration import MigrationManager
from spicewire.server.session import (
    MAIN_MAX_MESSAGE,
    PORT_MAX_MESSAGE,
    Limits,
    MainConnection,
    PortConnection,
    PortState,
    Segment,
    Session,
    new_session_id,
)

log = logging.getLogger(__name__)

RECV_BUFFER = 256 << 10
WRITE_BATCH = 1 << 20


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5900
    password: str | None = None  # None: ticketing disabled (a decryptable ticket is still required)
    password_expiry: float | None = None  # epoch seconds after which the password is refused
    port_channels: list[tuple[str, str]] = field(default_factory=list)  # (port name, device kind)
    limits: Limits = field(default_factory=Limits)
    link_timeout: float = 10.0
    stall_timeout: float = 30.0  # a client silent this long in the middle of a message is dropped
    tick_interval: float = 0.01

    def __post_init__(self) -> None:
        # Refused here, where the value is given, not as a stall or a crash once clients come.
        port: object = self.port  # checked as given: a caller need not have kept to the annotation
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"ServerConfig.port must be 0-65535, not {port!r}")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"ServerConfig.limits must be a Limits, not {type(self.limits).__name__}")
        for name in ("link_timeout", "stall_timeout", "tick_interval"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # NaN fails this too
                raise ValueError(f"ServerConfig.{name} must be a finite number of seconds above 0, not {value!r}")


TRIM_AFTER = 64 << 20
_libc: ctypes.CDLL | None = None


def release_free_memory() -> None:
    """Give freed heap back to the system. A session that leaves (or migrates away) may free
    hundreds of MiB of small buffers, which glibc keeps on its heap otherwise: the RSS would stay
    as if the session were still here."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError) as err:
        log.debug("not glibc, freed heap stays with the process: %s", err)


def _link_error_name(code: int) -> str:
    try:
        return LinkErr(code).name.lower()
    except ValueError:  # a code the enum does not know: still one label per code
        return f"link_error_{int(code)}"


class KeyPool:
    """Fresh RSA-1024 keys, generated ahead in a thread: a key costs ~8 ms, too long to make a
    client wait for on every link. Each key is handed out once.

    Refills wait a moment after the links that used the keys: clients link in bursts (a session's
    channels, a migration's pre-connect), and key generation competing for the CPU right then
    would slow exactly the latency-sensitive steps that follow (a migration's switch)."""

    REFILL_DELAY = 1.0

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._keys: deque[rsa.RSAPrivateKey] = deque()
        self._pending = 0
        self._scheduled: gevent.Greenlet[[], None] | None = None

    def pop(self) -> rsa.RSAPrivateKey:
        key = self._keys.popleft() if self._keys else new_link_key()
        if self._scheduled is None:
            self._scheduled = gevent.spawn_later(self.REFILL_DELAY, self._refill)
        return key

    def _refill(self) -> None:
        self._scheduled = None
        hub = gevent.get_hub()
        while len(self._keys) + self._pending < self.size:
            self._pending += 1
            hub.threadpool.spawn(new_link_key).rawlink(self._arrived)

    def _arrived(self, result: AsyncResult[rsa.RSAPrivateKey]) -> None:
        self._pending -= 1
        key = result.value if result.successful() else None  # a failed one is made again on demand
        if key is not None:
            self._keys.append(key)


class Connection:
    """One TCP connection: its link, then its channel. Also the session layer's Transport."""

    def __init__(self, server: SpiceServer, sock: socket.socket, address: tuple[Any, ...]) -> None:
        self.server = server
        self.sock = sock
        self.peer = f"{address[0]}:{address[1]}"
        self.label = self.peer
        # Session and channel join these once known; the JSON log format gives each its own field.
        self.log_fields: dict[str, str] = {"peer": self.peer}
        self.log = logging.LoggerAdapter(log, self.log_fields)
        self.event_fields: dict[str, Any] = {}  # what every event about this connection carries
        self.pending_write = 0
        self.closed = False
        self.handler: MainConnection | PortConnection | None = None
        self.channel: ChannelConnection | None = None
        # Frames, and the piece iterators of streamed bodies (send_stream) in their place in line.
        self._outq: deque[bytes | Iterable[Segment]] = deque()
        self._write_ready = gevent.event.Event()
        self._read_gate = gevent.event.Event()
        self._read_gate.set()
        self._writer: gevent.Greenlet[[MainConnection | PortConnection], None] | None = None
        self.link_failure: str | None = None  # why the link did not become a channel (a metric label)

    # --- Transport ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self.channel is None:
            return  # still linking: no channel, so nothing framed to move
        frames = self.channel.data_to_send()
        if frames and log.isEnabledFor(logging.DEBUG):
            self._trace_out(frames)
        if frames and not self.closed:
            self._outq.extend(frames)
            self.pending_write += sum(len(f) for f in frames)
            self._write_ready.set()

    def resume_reading(self) -> None:
        self._read_gate.set()

    def send_stream(self, header: bytes, pieces: Iterable[Segment], size: int) -> None:
        """Queue a message whose body is produced piece by piece (MIGRATE_DATA of a large
        session): each piece is written before the next is asked for, so a producer may reuse
        one buffer. ``size`` is header plus body, for the pending-bytes accounting."""
        if self.closed:
            return
        self.flush()
        self._outq.append(header)
        self._outq.append(pieces)
        self.pending_write += size
        self._write_ready.set()

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.log.info("[%s] closing: %s", self.label, reason)
        self._read_gate.set()
        self._write_ready.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as err:  # the peer reset it first: it is down either way
            self.log.debug("[%s] shutdown: %s", self.label, err)

    # --- the connection's life ---------------------------------------------------------------

    def run(self) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            established = self._link()
            if established is not None and not self.closed:
                self._serve(established)
        except PeerFault as err:  # what the client sent (or did not send in time)
            self.log.warning("[%s] protocol error, disconnecting: %s", self.label, err)
        except SpiceError as err:  # ours: a bug, never blamed on the client, and only this connection ends
            self.log.exception("[%s] internal error, disconnecting: %s", self.label, err)
        except OSError as err:
            self.log.info("[%s] connection lost: %s", self.label, err)
        finally:
            self.close("done")
            if self._writer is not None:
                self._writer.kill(block=False)
            if self.handler is not None:
                self.handler.closed()
                self.server.events.emit(events.DISCONNECTED, **self.event_fields)
            elif self.channel is None and self.link_failure is None:
                self.link_failure = "connection_lost"
            if self.link_failure is not None:
                self.server.metrics.link_failed(self.link_failure)
            self.sock.close()
            # The handler and the channel point back here (as their transport): let go of them,
            # so a closed connection's buffers (a half-read MIGRATE_DATA) go now, not whenever
            # the cyclic collector runs.
            self.handler = None
            self.channel = None

    def _link(self) -> LinkEstablished | None:
        cfg = self.server.config
        link = ServerLink(
            time.time(), password=cfg.password, password_expiry=cfg.password_expiry,
            key_factory=self.server.keys.pop, timeout=cfg.link_timeout,
        )
        while True:
            try:
                event = link.next_event()
            except (PeerFault, LinkError) as err:  # anything else is our bug: run() reports it
                self._send_now(link.data_to_send())
                self.link_failure = _link_error_name(err.code) if isinstance(err, LinkError) else "protocol_error"
                self.log.warning("[%s] link refused: %s", self.label, err)
                return None
            self._send_now(link.data_to_send())
            if isinstance(event, LinkRequested):
                self.server.answer_link(link, event)
                if link.state is LinkState.CLOSED:
                    # Rejected (BAD_CONNECTION_ID, CHANNEL_NOT_AVAILABLE...): send the error reply
                    # and close now, rather than wait for bytes that cannot come until link_timeout.
                    reply = link.data_to_send()
                    self._send_now(reply)
                    code = LinkErr(SpiceLinkReply.decode(reply[LINK_HEADER_SIZE:]).error).name if reply else "no reply"
                    self.link_failure = code.lower().replace(" ", "_")
                    self.log.warning(
                        "[%s] link refused: %s for channel type %d id %d, connection id %08x", self.label,
                        code, event.channel_type, event.channel_id, event.connection_id,
                    )
                    return None
            elif isinstance(event, LinkEstablished):
                return event
            else:
                # The machine keeps the deadline (in the clock it was given); this only waits for it.
                deadline = link.get_timer()
                if deadline is None:
                    return None  # closed without a reply: nothing more comes of this link
                data = self._recv_until(deadline)
                if data is None:
                    try:
                        link.handle_timer(time.time())
                    except LinkTimeout:
                        self.link_failure = "timeout"
                        self.log.warning("[%s] link timed out after %.1f s", self.label, cfg.link_timeout)
                        return None
                    continue
                if not data:
                    self.link_failure = "closed"
                    self.log.info("[%s] client closed during the link", self.label)
                    return None
                link.receive_data(data, time.time())

    def _recv_until(self, deadline: float) -> bytes | None:
        """Bytes from the client, or None if the deadline (time.time() clock) came first."""
        remaining = deadline - time.time()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def _send_now(self, data: bytes) -> None:
        if data:
            self.sock.settimeout(self.server.config.link_timeout)
            self.sock.sendall(data)

    def _serve(self, established: LinkEstablished) -> None:
        max_size = MAIN_MAX_MESSAGE if established.channel_type == ChannelType.MAIN else PORT_MAX_MESSAGE
        channel = self.channel = ChannelConnection(
            Side.SERVER, established.channel_type, established.channel_id,
            send_mini=established.send_mini_header, expect_mini=established.expect_mini_header,
            max_size=max_size,
        )
        handler = self.handler = self.server.attach(established, self, channel)
        if handler is None:
            self.link_failure = "gone_during_link"
            return
        self.server.events.emit(events.CONNECTED, **self.event_fields)
        self.sock.settimeout(None)
        self._writer = gevent.spawn(self._write_loop, handler)
        handler.start()
        self.server.events.emit(events.INITIALIZED, **self.event_fields)
        if established.trailing:
            self._deliver(handler, channel.receive_data(established.trailing))
            self.flush()
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        stall = self.server.config.stall_timeout
        while not self.closed:
            while not handler.reading_allowed and not self.closed:
                self._read_gate.clear()
                self._read_gate.wait(1.0)
            if self.closed:
                break
            self.sock.settimeout(stall if channel.buffered else None)
            bulk = channel.receive_buffer()
            try:
                n = self.sock.recv_into(buf if bulk is None else bulk)
            except TimeoutError:
                raise PeerStalled(f"client stalled {stall:g} s in the middle of a message") from None
            if n == 0:
                self.log.info("[%s] client closed the connection", self.label)
                break
            self.server.metrics.bytes_in += n
            if bulk is None:
                self._deliver(handler, channel.receive_data(view[:n]))
            else:  # straight into a large body (MIGRATE_DATA, big DATA): no copy, no per-chunk parsing
                self._deliver(handler, channel.received_into(n))
            self.flush()

    def _deliver(self, handler: MainConnection | PortConnection, msgs: list[m.Message]) -> None:
        if msgs and log.isEnabledFor(logging.DEBUG):
            for msg in msgs:
                self.log.debug("[%s] <- %s (%d bytes)", self.label, type(msg).__name__, len(msg.wire_body()))
        handler.handle(msgs)

    def _trace_out(self, frames: list[bytes]) -> None:
        """DEBUG: each framed message going out, by name (frames are whole messages, header first)."""
        channel = self.channel
        if channel is None:
            return
        mini = channel.sends_mini_header
        for frame in frames:
            if mini:
                msg_type, size = MINI_HEADER.unpack_from(frame)
            else:
                _, msg_type, size, _ = FULL_HEADER.unpack_from(frame)
            cls = m.lookup(channel.channel_type, m.Direction.SERVER_TO_CLIENT, msg_type)
            self.log.debug("[%s] -> %s (%d bytes)", self.label, cls.__name__ if cls else f"type {msg_type}", size)

    def _write_loop(self, handler: MainConnection | PortConnection) -> None:
        try:
            while not self.closed:
                self._write_ready.wait()
                self._write_ready.clear()
                while self._outq and not self.closed:
                    head = self._outq.popleft()
                    if not isinstance(head, bytes):
                        for piece in head:  # a streamed body (send_stream)
                            # numpy's stubs give ndarray its __buffer__ only from Python 3.12 on.
                            self.sock.sendall(piece)  # type: ignore[arg-type]
                            self.pending_write -= len(piece)
                            self.server.metrics.bytes_out += len(piece)
                        continue
                    batch, size = [head], len(head)
                    while self._outq and size < WRITE_BATCH:
                        frame = self._outq[0]
                        if not isinstance(frame, bytes):
                            break
                        self._outq.popleft()
                        batch.append(frame)
                        size += len(frame)
                    self.sock.sendall(batch[0] if len(batch) == 1 else b"".join(batch))
                    self.pending_write -= size
                    self.server.metrics.bytes_out += size
                    if not self._outq:
                        handler.on_drained()
        except OSError as err:
            self.close(f"write failed: {err}")


class SpiceServer:
    """Serves main and port channels to any number of sessions."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sessions: dict[int, Session] = {}
        self.keys = KeyPool()
        self._factories = [(name, devices.factory(kind)) for name, kind in config.port_channels]
        self._connections: set[Connection] = set()
        self._pool = gevent.pool.Pool()
        self._server = StreamServer((config.host, config.port), self._handle, spawn=self._pool)
        self._ticker: gevent.Greenlet[[], None] | None = None
        self._stopped = gevent.event.Event()  # what serve_forever waits for
        self.migration = MigrationManager(self)
        self.metrics = ServerMetrics(self)
        self.events = EventBus()
        self.started: float | None = None  # time.monotonic() at start(), for the control API's uptime

    @property
    def address(self) -> tuple[str, int]:
        address = self._server.address
        if isinstance(address, str):
            raise TypeError(f"a SPICE server listens on TCP, not on {address!r}")
        return address[:2]

    def start(self) -> None:
        self._stopped.clear()
        self._server.start()
        self.started = time.monotonic()
        self._ticker = gevent.spawn(self._tick_loop)
        log.info("serving SPICE on %s:%d", *self.address)

    def stop(self, timeout: float = 2.0) -> None:
        self._server.stop(timeout=0)
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.kill()
        for conn in list(self._connections):
            conn.close("server stopping")
        self._pool.join(timeout=timeout)
        self._pool.kill()

    def serve_forever(self) -> None:
        self.start()
        self._stopped.wait()

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def _handle(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        conn = Connection(self, sock, address)
        self._connections.add(conn)
        try:
            conn.run()
        finally:
            self._connections.discard(conn)

    # --- decisions the network layer asks for ------------------------------------------------

    def answer_link(self, link: ServerLink, req: LinkRequested) -> None:
        if req.channel_type == ChannelType.MAIN:
            # connection_id != 0 is a migrating client: only for a session a source announced
            # (spice-server takes any id; 1.8).
            if req.connection_id == 0 or self.migration.expects(req.connection_id):
                link.accept(self.main_caps())
            else:
                link.reject(LinkErr.BAD_CONNECTION_ID)
            return
        if req.channel_type != ChannelType.PORT:
            link.reject(LinkErr.CHANNEL_NOT_AVAILABLE)
            return
        session = self.sessions.get(req.connection_id)
        if session is None:
            link.reject(LinkErr.BAD_CONNECTION_ID)
        elif req.channel_id not in session.ports or session.ports[req.channel_id].connection is not None:
            link.reject(LinkErr.CHANNEL_NOT_AVAILABLE)
        else:
            link.accept(())

    def main_caps(self) -> tuple[int, ...]:
        # Both migration modes are honoured as source and as destination (5.9 items 1-2).
        return tuple(caps_to_words((MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE)))

    def attach(
        self, established: LinkEstablished, conn: Connection, channel: ChannelConnection,
    ) -> MainConnection | PortConnection | None:
        if established.channel_type == ChannelType.MAIN:
            migrating = established.connection_id != 0
            if migrating:
                session = self.migration.arriving_session(established.connection_id)
                if session is None:
                    log.warning("[%s] the announcement went away during the link", conn.label)
                    return None
            else:
                session = Session(
                    id=new_session_id(self.sessions),
                    ports={
                        i: PortState(i, name, make(), self.config.limits)
                        for i, (name, make) in enumerate(self._factories)
                    },
                )
            self.sessions[session.id] = session
            session.client = conn.peer
            conn.label = f"{conn.peer} session {session.id:08x} main"
            conn.log_fields.update(context(session.id, "main"))
            conn.event_fields.update(session_id=session_label(session.id), channel="main", client=conn.peer)
            session.main = MainConnection(session, channel, conn, established.channel_caps)
            session.on_end = self._session_ended
            if migrating:
                self.migration.arriving_main_linked(session)
                log.info("[%s] migrating session arrived", conn.label)
            else:
                log.info("[%s] new session", conn.label)
            return session.main
        session = self.sessions.get(established.connection_id)
        port = session.ports.get(established.channel_id) if session is not None else None
        if session is None or port is None or port.connection is not None:
            log.warning("[%s] session or port went away during the link", conn.label)
            return None
        conn.label = f"{conn.peer} session {session.id:08x} port {port.channel_id} ({port.name})"
        channel_name = f"port {port.channel_id} ({port.name})"
        conn.log_fields.update(context(session.id, channel_name))
        conn.event_fields.update(session_id=session_label(session.id), channel=channel_name, client=conn.peer)
        log.info("[%s] port channel linked", conn.label)
        handler = PortConnection(port, channel, conn)
        if session.migration is not None:
            self.migration.port_linked(session, handler)
        return handler

    def _session_ended(self, session: Session) -> None:
        self.migration.session_ended(session)
        self.sessions.pop(session.id, None)
        buffered = session.in_flight
        session.close_ports("session ended")
        for port in session.ports.values():
            port.release_device()
        log.info("session %08x ended", session.id, extra=context(session.id))
        if buffered >= TRIM_AFTER:
            gevent.spawn_later(0, release_free_memory)

    def _tick_loop(self) -> None:
        while True:
            gevent.sleep(self.config.tick_interval)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                for port in session.ports.values():
                    if port.device.wants_ticks and port.connection is not None and not port.device_stopped:
                        port.tick(now)  # a device that raises closes its own port, not this loop

