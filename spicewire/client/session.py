"""gevent client: links channels with protocol.link.ClientLink, then runs each channel's messages
through protocol.channel.ChannelConnection (which answers SET_ACK, PING and the ACK window).

    session = ClientSession("127.0.0.1", 5900, password=None)
    session.connect()
    port = session.open_port("org.spicewire.echo")
    port.write(b"hello")
    port.read(5, timeout=5)
    session.close()
"""

from __future__ import annotations

import logging
from gevent import socket
import time
from collections import deque

import gevent
import gevent.event
import gevent.lock

from spicewire.errors import ProtocolError, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType, MainCap, MsgcSpicevmc, PortEvent
from spicewire.protocol.link import CLIENT_COMMON_CAPS, ClientLink, LinkEstablished

log = logging.getLogger(__name__)

RECV_BUFFER = 256 << 10
DATA_CHUNK = 64 << 10
# Caps this client honours. Migration caps are added only by the migration code that honours them.
MAIN_CAPS = (MainCap.NAME_AND_UUID,)


def link_channel(
    host: str, port: int, connection_id: int, channel_type: int, channel_id: int, *,
    password: str | None = None, channel_caps=(), common_caps=CLIENT_COMMON_CAPS, timeout: float = 10.0,
) -> tuple[socket.socket, LinkEstablished]:
    """Open a TCP connection and run the link handshake on it (LinkError when refused)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = ClientLink(connection_id, channel_type, channel_id, password=password,
                          common_caps=common_caps, channel_caps=tuple(channel_caps))
        deadline = time.monotonic() + timeout
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
                return sock, event
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed the {ChannelType(channel_type).name} link")
            link.receive_data(data)
    except BaseException:
        sock.close()
        raise


class ChannelClient:
    """One linked channel: a reader greenlet feeding a ChannelConnection, and locked writes."""

    def __init__(self, sock: socket.socket, established: LinkEstablished) -> None:
        self.sock = sock
        self.established = established
        self.channel = ChannelConnection(
            Side.CLIENT, established.channel_type, established.channel_id,
            send_mini=established.send_mini_header, expect_mini=established.expect_mini_header,
        )
        self.closed = gevent.event.Event()
        self.error: BaseException | None = None
        self._write_lock = gevent.lock.Semaphore()
        self._reader = None

    def start(self) -> None:
        if self.established.trailing:
            self._dispatch(self.channel.receive_data(self.established.trailing))
        self._reader = gevent.spawn(self._read_loop)

    def send(self, msg: m.Message) -> None:
        self.channel.send(msg)
        self._flush()

    def send_raw(self, msg_type: int, body) -> None:
        self.channel.send_raw(msg_type, body)
        self._flush()

    def _flush(self) -> None:
        frames = self.channel.data_to_send()
        if frames:
            with self._write_lock:
                self.sock.sendall(frames[0] if len(frames) == 1 else b"".join(frames))

    def _read_loop(self) -> None:
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        try:
            while True:
                n = self.sock.recv_into(buf)
                if n == 0:
                    break
                self._dispatch(self.channel.receive_data(view[:n]))
                self._flush()
        except (OSError, SpiceError) as err:
            self.error = err
            if not isinstance(err, OSError):
                log.warning("%s channel: %s", self.channel.channel_type.name, err)
        finally:
            self.closed.set()
            self._on_closed()

    def _dispatch(self, msgs: list[m.Message]) -> None:
        for msg in msgs:
            self.handle(msg)

    def handle(self, msg: m.Message) -> None:
        log.debug("ignoring %s on %s channel", type(msg).__name__, self.channel.channel_type.name)

    def _on_closed(self) -> None:
        pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._reader is not None:
            self._reader.join(timeout=1)


class MainChannel(ChannelClient):
    def __init__(self, sock, established) -> None:
        super().__init__(sock, established)
        self.init: m.MsgMainInit | None = None
        self.channels: list[tuple[int, int]] | None = None
        self.name: str | None = None
        self.uuid: bytes | None = None
        self.ready = gevent.event.Event()
        self.listed = gevent.event.Event()

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgMainInit):
            self.init = msg
            self.ready.set()
            self.send(m.MsgcMainAttachChannels())
        elif isinstance(msg, m.MsgMainChannelsList):
            self.channels = [(c.type, c.id) for c in msg.channels]
            self.listed.set()
        elif isinstance(msg, m.MsgMainName):
            self.name = msg.name
        elif isinstance(msg, m.MsgMainUuid):
            self.uuid = msg.uuid
        else:
            super().handle(msg)


class PortChannel(ChannelClient):
    """A port channel: write() sends DATA, read() returns what the device sent."""

    def __init__(self, sock, established) -> None:
        super().__init__(sock, established)
        self.name: str | None = None
        self.opened = False
        self.initialised = gevent.event.Event()
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._arrived = gevent.event.Event()
        self.bytes_received = 0
        self.bytes_sent = 0

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.MsgSpicevmcData):
            data = bytes(msg.data)
            self._inbox.append(data)
            self._inbox_bytes += len(data)
            self.bytes_received += len(data)
            self.opened = True  # spice-gtk treats any data as "opened" (4.3)
            self._arrived.set()
        elif isinstance(msg, m.MsgPortInit):
            if self.name is None:  # spice-gtk accepts PORT_INIT once per connection (4.3)
                self.name, self.opened = msg.name, bool(msg.opened)
            self.initialised.set()
        elif isinstance(msg, m.MsgPortEvent):
            if msg.event == PortEvent.OPENED:
                self.opened = True
            elif msg.event == PortEvent.CLOSED:
                self.opened = False
        else:
            super().handle(msg)

    def _on_closed(self) -> None:
        self._arrived.set()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), DATA_CHUNK):
            self.send_raw(MsgcSpicevmc.DATA, view[start : start + DATA_CHUNK])
        self.bytes_sent += len(view)

    def read(self, n: int | None = None, timeout: float | None = None) -> bytes:
        """Up to ``n`` bytes (everything buffered if None) once at least one byte arrived; with
        ``n`` given, waits until exactly ``n`` arrived or the timeout passes, then returns what
        there is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        want = 1 if n is None else n
        while self._inbox_bytes < want and not self.closed.is_set():
            self._arrived.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._arrived.wait(left)
        return self._take(self._inbox_bytes if n is None else min(n, self._inbox_bytes))

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


class ClientSession:
    """A client session: the main channel plus whichever port channels are opened."""

    def __init__(self, host: str, port: int, password: str | None = None, *, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.timeout = timeout
        self.main: MainChannel | None = None
        self.ports: dict[int, PortChannel] = {}

    @property
    def session_id(self) -> int:
        return self.main.init.session_id

    def connect(self) -> ClientSession:
        sock, est = link_channel(self.host, self.port, 0, ChannelType.MAIN, 0, password=self.password,
                                 channel_caps=caps_to_words(MAIN_CAPS), timeout=self.timeout)
        self.main = MainChannel(sock, est)
        self.main.start()
        if not self.main.listed.wait(self.timeout):
            self.close()
            raise ProtocolError("no MAIN_INIT and CHANNELS_LIST from the server in time")
        return self

    @property
    def channels(self) -> list[tuple[int, int]]:
        return list(self.main.channels or [])

    def open_port(self, name: str | None = None, channel_id: int | None = None) -> PortChannel:
        """Link the port channel with ``channel_id``, or find the one named ``name`` (as spice-gtk
        does: link each port and read its PORT_INIT)."""
        candidates = [cid for ctype, cid in self.channels if ctype == ChannelType.PORT]
        if channel_id is not None:
            candidates = [channel_id]
        for cid in candidates:
            port = self.ports.get(cid) or self._link_port(cid)
            if name is None or port.name == name:
                return port
        raise LookupError(f"no port channel named {name!r}; the server has {self.port_names()}")

    def port_names(self) -> list[str | None]:
        return [p.name for p in self.ports.values()]

    def _link_port(self, channel_id: int) -> PortChannel:
        sock, est = link_channel(self.host, self.port, self.session_id, ChannelType.PORT, channel_id,
                                 password=self.password, timeout=self.timeout)
        port = PortChannel(sock, est)
        port.start()
        if not port.initialised.wait(self.timeout):
            port.close()
            raise ProtocolError(f"port channel {channel_id} sent no PORT_INIT")
        self.ports[channel_id] = port
        return port

    def close(self) -> None:
        for port in self.ports.values():
            port.close()
        if self.main is not None:
            self.main.close()

    def __enter__(self) -> ClientSession:
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()
