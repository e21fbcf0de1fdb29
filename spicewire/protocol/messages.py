"""Message payloads of PROTOCOL.md section 4, each declared once.

A message is a frozen dataclass whose annotations *are* its wire layout, in wire order:
``session_id: U32`` reads "a little-endian u32". Encoding and decoding are both derived from that
declaration, so the two directions of the codec cannot drift apart. ``Cls.LAYOUT`` lists the
(field, wire kind) pairs the codec compiled.

Rules from spice.proto (4.0) that every kind below obeys:

- pointers are a u32 size and a u32 offset from the body start (0 = absent); the pointed bytes are
  appended after everything else, in field order; receivers bounds-check them;
- zero-terminated strings are sent with their NUL counted and parsed with or without it;
- bytes beyond what the layout consumes are ignored.

Bad input raises ``CodecError``, never ``IndexError`` or ``struct.error``.
"""

import dataclasses
import functools
import struct
import typing
from collections.abc import Callable, Sequence
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Self, TypeVar

from spicewire.errors import CodecError
from spicewire.protocol import framing
from spicewire.protocol.enums import (
    ChannelType,
    DataCompression,
    Msg,
    Msgc,
    MsgcDisplay,
    MsgcInputs,
    MsgcMain,
    MsgcSpicevmc,
    MsgCursor,
    MsgDisplay,
    MsgInputs,
    MsgMain,
    MsgSpicevmc,
)

Buffer = bytes | bytearray | memoryview
_U32 = struct.Struct("<I")
_POINTER = struct.Struct("<II")  # every pointer in these layouts sits right after its size field


def _need(body: Buffer, pos: int, n: int, what: str) -> None:
    if pos + n > len(body):
        raise CodecError(f"{what} needs bytes {pos}..{pos + n} but the body has {len(body)}")


def _to_c_string(value: Any) -> bytes:
    if not isinstance(value, str):
        raise CodecError(f"expected str, got {type(value).__name__}")
    # surrogateescape: any bytes a peer sent decode to a str that encodes back to the same bytes
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise CodecError(f"string {value!r} cannot be encoded: {exc}") from None
    if b"\0" in raw:
        raise CodecError(f"string {value!r} contains NUL, which a C peer would cut it at")
    return raw


def _from_c_string(raw: Buffer) -> str:
    # A C peer stops at the first NUL, whether or not the sender counted one.
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# --- wire kinds ------------------------------------------------------------------------------
# encode(value, out, deferred, owner) appends to ``out``; pointed-to data goes to ``deferred``
# as (offset of the u32 to patch, bytes). decode(body, pos, decoded) -> (value, new pos), where
# ``decoded`` holds the fields already read (for When).


class Scalar:
    """A little-endian integer, signed when its struct code is lower case; runs of them are packed
    with one struct.Struct."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.size = struct.calcsize(code)
        self.signed = code.islower()

    def __repr__(self) -> str:
        return f"{'i' if self.signed else 'u'}{self.size * 8}"


u8, u16, u32, u64 = Scalar("B"), Scalar("H"), Scalar("I"), Scalar("Q")
U8 = Annotated[int, u8]
U16 = Annotated[int, u16]
U32 = Annotated[int, u32]
U64 = Annotated[int, u64]
i8, i16, i32, i64 = Scalar("b"), Scalar("h"), Scalar("i"), Scalar("q")
I8 = Annotated[int, i8]
I16 = Annotated[int, i16]
I32 = Annotated[int, i32]
I64 = Annotated[int, i64]


class FixedBytes:
    """``u8 x[n]`` with a constant n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def encode(self, value: Buffer, out: bytearray, deferred: list, owner: Any) -> None:
        if len(value) != self.n:
            raise CodecError(f"expected exactly {self.n} bytes, got {len(value)}")
        out += value

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[bytes, int]:
        _need(body, pos, self.n, f"{self.n}-byte array")
        return bytes(body[pos : pos + self.n]), pos + self.n


class Rest:
    """Opaque bytes to the end of the body (Data messages, compressed payloads)."""

    def encode(self, value: Buffer, out: bytearray, deferred: list, owner: Any) -> None:
        out += value

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[Buffer, int]:
        return (body[pos:] if pos else body), len(body)  # the whole body is passed on uncopied


class Padding:
    """Filler to the end of the body, kept as its length: only its size matters (PING)."""

    def encode(self, value: object, out: bytearray, deferred: list, owner: Any) -> None:
        if not isinstance(value, int) or value < 0:
            raise CodecError(f"padding length {value!r} is not a byte count")
        out += bytes(value)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[int, int]:
        return len(body) - pos, len(body)


class CString:
    """An inline length-prefixed string (``u32 n; u8 s[n]``).

    ``counts_nul`` is the zero_terminated rule (NAME); NOTIFY instead counts strlen but spice-server
    appends the NUL anyway, which ``counts_nul=False`` reproduces.
    """

    def __init__(self, length: Scalar, counts_nul: bool = True) -> None:
        self.length = struct.Struct("<" + length.code)
        self.counts_nul = counts_nul

    def encode(self, value: str, out: bytearray, deferred: list, owner: Any) -> None:
        raw = _to_c_string(value)
        out += self.length.pack(len(raw) + self.counts_nul)
        out += raw
        out += b"\0"

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[str, int]:
        _need(body, pos, self.length.size, "string length")
        (n,) = self.length.unpack_from(body, pos)
        pos += self.length.size
        _need(body, pos, n, f"{n}-byte string")
        return _from_c_string(body[pos : pos + n]), pos + n


class Pointer:
    """``u32 size; u8 *data[size] @zero_terminated`` as a str, or None when the pointer is 0."""

    def __init__(self, nonnull: bool) -> None:
        self.nonnull = nonnull

    def encode(self, value: str | None, out: bytearray, deferred: list, owner: Any) -> None:
        if value is None:
            if self.nonnull:
                raise CodecError("a @nonnull pointer field cannot be None")
            out += _POINTER.pack(0, 0)
            return
        data = _to_c_string(value) + b"\0"
        out += _U32.pack(len(data))
        deferred.append((len(out), data))
        out += bytes(4)  # offset, patched once the fixed part's length is known

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[str | None, int]:
        _need(body, pos, _POINTER.size, "pointer")
        size, offset = _POINTER.unpack_from(body, pos)
        pos += _POINTER.size
        if offset == 0:
            if self.nonnull:
                raise CodecError("@nonnull pointer is 0")
            return None, pos
        if offset >= len(body) or offset + size > len(body):
            raise CodecError(f"pointer to {size} bytes at offset {offset} is past the {len(body)}-byte body")
        return _from_c_string(body[offset : offset + size]), pos


class Array:
    """``count; Item items[count] @end`` where Item is a wire struct of scalars."""

    def __init__(self, count: Scalar, item: type["WireStruct"]) -> None:
        self.count = struct.Struct("<" + count.code)
        self.item = item
        self.item_layout = item._layout
        fixed = self.item_layout.fixed
        if fixed is None:
            raise TypeError(f"array items must be structs of scalars, {item.__name__} is not")
        self.item_struct = fixed

    def encode(self, value: Sequence, out: bytearray, deferred: list, owner: Any) -> None:
        out += self.count.pack(len(value))
        for item in value:
            self.item_layout.encode_into(item, out, deferred)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[tuple, int]:
        _need(body, pos, self.count.size, "array count")
        (count,) = self.count.unpack_from(body, pos)
        pos += self.count.size
        item = self.item_struct
        end = pos + count * item.size
        _need(body, pos, count * item.size, f"array of {count} {self.item.__name__}")
        make = self.item_layout.cls
        return tuple(make(*fields) for fields in item.iter_unpack(body[pos:end])), end


class CountedArray:
    """``Item items[<field on>] @end``: an array whose count is an earlier field of its own, with
    other fields in between (MONITORS_CONFIG's ``u16 count, u16 max_allowed, Head heads[count]``).
    Encoding refuses a count that does not match the items."""

    def __init__(self, on: str, item: type["WireStruct"]) -> None:
        self.on = on
        self.item = item
        self.item_layout = item._layout
        fixed = self.item_layout.fixed
        if fixed is None:
            raise TypeError(f"array items must be structs of scalars, {item.__name__} is not")
        self.item_struct = fixed

    def encode(self, value: Sequence, out: bytearray, deferred: list, owner: Any) -> None:
        count = getattr(owner, self.on)
        if count != len(value):
            raise CodecError(f"{self.on} = {count} but {len(value)} {self.item.__name__} items are given")
        for item in value:
            self.item_layout.encode_into(item, out, deferred)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[tuple, int]:
        count = decoded[self.on]
        item = self.item_struct
        end = pos + count * item.size
        _need(body, pos, count * item.size, f"array of {count} {self.item.__name__}")
        make = self.item_layout.cls
        return tuple(make(*fields) for fields in item.iter_unpack(body[pos:end])), end


class When:
    """A field present only if ``predicate(<field ``on``>)`` holds; None when absent."""

    def __init__(self, on: str, predicate: Callable[[Any], bool], kind: Scalar) -> None:
        self.on = on
        self.predicate = predicate
        self.struct = struct.Struct("<" + kind.code)

    def encode(self, value: int | None, out: bytearray, deferred: list, owner: Any) -> None:
        if self.predicate(getattr(owner, self.on)):
            if value is None:
                raise CodecError(f"field is required when {self.on} = {getattr(owner, self.on)}")
            out += self.struct.pack(value)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[int | None, int]:
        if not self.predicate(decoded[self.on]):
            return None, pos
        _need(body, pos, self.struct.size, "conditional field")
        return self.struct.unpack_from(body, pos)[0], pos + self.struct.size


class SubMessages:
    """A SpiceSubMessageList taking the rest of the body (the LIST message)."""

    def encode(self, value: Sequence, out: bytearray, deferred: list, owner: Any) -> None:
        out += framing.encode_sub_message_list(value, base=len(out))

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[tuple, int]:
        return framing.parse_sub_message_list(body, pos), len(body)


class Nested:
    """A wire struct inside another; its pointers still count from the message body start."""

    def __init__(self, cls: type["WireStruct"]) -> None:
        self.cls = cls

    def __repr__(self) -> str:
        return f"Nested({self.cls.__name__})"

    def encode(self, value: Any, out: bytearray, deferred: list, owner: Any) -> None:
        self.cls._layout.encode_into(value, out, deferred)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> tuple[Any, int]:
        return self.cls._layout.decode_from(body, pos)


# --- layout compiler -------------------------------------------------------------------------


class _Scalars:
    """Consecutive scalar fields, read and written with one struct call."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.codes = "<"

    def add(self, name: str, kind: Scalar) -> None:
        self.names.append(name)
        self.codes += kind.code
        self.struct = struct.Struct(self.codes)

    def encode(self, obj: Any, out: bytearray, deferred: list) -> None:
        out += self.struct.pack(*[getattr(obj, name) for name in self.names])

    def decode(self, body: Buffer, pos: int, decoded: dict) -> int:
        _need(body, pos, self.struct.size, "fields " + ", ".join(self.names))
        decoded.update(zip(self.names, self.struct.unpack_from(body, pos), strict=True))
        return pos + self.struct.size


class _Field:
    def __init__(self, name: str, kind: Any) -> None:
        self.name = name
        self.kind = kind

    def encode(self, obj: Any, out: bytearray, deferred: list) -> None:
        self.kind.encode(getattr(obj, self.name), out, deferred, obj)

    def decode(self, body: Buffer, pos: int, decoded: dict) -> int:
        decoded[self.name], pos = self.kind.decode(body, pos, decoded)
        return pos


class _Layout:
    def __init__(self, cls: type["WireStruct"]) -> None:
        # Typed loosely on purpose: the layout builds instances from decoded fields, a call the
        # field-less base class cannot describe.
        self.cls: type[Any] = cls
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = []
        self.ops: list[_Scalars | _Field] = []
        for field in dataclasses.fields(cls):
            kind = _kind_of(cls, field.name, hints[field.name])
            fields.append((field.name, kind))
            if isinstance(kind, Scalar):
                run = self.ops[-1] if self.ops else None
                if not isinstance(run, _Scalars):
                    run = _Scalars()
                    self.ops.append(run)
                run.add(field.name, kind)
            else:
                self.ops.append(_Field(field.name, kind))
        self.fields = tuple(fields)
        only = self.ops[0] if len(self.ops) == 1 else None
        # Data messages: the body is the payload, so neither direction needs to copy it.
        self.opaque_field = only.name if isinstance(only, _Field) and isinstance(only.kind, Rest) else None
        self.fixed = only.struct if isinstance(only, _Scalars) else None  # scalars only: array items

    def encode_into(self, obj: Any, out: bytearray, deferred: list) -> None:
        for op in self.ops:
            op.encode(obj, out, deferred)

    def decode_from(self, body: Buffer, pos: int) -> tuple[Any, int]:
        decoded: dict[str, Any] = {}
        for op in self.ops:
            try:
                pos = op.decode(body, pos, decoded)
            except CodecError as exc:
                where = f".{op.name}" if isinstance(op, _Field) else ""
                raise CodecError(f"{self.cls.__name__}{where}: {exc}") from None
        return self.cls(**decoded), pos

    def encode(self, obj: Any) -> bytes:
        out = bytearray()
        deferred: list[tuple[int, bytes]] = []
        try:
            if self.opaque_field:
                payload = getattr(obj, self.opaque_field)
                return payload if isinstance(payload, bytes) else memoryview(payload).tobytes()
            self.encode_into(obj, out, deferred)
            for slot, data in deferred:
                _U32.pack_into(out, slot, len(out))
                out += data
        except (struct.error, TypeError) as exc:
            raise CodecError(f"cannot encode {obj!r}: {exc}") from None
        except CodecError as exc:
            raise CodecError(f"{self.cls.__name__}: {exc}") from None
        return bytes(out)


def _kind_of(cls: type, name: str, hint: Any) -> Any:
    if typing.get_origin(hint) is Annotated:
        return hint.__metadata__[0]
    if isinstance(hint, type) and issubclass(hint, WireStruct):
        return Nested(hint)
    raise TypeError(f"{cls.__name__}.{name}: annotation {hint!r} does not say how it is encoded")


class WireStruct:
    """Base of every class ``wire_struct`` compiles: the layout it compiled, for the codec."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # each subclass is a dataclass
    LAYOUT: ClassVar[tuple[tuple[str, Any], ...]]
    _layout: ClassVar[_Layout]


_W = TypeVar("_W", bound=WireStruct)


# dataclass_transform tells type checkers what the decorator does at run time: every user of these
# classes gets their real constructors and read-only fields.
@typing.dataclass_transform(frozen_default=True)
def wire_struct(cls: type[_W]) -> type[_W]:
    """Make ``cls`` a frozen dataclass whose annotations are its wire layout."""
    cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
    cls._layout = _Layout(cls)
    cls.LAYOUT = cls._layout.fields
    return cls


# --- messages and their registry ---------------------------------------------------------------


class Direction(IntEnum):
    SERVER_TO_CLIENT = 0  # SPICE_MSG_*
    CLIENT_TO_SERVER = 1  # SPICE_MSGC_*


class Family(Enum):
    """Which channels share a message-number space (section 3)."""

    COMMON = "common"  # types below 101, on every channel
    MAIN = "main"
    SPICEVMC = "spicevmc"  # usbredir, port, webdav
    PORT = "port"  # port and webdav on top of spicevmc
    DISPLAY = "display"
    INPUTS = "inputs"
    CURSOR = "cursor"


_CHANNEL_FAMILIES: dict[int, tuple[Family, ...]] = {
    ChannelType.MAIN: (Family.COMMON, Family.MAIN),
    ChannelType.USBREDIR: (Family.COMMON, Family.SPICEVMC),
    ChannelType.PORT: (Family.COMMON, Family.SPICEVMC, Family.PORT),
    ChannelType.WEBDAV: (Family.COMMON, Family.SPICEVMC, Family.PORT),
    ChannelType.DISPLAY: (Family.COMMON, Family.DISPLAY),
    ChannelType.INPUTS: (Family.COMMON, Family.INPUTS),
    ChannelType.CURSOR: (Family.COMMON, Family.CURSOR),
}

_REGISTRY: dict[tuple[Family, Direction, int], type["Message"]] = {}
REGISTRY = MappingProxyType(_REGISTRY)
"""(family, direction, type number) -> message class."""


class Message(WireStruct):
    """Base of every message class; the class attributes say where it travels."""

    __slots__ = ()
    FAMILY: ClassVar[Family]
    DIRECTION: ClassVar[Direction]
    TYPE: ClassVar[int]

    def encode(self) -> bytes:
        return self._layout.encode(self)

    def wire_body(self) -> Buffer:
        """The body to frame. A data message's payload as it is, when it is a flat byte buffer:
        framing copies it once anyway, and ``encode`` would copy it first."""
        field = self._layout.opaque_field
        if field:
            payload = getattr(self, field)
            if isinstance(payload, (bytes, bytearray)) or (
                isinstance(payload, memoryview) and payload.ndim == 1 and payload.itemsize == 1
                and payload.c_contiguous
            ):
                return payload
        return self.encode()

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        layout = cls._layout
        if layout.opaque_field:  # a data message: the body is its payload, passed on uncopied
            return layout.cls(body)
        return layout.decode_from(body, 0)[0]


_M = TypeVar("_M", bound=Message)


@typing.dataclass_transform(frozen_default=True)
def message(family: Family, direction: Direction, msg_type: int) -> Callable[[type[_M]], type[_M]]:
    def register(cls: type[_M]) -> type[_M]:
        cls = wire_struct(cls)
        cls.FAMILY, cls.DIRECTION, cls.TYPE = family, direction, msg_type
        key = (family, direction, int(msg_type))
        if key in _REGISTRY:
            raise TypeError(f"{cls.__name__} and {_REGISTRY[key].__name__} share the number {key}")
        _REGISTRY[key] = cls
        return cls

    return register


def lookup(channel_type: int, direction: Direction, msg_type: int) -> type[Message] | None:
    """The message class for ``msg_type`` on a channel of ``channel_type``, or None if unknown."""
    return message_table(channel_type, direction).get(msg_type)


@functools.cache
def message_table(channel_type: int, direction: Direction) -> dict[int, type[Message]]:
    """Every message number a channel of ``channel_type`` knows in ``direction``, to its class: one
    dict lookup per received message. The first family listed for the channel wins a number.
    (Classes are all registered when this module is imported, before any table is asked for.)"""
    table: dict[int, type[Message]] = {}
    for family in reversed(_CHANNEL_FAMILIES.get(channel_type, (Family.COMMON,))):
        table.update({number: cls for (fam, dirn, number), cls in _REGISTRY.items()
                      if fam is family and dirn == direction})
    return table


def decode(channel_type: int, direction: Direction, msg_type: int, body: Buffer) -> Message:
    cls = lookup(channel_type, direction, msg_type)
    if cls is None:
        raise CodecError(f"unknown message type {msg_type} ({direction!r}) on channel type {channel_type}")
    return cls.decode(body)


def check_decodable(channel_type: int, direction: Direction, msg_type: int, body: Buffer) -> None:
    """Raises the CodecError ``decode`` would, without building the message where its layout
    allows: scalars only (every inputs message but KEY_SCANCODE) decode from any body long enough,
    and a data message from any body. For a stored message checked now and decoded later."""
    cls = lookup(channel_type, direction, msg_type)
    if cls is None:
        raise CodecError(f"unknown message type {msg_type} ({direction!r}) on channel type {channel_type}")
    layout = cls._layout
    if layout.opaque_field:
        return
    if layout.fixed is not None:
        _need(body, 0, layout.fixed.size, f"{cls.__name__}: fields")
        return
    cls.decode(body)


def encode(msg: Message) -> bytes:
    return msg.encode()


S2C, C2S = Direction.SERVER_TO_CLIENT, Direction.CLIENT_TO_SERVER
Data = Annotated[Buffer, Rest()]


@wire_struct
class ChannelWait(WireStruct):
    channel_type: U8
    channel_id: U8
    message_serial: U64


@wire_struct
class ChannelId(WireStruct):
    type: U8
    id: U8


@wire_struct
class MigrationDstInfo(WireStruct):
    """SpiceMigrationDstInfo: where the client should connect to reach the destination."""

    port: U16  # plain TCP port, 0 = none
    sport: U16  # TLS port, 0 = none
    host: Annotated[str, Pointer(nonnull=True)]
    cert_subject: Annotated[str | None, Pointer(nonnull=False)] = None


# 4.1 common, server -> client


@message(Family.COMMON, S2C, Msg.MIGRATE)
class MsgMigrate(Message):
    flags: U32


@message(Family.COMMON, S2C, Msg.MIGRATE_DATA)
class MsgMigrateData(Message):
    data: Data


@message(Family.COMMON, S2C, Msg.SET_ACK)
class MsgSetAck(Message):
    generation: U32
    window: U32


@message(Family.COMMON, S2C, Msg.PING)
class MsgPing(Message):
    id: U32
    timestamp: U64
    padding: Annotated[int, Padding()] = 0  # byte count; the network test sends 256000


@message(Family.COMMON, S2C, Msg.WAIT_FOR_CHANNELS)
class MsgWaitForChannels(Message):
    wait_list: Annotated[tuple[ChannelWait, ...], Array(u8, ChannelWait)]


@message(Family.COMMON, S2C, Msg.DISCONNECTING)
class MsgDisconnecting(Message):
    time_stamp: U64
    reason: U32  # LinkErr


@message(Family.COMMON, S2C, Msg.NOTIFY)
class MsgNotify(Message):
    time_stamp: U64
    severity: U32
    visibility: U32
    what: U32
    message: Annotated[str, CString(u32, counts_nul=False)]


@message(Family.COMMON, S2C, Msg.LIST)
class MsgList(Message):
    sub_messages: Annotated[tuple[framing.SubMessage, ...], SubMessages()]


# 4.1 common, client -> server


@message(Family.COMMON, C2S, Msgc.ACK_SYNC)
class MsgcAckSync(Message):
    generation: U32


@message(Family.COMMON, C2S, Msgc.ACK)
class MsgcAck(Message):
    pass


@message(Family.COMMON, C2S, Msgc.PONG)
class MsgcPong(Message):
    id: U32
    timestamp: U64


@message(Family.COMMON, C2S, Msgc.MIGRATE_FLUSH_MARK)
class MsgcMigrateFlushMark(Message):
    pass


@message(Family.COMMON, C2S, Msgc.MIGRATE_DATA)
class MsgcMigrateData(Message):
    data: Data


@message(Family.COMMON, C2S, Msgc.DISCONNECTING)
class MsgcDisconnecting(Message):
    time_stamp: U64
    reason: U32


# 4.2 main, server -> client


@message(Family.MAIN, S2C, MsgMain.MIGRATE_BEGIN)
class MsgMainMigrateBegin(Message):
    dst_info: MigrationDstInfo


@message(Family.MAIN, S2C, MsgMain.MIGRATE_CANCEL)
class MsgMainMigrateCancel(Message):
    pass


@message(Family.MAIN, S2C, MsgMain.INIT)
class MsgMainInit(Message):
    session_id: U32
    display_channels_hint: U32
    supported_mouse_modes: U32
    current_mouse_mode: U32
    agent_connected: U32
    agent_tokens: U32
    multi_media_time: U32
    ram_hint: U32


@message(Family.MAIN, S2C, MsgMain.CHANNELS_LIST)
class MsgMainChannelsList(Message):
    channels: Annotated[tuple[ChannelId, ...], Array(u32, ChannelId)]


@message(Family.MAIN, S2C, MsgMain.MOUSE_MODE)
class MsgMainMouseMode(Message):
    supported_modes: U16  # flags16 here, although MAIN_INIT carries them as u32
    current_mode: U16


@message(Family.MAIN, S2C, MsgMain.MULTI_MEDIA_TIME)
class MsgMainMultiMediaTime(Message):
    time: U32


@message(Family.MAIN, S2C, MsgMain.AGENT_CONNECTED)
class MsgMainAgentConnected(Message):
    pass


@message(Family.MAIN, S2C, MsgMain.AGENT_DISCONNECTED)
class MsgMainAgentDisconnected(Message):
    error_code: U32


@message(Family.MAIN, S2C, MsgMain.AGENT_DATA)
class MsgMainAgentData(Message):
    data: Data


@message(Family.MAIN, S2C, MsgMain.AGENT_TOKEN)
class MsgMainAgentToken(Message):
    num_tokens: U32


@message(Family.MAIN, S2C, MsgMain.MIGRATE_SWITCH_HOST)
class MsgMainMigrateSwitchHost(Message):
    dst_info: MigrationDstInfo  # spice.proto spells the same fields out inline


@message(Family.MAIN, S2C, MsgMain.MIGRATE_END)
class MsgMainMigrateEnd(Message):
    pass


@message(Family.MAIN, S2C, MsgMain.NAME)
class MsgMainName(Message):
    name: Annotated[str, CString(u32)]  # name_len counts the NUL


@message(Family.MAIN, S2C, MsgMain.UUID)
class MsgMainUuid(Message):
    uuid: Annotated[bytes, FixedBytes(16)]


@message(Family.MAIN, S2C, MsgMain.AGENT_CONNECTED_TOKENS)
class MsgMainAgentConnectedTokens(Message):
    num_tokens: U32


@message(Family.MAIN, S2C, MsgMain.MIGRATE_BEGIN_SEAMLESS)
class MsgMainMigrateBeginSeamless(Message):
    dst_info: MigrationDstInfo
    src_mig_version: U32  # at offset 20: the host and cert bytes follow it, from offset 24


@message(Family.MAIN, S2C, MsgMain.MIGRATE_DST_SEAMLESS_ACK)
class MsgMainMigrateDstSeamlessAck(Message):
    pass


@message(Family.MAIN, S2C, MsgMain.MIGRATE_DST_SEAMLESS_NACK)
class MsgMainMigrateDstSeamlessNack(Message):
    pass


# 4.2 main, client -> server


@message(Family.MAIN, C2S, MsgcMain.CLIENT_INFO)
class MsgcMainClientInfo(Message):
    cache_size: U64


@message(Family.MAIN, C2S, MsgcMain.MIGRATE_CONNECTED)
class MsgcMainMigrateConnected(Message):
    pass


@message(Family.MAIN, C2S, MsgcMain.MIGRATE_CONNECT_ERROR)
class MsgcMainMigrateConnectError(Message):
    pass


@message(Family.MAIN, C2S, MsgcMain.ATTACH_CHANNELS)
class MsgcMainAttachChannels(Message):
    pass


@message(Family.MAIN, C2S, MsgcMain.MOUSE_MODE_REQUEST)
class MsgcMainMouseModeRequest(Message):
    mode: U16


@message(Family.MAIN, C2S, MsgcMain.AGENT_START)
class MsgcMainAgentStart(Message):
    num_tokens: U32


@message(Family.MAIN, C2S, MsgcMain.AGENT_DATA)
class MsgcMainAgentData(Message):
    data: Data


@message(Family.MAIN, C2S, MsgcMain.AGENT_TOKEN)
class MsgcMainAgentToken(Message):
    num_tokens: U32


@message(Family.MAIN, C2S, MsgcMain.MIGRATE_END)
class MsgcMainMigrateEnd(Message):
    pass


@message(Family.MAIN, C2S, MsgcMain.MIGRATE_DST_DO_SEAMLESS)
class MsgcMainMigrateDstDoSeamless(Message):
    src_version: U32


@message(Family.MAIN, C2S, MsgcMain.MIGRATE_CONNECTED_SEAMLESS)
class MsgcMainMigrateConnectedSeamless(Message):
    pass


# 4.3 spicevmc / port

_Compressed = When("type", lambda kind: kind != DataCompression.NONE, u32)


@message(Family.SPICEVMC, S2C, MsgSpicevmc.DATA)
class MsgSpicevmcData(Message):
    data: Data


@message(Family.SPICEVMC, S2C, MsgSpicevmc.COMPRESSED_DATA)
class MsgSpicevmcCompressedData(Message):
    type: U8  # DataCompression
    uncompressed_size: Annotated[int | None, _Compressed]
    data: Data


@message(Family.PORT, S2C, MsgSpicevmc.PORT_INIT)
class MsgPortInit(Message):
    name: Annotated[str, Pointer(nonnull=True)]  # the name bytes land at offset 9
    opened: U8


@message(Family.PORT, S2C, MsgSpicevmc.PORT_EVENT)
class MsgPortEvent(Message):
    event: U8  # PortEvent


@message(Family.SPICEVMC, C2S, MsgcSpicevmc.DATA)
class MsgcSpicevmcData(Message):
    data: Data


@message(Family.SPICEVMC, C2S, MsgcSpicevmc.COMPRESSED_DATA)
class MsgcSpicevmcCompressedData(Message):
    type: U8
    uncompressed_size: Annotated[int | None, _Compressed]
    data: Data


@message(Family.PORT, C2S, MsgcSpicevmc.PORT_EVENT)
class MsgcPortEvent(Message):
    event: U8


# display, inputs and cursor (CHANNELS.md 1.2-1.3, checked against spice-common spice.proto). The
# draw messages' bodies hold pointers into themselves and bulk pixels: graphics.py builds and parses
# those, and they travel here as opaque data.


@wire_struct
class MonitorHead(WireStruct):
    monitor_id: U32
    surface_id: U32
    width: U32
    height: U32
    x: U32
    y: U32
    flags: U32


@message(Family.DISPLAY, S2C, MsgDisplay.MARK)
class MsgDisplayMark(Message):
    pass  # after SURFACE_CREATE: until it comes, spice-gtk's widget shows nothing


@message(Family.DISPLAY, S2C, MsgDisplay.RESET)
class MsgDisplayReset(Message):
    pass


@message(Family.DISPLAY, S2C, MsgDisplay.INVAL_ALL_PALETTES)
class MsgDisplayInvalAllPalettes(Message):
    pass


@message(Family.DISPLAY, S2C, MsgDisplay.DRAW_COPY)
class MsgDisplayDrawCopy(Message):
    data: Data  # graphics.encode_draw_copy / parse_draw_copy


@message(Family.DISPLAY, S2C, MsgDisplay.SURFACE_CREATE)
class MsgDisplaySurfaceCreate(Message):
    surface_id: U32
    width: U32
    height: U32
    format: U32  # SurfaceFormat
    flags: U32  # SurfaceFlags


@message(Family.DISPLAY, S2C, MsgDisplay.SURFACE_DESTROY)
class MsgDisplaySurfaceDestroy(Message):
    surface_id: U32


@message(Family.DISPLAY, S2C, MsgDisplay.MONITORS_CONFIG)
class MsgDisplayMonitorsConfig(Message):
    count: U16  # = len(heads); spice-gtk ignores a MONITORS_CONFIG with none
    max_allowed: U16
    heads: Annotated[tuple[MonitorHead, ...], CountedArray("count", MonitorHead)]


@message(Family.DISPLAY, C2S, MsgcDisplay.INIT)
class MsgcDisplayInit(Message):
    pixmap_cache_id: U8
    pixmap_cache_size: I64  # in pixels
    glz_dictionary_id: U8
    glz_dictionary_window_size: I32  # in pixels


@message(Family.DISPLAY, C2S, MsgcDisplay.STREAM_REPORT)
class MsgcDisplayStreamReport(Message):
    data: Data  # we create no streams, so a report is never about anything of ours


@message(Family.DISPLAY, C2S, MsgcDisplay.PREFERRED_COMPRESSION)
class MsgcDisplayPreferredCompression(Message):
    image_compression: U8  # ImageCompression


@message(Family.DISPLAY, C2S, MsgcDisplay.GL_DRAW_DONE)
class MsgcDisplayGlDrawDone(Message):
    pass


@message(Family.DISPLAY, C2S, MsgcDisplay.PREFERRED_VIDEO_CODEC_TYPE)
class MsgcDisplayPreferredVideoCodecType(Message):
    data: Data  # u8 count, u8 codecs[count]: kept opaque until we stream video


@message(Family.INPUTS, S2C, MsgInputs.INIT)
class MsgInputsInit(Message):
    modifiers: U16  # KeyModifier


@message(Family.INPUTS, S2C, MsgInputs.KEY_MODIFIERS)
class MsgInputsKeyModifiers(Message):
    modifiers: U16


@message(Family.INPUTS, S2C, MsgInputs.MOUSE_MOTION_ACK)
class MsgInputsMouseMotionAck(Message):
    pass  # one per INPUT_MOTION_ACK_BUNCH motion or position messages


@message(Family.INPUTS, C2S, MsgcInputs.KEY_DOWN)
class MsgcInputsKeyDown(Message):
    code: U32  # PC XT set-1 scancode; an extended key 0x1xx arrives as bytes E0 xx


@message(Family.INPUTS, C2S, MsgcInputs.KEY_UP)
class MsgcInputsKeyUp(Message):
    code: U32  # the key-down code with 0x80 set on its last byte


@message(Family.INPUTS, C2S, MsgcInputs.KEY_MODIFIERS)
class MsgcInputsKeyModifiers(Message):
    modifiers: U16


@message(Family.INPUTS, C2S, MsgcInputs.KEY_SCANCODE)
class MsgcInputsKeyScancode(Message):
    data: Data  # raw scancode bytes (InputsCap.KEY_SCANCODE)


@message(Family.INPUTS, C2S, MsgcInputs.MOUSE_MOTION)
class MsgcInputsMouseMotion(Message):
    dx: I32
    dy: I32
    buttons: U16  # ButtonMask


@message(Family.INPUTS, C2S, MsgcInputs.MOUSE_POSITION)
class MsgcInputsMousePosition(Message):
    x: U32
    y: U32
    buttons: U16
    display_id: U8


@message(Family.INPUTS, C2S, MsgcInputs.MOUSE_PRESS)
class MsgcInputsMousePress(Message):
    button: U8  # MouseButton
    buttons: U16  # ButtonMask


@message(Family.INPUTS, C2S, MsgcInputs.MOUSE_RELEASE)
class MsgcInputsMouseRelease(Message):
    button: U8
    buttons: U16


# A cursor position is spice.proto's Point16: signed, so a hot spot may sit left of or above the
# surface. ``cursor`` is a SpiceCursor, built and parsed by graphics.encode_cursor / parse_cursor.


@message(Family.CURSOR, S2C, MsgCursor.INIT)
class MsgCursorInit(Message):
    x: I16
    y: I16
    trail_length: U16
    trail_frequency: U16
    visible: U8
    cursor: Data


@message(Family.CURSOR, S2C, MsgCursor.RESET)
class MsgCursorReset(Message):
    pass


@message(Family.CURSOR, S2C, MsgCursor.SET)
class MsgCursorSet(Message):
    x: I16
    y: I16
    visible: U8
    cursor: Data


@message(Family.CURSOR, S2C, MsgCursor.MOVE)
class MsgCursorMove(Message):
    x: I16
    y: I16


@message(Family.CURSOR, S2C, MsgCursor.HIDE)
class MsgCursorHide(Message):
    pass


@message(Family.CURSOR, S2C, MsgCursor.TRAIL)
class MsgCursorTrail(Message):
    length: U16
    frequency: U16


@message(Family.CURSOR, S2C, MsgCursor.INVAL_ONE)
class MsgCursorInvalOne(Message):
    id: U64


@message(Family.CURSOR, S2C, MsgCursor.INVAL_ALL)
class MsgCursorInvalAll(Message):
    pass
