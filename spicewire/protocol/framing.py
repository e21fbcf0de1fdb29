"""Message framing after link (PROTOCOL.md section 2): headers, serials and sub-message lists.

No I/O: ``MessageReader.feed`` takes bytes as they arrive, in any split, and hands back whole
messages; ``MessageWriter.frame`` gives the bytes to send.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from spicewire import codec
from spicewire._codec_layout import DEFAULT_MAX_SIZE, FULL_HEADER, MINI_HEADER
from spicewire.errors import CodecError, LocalProtocolError, MessageTooLarge, RemoteProtocolError

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SUB_HEADER = struct.Struct("<HI")  # SpiceSubMessage: type, size


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One framed message: its header fields and the undecoded body."""

    serial: int
    type: int
    body: bytes | memoryview  # memoryview over a numpy buffer for bulk bodies
    sub_list: int = 0  # full header only: offset of a SpiceSubMessageList in body, 0 = none

    def sub_messages(self) -> tuple[SubMessage, ...]:
        """The sub-messages the header's sub_list points to (to be handled before this message)."""
        return parse_sub_message_list(self.body, self.sub_list) if self.sub_list else ()


@dataclass(frozen=True, slots=True)
class SubMessage:
    type: int
    body: bytes | memoryview  # memoryview over a numpy buffer for bulk bodies


def parse_sub_message_list(body: bytes | bytearray | memoryview, offset: int = 0) -> tuple[SubMessage, ...]:
    """Parse the SpiceSubMessageList at ``offset`` of ``body`` (offset 0 for a LIST message)."""
    size = len(body)
    if offset < 0 or offset + _U16.size > size:
        raise CodecError(f"sub-message list at offset {offset} lies outside the {size}-byte body")
    (count,) = _U16.unpack_from(body, offset)
    table = offset + _U16.size
    if table + count * _U32.size > size:
        raise CodecError(f"sub-message list of {count} entries at offset {offset} overruns the {size}-byte body")
    subs = []
    for (sub_offset,) in _U32.iter_unpack(body[table : table + count * _U32.size]):
        if sub_offset + _SUB_HEADER.size > size:
            raise CodecError(f"sub-message header at offset {sub_offset} overruns the {size}-byte body")
        sub_type, sub_size = _SUB_HEADER.unpack_from(body, sub_offset)
        start = sub_offset + _SUB_HEADER.size
        if start + sub_size > size:
            raise CodecError(f"sub-message of {sub_size} bytes at offset {sub_offset} overruns the {size}-byte body")
        subs.append(SubMessage(sub_type, bytes(body[start : start + sub_size])))
    return tuple(subs)


def encode_sub_message_list(subs: Iterable[SubMessage], base: int = 0) -> bytes:
    """A SpiceSubMessageList followed by its records, for placing at offset ``base`` of a body
    (offsets count from the body start)."""
    subs = list(subs)
    position = base + _U16.size + _U32.size * len(subs)
    try:
        out = bytearray(_U16.pack(len(subs)))
        for sub in subs:
            out += _U32.pack(position)
            position += _SUB_HEADER.size + len(sub.body)
        for sub in subs:
            out += _SUB_HEADER.pack(sub.type, len(sub.body))
            out += sub.body
        return bytes(out)
    except (struct.error, TypeError) as exc:
        raise CodecError(f"cannot encode sub-message list: {exc}") from None


def _new_buffer(size: int) -> np.ndarray:
    return np.empty(size, dtype=np.uint8)


class MessageReader:
    """Reassembles messages from a byte stream, checking header serials and sizes.

    Small bodies are copied out of one growing buffer. A body of BULK_BODY bytes or more (a
    migration's MIGRATE_DATA, a large DATA) is gathered straight into a numpy buffer of its exact
    size instead, so a 1 GiB body costs 1 GiB, not a bytearray grown to 1 GiB and copied again.
    """

    BULK_BODY = 256 * 1024

    def __init__(self, mini: bool, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.mini = mini
        self._max_size = max_size
        self._serial = 0  # serial of the last message handed out
        self._adopt_serial = False  # take the next full-header serial as given (a migrated channel)
        self._header_size = MINI_HEADER.size if mini else FULL_HEADER.size
        self._buf = bytearray()
        self._offset = 0  # start of unconsumed data in _buf
        self._consumed = 0  # stream position of _buf[0], for error reports
        self._bulk: tuple[int, int, int, np.ndarray] | None = None  # serial, type, sub_list, body
        self._bulk_filled = 0
        # One message announced by the owner (expect_large): its type, a larger limit and, for a
        # bulk body, memory prepared (faulted in) ahead. They apply to the next message of that
        # type only, so no later message can land in memory meant for another.
        self._large: tuple[int, int, Callable[[int], np.ndarray] | None] | None = None

    @property
    def max_size(self) -> int:
        """The largest body accepted for a message of no announced type."""
        return self._max_size

    @property
    def serial(self) -> int:
        """Serial of the last message handed out (or skipped)."""
        return self._serial

    @property
    def header_size(self) -> int:
        return self._header_size

    def expect_large(self, msg_type: int, limit: int, into: Callable[[int], np.ndarray] | None = None) -> None:
        """The next message of ``msg_type`` may be up to ``limit`` bytes, and a bulk body of it goes
        into ``into(size)`` (a 1-D uint8 array of at least ``size`` bytes). That one message only:
        every other message keeps the reader's own limit and allocation."""
        if self._bulk is not None:
            raise LocalProtocolError("a message body is half read")
        self._large = (msg_type, limit, into)

    def adopt_next_serial(self) -> None:
        """Take the next full-header serial as given: the peer numbered its messages on another
        connection meanwhile (a migrated or rolled-back channel)."""
        self._adopt_serial = not self.mini

    def continue_serials(self, serial: int) -> None:
        """Number on from ``serial`` (a channel rebound onto a new connection keeps its count)."""
        self._serial = serial

    def skip_message(self) -> None:
        """The owner consumed one whole message outside the reader (passed through unparsed)."""
        self._accept(self._serial + 1)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._bulk is not None:
            body = self._bulk[3]
            n = min(len(data), len(body) - self._bulk_filled)
            body[self._bulk_filled : self._bulk_filled + n] = np.frombuffer(data, dtype=np.uint8, count=n)
            self._bulk_filled += n
            data = memoryview(data)[n:]
        if len(data):
            self._buf += data

    def bulk_view(self, limit: int = 8 << 20) -> memoryview | None:
        """The next unfilled part (at most ``limit`` bytes) of a bulk body being gathered, for
        receiving straight into it (then call ``bulk_received``); None when none is under way."""
        if self._bulk is None:
            return None
        body = self._bulk[3]
        end = min(len(body), self._bulk_filled + limit)
        return body[self._bulk_filled : end].data

    def bulk_received(self, n: int) -> None:
        self._bulk_filled += n

    def bulk_progress(self) -> int:
        """Bytes of the bulk body being gathered that arrived so far (0 when none is under way):
        its owner may read that much of the body before the message is complete."""
        return self._bulk_filled if self._bulk is not None else 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet handed out as a message."""
        bulk = self._header_size + self._bulk_filled if self._bulk is not None else 0
        return len(self._buf) - self._offset + bulk

    def take_buffered(self) -> bytes:
        """Every byte received but not yet parsed, raw: for passing a stream through unparsed."""
        if self._bulk is not None:
            raise LocalProtocolError("a message body is half read")
        with memoryview(self._buf) as view:
            rest = view[self._offset :].tobytes()
        self._advance(len(self._buf))
        return rest

    def next_message(self) -> RawMessage | None:
        """The next complete message, or None until more bytes are fed."""
        if self._bulk is not None:
            return self._finish_bulk()
        buf, start = self._buf, self._offset
        header = codec.parse_header(buf, start, self.mini)
        if header is None:
            return None
        if self.mini:
            msg_type, size = header
            serial, sub_list = self._serial + 1, 0
        else:
            serial, msg_type, size, sub_list = header
            if serial != self._serial + 1 and not self._adopt_serial:
                raise RemoteProtocolError(f"message serial {serial} where {self._serial + 1} was expected")
        large = self._large
        if large is not None and large[0] != msg_type:
            large = None
        limit = self._max_size if large is None else large[1]
        if size > limit:
            raise MessageTooLarge(size, limit, self._consumed + start)
        body_start = start + self._header_size
        end = body_start + size
        if size >= self.BULK_BODY:
            body = self._bulk_body(None if large is None else large[2], size)
            have = min(size, len(buf) - body_start)
            body[:have] = np.frombuffer(buf, dtype=np.uint8, count=have, offset=body_start)
            self._bulk, self._bulk_filled = (serial, msg_type, sub_list, body), have
            self._advance(body_start + have)
            return self._finish_bulk()
        if len(buf) < end:
            return None
        # Copy out exactly the body: a view into _buf would pin it (BufferError on resize) and
        # would see its bytes change once the buffer is compacted and refilled.
        with memoryview(buf) as view:
            small = view[body_start:end].tobytes()
        self._accept(serial, msg_type)
        self._advance(end)
        return RawMessage(serial, msg_type, small, sub_list)

    def _finish_bulk(self) -> RawMessage | None:
        if self._bulk is None:
            raise LocalProtocolError("no message body is being gathered")
        serial, msg_type, sub_list, body = self._bulk
        if self._bulk_filled < len(body):
            return None
        self._bulk = None
        self._accept(serial, msg_type)
        return RawMessage(serial, msg_type, body.data, sub_list)

    def _bulk_body(self, into: Callable[[int], np.ndarray] | None, size: int) -> np.ndarray:
        if into is None:
            return _new_buffer(size)
        body: object = into(size)
        # Bytes are copied and received into it by count: anything but a flat uint8 array of the
        # right size would take the right number of bytes and hold the wrong ones.
        if not isinstance(body, np.ndarray) or body.dtype != np.uint8 or body.ndim != 1 or len(body) < size:
            raise LocalProtocolError(
                f"a bulk body of {size} bytes needs a 1-D uint8 array of that size, got {body!r:.80}"
            )
        if not body.flags.c_contiguous or not body.flags.writeable:
            raise LocalProtocolError("a bulk body buffer must be contiguous and writable")
        return body[:size]

    def _accept(self, serial: int, msg_type: int | None = None) -> None:
        self._serial = serial
        self._adopt_serial = False
        if self._large is not None and self._large[0] == msg_type:
            self._large = None

    def __iter__(self) -> Iterator[RawMessage]:
        while (msg := self.next_message()) is not None:
            yield msg

    def _advance(self, offset: int) -> None:
        # Dropping the consumed prefix on every message would copy the rest of the buffer each
        # time (quadratic for many small messages); compact only once it is most of the buffer.
        if offset == len(self._buf):
            self._consumed += offset
            self._buf.clear()
            self._offset = 0
        elif offset > len(self._buf) // 2:
            self._consumed += offset
            del self._buf[:offset]
            self._offset = 0
        else:
            self._offset = offset


class MessageWriter:
    """Frames message bodies with the header the peer expects; serials start at 1."""

    def __init__(self, mini: bool) -> None:
        self.mini = mini
        self._serial = 0  # serial of the last message framed (implicit with mini headers)

    @property
    def serial(self) -> int:
        return self._serial

    def continue_serials(self, serial: int) -> None:
        """Number on from ``serial``: never backwards, so a serial the peer has seen is not reused."""
        self._serial = max(self._serial, serial)

    def header(self, msg_type: int, size: int, sub_list: int = 0) -> bytes:
        """Only the header of a ``size``-byte message whose body the caller sends itself."""
        serial = self._serial + 1
        try:
            if self.mini:
                header = MINI_HEADER.pack(msg_type, size)
            else:
                header = FULL_HEADER.pack(serial, msg_type, size, sub_list)
        except struct.error as exc:
            raise CodecError(f"cannot frame message type {msg_type} of {size} bytes: {exc}") from None
        self._serial = serial
        return header

    def frame(self, msg_type: int, body: bytes | bytearray | memoryview = b"", sub_list: int = 0) -> bytes:
        if sub_list and self.mini:
            raise LocalProtocolError("the mini header has no sub_list; send a LIST message instead")
        return b"".join((self.header(msg_type, len(body), sub_list), body))
