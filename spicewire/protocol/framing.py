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


def parse_sub_message_list(body: bytes | memoryview, offset: int = 0) -> tuple[SubMessage, ...]:
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
        self.max_size = max_size
        self.serial = 0  # serial of the last message handed out
        self.adopt_serial = False  # take the next full-header serial as given (a migrated channel)
        self._header_size = MINI_HEADER.size if mini else FULL_HEADER.size
        self._buf = bytearray()
        self._offset = 0  # start of unconsumed data in _buf
        self._consumed = 0  # stream position of _buf[0], for error reports
        self._bulk: tuple[int, int, int, np.ndarray] | None = None  # serial, type, sub_list, body
        self._bulk_filled = 0
        # Where bulk bodies go: a receiver that knows a big one is coming can hand out memory it
        # prepared (faulted in) ahead, instead of paying for fresh pages while the bytes arrive.
        self.bulk_allocator: Callable[[int], np.ndarray] = _new_buffer

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
        return memoryview(body)[self._bulk_filled : end]

    def bulk_received(self, n: int) -> None:
        self._bulk_filled += n

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
            serial, sub_list = self.serial + 1, 0
        else:
            serial, msg_type, size, sub_list = header
            if serial != self.serial + 1 and not self.adopt_serial:
                raise RemoteProtocolError(f"message serial {serial} where {self.serial + 1} was expected")
        if size > self.max_size:
            raise MessageTooLarge(size, self.max_size, self._consumed + start)
        body_start = start + self._header_size
        end = body_start + size
        if size >= self.BULK_BODY:
            body = self.bulk_allocator(size)
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
            body = view[body_start:end].tobytes()
        self._accept(serial)
        self._advance(end)
        return RawMessage(serial, msg_type, body, sub_list)

    def _finish_bulk(self) -> RawMessage | None:
        serial, msg_type, sub_list, body = self._bulk
        if self._bulk_filled < len(body):
            return None
        self._bulk = None
        self._accept(serial)
        return RawMessage(serial, msg_type, memoryview(body), sub_list)

    def _accept(self, serial: int) -> None:
        self.serial = serial
        self.adopt_serial = False

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
        self.serial = 0  # serial of the last message framed (implicit with mini headers)

    def header(self, msg_type: int, size: int, sub_list: int = 0) -> bytes:
        """Only the header of a ``size``-byte message whose body the caller sends itself."""
        serial = self.serial + 1
        try:
            if self.mini:
                header = MINI_HEADER.pack(msg_type, size)
            else:
                header = FULL_HEADER.pack(serial, msg_type, size, sub_list)
        except struct.error as exc:
            raise CodecError(f"cannot frame message type {msg_type} of {size} bytes: {exc}") from None
        self.serial = serial
        return header

    def frame(self, msg_type: int, body: bytes | bytearray | memoryview = b"", sub_list: int = 0) -> bytes:
        if sub_list and self.mini:
            raise LocalProtocolError("the mini header has no sub_list; send a LIST message instead")
        return b"".join((self.header(msg_type, len(body), sub_list), body))
