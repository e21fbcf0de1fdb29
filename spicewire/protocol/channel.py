"""One channel connection after its link (PROTOCOL.md sections 2 and 7.1-7.2), for either side.

It frames and unframes messages, keeps the serials, and answers the common messages itself:
the client side answers SET_ACK with ACK_SYNC, PING with PONG and sends an ACK every ``window``
messages; the server side counts what it sent against the ACK window. Everything else comes out of
``receive_data`` as decoded message objects for the channel's owner. No sockets, no clock.

The state a migration has to move (serials, ACK window and generation, unacknowledged count) is
readable by the control plane and by migrate-data builders; the edges change it only through the
operations below (``expect_migrate_data``, ``restore_migrated``, ``send_streamed``...), never by
assigning the reader's or writer's fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum

import numpy as np

from spicewire.errors import CodecError, LocalProtocolError, RemoteProtocolError, SpiceError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, MigrateFlags, Msgc
from spicewire.protocol.framing import DEFAULT_MAX_SIZE, MessageReader, MessageWriter

log = logging.getLogger(__name__)

NO_GENERATION = 0xFFFFFFFF  # the server's idea of the client's ACK generation before any ACK_SYNC


class Side(Enum):
    SERVER = "server"
    CLIENT = "client"


class ChannelConnection:
    """Framing plus the common-message rules of one channel connection."""

    def __init__(
        self,
        side: Side,
        channel_type: int,
        channel_id: int = 0,
        *,
        send_mini: bool = True,
        expect_mini: bool = True,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.side = side
        self.channel_type = ChannelType(channel_type)
        self.channel_id = channel_id
        self.reader = MessageReader(expect_mini, max_size)
        self.writer = MessageWriter(send_mini)
        self._incoming = m.C2S if side is Side.SERVER else m.S2C
        self._classes = m.message_table(channel_type, self._incoming)
        self._outbox: list[bytes] = []
        self._bytes_in = 0
        self._bytes_out = 0
        # Server: the window it set and how many messages the client has not acknowledged.
        self._ack_generation = 0
        self.ack_window = 0
        self.unacked = 0
        self.client_generation = NO_GENERATION
        # Client: the window the server set, and messages left before the client owes an ACK.
        self.client_window = 0
        self.ack_countdown = 0
        # Client: set by a MIGRATE with NEED_DATA_TRANSFER. The MIGRATE_DATA that must follow can be
        # far larger than what a client may hold, so parsing stops and the owner passes it through
        # (``take_unparsed``, then the socket) and calls ``passed_through`` or ``resume``.
        self.paused = False
        # Once parsing failed, where the next message starts is unknown: the incoming half refuses
        # every later byte, as h11's their_state ERROR does (sending stays possible, for a goodbye).
        self.receive_error: SpiceError | None = None

    @property
    def bytes_in(self) -> int:
        return self._bytes_in

    @property
    def bytes_out(self) -> int:
        return self._bytes_out

    @property
    def ack_generation(self) -> int:
        """Server: the generation of the last SET_ACK sent."""
        return self._ack_generation

    @property
    def serial_in(self) -> int:
        return self.reader.serial

    @property
    def serial_out(self) -> int:
        return self.writer.serial

    @property
    def header_size(self) -> int:
        """Bytes of each incoming message's header."""
        return self.reader.header_size

    @property
    def expects_mini_header(self) -> bool:
        return self.reader.mini

    @property
    def sends_mini_header(self) -> bool:
        return self.writer.mini

    @property
    def max_size(self) -> int:
        """The largest incoming body accepted (but for an expected MIGRATE_DATA)."""
        return self.reader.max_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as a message."""
        return self.reader.buffered

    # --- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[m.Message]:
        """Messages for the owner; answers to common messages wait in ``data_to_send``. After one
        call raised, every later one raises LocalProtocolError."""
        self._check_receiving()
        if self.paused:
            raise LocalProtocolError("the channel is paused for a MIGRATE_DATA pass-through")
        self._bytes_in += len(data)
        self.reader.feed(data)
        return self._parse()

    def receive_buffer(self, limit: int = 8 << 20) -> memoryview | None:
        """Where the next bytes may be received straight into: the unfilled part of a large body
        under way (then call ``received_into``), or None to receive into a buffer of one's own
        and call ``receive_data``."""
        return None if self.paused else self.reader.bulk_view(limit)

    def received_into(self, n: int) -> list[m.Message]:
        """``n`` bytes were received into the view ``receive_buffer`` gave."""
        self._check_receiving()
        if self.paused:
            raise LocalProtocolError("the channel is paused for a MIGRATE_DATA pass-through")
        self._bytes_in += n
        self.reader.bulk_received(n)
        return self._parse()

    def bulk_progress(self) -> int:
        """Bytes of the large body under way received so far (into the array ``into`` gave for
        a MIGRATE_DATA); 0 when none is."""
        return self.reader.bulk_progress()

    def expect_migrate_data(self, limit: int, into: Callable[[int], np.ndarray] | None = None) -> None:
        """Server, destination: the next message is the client's MIGRATE_DATA, up to ``limit``
        bytes, gathered into ``into(size)`` when large. The client numbered it on its connection
        to the source, so its serial is adopted. Only that message: the channel's own limit
        applies to every other message."""
        self.reader.expect_large(Msgc.MIGRATE_DATA, limit, into)
        self.reader.adopt_next_serial()

    def restore_migrated(self, *, serial_out: int, ack_generation: int) -> None:
        """Server, destination: go on from the source's serial and ACK generation (MIGRATE_DATA)."""
        self.writer.continue_serials(serial_out)
        self._ack_generation = ack_generation

    def adopt_peer_serials(self) -> None:
        """Server, source taking a session back: the client numbered what it wrote to the
        destination meanwhile, so its next serial is taken as given."""
        self.reader.adopt_next_serial()

    def take_unparsed(self) -> bytes:
        """Client, paused: every byte received but not parsed, for passing a message through."""
        if not self.paused:
            raise LocalProtocolError("bytes are taken out unparsed only while paused for MIGRATE_DATA")
        return self.reader.take_buffered()

    def resume(self, unparsed: bytes | bytearray | memoryview = b"") -> list[m.Message]:
        """Parse again after a pause, starting with ``unparsed`` (bytes taken out with
        ``take_unparsed`` that follow the message passed through or dropped)."""
        self._check_receiving()
        self.paused = False
        self.reader.feed(unparsed)
        return self._parse()

    def passed_through(self) -> None:
        """The owner took one whole message off the stream unparsed (relayed or dropped): it
        counts for the serials and the ACK window."""
        self.paused = False
        self.reader.skip_message()
        if self.side is Side.CLIENT:
            self._count_for_ack()

    def rebind(self, *, send_mini: bool, expect_mini: bool) -> None:
        """Client, seamless migration: the channel goes on over a connection to another server.
        Serials and ACK state stay (spice-gtk swaps only socket and header mode); the new server
        numbers its full headers from 1, so the next incoming serial is adopted."""
        reader, writer = self.reader, self.writer
        self.reader = MessageReader(expect_mini, reader.max_size)
        self.reader.continue_serials(reader.serial)
        self.reader.adopt_next_serial()
        self.writer = MessageWriter(send_mini)
        self.writer.continue_serials(writer.serial)
        self.paused = False

    def _check_receiving(self) -> None:
        if self.receive_error is not None:
            raise LocalProtocolError(
                f"the {self.channel_type.name} channel's incoming stream failed ({self.receive_error}); "
                "it takes no more bytes"
            )

    def _parse(self) -> list[m.Message]:
        try:
            return self._parse_messages()
        except SpiceError as err:
            self.receive_error = err
            raise

    def _parse_messages(self) -> list[m.Message]:
        out = []
        for raw in self.reader:
            if self.side is Side.CLIENT:
                self._count_for_ack()
            cls = self._classes.get(raw.type)
            if cls is None:
                self._unknown(raw.type)
                continue
            try:
                msg = cls.decode(raw.body)
            except CodecError as err:
                raise RemoteProtocolError(f"malformed {cls.__name__}: {err}") from None
            if not self._handle_common(msg):
                out.append(msg)
            if (
                self.side is Side.CLIENT
                and isinstance(msg, m.MsgMigrate)
                and msg.flags & MigrateFlags.NEED_DATA_TRANSFER
            ):
                self.paused = True
                break
        return out

    def _unknown(self, msg_type: int) -> None:
        # spice-server disconnects on an unknown type; spice-gtk logs and goes on (section 2).
        if self.side is Side.SERVER:
            raise RemoteProtocolError(f"unknown message type {msg_type} on {self.channel_type.name} channel")
        log.warning("ignoring unknown message type %d on %s channel", msg_type, self.channel_type.name)

    def _handle_common(self, msg: m.Message) -> bool:
        if msg.FAMILY is not m.Family.COMMON:
            return False  # the data path (DATA, main messages) skips the chain below
        if isinstance(msg, m.MsgcAckSync):
            self.client_generation = msg.generation
        elif isinstance(msg, m.MsgcAck):
            if self.client_generation == self._ack_generation and self.ack_window:
                self.unacked = max(0, self.unacked - self.ack_window)
        elif isinstance(msg, m.MsgSetAck):
            self.send(m.MsgcAckSync(msg.generation))
            self.client_window = self.ack_countdown = msg.window
        elif isinstance(msg, m.MsgPing):
            self.send(m.MsgcPong(msg.id, msg.timestamp))
        elif isinstance(msg, m.MsgNotify):
            log.info("server notice on %s channel: %s", self.channel_type.name, msg.message)
        elif isinstance(msg, (m.MsgWaitForChannels, m.MsgList, m.MsgcPong)):
            pass  # no display channel here to wait for or to carry sub-messages
        else:
            return False
        return True

    def _count_for_ack(self) -> None:
        if self.ack_countdown:
            self.ack_countdown -= 1
            if self.ack_countdown == 0:
                self.send(m.MsgcAck())
                self.ack_countdown = self.client_window

    # --- sending -----------------------------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        self.send_raw(msg.TYPE, msg.wire_body())

    def send_raw(self, msg_type: int, body: bytes | bytearray | memoryview = b"") -> None:
        framed = self.writer.frame(msg_type, body)
        self._bytes_out += len(framed)
        self._outbox.append(framed)
        self._count_sent()

    def send_streamed(self, msg_type: int, size: int) -> bytes:
        """Frame a message whose ``size``-byte body the caller sends itself (as h11's data
        passthrough). Returns what to write before the body: the messages queued so far, in
        order (their serials come first), then the header. Nothing else may be written on the
        connection until the body is."""
        header = self.writer.header(msg_type, size)
        self._bytes_out += len(header) + size
        self._count_sent()
        queued, self._outbox = self._outbox, []
        return b"".join((*queued, header))

    def _count_sent(self) -> None:
        if self.side is Side.SERVER and self.ack_window:
            self.unacked += 1

    def set_ack(self, window: int) -> None:
        """Server: start (or change) ACK flow control with a new generation."""
        self._ack_generation += 1
        self.ack_window = window
        self.send(m.MsgSetAck(self._ack_generation, window))
        self.unacked = 0  # SET_ACK itself is not counted

    @property
    def window_open(self) -> bool:
        """Server: whether another message may go out (spice-server stops at twice the window)."""
        return not self.ack_window or self.unacked < 2 * self.ack_window

    def data_to_send(self) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def state(self) -> dict:
        """The in-flight protocol state, as the control plane and migration see it."""
        return {
            "serial_in": self.reader.serial,
            "serial_out": self.writer.serial,
            "ack_generation": self._ack_generation,
            "ack_window": self.ack_window,
            "unacked": self.unacked,
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "buffered_in": self.reader.buffered,
        }
