"""One linked channel on gevent: a reader greenlet feeding a ChannelConnection, locked writes.

A channel outlives its sockets: a migration moves it onto a connection to another server (the
session's migration driver decides when), and the application's PortChannel object stays valid.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import gevent
import gevent.event
import gevent.lock
import gevent.monkey
from gevent import socket

from spicewire.client.tls import shutdown_read
from spicewire.errors import LocalProtocolError, PeerFault, ReadTimeout, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, PortEvent
from spicewire.protocol.link import CLIENT_COMMON_CAPS, Caps, ClientLink, LinkEstablished
from spicewire.protocol.migration import Peer

log = logging.getLogger(__name__)

RECV_BUFFER = 256 << 10
DATA_CHUNK = 64 << 10
PARK_WRITE_WAIT = 2.0  # a frozen s1 that no longer reads must not hold a write forever
# The OS thread, also under monkey-patching (where threading's ident is the greenlet's).
thread_ident = gevent.monkey.get_original("_thread", "get_ident")


def check_thread(owner: int) -> None:
    """Refuse a call from another thread than ``owner``, the one whose hub runs the session:
    there it would wait on a hub that is not running, or hit gevent's InvalidThreadUseError."""
    if thread_ident() != owner:
        raise LocalProtocolError(
            "a ClientSession is used only in the thread that made it (it runs on that thread's "
            "gevent hub); from other threads, use spicewire.client.connect"
        )


class ChannelOwner(Protocol):
    """What a channel asks of the session it belongs to (ClientSession)."""

    def route(self, ch: ChannelClient, msg: m.Message) -> None: ...

    def on_message(self, ch: ChannelClient, msg: m.Message) -> None: ...

    def destination_failed(self, ch: ChannelClient, sock: socket.socket, reason: str) -> bool:
        """``sock`` failed: whether the channel is back on s1 (True) or the error stands."""

    def pass_through_migrate_data(self, ch: ChannelClient) -> None: ...

    def note_dropped(self, ch: ChannelClient, **counts: int) -> None: ...


def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host``. A numeric address is connected to as it is: gevent resolves
    names in its thread pool, and a migration of 500 sessions links 1,000 channels to one s2
    address, each lookup a round trip through a thread for an answer known in advance."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=timeout)


def link_channel(
    host: str, port: int, connection_id: int, channel_type: int, channel_id: int, *,
    password: str | None = None, channel_caps: Iterable[int] = (), common_caps: Caps = CLIENT_COMMON_CAPS,
    timeout: float = 10.0, wrap: Callable[[socket.socket], socket.socket] | None = None,
) -> tuple[socket.socket, LinkEstablished]:
    """Open a TCP connection and run the link handshake on it (LinkError when refused). ``wrap``
    (a TLS handshake) runs first, within ``timeout``: nothing is sent before it returns."""
    sock = open_tcp(host, port, timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if wrap is not None:
            sock = wrap(sock)
        link = ClientLink(connection_id, channel_type, channel_id, password=password,
                          common_caps=common_caps, channel_caps=tuple(channel_caps),
                          now=time.monotonic(), timeout=timeout)
        while True:
            out = link.data_to_send()
            if out:
                sock.sendall(out)
            event = link.next_event()
            out = link.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(event, LinkEstablished):
                sock.settimeout(None)
                if channel_type == ChannelType.MAIN:
                    read_first(sock)
                return sock, event
            link.handle_timer(time.monotonic())
            deadline = link.get_timer()
            sock.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                link.handle_timer(time.monotonic())  # raises once the deadline has passed
                continue
            if not data:
                raise ConnectionError(f"server closed the {ChannelType(channel_type).name} link")
            link.receive_data(data)
    except BaseException:
        sock.close()
        raise


FIRST_READ_PRIORITY = 1  # libev's priorities run from -2 to 2; every other watcher has 0


def read_first(sock: socket.socket) -> None:
    """Reads of ``sock`` (main's) are handled before the other channels' ready in the same loop
    turn. libev runs the ready watchers of one priority last-ready first: at a seamless switch s1
    sends main's MIGRATE first, so it was read last, behind the inputs', display's and cursor's,
    and main's FLUSH_MARK round trip (whose MIGRATE_DATA completes the session on s2) began ~0.4 ms
    late. The inputs' reads first too measured no better: s1 then answered their FLUSH_MARK before
    main's. No-op where the loop has no priorities (libuv), or the socket no read watcher of gevent's."""
    watcher = getattr(sock, "_read_event", None)
    if watcher is None or getattr(watcher, "active", False):
        return
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        watcher.priority = FIRST_READ_PRIORITY


def close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError as err:  # the peer reset it first: it is down either way
        log.debug("shutdown: %s", err)
    sock.close()


class ChannelClient:
    """One channel of a session. ``session`` routes every outgoing message (``send``) and sees
    every incoming one (``session.on_message``); the channel only moves bytes."""

    # Set by attach(), which every connection goes through, the first one included.
    sock: socket.socket
    established: LinkEstablished
    channel: ChannelConnection

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.session = session
        self.owner_thread = thread_ident()  # whose hub runs this channel
        self.key = (established.channel_type, established.channel_id)
        self.write_lock = gevent.lock.RLock()
        self.closed = gevent.event.Event()
        self.error: BaseException | None = None
        self.peer = Peer.S1  # which server of a running migration the channel talks to
        # Semi-seamless / switch-host: s1 is gone and the next connection is not attached yet.
        self.frozen = False
        self._parked = gevent.event.Event()  # the reader saw the end of the old connection
        self._resumed = gevent.event.Event()
        self._resumed.set()
        self._reader: gevent.Greenlet[[], None] | None = None
        self._flusher: gevent.Greenlet[[], None] | None = None
        self.attach(sock, established)

    @property
    def channel_type(self) -> ChannelType:
        return ChannelType(self.key[0])

    def attach(self, sock: socket.socket, established: LinkEstablished, *, keep_state: bool = False) -> None:
        """Use ``sock`` from now on. ``keep_state`` (seamless migration) keeps serials and ACK
        state; otherwise the channel starts a fresh connection state."""
        self.sock, self.established = sock, established
        if keep_state:
            self.channel.rebind(send_mini=established.send_mini_header, expect_mini=established.expect_mini_header)
        else:
            self.channel = ChannelConnection(
                Side.CLIENT, established.channel_type, established.channel_id,
                send_mini=established.send_mini_header, expect_mini=established.expect_mini_header,
            )
        self._trailing = established.trailing

    def start(self) -> None:
        self._reader = gevent.spawn(self._read_loop)

    # --- writing -----------------------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        """Send ``msg`` wherever the session's routing says (a migration may hold it back)."""
        self.session.route(self, msg)

    def write_now(self, msg: m.Message) -> None:
        """Frame ``msg`` on the current connection and write it (caller holds no routing duty)."""
        with self.write_lock:
            self.channel.send(msg)
            self.flush()

    def flush(self) -> None:
        # Never wait here for a write another greenlet is blocked in: the reader flushes its ACKs
        # after every batch, and a server that stopped reading until we read would wait forever.
        # The holder writes what we queued: it loops until nothing is left.
        if not self.write_lock.acquire(blocking=False):
            return
        try:
            while frames := self.channel.data_to_send():
                sock = self.sock
                try:
                    sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))
                except OSError as err:
                    if not (self.frozen or self.sock is not sock):
                        if self.session.destination_failed(self, sock, str(err)):
                            continue  # s2 failed: its messages are resent to s1 if s1 takes us back
                        raise
                    # s1 went away under a write during a migration: lost by design (5.3)
                    self.session.note_dropped(self, unsent_bytes=sum(map(len, frames)))
        finally:
            self.write_lock.release()

    def write_soon(self, msg: m.Message) -> None:
        """Like write_now, but from the channel's reader: frame ``msg`` now (its place in the order
        is taken) and let another greenlet write it, so the reader goes on reading."""
        if gevent.getcurrent() is not self._reader:
            self.write_now(msg)
            return
        # Not under the write lock: an application write may hold it, blocked until the server
        # reads, and the server may read only once we read what it sends. Framing does not yield,
        # so the message takes its place in the order here; the lock's holder or the background
        # flush writes it.
        self.channel.send(msg)
        self._flush_in_background()

    def _flush_in_background(self) -> None:
        """Have what is queued written by a greenlet of its own, never by the reader: the queue may
        hold megabytes of application data released after a migration, and a server whose device
        is over its limit reads them only once we read what it sends (ACKs and echoes), so a
        reader blocked in that write would wait on the server forever, and it on us."""
        if self._flusher is None or self._flusher.dead:
            self._flusher = gevent.spawn(self._background_flush)

    def _background_flush(self) -> None:
        try:
            self.flush()
        except OSError as err:  # the reader finds the broken connection on its next receive
            log.debug("%s channel: background write failed: %s", self.channel_type.name, err)

    # --- reading -----------------------------------------------------------------------------

    def _read_loop(self) -> None:
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        try:
            while True:
                if self._trailing:
                    data, self._trailing = self._trailing, b""
                    self._receive(data)
                    continue
                sock, error = self.sock, None
                try:
                    n = sock.recv_into(buf)
                except OSError as err:
                    n, error = 0, err
                if n == 0:
                    if self.sock is not sock:
                        continue  # switched underneath: read the new connection
                    if self.frozen:
                        self._park(sock)
                        continue
                    if self.session.destination_failed(self, sock, str(error or "connection closed")):
                        continue  # s2 failed: back on s1's connection
                    if error is not None:
                        raise error
                    break
                self._receive(view[:n])
        except PeerFault as err:
            self.error = err
            log.warning("%s channel: the server broke the protocol: %s", self.channel_type.name, err)
        except SpiceError as err:  # ours, not the server's doing
            self.error = err
            log.exception("%s channel: internal error: %s", self.channel_type.name, err)
        except OSError as err:
            self.error = err
        finally:
            self.closed.set()
            self._on_closed()

    def _receive(self, data: bytes | bytearray | memoryview) -> None:
        conn = self.channel
        framed = conn.bytes_out
        for msg in conn.receive_data(data):
            if self.channel is not conn:
                break  # the channel moved to another server while handling this batch
            self.session.on_message(self, msg)
        # Only when the batch framed something (ACKs, answers): a greenlet per batch read costs
        # each read a switch, and what others queue is written by the writer that queued it.
        if self.channel is conn:
            if conn.bytes_out != framed:
                self._flush_in_background()
            if conn.paused:
                self.session.pass_through_migrate_data(self)

    def _park(self, old: socket.socket) -> None:
        """The old server's connection ended during a freeze: drop it, wait for the next one."""
        locked = self.write_lock.acquire(timeout=PARK_WRITE_WAIT)  # a write in progress finishes first
        try:
            self.session.note_dropped(self, partial_in_bytes=self.channel.buffered)
            old.close()
        finally:
            if locked:
                self.write_lock.release()
        self._parked.set()
        self._resumed.wait()

    def freeze(self) -> None:
        """Stop using the current connection: what has arrived is still read, then the reader waits
        for ``resume``. Writes wait too (see ClientSession.route)."""
        self.frozen = True
        self._parked.clear()
        self._resumed.clear()
        try:
            shutdown_read(self.sock)  # the reader gets what is queued, then EOF
        except OSError as err:  # already gone: the reader sees an error, which a frozen channel takes as EOF
            log.debug("%s channel: shutdown: %s", self.channel_type.name, err)

    def resume(self, sock: socket.socket, established: LinkEstablished, timeout: float = 10.0) -> None:
        """Attach the next connection (fresh state) after ``freeze``."""
        if self._reader is not None and not self._reader.dead and not self._parked.wait(timeout):
            log.warning("%s channel: reader did not park in time", self.channel_type.name)
        self.attach(sock, established)
        self.reset_state()
        self.frozen = False
        self._resumed.set()

    def wait_resumed(self, timeout: float | None = None) -> bool:
        return self._resumed.wait(timeout)

    def reset_state(self) -> None:
        """Forget what the old server told this channel (semi-seamless 5.3 step 1)."""

    def handle(self, msg: m.Message) -> None:
        log.debug("ignoring %s on %s channel", type(msg).__name__, self.channel_type.name)

    def _on_closed(self) -> None:
        pass

    def close(self) -> None:
        self._resumed.set()
        close_socket(self.sock)
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.join(timeout=1)


class MainChannel(ChannelClient):
    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.init: m.MsgMainInit | None = None
        self.channels: list[tuple[int, int]] | None = None
        self.name: str | None = None
        self.uuid: bytes | None = None
        self.agent_tokens = 0
        self.ready = gevent.event.Event()
        self.listed = gevent.event.Event()
        super().__init__(session, sock, established)

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgMainInit):
            self.init = msg
            self.agent_tokens = msg.agent_tokens
            self.ready.set()
        elif isinstance(msg, m.MsgMainChannelsList):
            self.channels = [(c.type, c.id) for c in msg.channels]
            self.listed.set()
        elif isinstance(msg, m.MsgMainName):
            self.name = msg.name
        elif isinstance(msg, m.MsgMainUuid):
            self.uuid = msg.uuid
        elif isinstance(msg, m.MsgMainAgentConnectedTokens):
            self.agent_tokens = msg.num_tokens  # replaces the count (7.3); we have no agent to feed
        elif isinstance(msg, m.MsgMainAgentToken):
            self.agent_tokens += msg.num_tokens
        elif isinstance(msg, m.MsgMainAgentDisconnected):
            self.agent_tokens = 0
        else:
            super().handle(msg)

    def reset_state(self) -> None:
        self.agent_tokens = 0


class PortChannel(ChannelClient):
    """A port channel: write() sends DATA, read() returns what the device sent, in order, across
    migrations."""

    def __init__(self, session: ChannelOwner, sock: socket.socket, established: LinkEstablished) -> None:
        self.name: str | None = None
        self.opened = False
        self.initialised = gevent.event.Event()
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._arrived = gevent.event.Event()
        self.bytes_received = 0
        self.bytes_sent = 0
        super().__init__(session, sock, established)

    @property
    def unread(self) -> int:
        return self._inbox_bytes

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgSpicevmcData):
            data = bytes(msg.data)
            self._inbox.append(data)
            self._inbox_bytes += len(data)
            self.bytes_received += len(data)
            self.opened = True  # spice-gtk treats any data as "opened" (4.3)
            self._arrived.set()
        elif isinstance(msg, m.MsgPortInit):
            if self.name is None:  # spice-gtk accepts PORT_INIT once per connection (4.3, 5.9.8)
                self.name, self.opened = msg.name, bool(msg.opened)
            self.initialised.set()
        elif isinstance(msg, m.MsgPortEvent):
            if msg.event == PortEvent.OPENED:
                self.opened = True
            elif msg.event == PortEvent.CLOSED:
                self.opened = False
        else:
            super().handle(msg)

    def reset_state(self) -> None:
        # The next server introduces the port again with PORT_INIT; unread data stays for the app.
        self.name, self.opened = None, False
        self.initialised.clear()

    def _on_closed(self) -> None:
        self._arrived.set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        check_thread(self.owner_thread)
        view = memoryview(data).cast("B")
        for start in range(0, len(view), DATA_CHUNK):
            self.send(m.MsgcSpicevmcData(view[start : start + DATA_CHUNK]))
        self.bytes_sent += len(view)

    def read(self, n: int | None = None, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes (everything buffered if None) once at least one byte arrived; with
        ``n`` given, waits until exactly ``n`` arrived or the timeout passes, then returns what
        there is. Lenient: a timeout and the end of the stream both return what there is, ``b""``
        included; ``receive`` tells them apart."""
        self._wait_for(1 if n is None else n, timeout)
        return self._take(self._inbox_bytes if n is None else min(n, self._inbox_bytes))

    def receive(self, n: int | None = None, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes (with None: everything buffered, once at least one byte arrived).
        Fewer, down to ``b""``, only at the end of the stream (the channel closed). If ``timeout``
        passes first it raises ReadTimeout and consumes nothing."""
        if not self._wait_for(1 if n is None else n, timeout):
            raise ReadTimeout(
                f"{self.name or self.channel_type.name}: {'a byte' if n is None else f'{n} bytes'} did not arrive "
                f"within {timeout:g} s ({self._inbox_bytes} buffered)", available=self._inbox_bytes,
            )
        return self._take(self._inbox_bytes if n is None else min(n, self._inbox_bytes))

    def _wait_for(self, want: int, timeout: float | None) -> bool:
        """Until ``want`` bytes are buffered or the channel closed (True), or ``timeout`` passed (False)."""
        check_thread(self.owner_thread)
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._inbox_bytes < want and not self.closed.is_set():
            self._arrived.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._arrived.wait(left)
        return True

    def put_back(self, data: bytes) -> None:
        """Put ``data`` back in front of what is buffered: a reader that gave up after taking it."""
        if data:
            self._inbox.appendleft(data)
            self._inbox_bytes += len(data)
            self._arrived.set()

    def _take(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            head = self._inbox.popleft()
            if got + len(head) > n:
                self._inbox.appendleft(head[n - got :])
                head = head[: n - got]
            parts.append(head)
            got += len(head)
        self._inbox_bytes -= got
        return b"".join(parts)
