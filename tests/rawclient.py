"""A bare SPICE client for server tests: the link machine and a client-side channel over a gevent
socket (cooperative when the server shares the hub, an ordinary blocking socket otherwise)."""

from __future__ import annotations

from collections import deque

import gevent.socket

from spicewire.protocol import messages as m
from spicewire.protocol.channel import ChannelConnection, Side
from spicewire.protocol.enums import ChannelType
from spicewire.protocol.link import ClientLink, LinkEstablished

TIMEOUT = 5.0


class RawChannel:
    """One linked channel: ``send`` messages, ``expect`` the next message of a type."""

    def __init__(self, address, connection_id: int, channel_type: int, channel_id: int = 0, password=None) -> None:
        self.sock = gevent.socket.create_connection(address, timeout=TIMEOUT)
        try:
            event = self._link(ClientLink(connection_id, channel_type, channel_id, password=password))
        except BaseException:
            self.sock.close()
            raise
        self.channel = ChannelConnection(
            Side.CLIENT, channel_type, channel_id,
            send_mini=event.send_mini_header, expect_mini=event.expect_mini_header,
        )
        self.inbox: deque[m.Message] = deque(self.channel.receive_data(event.trailing))

    def _link(self, link: ClientLink) -> LinkEstablished:
        while True:
            event = link.next_event()  # raises LinkError when the server refuses
            out = link.data_to_send()
            if out:
                self.sock.sendall(out)
            if isinstance(event, LinkEstablished):
                return event
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection during the link")
            link.receive_data(data)

    def send(self, *msgs: m.Message) -> None:
        for msg in msgs:
            self.channel.send(msg)
        self._flush()

    def expect(self, cls: type[m.Message]) -> m.Message:
        """The next message of type ``cls``; messages of other types before it are dropped."""
        while True:
            while self.inbox:
                msg = self.inbox.popleft()
                if isinstance(msg, cls):
                    return msg
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"server closed the connection before {cls.__name__}")
            self.inbox.extend(self.channel.receive_data(data))
            self._flush()  # ACK_SYNC, ACK and PONG the channel owes

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        out = self.channel.data_to_send()
        if out:
            self.sock.sendall(b"".join(out))


def open_session(address, password=None) -> tuple[RawChannel, int]:
    """Link a main channel (connection id 0: a new session); return it and the session id."""
    main = RawChannel(address, 0, ChannelType.MAIN, password=password)
    return main, main.expect(m.MsgMainInit).session_id
