"""gevent at the edge: accept sockets, run each link machine, then move bytes between sockets and
the sans-I/O channel machines (protocol/) and session logic (session.py). Nothing here decides
protocol; it reads, writes, waits and times out.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer

from spicewire import devices, screens
from spicewire.errors import LinkError, LinkTimeout, PeerFault, PeerStalled, SpiceError
from spicewire.logs import context, session_label
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import LINK_HEADER_SIZE, ChannelType, DisplayCap, InputsCap, LinkErr, MainCap
from spicewire.protocol.framing import FULL_HEADER, MINI_HEADER
from spicewire.protocol.link import (
    LinkAuthenticated,
    LinkEstablished,
    LinkRequested,
    LinkState,
    ServerLink,
    SpiceLinkReply,
)
from spicewire.server import events
from spicewire.server.admission import (
    SESSION_TICKET,
    AcceptBackoff,
    AdmissionCollector,
    LinkGuard,
    LinkLimits,
    LogThrottle,
    SessionTickets,
    host_of,
)
from spicewire.server.budget import MemoryBudget
from spicewire.server.display import (
    GRAPHICS_MAX_MESSAGE,
    CursorConnection,
    DisplayConnection,
    DisplayOptions,
    DisplayState,
    GraphicsConnection,
    InputsConnection,
)
from spicewire.server.events import EventBus
from spicewire.server.heap import TRIM_AFTER, Releaser, release_free_memory
from spicewire.server.keys import KeyPool
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
from spicewire.server.tls import ServerTLS, load_server_tls
from spicewire.tlssocket import send_buffers
from spicewire.turns import BulkTurns

log = logging.getLogger(__name__)

RECV_BUFFER = 256 << 10
WRITE_BATCH = 1 << 20
# Each read is sized for about FLOOD_MESSAGES messages of the size the last read's were (at least
# FLOOD_READ bytes, at most RECV_BUFFER; FIRST_READ for the first): parsing 256 KiB of 6-byte ACKs
# or PONGs would hold the hub for most of a second (about 15 us each), one such read a millisecond
# or two, while 64 KiB DATA messages still get whole RECV_BUFFER reads.
FLOOD_MESSAGES = 64
FLOOD_READ = 1 << 10
FIRST_READ = 4 << 10
# A port's MIGRATE_DATA lands in memory made for the whole body before it arrives: reads into it
# may be this large (the socket gives what it holds, up to this) without holding more memory, and
# a 1 GiB body read RECV_BUFFER at a time cost s2 4,096 turns of the loop, each its own idle().
LANDING_READ = 8 << 20


def next_read_size(n: int, count: int) -> int:
    """How much to read next, after a read of ``n`` bytes that completed ``count`` messages."""
    if not count:  # none complete: a large message under way
        return RECV_BUFFER
    return max(FLOOD_READ, min(RECV_BUFFER, FLOOD_MESSAGES * n // count))


# The names a channel policy (secure_channels, plaintext_channels) takes: QEMU's tls-channel names.
CHANNEL_NAMES = {channel.name.lower(): channel for channel in ChannelType}
ALL_CHANNELS = "all"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int | None = 5900  # None: no plain listener (TLS only); 0: any free port
    password: str | None = None  # None: ticketing disabled (a decryptable ticket is still required)
    password_expiry: float | None = None  # epoch seconds after which the password is refused
    tls_port: int | None = None  # None: no TLS listener; 0: any free port
    tls_host: str | None = None  # None: the same as host
    x509_dir: str | None = None  # ca-cert.pem, server-cert.pem, server-key.pem (QEMU's x509-dir)
    tls_ciphers: str | None = None  # an OpenSSL cipher list (TLS 1.2)
    # Channel names (CHANNEL_NAMES) or "all": these link only over TLS (NEED_SECURED on the plain
    # port), those only in plain (NEED_UNSECURED on the TLS port). A name beats "all"; any other
    # channel may use either port (spice-server's default).
    secure_channels: frozenset[str] = frozenset()
    plaintext_channels: frozenset[str] = frozenset()
    port_channels: list[tuple[str, str]] = field(default_factory=list)  # (port name, device kind)
    display: str | None = None  # a screen kind: every session gets a display, inputs and cursor channel
    display_size: tuple[int, int] | None = None  # (width, height); None: the screen's own default
    display_options: DisplayOptions = field(default_factory=DisplayOptions)
    server_name: str = "spicewire"  # what MAIN_NAME and the clock screen say
    limits: Limits = field(default_factory=Limits)
    link_timeout: float = 10.0
    link_limits: LinkLimits = field(default_factory=LinkLimits)
    # False: a channel link for an existing session (and a migration's target link) is taken only
    # from the host its main channel came from (or that the source announced). True is for clients
    # behind a NAT whose outside address changes between connections.
    channels_from_any_address: bool = False
    stall_timeout: float = 30.0  # a client silent this long in the middle of a message is dropped
    tick_interval: float = 0.01
    # Migration: pre-copy big ports' queued bytes to s2 before the switch (as s1), and take such
    # pre-copies (as s2). Off, the whole state goes through the client at the switch.
    precopy: bool = True
    # Bytes queued for one connection before the server stops reading it; a client that leaves
    # them unread for stall_timeout is disconnected (it asks and does not read the answers).
    queue_limit: int = 8 << 20
    memory_budget: int | None = None  # bytes held for all sessions together; None: a quarter of the RAM
    # Link keys made ahead (keys.py): this many ready, made by this many background threads at the
    # lowest priority, refilled once no link took a key for the delay; a link that finds none makes
    # its own. A server expecting a migration of N sessions links about 2N channels at once: a pool
    # that large serves them without waiting.
    key_pool: int = 64
    key_pool_threads: int = 1
    key_pool_refill_delay: float = 0.5

    def __post_init__(self) -> None:
        # Refused here, where the value is given, not as a stall or a crash once clients come.
        for name in ("port", "tls_port"):
            port: object = getattr(self, name)  # checked as given: a caller need not have kept to the annotation
            if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
                raise ValueError(f"ServerConfig.{name} must be 0-65535 or None, not {port!r}")
        if self.port is None and self.tls_port is None:
            raise ValueError("ServerConfig needs a port, a tls_port or both: no listener otherwise")
        if (self.tls_port is None) != (self.x509_dir is None):
            raise ValueError("ServerConfig.tls_port and x509_dir go together: a TLS listener needs certificates")
        self.secure_channels = frozenset(self.secure_channels)
        self.plaintext_channels = frozenset(self.plaintext_channels)
        for name in self.secure_channels | self.plaintext_channels:
            if name != ALL_CHANNELS and name not in CHANNEL_NAMES:
                known = ", ".join(CHANNEL_NAMES)
                raise ValueError(f"unknown channel {name!r} in a channel policy; known: all, {known}")
        both = self.secure_channels & self.plaintext_channels
        if both:
            raise ValueError(f"channel {', '.join(sorted(both))} cannot be both TLS-only and plain-only")
        # A client told NEED_SECURED (or NEED_UNSECURED) must have a port to go to (CHANNELS.md 2).
        if self.secure_channels and self.tls_port is None:
            raise ValueError("secure_channels needs a TLS listener (tls_port): NEED_SECURED sends clients nowhere")
        if self.plaintext_channels and self.port is None:
            raise ValueError("plaintext_channels needs a plain listener (port): NEED_UNSECURED sends clients nowhere")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"ServerConfig.limits must be a Limits, not {type(self.limits).__name__}")
        if not isinstance(self.link_limits, LinkLimits):
            raise ValueError(f"ServerConfig.link_limits must be a LinkLimits, not {type(self.link_limits).__name__}")
        for name in ("link_timeout", "stall_timeout", "tick_interval"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):  # NaN fails this too
                raise ValueError(f"ServerConfig.{name} must be a finite number of seconds above 0, not {value!r}")
        for name, least in (("key_pool", 0), ("key_pool_threads", 1)):
            count = getattr(self, name)
            if type(count) is not int or count < least:
                raise ValueError(f"ServerConfig.{name} must be a whole number, at least {least}, not {count!r}")
        if not 0 <= self.key_pool_refill_delay < float("inf"):  # NaN fails this too
            raise ValueError("ServerConfig.key_pool_refill_delay must be a finite number of seconds >= 0, "
                             f"not {self.key_pool_refill_delay!r}")
        for name in ("queue_limit", "memory_budget"):
            size = getattr(self, name)
            if size is not None and (type(size) is not int or size < 1):
                raise ValueError(f"ServerConfig.{name} must be a whole number of bytes, at least 1, not {size!r}")

    def requires_tls(self, channel_type: int) -> bool | None:
        """True: this channel links only over TLS; False: only in plain; None: over either."""
        try:
            name = ChannelType(channel_type).name.lower()
        except ValueError:
            name = ""  # a type we do not know: only "all" can speak for it
        for candidate in (name, ALL_CHANNELS):
            if candidate in self.secure_channels:
                return True
            if candidate in self.plaintext_channels:
                return False
        return None


Handler = MainConnection | PortConnection | GraphicsConnection
"""What serves one channel connection once linked."""

GRAPHICS_CHANNELS: dict[int, type[GraphicsConnection]] = {
    ChannelType.DISPLAY: DisplayConnection, ChannelType.INPUTS: InputsConnection, ChannelType.CURSOR: CursorConnection,
}


def graphics_connection(session: Session, channel_type: int) -> GraphicsConnection | None:
    """The session's live connection of that display channel type, if any."""
    display = session.display
    if display is None:
        return None
    connections: dict[int, GraphicsConnection | None] = {
        ChannelType.DISPLAY: display.display, ChannelType.INPUTS: display.inputs, ChannelType.CURSOR: display.cursor}
    return connections.get(channel_type)


def graphics_caps(channel_type: int) -> tuple[int, ...]:
    """What the server's display and inputs channels advertise at link time."""
    if channel_type == ChannelType.DISPLAY:
        return tuple(caps_to_words((DisplayCap.MONITORS_CONFIG, DisplayCap.LZ4_COMPRESSION)))
    if channel_type == ChannelType.INPUTS:
        return tuple(caps_to_words((InputsCap.KEY_SCANCODE,)))
    return ()


def _handshake_failure(err: OSError, tls: ServerTLS) -> str:
    """One line on why a TLS handshake failed, with what an operator can do about it."""
    code = err.reason if isinstance(err, ssl.SSLError) else None
    reason = code.lower().replace("_", " ") if code else str(err) or type(err).__name__
    if code in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"{reason} (the client does not speak TLS: plain SPICE on the TLS port?)"
    if code is not None and "ALERT" in code:  # the client sent an alert: it refused us
        problem = tls.validity_problem()
        return f"{reason} (the client refused our certificate{'; ' + problem if problem else ''})"
    return reason


def _tcp_address(server: StreamServer) -> tuple[str, int]:
    address = server.address
    if isinstance(address, str):
        raise TypeError(f"a SPICE server listens on TCP, not on {address!r}")
    return address[:2]

def _link_error_name(code: int) -> str:
    try:
        return LinkErr(code).name.lower()
    except ValueError:  # a code the enum does not know: still one label per code
        return f"link_error_{int(code)}"


# What accept(2) says when the process or the system has no descriptor or buffer left for one more
# connection: waiting is the cure, not retrying at once.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class GuardedStreamServer(StreamServer):
    """gevent's StreamServer, pausing (not spinning, not logging a traceback per try) while accept
    fails for want of descriptors. Connections wait in the kernel's backlog meanwhile."""

    # A migration of N sessions opens about 2N connections to the destination at once. gevent's
    # default backlog (128) drops the excess, and each dropped client tries again only after TCP's
    # 1 s SYN timeout: 250 sessions took 5 s, not 1. The kernel caps this at net.core.somaxconn.
    backlog = socket.SOMAXCONN

    def __init__(self, listener: Any, handle: Any, *, backoff: AcceptBackoff, **kwargs: Any) -> None:
        super().__init__(listener, handle, **kwargs)
        self.backoff = backoff
        self._resume: Any = None

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as err:
            if err.errno not in EXHAUSTED:
                raise
            first = self.backoff.delay == 0
            delay = self.backoff.exhausted()
            (log.warning if first else log.debug)(
                "cannot accept a SPICE connection on %s:%d: %s; pausing %g s (up to %g s while it lasts)",
                *self.address[:2], err.strerror, delay, self.backoff.limits.accept_backoff_max)
            self.stop_accepting()
            self._resume = self.loop.timer(delay)
            self._resume.start(self._accept_again)
            return None
        if self.backoff.accepted():  # gevent's do_read returns None only without a connection waiting
            log.info("accepting SPICE connections on %s:%d again", *self.address[:2])
        return accepted

    def _accept_again(self) -> None:
        self._resume = None
        if self.started:
            self.start_accepting()

    def stop(self, timeout: float | None = None) -> None:
        if self._resume is not None:
            self._resume.stop()
            self._resume = None
        super().stop(timeout)


class Connection:
    """One TCP connection: its link, then its channel. Also the session layer's Transport."""

    def __init__(
        self, server: SpiceServer, sock: socket.socket, address: tuple[Any, ...], secure: bool = False,
    ) -> None:
        self.server = server
        self.sock = sock
        self.secure = secure  # accepted on the TLS listener: the link runs inside TLS
        self.peer = f"{address[0]}:{address[1]}"
        self.host = host_of(str(address[0]))
        self.label = self.peer
        # Session and channel join these once known; the JSON log format gives each its own field.
        self.log_fields: dict[str, str] = {"peer": self.peer}
        self.log = logging.LoggerAdapter(log, self.log_fields)
        self.event_fields: dict[str, Any] = {}  # what every event about this connection carries
        self.pending_write = 0
        self.queued = 0  # bytes of whole frames in _outq: reserved in the server's memory budget
        self.written = 0  # bytes sent so far: whether a client whose queue is full reads at all
        self.closed = False
        self.handler: Handler | None = None
        self.channel: ChannelConnection | None = None
        # Frames, and the piece iterators of streamed bodies (send_stream) in their place in line.
        self._outq: deque[bytes | Iterable[Segment]] = deque()
        self._write_ready = gevent.event.Event()
        self._read_gate = gevent.event.Event()
        self._read_gate.set()
        self._writer: gevent.Greenlet[[Handler], None] | None = None
        self._writer_waiting = False  # it holds no frame: flush_now may write in its place
        self.link_failure: str | None = None  # why the link did not become a channel (a metric label)
        self.password: str | None = None  # the server's password when this link was checked
        self.credential: str | None = None  # what its ticket matched (LinkAuthenticated.credential)

    # --- Transport ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self.channel is None:
            return  # still linking: no channel, so nothing framed to move
        frames = self.channel.data_to_send()
        if frames and log.isEnabledFor(logging.DEBUG):
            self._trace_out(frames)
        if frames and not self.closed:
            self._outq.extend(frames)
            size = sum(len(f) for f in frames)
            self.pending_write += size
            self.queued += size
            self.server.budget.reserve(size)
            self._write_ready.set()

    def flush_now(self) -> None:
        """flush, then write what it queued before returning when the writer holds nothing and
        waits: a migration's MIGRATE and small MIGRATE_DATA leave in the turn that made them,
        not a turn of the loop later in the writer, which then idle()s before the next channel's.
        The send never waits (what the socket does not take stays queued for the writer), and
        the handler is not told its queue drained: these are a frozen channel's last messages."""
        self.flush()
        if not self._writer_waiting or self.secure or self.closed:
            return  # TLS: TlsSocket.send encrypts and writes all it is given, waiting if it must
        while self._outq and isinstance(frame := self._outq[0], bytes):
            self._outq.popleft()
            try:
                sent = self.sock.send(frame, 0, timeout=0.0)  # type: ignore[call-arg]  # gevent's: 0 never waits
            except OSError:  # full (EAGAIN) or broken: the writer's sendall waits, or finds out
                sent = 0
            self.pending_write -= sent
            self.written += sent
            self.queued -= sent
            self.server.budget.release(sent)
            self.server.metrics.bytes_out += sent
            if sent < len(frame):
                self._outq.appendleft(frame[sent:])
                return

    def resume_reading(self) -> None:
        self._read_gate.set()

    def send_stream(self, header: bytes, pieces: Iterable[Segment], size: int) -> None:
        """Queue a message whose body is produced piece by piece (MIGRATE_DATA of a large
        session): each piece is written before the next is asked for, so a producer may reuse
        one buffer. ``size`` is header plus body, for the pending-bytes accounting."""
        if self.closed:
            return
        self.flush()
        # The header goes out as a queued frame, which the writer releases: reserve it like one.
        self._outq.append(header)
        self.queued += len(header)
        self.server.budget.reserve(len(header))
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
            # The TCP socket itself, also under TLS (TlsSocket keeps the plain shutdown): the
            # greenlets still reading and writing through it get EOF or an error, not a torn state.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as err:  # the peer reset it first: it is down either way
            self.log.debug("[%s] shutdown: %s", self.label, err)

    # --- the connection's life ---------------------------------------------------------------

    def run(self, on_linked: Callable[[], None] = lambda: None) -> None:
        """Link, then serve the channel; ``on_linked`` runs once the link is over, either way."""
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            try:
                if self.secure and not self._tls_handshake():
                    return
                established = self._link()
            finally:
                on_linked()
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
            # Frames never written: the budget has them back, whatever the writer was doing.
            self.server.budget.forget(self.resume_reading)
            self.server.budget.release(self.queued)
            self.queued = 0
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
            self.server.memory_freed()

    def _tls_handshake(self) -> bool:
        """Wrap the socket and finish the TLS handshake within link_timeout; a failure ends this
        connection alone, with one line that says why."""
        tls = self.server.tls
        assert tls is not None  # a secure connection comes only from the TLS listener
        timeout = self.server.config.link_timeout
        try:
            # One deadline for the whole handshake: a client trickling bytes cannot stretch it.
            with gevent.Timeout(timeout, TimeoutError(f"no handshake within {timeout:g} s")):
                self.sock = tls.wrap(self.sock)
                self.sock.do_handshake()
        except (ssl.SSLError, OSError) as err:  # TimeoutError and a peer that left are OSErrors
            self.link_failure = "tls_handshake"
            self.log.warning("[%s] TLS handshake failed, disconnecting: %s", self.label, _handshake_failure(err, tls))
            return False
        return True

    def _link(self) -> LinkEstablished | None:
        cfg = self.server.config
        password, expiry = self.server.password
        self.password = password
        link = ServerLink(
            time.time(), password=password, password_expiry=expiry,
            key_factory=self.server.keys.pop, timeout=cfg.link_timeout,
        )
        while True:
            try:
                event = link.next_event()
            except (PeerFault, LinkError) as err:  # anything else is our bug: run() reports it
                if isinstance(err, LinkError):  # a ticket refused: its answer waits, longer each time
                    self._wait_after_failure()
                self._send_now(link.data_to_send())
                self.link_failure = _link_error_name(err.code) if isinstance(err, LinkError) else "protocol_error"
                self.log.warning("[%s] link refused: %s", self.label, err)
                return None
            if isinstance(event, LinkAuthenticated):
                self.credential = event.credential
                refusal = self.server.admit_link(link, event, self)
                if refusal is not None:
                    if refusal[0] in (LinkErr.PERMISSION_DENIED, LinkErr.BAD_CONNECTION_ID):
                        self._wait_after_failure()  # not for a busy channel: its own client retrying
                    self._send_now(link.data_to_send())
                    self.link_failure = _link_error_name(refusal[0])
                    self.log.warning(
                        "[%s] link refused after its ticket: %s for channel type %d id %d, connection id %08x: %s",
                        self.label, LinkErr(refusal[0]).name, event.channel_type, event.channel_id,
                        event.connection_id, refusal[1],
                    )
                    return None
                continue
            self._send_now(link.data_to_send())
            if isinstance(event, LinkRequested):
                self.server.answer_link(link, event, secure=self.secure)
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

    def _wait_after_failure(self) -> None:
        """Hold a failed link's answer: a prober from this address waits longer each time, while
        this greenlet alone sleeps (and the link still counts as in progress for its address)."""
        guard = self.server.guard
        delay = guard.failed(self.host, time.monotonic())
        if delay:
            try:
                gevent.sleep(delay)
            finally:
                guard.answered(self.host)

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
        # A port takes no message larger than its buffer limit: one that size is always received
        # whole once its device took what came before, and a port never holds more than that.
        port_max = min(PORT_MAX_MESSAGE, self.server.config.limits.to_device)
        limits: dict[int, int] = {ChannelType.MAIN: MAIN_MAX_MESSAGE, ChannelType.PORT: port_max}
        max_size = limits.get(established.channel_type, GRAPHICS_MAX_MESSAGE)
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
        # One buffer for every connection: what a read brings is parsed (copied out) before
        # this greenlet yields again, and a buffer each would cost RECV_BUFFER per connection.
        view = self.server.recv_view
        stall = self.server.config.stall_timeout
        want = FIRST_READ
        turns = BulkTurns()
        while not self.closed:
            self._wait_for_reading(handler)
            if self.closed:
                break
            self.sock.settimeout(stall if channel.buffered else None)
            # At most one read buffer into a large body too: a port holds its limit plus one read.
            landing = isinstance(handler, PortConnection) and handler.waiting_for_migrate_data
            bulk = channel.receive_buffer(LANDING_READ if landing else RECV_BUFFER)
            try:
                n = self.sock.recv_into(view[:want] if bulk is None else bulk)
            except TimeoutError:
                raise PeerStalled(f"client stalled {stall:g} s in the middle of a message") from None
            if n == 0:
                self.log.info("[%s] client closed the connection", self.label)
                break
            self.server.metrics.bytes_in += n
            serial = channel.serial_in
            # A large body (MIGRATE_DATA, big DATA) is received straight into: no copy, no parsing.
            msgs = channel.receive_data(view[:n]) if bulk is None else channel.received_into(n)
            if bulk is not None and isinstance(handler, PortConnection) and handler.on_bulk is not None:
                handler.on_bulk()
            count = channel.serial_in - serial  # ACKs and PONGs too, which msgs leaves out
            if bulk is not None and not count and not turns.moved(n):
                continue  # inside a large body: no message to hand on, and no turn due yet
            turns.restart()
            if count > FLOOD_MESSAGES:
                self.server.flood_reads += 1
            want = next_read_size(n, count)
            # At most FLOOD_MESSAGES handled per turn, then the others' turn: a client that always
            # has bytes ready would otherwise never let the hub run (gevent switches only when a
            # socket would block), and one read can bring thousands of requests. idle(), not
            # sleep(0): the next turn comes once every other ready socket had its own, where
            # sleep(0) let a flood take thousands of turns for each of a bystander's.
            # Even none: an ACK (taken by the channel) may have opened the window for waiting data.
            for start in range(0, max(1, len(msgs)), FLOOD_MESSAGES):
                if start:
                    gevent.idle()
                if self.closed:
                    break
                self._deliver(handler, msgs[start : start + FLOOD_MESSAGES])
                self.flush()
            gevent.idle()

    def _wait_for_reading(self, handler: Handler) -> None:
        """Return once this connection may be read: its handler takes more, its own queue is
        under the queue limit, and the memory budget is not spent while it has a queue. A client
        that leaves its queue unread for stall_timeout is closed."""
        config, budget = self.server.config, self.server.budget
        stall = config.stall_timeout
        waited, written = 0.0, self.written
        while not self.closed:
            full = self.queued >= config.queue_limit or (budget.exhausted and self.queued > 0)
            if handler.reading_allowed and not full:
                return
            if budget.exhausted:
                budget.wait_for_room(self.resume_reading)
            self._read_gate.clear()
            step = min(1.0, stall)
            started = time.monotonic()
            self._read_gate.wait(step)
            if not full or self.written != written:
                waited, written = 0.0, self.written
                continue
            waited += time.monotonic() - started
            if waited >= stall:
                self.server.unread_closed += 1
                self.log.warning("[%s] client leaves %d bytes unread for %g s: disconnecting",
                                 self.label, self.queued, stall)
                self.close(f"{self.queued} bytes queued and unread")

    def _deliver(self, handler: Handler, msgs: list[m.Message]) -> None:
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

    def _write_loop(self, handler: Handler) -> None:
        try:
            while not self.closed:
                self._writer_waiting = True
                self._write_ready.wait()
                self._writer_waiting = False
                self._write_ready.clear()
                while self._outq and not self.closed:
                    head = self._outq.popleft()
                    if not isinstance(head, bytes):
                        turns = BulkTurns()
                        for piece in head:  # a streamed body (send_stream)
                            if isinstance(piece, list):  # views gathered for one sendmsg, never joined
                                sent = send_buffers(self.sock, piece)
                            else:
                                # numpy's stubs give ndarray its __buffer__ only from Python 3.12 on.
                                self.sock.sendall(piece)  # type: ignore[arg-type]
                                sent = len(piece)
                            self.pending_write -= sent
                            self.written += sent
                            self.server.metrics.bytes_out += sent
                            if turns.moved(sent):  # a client that keeps up would never make this yield
                                gevent.idle()
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
                    self.written += size
                    self.queued -= size
                    self.server.budget.release(size)
                    self.server.metrics.bytes_out += size
                    self._read_gate.set()  # a reader stopped for this queue may go on
                    if not self._outq:
                        handler.on_drained()
                    gevent.idle()  # as after a read: the others' ready sockets first
        except OSError as err:
            self.close(f"write failed: {err}")


class SpiceServer:
    """Serves main and port channels to any number of sessions."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sessions: dict[int, Session] = {}
        # The sessions the tick loop visits (Session.wants_ticks). Walking every session each tick
        # kept an idle server of 500 sink sessions 7.8% busy (2.2% without it).
        self._ticking: dict[int, Session] = {}
        self.keys = KeyPool(config.key_pool, config.key_pool_threads, refill_delay=config.key_pool_refill_delay)
        self._factories = [(name, devices.factory(kind)) for name, kind in config.port_channels]
        self._screen_factory: Callable[[], screens.Screen] | None = None
        if config.display:
            self._screen_factory = screens.factory(config.display, *(config.display_size or (None, None)))
        self._connections: set[Connection] = set()
        self._pool = gevent.pool.Pool()
        self.budget = MemoryBudget(config.memory_budget)
        self.releaser = Releaser()  # a session's large backlog is freed a step at a time
        self.recv_view = memoryview(bytearray(RECV_BUFFER))  # every connection's (Connection._serve)
        self.flood_reads = 0  # reads that brought more than FLOOD_MESSAGES messages (the next is cut)
        self.unread_closed = 0  # connections closed for leaving their queue unread
        # Certificates are read here, so a bad x509 directory fails the start, not the first client.
        self.tls: ServerTLS | None = None
        self._listeners: list[StreamServer] = []
        self._server: StreamServer | None = None
        self._tls_server: StreamServer | None = None
        self.guard = LinkGuard(config.link_limits)
        self._refusals_logged = LogThrottle()
        backoffs: list[AcceptBackoff] = []
        if config.port is not None:
            backoffs.append(AcceptBackoff(config.link_limits))
            self._server = GuardedStreamServer((config.host, config.port), self._handle, spawn=self._pool,
                                               backoff=backoffs[-1])
            self._listeners.append(self._server)
        if config.tls_port is not None and config.x509_dir is not None:
            self.tls = load_server_tls(config.x509_dir, config.tls_ciphers)
            tls_address = (config.tls_host or config.host, config.tls_port)
            backoffs.append(AcceptBackoff(config.link_limits))
            self._tls_server = GuardedStreamServer(tls_address, self._handle_tls, spawn=self._pool,
                                                   backoff=backoffs[-1])
            self._listeners.append(self._tls_server)
        self.session_tickets = SessionTickets()
        self.client_hosts: dict[int, str] = {}  # session id -> the host its main channel came from
        self._password = config.password
        self._password_expiry = config.password_expiry
        self.tickets: dict[int, str] = {}  # session id -> the password its client linked with
        self._ticker: gevent.Greenlet[[], None] | None = None
        self._stopped = gevent.event.Event()  # what serve_forever waits for
        self.migration = MigrationManager(self)
        self.metrics = ServerMetrics(self)
        self.metrics.registry.register(AdmissionCollector(self.guard, backoffs))
        self.events = EventBus()
        self.started: float | None = None  # time.monotonic() at start(), for the control API's uptime

    @property
    def address(self) -> tuple[str, int]:
        """The plain listener's (host, port); LookupError for a TLS-only server."""
        if self._server is None:
            raise LookupError("this server has no plain listener (TLS only)")
        return _tcp_address(self._server)

    @property
    def tls_address(self) -> tuple[str, int]:
        """The TLS listener's (host, port); LookupError for a server without one."""
        if self._tls_server is None:
            raise LookupError("this server has no TLS listener")
        return _tcp_address(self._tls_server)

    @property
    def listen_label(self) -> str:
        """HOST:PORT where clients reach this server (the plain listener, else the TLS one), as a
        screen shows it; empty before the server has started."""
        for listener in ("address", "tls_address"):
            try:
                host, port = getattr(self, listener)
            except (LookupError, AttributeError, TypeError):
                continue
            return f"{host}:{port}"
        return ""

    @property
    def password(self) -> tuple[str | None, float | None]:
        """The password new links must present (None: ticketing disabled) and its expiry (epoch s)."""
        return self._password, self._password_expiry

    def set_password(self, password: str | None, expires_at: float | None) -> None:
        """What links from now on check, as QMP's set_password and expire_password change it:
        ``password`` None disables ticketing; ``expires_at`` (epoch s, None: never) is when it
        stops being accepted. Channels already linked stay."""
        if password is None and expires_at is not None:
            raise ValueError("an expiry needs a password")
        self._password, self._password_expiry = password, expires_at

    def start(self) -> None:
        self._stopped.clear()
        for listener in self._listeners:
            listener.start()
        self.started = time.monotonic()
        self._ticker = gevent.spawn(self._tick_loop)
        self.keys.start()
        if self._server is not None:
            log.info("serving SPICE on %s:%d", *self.address)
        if self._tls_server is not None:
            log.info("serving SPICE over TLS on %s:%d", *self.tls_address)

    def stop(self, timeout: float = 2.0) -> None:
        for listener in self._listeners:
            listener.stop(timeout=0)
        self._stopped.set()
        self.keys.stop()
        if self._ticker is not None:
            self._ticker.kill()
        for conn in list(self._connections):
            conn.close("server stopping")
        self._pool.join(timeout=timeout)
        self._pool.kill()
        self.releaser.close()

    def serve_forever(self) -> None:
        self.start()
        self._stopped.wait()

    @property
    def connections(self) -> frozenset[Connection]:
        return frozenset(self._connections)

    def _handle(self, sock: socket.socket, address: tuple[Any, ...], secure: bool = False) -> None:
        host = host_of(str(address[0]))
        refusal = self.guard.begin(host)
        if refusal is not None:
            # Closed before a byte is read or a key spent: what a flood of half-open links costs.
            left_out = self._refusals_logged.allow(refusal, time.monotonic())
            if left_out is not None:
                since = f"; {left_out} more since the last such line" if left_out else ""
                log.warning("%s:%s: closed at once: too many links in progress (%s)%s", address[0], address[1],
                            refusal.replace("_", " "), since)
            self.metrics.link_failed(refusal)
            sock.close()
            return
        conn = Connection(self, sock, address, secure)
        self._connections.add(conn)
        try:
            conn.run(on_linked=lambda: self.guard.end(host))
        finally:
            self._connections.discard(conn)

    def _handle_tls(self, sock: socket.socket, address: tuple[Any, ...]) -> None:
        self._handle(sock, address, secure=True)

    # --- decisions the network layer asks for ------------------------------------------------

    def answer_link(self, link: ServerLink, req: LinkRequested, *, secure: bool = False) -> None:
        # The transport policy comes before the ids and the ticket, as in spice-server: a client
        # sent to the other port learns nothing else here.
        requires_tls = self.config.requires_tls(req.channel_type)
        if requires_tls is True and not secure:
            link.reject(LinkErr.NEED_SECURED)
            return
        if requires_tls is False and secure:
            link.reject(LinkErr.NEED_UNSECURED)
            return
        main = req.channel_type == ChannelType.MAIN
        if main and req.connection_id == 0 and not self.budget.admits():
            # New work waits for memory; what the sessions here hold already is never dropped.
            log.warning("memory budget spent (%d of %d bytes held): new session refused",
                        self.budget.used, self.budget.limit)
            link.reject(LinkErr.ERROR)
            return
        if not main and req.channel_type != ChannelType.PORT and req.channel_type not in GRAPHICS_CHANNELS:
            link.reject(LinkErr.CHANNEL_NOT_AVAILABLE)  # a type no session here has: says nothing of ids
            return
        # Everything that depends on the connection id waits for the ticket (admit_link), as in
        # spice-server: without one, an unknown id and a live one get the same answers, on the
        # same path (a key, a decryption), so probing ids teaches nothing.
        ticket = self.migration.ticket(req.connection_id)
        if ticket is not None:  # the session's channels, while a source's announcement of it lasts
            link.allow_migration_ticket(ticket)
        for session_ticket in self.session_tickets.allowed(req.connection_id, main, time.monotonic()):
            link.allow_ticket(session_ticket.secret, session_ticket.name)
        caps = self.main_caps() if main else graphics_caps(req.channel_type)
        link.accept(caps, decide_after_ticket=True)

    def admit_link(self, link: ServerLink, auth: LinkAuthenticated, conn: Connection) -> tuple[LinkErr, str] | None:
        """The ticket passed: now the ids. Establishes the link, or refuses it and says why."""
        refusal = self._link_verdict(auth, conn)
        if refusal is None:
            link.establish()
        else:
            link.refuse(refusal[0])
        return refusal

    def _link_verdict(self, auth: LinkAuthenticated, conn: Connection) -> tuple[LinkErr, str] | None:
        cid = auth.connection_id
        main = auth.channel_type == ChannelType.MAIN
        anywhere = self.config.channels_from_any_address
        if main and cid != 0:
            # A migrating client: only for a session a source announced (spice-server takes any
            # id; 1.8), from the client host it announced, and once.
            refused = self.migration.claim_target(cid, conn.host, anywhere)
            if refused is not None:
                return LinkErr.BAD_CONNECTION_ID, refused
        elif not main:
            session = self.sessions.get(cid)
            if session is None:
                return LinkErr.BAD_CONNECTION_ID, "no such session"
            # The same answer as an unknown id: a stranger with the password learns nothing more.
            if not anywhere and self.client_hosts.get(cid) != conn.host:
                return LinkErr.BAD_CONNECTION_ID, f"the session's main channel came from another host, not {conn.host}"
            if auth.channel_type in GRAPHICS_CHANNELS:
                if session.display is None or auth.channel_id != 0:
                    return LinkErr.CHANNEL_NOT_AVAILABLE, "no such display channel"
                if graphics_connection(session, auth.channel_type):
                    return LinkErr.CHANNEL_NOT_AVAILABLE, "that channel is linked already (never displaced)"
            elif auth.channel_id not in session.ports:
                return LinkErr.CHANNEL_NOT_AVAILABLE, "no such port"
            elif session.ports[auth.channel_id].connection is not None:
                return LinkErr.CHANNEL_NOT_AVAILABLE, "that port is linked already (never displaced)"
        if auth.credential.startswith(SESSION_TICKET):
            ticket = self.session_tickets.claim(auth.credential, cid, main, time.monotonic())
            if ticket is None:
                return LinkErr.PERMISSION_DENIED, "its ticket was used or expired meanwhile"
            conn.password = ticket.secret  # what its client linked with: a migration carries it on
        return None

    def main_caps(self) -> tuple[int, ...]:
        # Both migration modes are honoured as source and as destination (5.9 items 1-2).
        return tuple(caps_to_words((MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE)))

    def attach(
        self, established: LinkEstablished, conn: Connection, channel: ChannelConnection,
    ) -> Handler | None:
        if established.channel_type in GRAPHICS_CHANNELS:
            return self._attach_graphics(established, conn, channel)
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
                        i: PortState(i, name, make(), self.config.limits, self.budget, self.let_go)
                        for i, (name, make) in enumerate(self._factories)
                    },
                    server_name=self.config.server_name,
                )
                if self._screen_factory is not None:
                    session.display = DisplayState(self._screen_factory(), self.config.display_options)
                    session.display.attach_to(session, self.config.server_name, self.listen_label)
            self.sessions[session.id] = session
            if session.wants_ticks:
                self._ticking[session.id] = session
            # What its client linked with: a migration carries it to s2 as the session's ticket.
            ticket = (self.migration.ticket(session.id) if migrating else None) or conn.password
            if ticket:
                self.tickets[session.id] = ticket
            session.client = conn.peer
            self.client_hosts[session.id] = conn.host
            if conn.credential is not None and conn.credential.startswith(SESSION_TICKET):
                self.session_tickets.bind(conn.credential, session.id)
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

    def _attach_graphics(
        self, established: LinkEstablished, conn: Connection, channel: ChannelConnection,
    ) -> GraphicsConnection | None:
        session = self.sessions.get(established.connection_id)
        display = session.display if session is not None else None
        if session is None or display is None or graphics_connection(session, established.channel_type):
            log.warning("[%s] session or display went away during the link", conn.label)
            return None
        kind = GRAPHICS_CHANNELS[established.channel_type]
        conn.label = f"{conn.peer} session {session.id:08x} {kind.name}"
        conn.log_fields.update(context(session.id, kind.name))
        conn.event_fields.update(session_id=session_label(session.id), channel=kind.name, client=conn.peer)
        log.info("[%s] %s channel linked", conn.label, kind.name)
        handler = kind(display, channel, conn, established.channel_caps)
        if session.migration is not None:
            self.migration.port_linked(session, handler)
        return handler

    def _session_ended(self, session: Session) -> None:
        self.migration.session_ended(session)
        self.sessions.pop(session.id, None)
        self._ticking.pop(session.id, None)
        self.tickets.pop(session.id, None)
        self.client_hosts.pop(session.id, None)
        self.session_tickets.session_ended(session.id)
        session.close_ports("session ended")
        for port in session.ports.values():
            port.release_device()  # its queues go to let_go
        session.display = None
        log.info("session %08x ended", session.id, extra=context(session.id))
        self.memory_freed()

    def let_go(self, held: list[deque[Any]], size: int) -> None:
        """Queues a port gave up (PortState.release_device: its session ended, or its device
        failed): freed a step at a time."""
        self.releaser.drop(held, size)
        self.memory_freed()

    def memory_freed(self) -> None:
        """Buffers were let go of: once enough were (or all), give the freed heap back to the
        system, in a thread (trimming a large heap takes a while; ctypes lets go of the GIL). Not
        while the releaser's steps run: each ends with a trim."""
        if self.budget.trim_due(TRIM_AFTER) and not self.releaser.busy:
            gevent.get_hub().threadpool.spawn(release_free_memory)

    def _tick_loop(self) -> None:
        while True:
            gevent.sleep(self.config.tick_interval)
            now = time.monotonic()
            for session in list(self._ticking.values()):
                if session.display is not None and session.migration is None:
                    session.display.tick(now)
                for port in session.ports.values():
                    if port.device.wants_ticks and port.connection is not None and port.device_running:
                        port.tick(now)  # a device that raises closes its own port, not this loop

