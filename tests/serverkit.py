"""Test helpers: an in-process SpiceServer and a small raw SPICE client on plain gevent sockets.

The client is deliberately thin (ClientLink for the handshake, ChannelConnection(Side.CLIENT) for
framing and the common messages) so tests can step outside the protocol wherever they need to:
write raw bytes, skip ACKs, stop reading. It does not use spicewire.client.

    with running_server(limits=Limits(to_device=1 << 20)) as server:
        main = MainSession(server.address)
        main.attach_channels()
        echo = main.open_port(ECHO)
        echo.send_data(b"x" * 100)
        assert echo.read_data(100) == b"x" * 100
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gevent
from gevent import socket

from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import (
    LINK_HEADER_SIZE,
    LINK_MAGIC,
    LINK_REPLY_SIZE,
    ChannelType,
    LinkErr,
    MsgcSpicevmc,
)
from spicewire.protocol.link import (
    CLIENT_COMMON_CAPS,
    ClientLink,
    LinkEstablished,
    SpiceLinkHeader,
    SpiceLinkMess,
    SpiceLinkReply,
)
from spicewire.server.net import ServerConfig, SpiceServer
from spicewire.server.session import Limits

__all__ = [
    "DEFAULT_PORTS",
    "ECHO",
    "SINK",
    "Bystander",
    "Limits",
    "MainSession",
    "PortChannel",
    "RawChannel",
    "ServerConfig",
    "echo_roundtrip",
    "link_error_of",
    "link_mess_bytes",
    "port_state",
    "raw_connect",
    "read_exactly",
    "read_until_closed",
    "recv_exactly",
    "refused_port",
    "running_server",
    "sha256",
    "wait_until",
]

DEFAULT_PORTS = [("org.spicewire.echo", "echo"), ("org.spicewire.sink", "sink")]
ECHO, SINK = 0, 1  # port channel ids of DEFAULT_PORTS (ids follow the config order)
TIMEOUT = 10.0  # default bound on every blocking step, so no test can hang


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- server ----------------------------------------------------------------------------------


@contextmanager
def running_server(config: ServerConfig | None = None, **overrides) -> Iterator[SpiceServer]:
    """A started SpiceServer on 127.0.0.1, port 0, stopped on exit.

    Without ``config``, ServerConfig(port=0, port_channels=DEFAULT_PORTS, **overrides)."""
    if config is None:
        overrides.setdefault("port_channels", list(DEFAULT_PORTS))
        config = ServerConfig(host="127.0.0.1", port=0, **overrides)
    elif overrides:
        raise TypeError("pass either a config or overrides, not both")
    server = SpiceServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=2.0)


def port_state(server: SpiceServer, session_id: int, channel_id: int):
    """The server-side PortState (device, to_device/to_client buffers) of a session's port."""
    return server.sessions[session_id].ports[channel_id]


# --- raw sockets -----------------------------------------------------------------------------


def raw_connect(address, timeout: float = TIMEOUT, bufsize: int | None = None) -> socket.socket:
    """A connected TCP socket; ``bufsize`` fixes the client's SO_RCVBUF and SO_SNDBUF (no
    autotuning), so that backpressure reaches the application soon instead of after megabytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if bufsize:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        sock.settimeout(timeout)
        sock.connect(tuple(address))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses every connection while the block runs: bound, so nothing else
    can take it (as it could a port merely found free), and not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def recv_exactly(sock: socket.socket, n: int, timeout: float = TIMEOUT) -> bytes:
    """Exactly ``n`` bytes from ``sock``, however the stream cuts them; otherwise an AssertionError
    that says how many came."""
    data = bytearray()
    try:
        with gevent.Timeout(timeout):
            while len(data) < n:
                chunk = sock.recv(n - len(data))
                if not chunk:
                    raise AssertionError(f"the peer closed after {len(data)} of {n} bytes: {bytes(data)!r}")
                data += chunk
    except gevent.Timeout:
        raise AssertionError(f"{len(data)} of {n} bytes arrived within {timeout} s: {bytes(data)!r}") from None
    return bytes(data)


def read_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection.

    Raises gevent.Timeout if the peer keeps the connection open longer than ``timeout``."""
    out = bytearray()
    with gevent.Timeout(timeout):
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
    return bytes(out)


def link_error_of(data: bytes) -> int:
    """The link error in what a server answered to a link attempt: the error field of the
    LinkReply (1.4) or, after a successful reply, the u32 link result (1.7)."""
    if len(data) < LINK_HEADER_SIZE + LINK_REPLY_SIZE:
        raise AssertionError(f"no complete LinkReply in {len(data)} bytes: {data.hex()}")
    header = SpiceLinkHeader.decode(data)
    assert header.magic == LINK_MAGIC, hex(header.magic)
    body = data[LINK_HEADER_SIZE : LINK_HEADER_SIZE + header.size]
    reply = SpiceLinkReply.decode(body)
    if reply.error != LinkErr.OK:
        return reply.error
    rest = data[LINK_HEADER_SIZE + header.size :]
    assert len(rest) == 4, f"expected a u32 link result after the reply, got {rest.hex()}"
    return struct.unpack("<I", rest)[0]


def link_mess_bytes(connection_id: int, channel_type: int, channel_id: int = 0,
                    common_caps=CLIENT_COMMON_CAPS, channel_caps=()) -> bytes:
    """A framed SpiceLinkMess (header + mess + caps), ready to corrupt."""
    body = SpiceLinkMess(connection_id, channel_type, channel_id, tuple(common_caps), tuple(channel_caps)).encode()
    return SpiceLinkHeader(size=len(body)).encode() + body


# --- channels --------------------------------------------------------------------------------


class _NoAutoAck(ChannelConnection):
    """A client channel that answers SET_ACK with ACK_SYNC but never sends ACK by itself."""

    def _count_for_ack(self) -> None:
        pass


class RawChannel:
    """One linked channel connection: a gevent socket plus ChannelConnection(Side.CLIENT).

    Received messages queue up in ``inbox``; PING, SET_ACK (and, with ``auto_ack``, the ACK every
    window messages) are answered as soon as they are read."""

    def __init__(self, sock: socket.socket, established: LinkEstablished, *, auto_ack: bool = True) -> None:
        self.sock = sock
        self.established = established
        cls = ChannelConnection if auto_ack else _NoAutoAck
        self.channel = cls(
            Side.CLIENT, established.channel_type, established.channel_id,
            send_mini=established.send_mini_header, expect_mini=established.expect_mini_header,
        )
        self.inbox: deque[m.Message] = deque()
        self.received_messages = 0
        self.eof = False
        self._sending = False
        sock.settimeout(None)  # bounds come from gevent.Timeout: a socket timeout is shared by
        # the reading and the writing greenlet
        if established.trailing:
            self._feed(established.trailing)

    @classmethod
    def link(cls, address, connection_id: int, channel_type: int, channel_id: int = 0, *,
             password: str | None = None, common_caps=CLIENT_COMMON_CAPS, channel_caps=(),
             auto_ack: bool = True, timeout: float = TIMEOUT, bufsize: int | None = None,
             wrap: Callable[[socket.socket], socket.socket] | None = None) -> RawChannel:
        """Connect and link; a refused link raises LinkError (``.code`` is the SpiceLinkErr).
        ``wrap`` turns the connected socket into the one the link runs on (a TLS client's)."""
        sock = raw_connect(address, timeout, bufsize)
        try:
            if wrap is not None:
                sock = wrap(sock)
            link = ClientLink(connection_id, channel_type, channel_id, password=password,
                              common_caps=tuple(common_caps), channel_caps=tuple(channel_caps))
            with gevent.Timeout(timeout):
                while True:
                    event = link.next_event()  # raises LinkError / RemoteProtocolError
                    out = link.data_to_send()
                    if out:
                        sock.sendall(out)
                    if isinstance(event, LinkEstablished):
                        break
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("server closed the connection during the link")
                    link.receive_data(data)
        except BaseException:
            sock.close()
            raise
        return cls(sock, event, auto_ack=auto_ack)

    # sending

    def send(self, msg: m.Message) -> None:
        self.channel.send(msg)
        self.flush()

    def send_raw(self, msg_type: int, body: bytes = b"") -> None:
        self.channel.send_raw(msg_type, body)
        self.flush()

    def send_bytes(self, data: bytes) -> None:
        """Bytes straight onto the socket, bypassing framing."""
        self.flush()
        self._write(data)

    def _write(self, data) -> None:
        self._sending = True
        try:
            self.sock.sendall(data)
        finally:
            self._sending = False

    def flush(self) -> None:
        """Write the channel's queued frames. While another greenlet is in the middle of a write,
        return at once: that greenlet writes them next, so a reader never blocks on a send (and
        replies like ACK never land inside another frame)."""
        if self._sending:
            return
        while frames := self.channel.data_to_send():
            self._write(b"".join(frames))

    # receiving

    def _feed(self, data) -> None:
        before = self.channel.serial_in
        self.inbox.extend(self.channel.receive_data(data))
        self.received_messages += self.channel.serial_in - before
        self.flush()  # ACK_SYNC, PONG, ACK

    def pump(self, timeout: float | None = TIMEOUT) -> bool:
        """Read from the socket once (gevent.Timeout after ``timeout``); False at EOF."""
        if self.eof:
            return False
        try:
            with gevent.Timeout(timeout):
                data = self.sock.recv(1 << 18)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._feed(data)
        return True

    def expect(self, msg_cls: type[m.Message], timeout: float = TIMEOUT) -> m.Message:
        """The first queued message of ``msg_cls``; other messages before it are dropped."""
        with gevent.Timeout(timeout):
            while True:
                while self.inbox:
                    msg = self.inbox.popleft()
                    if isinstance(msg, msg_cls):
                        return msg
                if not self.pump(None):
                    raise ConnectionError(f"connection closed while waiting for {msg_cls.__name__}")

    def wait_closed(self, timeout: float = TIMEOUT) -> None:
        """Read (and process) until the server closes the connection."""
        with gevent.Timeout(timeout):
            while self.pump(None):
                pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PortChannel(RawChannel):
    """A port channel: DATA in both directions."""

    port_init: m.MsgPortInit | None = None
    CHUNK = 64 << 10

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._data = bytearray()

    def send_data(self, data: bytes, chunk: int | None = None) -> None:
        """``data`` as SPICEVMC DATA messages of at most ``chunk`` bytes (blocks while the server
        does not read)."""
        chunk = chunk or self.CHUNK
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            self.channel.send_raw(MsgcSpicevmc.DATA, view[start : start + chunk])
            self.flush()

    def _take_data(self) -> None:
        keep = deque()
        while self.inbox:
            msg = self.inbox.popleft()
            if isinstance(msg, m.MsgSpicevmcData):
                self._data += msg.data
            else:
                keep.append(msg)
        self.inbox = keep

    def read_data(self, n: int, timeout: float = TIMEOUT) -> bytes:
        """Exactly ``n`` bytes of DATA (raises gevent.Timeout / ConnectionError otherwise)."""
        with gevent.Timeout(timeout):
            while True:
                self._take_data()
                if len(self._data) >= n:
                    out = bytes(self._data[:n])
                    del self._data[:n]
                    return out
                if not self.pump(None):
                    raise ConnectionError(f"connection closed after {len(self._data)} of {n} bytes")

    def read_available(self, timeout: float = 0.2) -> bytes:
        """Whatever DATA arrives within ``timeout`` (possibly nothing)."""
        with gevent.Timeout(timeout, False):  # False: the time running out ends the look quietly
            while self.pump(None):
                pass
        self._take_data()
        out = bytes(self._data)
        self._data.clear()
        return out


class MainSession:
    """A session's main channel: link (conn id 0), MAIN_INIT, ATTACH_CHANNELS, port links."""

    def __init__(self, address, *, password: str | None = None, common_caps=CLIENT_COMMON_CAPS,
                 channel_caps=(), timeout: float = TIMEOUT) -> None:
        self.address = tuple(address)
        self.password = password
        self.main = RawChannel.link(address, 0, ChannelType.MAIN, 0, password=password,
                                    common_caps=common_caps, channel_caps=channel_caps, timeout=timeout)
        self.init = self.main.expect(m.MsgMainInit, timeout)
        self.session_id = self.init.session_id
        self.ports: list[PortChannel] = []

    def attach_channels(self, timeout: float = TIMEOUT) -> tuple[m.ChannelId, ...]:
        self.main.send(m.MsgcMainAttachChannels())
        return self.main.expect(m.MsgMainChannelsList, timeout).channels

    def open_port(self, channel_id: int, *, auto_ack: bool = True, common_caps=CLIENT_COMMON_CAPS,
                  timeout: float = TIMEOUT, bufsize: int | None = None) -> PortChannel:
        port = PortChannel.link(self.address, self.session_id, ChannelType.PORT, channel_id,
                                password=self.password, common_caps=common_caps,
                                auto_ack=auto_ack, timeout=timeout, bufsize=bufsize)
        port.port_init = port.expect(m.MsgPortInit, timeout)
        self.ports.append(port)
        return port

    def close(self) -> None:
        for port in self.ports:
            port.close()
        self.main.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def echo_roundtrip(port: PortChannel, data: bytes, chunk: int | None = None, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` to an echo port while reading it back concurrently; returns what came back."""
    writer = gevent.spawn(port.send_data, data, chunk)
    try:
        back = port.read_data(len(data), timeout)
        writer.get(timeout=timeout)
    finally:
        writer.kill(block=False)
    return back


# --- waiting and witnesses -------------------------------------------------------------------


def wait_until(predicate, timeout: float = TIMEOUT, interval: float = 0.005, what: str = "condition") -> None:
    """Poll ``predicate`` (yielding to the hub, so the in-process server runs) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        gevent.sleep(interval)


def read_exactly(port, n: int, timeout: float = TIMEOUT) -> bytes:
    """Exactly ``n`` bytes from a ``spicewire.client`` port, or a failure that says how many came.

    ``port.read(n, timeout)`` hands back what it has when the timeout passes; comparing that short
    read with the expected bytes would report wrong bytes where the truth is missing ones."""
    got = port.read(n, timeout=timeout)
    if len(got) != n:
        raise AssertionError(f"{len(got)} of {n} bytes arrived within {timeout} s; they start {got[:48]!r}")
    return got


class Bystander:
    """A session that must come through someone else's misbehaviour untouched: an echo port and a
    sink port whose device is paused while holding ``held`` bytes in the server's to_device
    buffer. ``check()`` does an echo round trip, then resumes the sink and compares SHA-256."""

    def __init__(self, server: SpiceServer, *, held: int = 256 << 10, password: str | None = None) -> None:
        self.server = server
        self.session = MainSession(server.address, password=password)
        self.session.attach_channels()
        self.echo = self.session.open_port(ECHO)
        self.sink = self.session.open_port(SINK)
        self.port = port_state(server, self.session.session_id, SINK)
        self.port.device.pause()
        self.data = os.urandom(held)
        self.sink.send_data(self.data)
        wait_until(lambda: self.port.to_device_bytes == held, what="the sink's held bytes")

    def check(self) -> None:
        assert self.session.session_id in self.server.sessions, "the bystander's session is gone"
        payload = os.urandom(100_000)
        assert echo_roundtrip(self.echo, payload) == payload
        assert self.port.to_device_bytes == len(self.data), "held bytes changed while paused"
        device = self.port.device
        assert device.bytes_in == 0
        device.resume()
        wait_until(lambda: device.bytes_in == len(self.data), what="the sink to drain")
        assert device.status()["sha256"] == sha256(self.data)

    def close(self) -> None:
        self.session.close()
