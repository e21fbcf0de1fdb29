"""Migration (PROTOCOL.md sections 5-7): the three sans-I/O roles and the migrate-data formats.

Roles, one object per client session:

- ``SourceMigration`` (s1): BEGIN, the connect wait, END / SPICE_MSG_MIGRATE / SWITCH_HOST, and per
  channel the MIGRATE -> FLUSH_MARK -> MIGRATE_DATA handover.
- ``DestinationMigration`` (s2): the migration-target session from its MAIN link (connection_id != 0)
  until MAIN_INIT (semi-seamless) or the last MIGRATE_DATA (seamless).
- ``ClientMigration``: what spice-gtk does between the two servers.

No role touches a socket or a clock. Every method returns, in order, what must happen next: ``Send``
(a message for one channel; for the client also which server) and events (frozen dataclasses below).
Time only enters as ``now`` arguments; ``get_timer()`` says when to call ``handle_timer(now)``.

Each role has an explicit table ``{(state, input): (next_state, action)}``; an input is a received
message class or the name of a local command or owner report. A pair missing from a table is an
illegal sequence: RemoteProtocolError for a received message, LocalProtocolError for a call.

Migrate-data bodies (section 6) start with SpiceMigrateDataHeader ``u32 magic, u32 version``.
spice-server's formats (main ``MNMD``, spicevmc ``SVMD``) are built and parsed byte-exact, pointers
being u32 offsets from the first header byte. For spicewire <-> spicewire port channels there is also
``SWPD``, which carries hundreds of MiB of buffered port data without per-chunk copies::

    0   4s   magic    b"SWPD"
    4   u32  version  1
    8   one or more codec.pack_chunks containers back to back (layout in _codec_layout.py), each
        at most a segment long unless a single chunk is larger; their chunks, in order:
        [0]     state record, 64 bytes, little-endian (first container only):
                0  u32 ack_generation   last SET_ACK generation sent (0 = none)
                4  u32 ack_window       its window (0 = ACKs off)
                8  u64 serial           last server->client message serial sent
                16 u64 client_serial    last client->server message serial received
                24 u64 pending_size     sum of the pending chunk lengths
                32 u32 pending_count    client->device chunks that follow the record
                36 u32 num_client_tokens
                40 u32 num_send_tokens
                44 u32 to_client_count  device->client chunks that follow the pending ones
                48 u64 to_client_size   their total length
                56 8 bytes reserved, zero
        then    client->device bytes not yet written to the device, oldest first
        then    device->client bytes the device produced before it stopped, not yet sent
        last    device-specific state, opaque (may be empty)

Why segments: s1 packs one segment at a time into a reused buffer and drops the buffers it has
packed, so building the message never holds the in-flight state twice; s2 gathers the whole body
in one buffer and keeps memoryviews into it, so restoring copies nothing.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Any, ClassVar

import numpy as np

from spicewire import _codec_layout as layout
from spicewire import codec
from spicewire.errors import CodecError, LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import has_cap
from spicewire.protocol.enums import (
    MIGRATE_FLAGS_MASK,
    MIGRATION_PROTOCOL_VERSION,
    ChannelType,
    MainCap,
    MigrateFlags,
    MouseMode,
)
from spicewire.protocol.messages import (
    Message,
    MigrationDstInfo,
    MsgcMainMigrateConnected,
    MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError,
    MsgcMainMigrateDstDoSeamless,
    MsgcMainMigrateEnd,
    MsgcMigrateData,
    MsgcMigrateFlushMark,
    MsgMainInit,
    MsgMainMigrateBegin,
    MsgMainMigrateBeginSeamless,
    MsgMainMigrateCancel,
    MsgMainMigrateDstSeamlessAck,
    MsgMainMigrateDstSeamlessNack,
    MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
    MsgMigrate,
    MsgMigrateData,
)

Buffer = bytes | bytearray | memoryview
Channel = tuple[int, int]
"""(channel_type, channel_id)."""
MAIN: Channel = (ChannelType.MAIN, 0)
MIGRATE_TIMEOUT = 10.0
"""spice-server's MIGRATE_TIMEOUT: the connect wait and the wait for the client to leave (7.6)."""

_SPICEVMC = frozenset({ChannelType.USBREDIR, ChannelType.PORT, ChannelType.WEBDAV})
_WITH_DATA = frozenset({ChannelType.MAIN, ChannelType.INPUTS, ChannelType.DISPLAY, ChannelType.SMARTCARD}) | _SPICEVMC


def default_migrate_flags(channel_type: int) -> MigrateFlags:
    """spice-server's per-channel flags (5.4): channels with in-flight state flush and transfer it."""
    return MigrateFlags(MIGRATE_FLAGS_MASK) if channel_type in _WITH_DATA else MigrateFlags(0)


class MigrationMode(IntEnum):
    """Ordered: a higher mode keeps more state."""

    SWITCH_HOST = 0
    SEMI_SEAMLESS = 1
    SEAMLESS = 2

    @property
    def label(self) -> str:
        """As the command line, the control API and the reports spell it: "semi-seamless"."""
        return self.name.lower().replace("_", "-")


def choose_mode(client_main_caps: Sequence[int], allowed: MigrationMode) -> MigrationMode:
    """The mode spice-server picks for a client (5.1), capped at ``allowed``."""
    if (
        allowed >= MigrationMode.SEAMLESS
        # AGENT_CONNECTED_TOKENS too: agent tokens stay valid if the agent (dis)connects meanwhile
        and has_cap(client_main_caps, MainCap.AGENT_CONNECTED_TOKENS)
        and has_cap(client_main_caps, MainCap.SEAMLESS_MIGRATE)
    ):
        return MigrationMode.SEAMLESS
    if allowed >= MigrationMode.SEMI_SEAMLESS and has_cap(client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE):
        return MigrationMode.SEMI_SEAMLESS
    return MigrationMode.SWITCH_HOST


# --- migrate-data formats (section 6) --------------------------------------------------------


def _magic(tag: bytes) -> int:
    return int.from_bytes(tag, "little")


class MigrateDataMagic(IntEnum):
    """SpiceMigrateDataHeader magics: four ASCII bytes in wire order, read as a LE u32."""

    MAIN = _magic(b"MNMD")
    SPICEVMC = _magic(b"SVMD")
    SMARTCARD = _magic(b"SCMD")
    DISPLAY = _magic(b"DCMD")
    INPUTS = _magic(b"ICMD")
    PORT = _magic(b"SWPD")  # spicewire only: spice-server does not know it


MIGRATE_DATA_VERSION = 1
"""Every per-channel version above, spicewire's included."""
CHAR_DEVICE_VERSION = 1
U32_MAX = 0xFFFFFFFF

_HEADER = struct.Struct("<II")  # magic, version
_CHAR_DEVICE = struct.Struct("<IBIIIII")  # 25 bytes (6.1)
_MAIN_TAIL = struct.Struct("<BI8sBIIIBIB")  # the 32 bytes after the agent char device (6.2)
_PORT_STATE = struct.Struct("<IIQQQIIIIQ8x")  # 64 bytes, SWPD chunk 0
SWPD_SEGMENT = 8 << 20  # one container's bytes while building: the size of the reused buffer
_CONTAINER_TOTAL = struct.Struct("<Q")  # codec container total_size, at offset 16
SPICEVMC_MIGRATE_DATA_SIZE = _HEADER.size + _CHAR_DEVICE.size  # 33
MAIN_MIGRATE_DATA_SIZE = SPICEVMC_MIGRATE_DATA_SIZE + _MAIN_TAIL.size  # 65
_AGENT_FILTER_RESULTS = 4  # OK, DISCARD, PROTO_ERROR, MONITORS_CONFIG
_VD_AGENT_MESSAGE_SIZE = 20


def parse_migrate_data_header(body: Buffer, magic: MigrateDataMagic) -> int:
    """The version of a body that must start with ``magic``; newer than ours is refused (no
    down-conversion exists, 6)."""
    if len(body) < _HEADER.size:
        raise CodecError(f"migrate data of {len(body)} bytes has no header")
    got, version = _HEADER.unpack_from(body)
    if got != magic:
        raise CodecError(f"migrate data magic {got.to_bytes(4, 'little')!r}, expected {magic.name}")
    if version > MIGRATE_DATA_VERSION:
        raise CodecError(f"{magic.name} migrate data version {version} is newer than {MIGRATE_DATA_VERSION}")
    return version


def _pointed(body: Buffer, ptr: int, size: int, fixed_end: int, what: str) -> memoryview:
    """``size`` bytes at offset ``ptr`` from the body start, which must lie after the fixed part."""
    if size == 0:
        return memoryview(b"")
    if ptr < fixed_end or ptr + size > len(body):
        raise CodecError(f"{what}: {size} bytes at offset {ptr} outside {fixed_end}..{len(body)}")
    return memoryview(body)[ptr : ptr + size]


def _patch_pointers(out: bytearray, deferred: list[tuple[int, Buffer]]) -> bytes:
    # Pointed-to bytes follow the fixed fields, in field order (6).
    for slot, data in deferred:
        struct.pack_into("<I", out, slot, len(out))
        out += data
    return bytes(out)


@dataclass(frozen=True, slots=True)
class CharDeviceMigrateData:
    """SpiceMigrateDataCharDevice (6.1). Defaults are what spice-server writes for spicevmc, which
    has no token flow control; ``write_data`` is every byte not yet written to the device."""

    connected: bool = True
    num_client_tokens: int = U32_MAX
    num_send_tokens: int = U32_MAX
    write_num_client_tokens: int = 0
    write_data: Buffer = b""

    def _pack(self, out: bytearray, deferred: list) -> None:
        out += _CHAR_DEVICE.pack(
            CHAR_DEVICE_VERSION, self.connected, self.num_client_tokens, self.num_send_tokens,
            len(self.write_data), self.write_num_client_tokens, 0,
        )
        if len(self.write_data):
            deferred.append((len(out) - 4, self.write_data))

    @classmethod
    def _parse(cls, body: Buffer, pos: int, fixed_end: int) -> CharDeviceMigrateData:
        version, connected, client_tokens, send_tokens, size, write_tokens, ptr = _CHAR_DEVICE.unpack_from(body, pos)
        if version > CHAR_DEVICE_VERSION:
            raise CodecError(f"char device migrate data version {version} is newer than {CHAR_DEVICE_VERSION}")
        data = _pointed(body, ptr, size, fixed_end, "char device write data")
        return cls(bool(connected), client_tokens, send_tokens, write_tokens, data)


NO_CHAR_DEVICE = CharDeviceMigrateData(False, 0, 0, 0, b"")
"""migrate_data_marshall_empty: no device client existed."""


def build_spicevmc_migrate_data(device: CharDeviceMigrateData = CharDeviceMigrateData()) -> bytes:
    """An ``SVMD`` body (usbredir/port/webdav): 33 bytes plus the pending write bytes."""
    out = bytearray(_HEADER.pack(MigrateDataMagic.SPICEVMC, MIGRATE_DATA_VERSION))
    deferred: list = []
    device._pack(out, deferred)
    return _patch_pointers(out, deferred)


def parse_spicevmc_migrate_data(body: Buffer) -> CharDeviceMigrateData:
    """Validated as spice-server does (5.8): a short body or ``connected`` = 0 is fatal there."""
    if len(body) < SPICEVMC_MIGRATE_DATA_SIZE:
        raise CodecError(f"spicevmc migrate data needs {SPICEVMC_MIGRATE_DATA_SIZE} bytes, got {len(body)}")
    parse_migrate_data_header(body, MigrateDataMagic.SPICEVMC)
    device = CharDeviceMigrateData._parse(body, _HEADER.size, SPICEVMC_MIGRATE_DATA_SIZE)
    if not device.connected:
        raise CodecError("spicevmc migrate data with connected = 0")
    return device


@dataclass(frozen=True, slots=True)
class MainMigrateData:
    """SpiceMigrateDataMain (6.2). The defaults are the "no agent" body, 65 bytes."""

    agent: CharDeviceMigrateData = NO_CHAR_DEVICE
    client_agent_started: bool = False
    chunk_header_size: int = 0  # agent->client VDIChunkHeader bytes read so far
    chunk_header: bytes = bytes(8)
    msg_header_done: bool = False
    msg_header_partial: Buffer = b""  # partial VDAgentMessage header
    msg_remaining: int = 0
    msg_filter_result: int = 0
    client_msg_remaining: int = 0  # client->agent
    client_msg_filter_result: int = 0


def build_main_migrate_data(state: MainMigrateData = MainMigrateData()) -> bytes:
    out = bytearray(_HEADER.pack(MigrateDataMagic.MAIN, MIGRATE_DATA_VERSION))
    deferred: list = []
    state.agent._pack(out, deferred)
    partial = state.msg_header_partial
    out += _MAIN_TAIL.pack(
        state.client_agent_started, state.chunk_header_size, state.chunk_header, state.msg_header_done,
        len(partial), 0, state.msg_remaining, state.msg_filter_result,
        state.client_msg_remaining, state.client_msg_filter_result,
    )
    if len(partial):
        deferred.append((SPICEVMC_MIGRATE_DATA_SIZE + 18, partial))  # msg_header_ptr
    return _patch_pointers(out, deferred)


def parse_main_migrate_data(body: Buffer) -> MainMigrateData:
    if len(body) < MAIN_MIGRATE_DATA_SIZE:
        raise CodecError(f"main migrate data needs {MAIN_MIGRATE_DATA_SIZE} bytes, got {len(body)}")
    parse_migrate_data_header(body, MigrateDataMagic.MAIN)
    agent = CharDeviceMigrateData._parse(body, _HEADER.size, MAIN_MIGRATE_DATA_SIZE)
    (started, chunk_size, chunk_header, done, partial_len, partial_ptr, remaining, filter_result,
     client_remaining, client_filter) = _MAIN_TAIL.unpack_from(body, SPICEVMC_MIGRATE_DATA_SIZE)
    if chunk_size > len(chunk_header):
        raise CodecError(f"agent chunk header size {chunk_size} > {len(chunk_header)}")
    if partial_len >= _VD_AGENT_MESSAGE_SIZE:
        raise CodecError(f"partial agent message header of {partial_len} bytes is not partial")
    if filter_result >= _AGENT_FILTER_RESULTS or client_filter >= _AGENT_FILTER_RESULTS:
        raise CodecError(f"agent filter results {filter_result}/{client_filter} out of range")
    partial = _pointed(body, partial_ptr, partial_len, MAIN_MIGRATE_DATA_SIZE, "agent message header")
    return MainMigrateData(
        agent, bool(started), chunk_size, chunk_header, bool(done), partial, remaining, filter_result,
        client_remaining, client_filter,
    )


@dataclass(frozen=True, slots=True)
class PortMigrateData:
    """spicewire's port-channel state (``SWPD``, layout in the module docstring)."""

    ack_generation: int = 0
    ack_window: int = 0
    serial: int = 0
    client_serial: int = 0
    num_client_tokens: int = U32_MAX
    num_send_tokens: int = U32_MAX
    device_state: Buffer = b""
    pending: Sequence[Buffer] = ()
    to_client: Sequence[Buffer] = ()

    @property
    def pending_size(self) -> int:
        return sum(memoryview(chunk).nbytes for chunk in self.pending)

    @property
    def to_client_size(self) -> int:
        return sum(memoryview(chunk).nbytes for chunk in self.to_client)


class PortMigrateDataWriter:
    """Builds an SWPD body segment by segment. ``size`` is known up front (for the message header);
    ``segments()`` yields numpy views of ONE reused buffer, each valid until the next is asked for,
    and pops the buffers it has packed from ``pending`` / ``to_client`` when those are deques, so
    the caller's memory falls as the message goes out."""

    def __init__(self, state: PortMigrateData, segment: int = SWPD_SEGMENT) -> None:
        self._pending = state.pending
        self._to_client = state.to_client
        pending_lengths = [memoryview(c).nbytes for c in state.pending]
        to_client_lengths = [memoryview(c).nbytes for c in state.to_client]
        self._record = _PORT_STATE.pack(
            state.ack_generation, state.ack_window, state.serial, state.client_serial, sum(pending_lengths),
            len(pending_lengths), state.num_client_tokens, state.num_send_tokens, len(to_client_lengths),
            sum(to_client_lengths),
        )
        self._device_state = state.device_state
        lengths = [len(self._record), *pending_lengths, *to_client_lengths, memoryview(state.device_state).nbytes]
        self._plan = _segment_plan(lengths, segment)  # chunk counts per container
        sizes, start = [], 0
        for count in self._plan:
            sizes.append(layout.data_start(count) + sum(lengths[start : start + count]))
            start += count
        self._container_sizes = sizes
        self.size = _HEADER.size + sum(sizes)

    @property
    def header(self) -> bytes:
        return _HEADER.pack(MigrateDataMagic.PORT, MIGRATE_DATA_VERSION)

    @property
    def largest_container(self) -> int:
        return max(self._container_sizes)

    def chunk_groups(self) -> Iterator[list[Buffer]]:
        """The chunks of each container in turn, for a caller that packs them itself (the server
        packs the next container in a thread while the previous one is being sent)."""
        sources = self._chunks()
        for count in self._plan:
            yield [next(sources) for _ in range(count)]

    def segments(self) -> Iterator[np.ndarray]:
        yield np.frombuffer(self.header, dtype=np.uint8)
        out = np.empty(self.largest_container, dtype=np.uint8)
        for chunks in self.chunk_groups():
            yield codec.pack_chunks(chunks, out=out)

    def _chunks(self) -> Iterator[Buffer]:
        yield self._record
        for queue in (self._pending, self._to_client):
            if isinstance(queue, deque):
                while queue:
                    yield queue.popleft()
            else:
                yield from queue
        yield self._device_state


def _segment_plan(lengths: Sequence[int], segment: int) -> list[int]:
    """How many chunks go in each container so that each packs to at most ``segment`` bytes (a
    chunk larger than that gets a container of its own)."""
    plan, count, size = [], 0, 0
    for length in lengths:
        if count and layout.data_start(count + 1) + size + length > segment:
            plan.append(count)
            count, size = 0, 0
        count += 1
        size += length
    plan.append(count)
    return plan


def build_port_migrate_data(state: PortMigrateData, segment: int = SWPD_SEGMENT) -> np.ndarray:
    """The whole ``SWPD`` body in one numpy buffer (the server streams the writer's segments)."""
    writer = PortMigrateDataWriter(state, segment)
    body = np.empty(writer.size, dtype=np.uint8)
    pos = 0
    for piece in writer.segments():
        body[pos : pos + len(piece)] = piece
        pos += len(piece)
    return body


def parse_port_migrate_data(body: Buffer) -> PortMigrateData:
    """Zero copy: ``device_state``, ``pending`` and ``to_client`` are memoryviews into ``body``."""
    view = memoryview(body).cast("B") if memoryview(body).format != "B" else memoryview(body)
    parse_migrate_data_header(view, MigrateDataMagic.PORT)
    chunks: list[memoryview] = []
    pos = _HEADER.size
    while pos < len(view):
        if len(view) - pos < layout.CHUNK_HEADER_SIZE:
            raise CodecError(f"SWPD: {len(view) - pos} stray bytes after the containers")
        (total,) = _CONTAINER_TOTAL.unpack_from(view, pos + 16)
        if not layout.CHUNK_HEADER_SIZE <= total <= len(view) - pos:
            raise CodecError(f"SWPD container of {total} bytes at offset {pos} in a {len(view)}-byte body")
        chunks += codec.unpack_chunks(view[pos : pos + total])
        pos += total
    if len(chunks) < 2 or len(chunks[0]) != _PORT_STATE.size:
        raise CodecError(f"SWPD needs a {_PORT_STATE.size}-byte state record and a device state chunk")
    record = chunks[0]
    (generation, window, serial, client_serial, pending_size, pending_count, client_tokens, send_tokens,
     to_client_count, to_client_size) = _PORT_STATE.unpack(record)
    if any(record[56:]):
        raise CodecError("SWPD reserved bytes are not zero")
    if 1 + pending_count + to_client_count + 1 != len(chunks):
        raise CodecError(f"SWPD announces {pending_count} + {to_client_count} buffers, holds {len(chunks) - 2}")
    pending = chunks[1 : 1 + pending_count]
    to_client = chunks[1 + pending_count : -1]
    if pending_size != sum(len(c) for c in pending) or to_client_size != sum(len(c) for c in to_client):
        raise CodecError("SWPD buffer sizes do not add up to the sizes its record announces")
    return PortMigrateData(
        generation, window, serial, client_serial, client_tokens, send_tokens, chunks[-1], tuple(pending),
        tuple(to_client),
    )


_OTHER_MAGICS = {
    ChannelType.INPUTS: MigrateDataMagic.INPUTS,
    ChannelType.DISPLAY: MigrateDataMagic.DISPLAY,
    ChannelType.SMARTCARD: MigrateDataMagic.SMARTCARD,
}


def parse_migrate_data(channel_type: int, body: Buffer) -> Any:
    """What s2 restores a channel from: MainMigrateData, CharDeviceMigrateData (SVMD),
    PortMigrateData (SWPD), or for other channels the header-checked body."""
    if channel_type == ChannelType.MAIN:
        return parse_main_migrate_data(body)
    if channel_type in _SPICEVMC:
        if bytes(body[:4]) == b"SWPD":
            return parse_port_migrate_data(body)
        return parse_spicevmc_migrate_data(body)
    if channel_type in _OTHER_MAGICS:
        parse_migrate_data_header(body, _OTHER_MAGICS[channel_type])
        return body
    raise CodecError(f"channel type {channel_type} has no migrate data")


# --- outputs ---------------------------------------------------------------------------------


class Peer(Enum):
    """Which server a client-side message travels to or came from."""

    S1 = "s1"
    S2 = "s2"


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``message`` on ``channel`` (for the client: on its connection to ``peer``)."""

    channel: Channel
    message: Message
    peer: Peer | None = None


@dataclass(frozen=True, slots=True)
class ConnectComplete:
    """s1: the connect phase is over (answer, error or timeout); QEMU's migrate_connect_complete."""

    success: bool
    seamless: bool


@dataclass(frozen=True, slots=True)
class MigrateDataRequested:
    """s1: build this channel's MIGRATE_DATA now (it must cover every client message received so
    far) and pass it to ``send``; nothing else may be sent on the channel."""

    channel: Channel


@dataclass(frozen=True, slots=True)
class DisconnectClient:
    """s1: the client did not leave within 10 s of the end of migration."""


@dataclass(frozen=True, slots=True)
class AttachChannel:
    """s2: start reading a parked link and run the channel's on-connect; with
    ``wait_for_migrate_data`` hold its device I/O until its state is restored (5.7)."""

    channel: Channel
    wait_for_migrate_data: bool


@dataclass(frozen=True, slots=True)
class RestoreMigrateData:
    """s2: restore ``channel`` from ``data``, already validated by ``parse_migrate_data``."""

    channel: Channel
    data: Any


@dataclass(frozen=True, slots=True)
class MigrationCompleted:
    """s2 / client: the session now lives on s2."""

    mode: MigrationMode


@dataclass(frozen=True, slots=True)
class LinkDestination:
    """Client: link these channels to s2 (``dst_info``) with ``connection_id``; report each with
    ``s2_linked`` or ``s2_link_failed`` and keep the connections frozen (nothing read or written)."""

    dst_info: MigrationDstInfo
    connection_id: int
    channels: tuple[Channel, ...]


@dataclass(frozen=True, slots=True)
class DropDestination:
    """Client: close every s2 connection; the session stays on s1."""


@dataclass(frozen=True, slots=True)
class ResetChannels:
    """Client, semi-seamless: close every s1 socket, discard unsent queues, clear channel state."""


@dataclass(frozen=True, slots=True)
class SwitchChannel:
    """Client: move ``channel`` onto its connection to ``peer`` and start reading it."""

    channel: Channel
    peer: Peer


@dataclass(frozen=True, slots=True)
class CloseSource:
    """Client, seamless: s2 has the session (it spoke, or the wait for it ended); close the s1
    connections."""


@dataclass(frozen=True, slots=True)
class AwaitConfirmation:
    """Client, seamless: every channel has switched; keep the s1 connections until s2's main speaks
    (``s2_spoke``), or until s1 lets go or a grace period passes (``confirmation_due``)."""


@dataclass(frozen=True, slots=True)
class AwaitRollback:
    """Client: s2 failed; every channel reads s1 again. Wait (bounded) for s1's MIGRATE_CANCEL."""


@dataclass(frozen=True, slots=True)
class DropMigrateData:
    """Client, rolling back: this MIGRATE_DATA from s1 has nowhere to go; read it and drop it."""

    channel: Channel
    data: Any


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Client: s1 took the session back; the migration ended without moving it."""


@dataclass(frozen=True, slots=True)
class SwitchHost:
    """Client: destroy non-main channels, reconnect main to ``dst_info`` with connection_id 0 (a new
    session; 5.6)."""

    dst_info: MigrationDstInfo
    connection_id: int = 0


# --- table machinery -------------------------------------------------------------------------


def _name(item: Any) -> str:
    return item.__name__ if isinstance(item, type) else str(item)


def _lookup(table: Mapping, state: Enum, inp: Any, error: type[Exception], where: str) -> tuple:
    try:
        return table[(state, inp)]
    except KeyError:
        raise error(f"{where}: {_name(inp)} is not allowed in state {state.name}") from None


def _input_error(inp: Any) -> type[Exception]:
    return RemoteProtocolError if isinstance(inp, type) else LocalProtocolError


def _migrate_input(flags: int) -> str:
    """Table input for SPICE_MSG_MIGRATE: the flags decide what follows."""
    flags = MigrateFlags(flags)
    return "MIGRATE" if not flags else f"MIGRATE({'|'.join(f.name for f in MigrateFlags if f in flags)})"


class _Role:
    TABLE: ClassVar[Mapping[tuple, tuple]]
    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]]

    def __init__(self, state: Enum, channels: Mapping[Channel, Enum]) -> None:
        self.state = state
        self.channels = dict(channels)
        self._out: list = []

    def _begin_call(self) -> list:
        self._out = []
        return self._out

    def _fire(self, inp: Any, *args: Any, error: type[Exception] | None = None) -> None:
        # The state changes before the action runs, so an action may fire follow-up inputs.
        where = type(self).__name__
        self.state, action = _lookup(self.TABLE, self.state, inp, error or _input_error(inp), where)
        if action:
            getattr(self, action)(*args)

    def _fire_channel(self, channel: Channel, inp: Any, *args: Any, error: type[Exception] | None = None) -> None:
        where = f"{type(self).__name__} channel {channel}"
        state = self._channel_state(channel)
        self.channels[channel], action = _lookup(self.CHANNEL_TABLE, state, inp, error or _input_error(inp), where)
        if action:
            getattr(self, action)(channel, *args)

    def _channel_state(self, channel: Channel) -> Enum:
        try:
            return self.channels[channel]
        except KeyError:
            raise LocalProtocolError(f"channel {channel} is not part of this session") from None


# --- s1 ----------------------------------------------------------------------------------------


class SourceState(Enum):
    IDLE = auto()
    WAIT_CONNECT = auto()  # MAIN_MIGRATE_BEGIN sent, 10 s timer
    WAIT_CONNECT_SEAMLESS = auto()  # MAIN_MIGRATE_BEGIN_SEAMLESS sent, 10 s timer
    CONNECTED = auto()  # the client holds s2 links: semi-seamless at the end
    CONNECTED_SEAMLESS = auto()
    NOT_CONNECTED = auto()  # CONNECT_ERROR, timeout or no BEGIN possible: switch host at the end
    MIGRATING = auto()  # SPICE_MSG_MIGRATE sent on every channel
    WAIT_DISCONNECT = auto()  # the client should leave within 10 s
    DONE = auto()


class SourceChannelState(Enum):
    NORMAL = auto()
    WAIT_FLUSH_MARK = auto()
    WAIT_FLUSH_MARK_THEN_DATA = auto()
    MIGRATE_DATA_DUE = auto()  # the owner builds MIGRATE_DATA; nothing else may be sent
    SWITCHED = auto()  # the client left this channel for s2


_S, _SC = SourceState, SourceChannelState
_BEGIN_INPUTS = {
    MigrationMode.SEAMLESS: "begin seamless",
    MigrationMode.SEMI_SEAMLESS: "begin semi-seamless",
    MigrationMode.SWITCH_HOST: "begin switch-host",
}
_CONNECTED, _CONNECTED_SEAMLESS, _CONNECT_ERROR = (
    MsgcMainMigrateConnected, MsgcMainMigrateConnectedSeamless, MsgcMainMigrateConnectError,
)


class SourceMigration(_Role):
    """s1 for one client session."""

    TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.2: BEGIN in the best mode the client allows; without SEMI_SEAMLESS_MIGRATE nothing is sent
        (_S.IDLE, "begin seamless"): (_S.WAIT_CONNECT_SEAMLESS, "_send_begin"),
        (_S.IDLE, "begin semi-seamless"): (_S.WAIT_CONNECT, "_send_begin"),
        (_S.IDLE, "begin switch-host"): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECTED_SEAMLESS): (_S.CONNECTED_SEAMLESS, "_connect_succeeded"),
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECTED): (_S.CONNECTED, "_connect_succeeded"),  # s2 NACKed
        (_S.WAIT_CONNECT_SEAMLESS, _CONNECT_ERROR): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT_SEAMLESS, "timeout"): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT, _CONNECTED): (_S.CONNECTED, "_connect_succeeded"),
        (_S.WAIT_CONNECT, _CONNECT_ERROR): (_S.NOT_CONNECTED, "_connect_failed"),
        (_S.WAIT_CONNECT, "timeout"): (_S.NOT_CONNECTED, "_connect_failed"),
        # an answer nobody waits for: a success is cancelled, an error ignored (as spice-server)
        (_S.IDLE, _CONNECTED): (_S.IDLE, "_send_cancel"),
        (_S.IDLE, _CONNECTED_SEAMLESS): (_S.IDLE, "_send_cancel"),
        (_S.IDLE, _CONNECT_ERROR): (_S.IDLE, None),
        (_S.NOT_CONNECTED, _CONNECTED): (_S.NOT_CONNECTED, "_send_cancel"),
        (_S.NOT_CONNECTED, _CONNECTED_SEAMLESS): (_S.NOT_CONNECTED, "_send_cancel"),
        (_S.NOT_CONNECTED, _CONNECT_ERROR): (_S.NOT_CONNECTED, None),
        # migrate_end(completed=0), or a second begin before the end
        (_S.WAIT_CONNECT, "cancel"): (_S.IDLE, "_send_cancel"),
        (_S.WAIT_CONNECT_SEAMLESS, "cancel"): (_S.IDLE, "_send_cancel"),
        (_S.CONNECTED, "cancel"): (_S.IDLE, "_send_cancel"),
        (_S.CONNECTED_SEAMLESS, "cancel"): (_S.IDLE, "_send_cancel"),
        (_S.NOT_CONNECTED, "cancel"): (_S.IDLE, None),
        # migrate_end(completed=1)
        (_S.CONNECTED, "finish"): (_S.WAIT_DISCONNECT, "_send_migrate_end"),  # 5.3
        (_S.CONNECTED_SEAMLESS, "finish"): (_S.MIGRATING, "_send_migrate"),  # 5.4
        (_S.CONNECTED, "finish switch-host"): (_S.WAIT_DISCONNECT, "_send_switch_host"),  # no SEMI cap
        (_S.CONNECTED, "finish stay"): (_S.IDLE, "_send_cancel"),
        (_S.NOT_CONNECTED, "finish switch-host"): (_S.WAIT_DISCONNECT, "_send_switch_host"),  # 5.6
        (_S.NOT_CONNECTED, "finish stay"): (_S.IDLE, None),
        (_S.MIGRATING, "all channels switched"): (_S.WAIT_DISCONNECT, None),
        (_S.MIGRATING, "timeout"): (_S.DONE, "_disconnect"),
        (_S.WAIT_DISCONNECT, "timeout"): (_S.DONE, "_disconnect"),
        # Ours, not spice-server's: s2 failed before it had the session, and the client is still
        # here (seamless only: semi-seamless reset the client's channels at END).
        (_S.MIGRATING, "roll back"): (_S.IDLE, "_roll_back"),
        (_S.WAIT_DISCONNECT, "roll back"): (_S.IDLE, "_roll_back"),
        (_S.MIGRATING, "client disconnected"): (_S.DONE, "_stop_timer"),
        (_S.WAIT_DISCONNECT, "client disconnected"): (_S.DONE, "_stop_timer"),
    }

    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.4: SPICE_MSG_MIGRATE with the channel's flags
        (_SC.NORMAL, "MIGRATE"): (_SC.SWITCHED, None),
        (_SC.NORMAL, "MIGRATE(NEED_FLUSH)"): (_SC.WAIT_FLUSH_MARK, None),
        (_SC.NORMAL, "MIGRATE(NEED_DATA_TRANSFER)"): (_SC.MIGRATE_DATA_DUE, "_request_migrate_data"),
        (_SC.NORMAL, "MIGRATE(NEED_FLUSH|NEED_DATA_TRANSFER)"): (_SC.WAIT_FLUSH_MARK_THEN_DATA, None),
        (_SC.WAIT_FLUSH_MARK, MsgcMigrateFlushMark): (_SC.SWITCHED, None),
        (_SC.WAIT_FLUSH_MARK_THEN_DATA, MsgcMigrateFlushMark): (_SC.MIGRATE_DATA_DUE, "_request_migrate_data"),
        # sent by the owner through send()
        (_SC.MIGRATE_DATA_DUE, MsgMigrateData): (_SC.SWITCHED, None),
    }

    def __init__(
        self,
        channels: Iterable[Channel],
        client_main_caps: Sequence[int],
        *,
        channel_flags: Mapping[Channel, int] | None = None,
        timeout: float = MIGRATE_TIMEOUT,
    ) -> None:
        """``channels``: every channel the client has open (main is added, and goes first)."""
        ordered = [MAIN, *(channel for channel in channels if channel != MAIN)]
        super().__init__(_S.IDLE, dict.fromkeys(ordered, _SC.NORMAL))
        flags = dict(channel_flags or {})
        self.flags = {ch: MigrateFlags(flags.get(ch, default_migrate_flags(ch[0]))) for ch in ordered}
        if any(value & ~MIGRATE_FLAGS_MASK for value in self.flags.values()):
            raise LocalProtocolError(f"migrate flags beyond {MIGRATE_FLAGS_MASK!r}: {self.flags}")
        self.client_main_caps = tuple(client_main_caps)
        self.timeout = timeout
        self.mode: MigrationMode | None = None
        self.dst_info: MigrationDstInfo | None = None
        self._deadline: float | None = None
        self._now = 0.0
        self._flushed: set[Channel] = set()

    # commands

    def begin(self, dst_info: MigrationDstInfo, mode: MigrationMode, now: float) -> list:
        """spice_server_migrate_connect; ``mode`` is the best the owner allows (QEMU
        seamless-migration=on -> SEAMLESS), the client's caps may lower it (``self.mode``)."""
        out = self._begin_call()
        if self.state in (_S.WAIT_CONNECT, _S.WAIT_CONNECT_SEAMLESS, _S.CONNECTED, _S.CONNECTED_SEAMLESS,
                          _S.NOT_CONNECTED):
            self._fire("cancel")  # 5.2 step 2: the previous attempt is cancelled first
        self.dst_info, self._now = dst_info, now
        self.mode = choose_mode(self.client_main_caps, mode)
        self._fire(_BEGIN_INPUTS[self.mode])
        return out

    def cancel(self) -> list:
        """migrate_end(completed=0): the VM stays here."""
        out = self._begin_call()
        self._fire("cancel")
        return out

    def finish(self, now: float, switch_host: bool = True) -> list:
        """migrate_end(completed=1). Without a working s2 connection the client is sent
        MIGRATE_SWITCH_HOST, or with ``switch_host=False`` stays on this server. Before a seamless
        finish the owner sends any partially read guest-agent chunk as AGENT_DATA (5.4)."""
        out = self._begin_call()
        self._now = now
        fallback = self.state is _S.NOT_CONNECTED or (
            # 5.3: END only reaches a client with SEMI_SEAMLESS_MIGRATE (a seamless client without it
            # that got a NACK)
            self.state is _S.CONNECTED and not has_cap(self.client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE)
        )
        self._fire(("finish switch-host" if switch_host else "finish stay") if fallback else "finish")
        return out

    def client_disconnected(self) -> list:
        out = self._begin_call()
        self._fire("client disconnected")
        return out

    def roll_back(self) -> list:
        """Seamless post-migration failed on s2's side: the session resumes here. Every channel is
        back to normal and the client is sent MIGRATE_CANCEL, which takes it back to our sockets."""
        out = self._begin_call()
        if self.mode is not MigrationMode.SEAMLESS:
            raise LocalProtocolError(f"a {self.mode.label if self.mode else 'no'} migration cannot roll back")
        self._fire("roll back")
        return out

    def get_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> list:
        out = self._begin_call()
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._fire("timeout")
        return out

    def receive(self, channel: Channel, message: Message) -> list:
        """Every client message on a session channel; those migration does not care about pass."""
        out = self._begin_call()
        kind = type(message)
        self._channel_state(channel)
        if kind in (_CONNECTED, _CONNECTED_SEAMLESS, _CONNECT_ERROR):
            self._fire(kind, message)
        elif kind is MsgcMigrateFlushMark:
            self._fire_channel(channel, kind)
            self._flushed.add(channel)
            self._check_all_switched()
        elif channel in self._flushed:
            # The client writes FLUSH_MARK last on s1; everything after belongs to s2.
            raise RemoteProtocolError(f"{kind.__name__} on channel {channel} after MIGRATE_FLUSH_MARK")
        return out

    def send(self, channel: Channel, message: Message) -> list:
        """Every message the owner writes on a session channel goes through here (5.9.4)."""
        out = self._begin_call()
        kind = type(message)
        state = self._channel_state(channel)
        if kind is MsgMigrate or (state is _SC.NORMAL and kind is MsgMigrateData):
            raise LocalProtocolError(f"{kind.__name__} is sent by the migration machine, not the owner")
        if state is _SC.NORMAL:
            out.append(Send(channel, message))
            return out
        if kind is not MsgMigrateData:
            raise LocalProtocolError(
                f"{kind.__name__} on channel {channel} in state {state.name}: only MIGRATE_DATA may follow MIGRATE"
            )
        self._fire_channel(channel, kind, error=LocalProtocolError)
        out.append(Send(channel, message))
        self._check_all_switched()
        return out

    # actions

    def _send_begin(self) -> None:
        if self.state is _S.WAIT_CONNECT_SEAMLESS:
            begin = MsgMainMigrateBeginSeamless(self.dst_info, MIGRATION_PROTOCOL_VERSION)
        else:
            begin = MsgMainMigrateBegin(self.dst_info)
        self._out.append(Send(MAIN, begin))
        self._deadline = self._now + self.timeout

    def _connect_succeeded(self, message: Message) -> None:
        self._deadline = None
        seamless = type(message) is _CONNECTED_SEAMLESS
        self.mode = MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS
        self._out.append(ConnectComplete(True, seamless))

    def _connect_failed(self, message: Message | None = None) -> None:
        self._deadline = None
        self.mode = MigrationMode.SWITCH_HOST
        self._out.append(ConnectComplete(False, False))

    def _send_cancel(self, message: Message | None = None) -> None:
        self._deadline = None
        self._out.append(Send(MAIN, MsgMainMigrateCancel()))

    def _send_migrate_end(self) -> None:
        self._out.append(Send(MAIN, MsgMainMigrateEnd()))
        self._deadline = self._now + self.timeout

    def _send_switch_host(self) -> None:
        self.mode = MigrationMode.SWITCH_HOST
        self._out.append(Send(MAIN, MsgMainMigrateSwitchHost(self.dst_info)))
        self._deadline = self._now + self.timeout

    def _roll_back(self) -> None:
        self._deadline = None
        self._flushed.clear()
        self.channels = dict.fromkeys(self.channels, _SC.NORMAL)
        self._out.append(Send(MAIN, MsgMainMigrateCancel()))

    def _send_migrate(self) -> None:
        self._deadline = self._now + self.timeout
        for channel in self.channels:  # main first
            self._out.append(Send(channel, MsgMigrate(self.flags[channel])))
            self._fire_channel(channel, _migrate_input(self.flags[channel]))
        self._check_all_switched()

    def _request_migrate_data(self, channel: Channel) -> None:
        self._out.append(MigrateDataRequested(channel))

    def _check_all_switched(self) -> None:
        if self.state is _S.MIGRATING and all(s is _SC.SWITCHED for s in self.channels.values()):
            self._fire("all channels switched")

    def _disconnect(self) -> None:
        self._out.append(DisconnectClient())

    def _stop_timer(self) -> None:
        self._deadline = None


# --- s2 ----------------------------------------------------------------------------------------


class DestinationState(Enum):
    TARGET = auto()  # MAIN linked with connection_id != 0; no MAIN_INIT
    TARGET_SEMI = auto()  # DST_DO_SEAMLESS was refused
    SEAMLESS = auto()  # ACK sent; waiting for every channel's MIGRATE_DATA
    MIGRATED = auto()


class DestinationChannelState(Enum):
    PARKED = auto()  # link answered OK, socket not read
    ATTACHED = auto()
    WAIT_MIGRATE_DATA = auto()


_D, _DC = DestinationState, DestinationChannelState
_DO_SEAMLESS_REFUSED = "DST_DO_SEAMLESS refused"
_END_WITHOUT_CAP = "MIGRATE_END from a client without SEMI_SEAMLESS_MIGRATE"

DEFAULT_MAIN_INIT = MsgMainInit(
    session_id=0, display_channels_hint=0, supported_mouse_modes=MouseMode.SERVER | MouseMode.CLIENT,
    current_mouse_mode=MouseMode.SERVER, agent_connected=0, agent_tokens=10, multi_media_time=0, ram_hint=0,
)


class DestinationMigration(_Role):
    """s2 for one migrating client; create it when a MAIN link with connection_id != 0 that s1
    announced arrives (checking the announcement is the owner's job)."""

    TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.2: s2 on DST_DO_SEAMLESS
        (_D.TARGET, MsgcMainMigrateDstDoSeamless): (_D.SEAMLESS, "_ack"),
        (_D.TARGET, _DO_SEAMLESS_REFUSED): (_D.TARGET_SEMI, "_nack"),
        # 5.3: semi-seamless
        (_D.TARGET, MsgcMainMigrateEnd): (_D.MIGRATED, "_send_main_init"),
        (_D.TARGET_SEMI, MsgcMainMigrateEnd): (_D.MIGRATED, "_send_main_init"),
        (_D.TARGET, _END_WITHOUT_CAP): (_D.TARGET, None),  # spice-server warns and ignores it
        (_D.TARGET_SEMI, _END_WITHOUT_CAP): (_D.TARGET_SEMI, None),
        # 5.4: seamless
        (_D.SEAMLESS, "all restored"): (_D.MIGRATED, "_seamless_done"),
    }

    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]] = {
        (_DC.PARKED, "attach"): (_DC.ATTACHED, "_attach"),
        (_DC.PARKED, "attach waiting"): (_DC.WAIT_MIGRATE_DATA, "_attach"),
        (_DC.ATTACHED, "wait for migrate data"): (_DC.WAIT_MIGRATE_DATA, None),
        (_DC.WAIT_MIGRATE_DATA, MsgcMigrateData): (_DC.ATTACHED, "_restore"),
    }

    def __init__(
        self,
        connection_id: int,
        client_main_caps: Sequence[int],
        *,
        seamless_enabled: bool = True,
        main_init: MsgMainInit = DEFAULT_MAIN_INIT,
        channel_flags: Mapping[Channel, int] | None = None,
    ) -> None:
        if connection_id == 0:
            raise LocalProtocolError("a MAIN link with connection_id 0 starts a new session, not a migration")
        super().__init__(_D.TARGET, {MAIN: _DC.ATTACHED})
        self.connection_id = connection_id
        self.client_main_caps = tuple(client_main_caps)
        self.seamless_enabled = seamless_enabled
        self.main_init = dataclasses.replace(main_init, session_id=connection_id)  # same session id
        self._channel_flags = dict(channel_flags or {})
        self.mode: MigrationMode | None = None

    def flags(self, channel: Channel) -> MigrateFlags:
        return MigrateFlags(self._channel_flags.get(channel, default_migrate_flags(channel[0])))

    def channel_linked(self, channel: Channel) -> list:
        """A non-main link with this connection_id; the owner has answered it OK."""
        out = self._begin_call()
        if channel in self.channels:
            raise LocalProtocolError(f"channel {channel} is already linked")
        self.channels[channel] = _DC.PARKED
        if self.state is _D.SEAMLESS:
            self._attach_parked(channel)
        elif self.state is _D.MIGRATED:
            self._fire_channel(channel, "attach")
        return out

    def receive(self, channel: Channel, message: Message) -> list:
        """Every client message on an attached channel of this session."""
        out = self._begin_call()
        kind = type(message)
        state = self._channel_state(channel)
        if state is _DC.PARKED:
            raise LocalProtocolError(f"channel {channel} is parked: its socket must not be read yet")
        if kind is MsgcMigrateData:
            if not self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER:
                return out  # 5.4: ignored on channels without data transfer
            data = None
            if state is _DC.WAIT_MIGRATE_DATA:
                try:
                    data = parse_migrate_data(channel[0], message.data)
                except CodecError as exc:
                    raise RemoteProtocolError(f"MIGRATE_DATA on channel {channel}: {exc}") from exc
            self._fire_channel(channel, kind, data)
            if self.state is _D.SEAMLESS and _DC.WAIT_MIGRATE_DATA not in self.channels.values():
                self._fire("all restored")
        elif state is _DC.WAIT_MIGRATE_DATA:
            # 5.7: data before the restore would break its empty-queue precondition
            raise RemoteProtocolError(f"{kind.__name__} on channel {channel} before its MIGRATE_DATA")
        elif channel == MAIN and self.state in (_D.TARGET, _D.TARGET_SEMI):
            self._fire(self._main_input(message), message, error=RemoteProtocolError)
        elif kind in (MsgcMainMigrateDstDoSeamless, MsgcMainMigrateEnd):
            self._fire(kind, message)
        return out

    def _main_input(self, message: Message) -> Any:
        # There is no down-conversion: a newer source gets semi-seamless (6).
        if type(message) is MsgcMainMigrateDstDoSeamless and (
            message.src_version > MIGRATION_PROTOCOL_VERSION or not self.seamless_enabled
        ):
            return _DO_SEAMLESS_REFUSED
        if type(message) is MsgcMainMigrateEnd and not has_cap(self.client_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE):
            return _END_WITHOUT_CAP
        return type(message)

    def _attach_parked(self, channel: Channel) -> None:
        waits = bool(self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER)
        self._fire_channel(channel, "attach waiting" if waits else "attach")

    def _ack(self, message: Message) -> None:
        self.mode = MigrationMode.SEAMLESS
        for channel, state in list(self.channels.items()):
            if state is _DC.PARKED:
                self._attach_parked(channel)
            elif self.flags(channel) & MigrateFlags.NEED_DATA_TRANSFER:
                self._fire_channel(channel, "wait for migrate data")
        self._out.append(Send(MAIN, MsgMainMigrateDstSeamlessAck()))

    def _nack(self, message: Message) -> None:
        self._out.append(Send(MAIN, MsgMainMigrateDstSeamlessNack()))

    def _send_main_init(self, message: Message) -> None:
        self.mode = MigrationMode.SEMI_SEAMLESS
        self._out.append(Send(MAIN, self.main_init))
        for channel, state in list(self.channels.items()):
            if state is _DC.PARKED:
                self._fire_channel(channel, "attach")
        self._out.append(MigrationCompleted(MigrationMode.SEMI_SEAMLESS))

    def _attach(self, channel: Channel) -> None:
        self._out.append(AttachChannel(channel, self.channels[channel] is _DC.WAIT_MIGRATE_DATA))

    def _restore(self, channel: Channel, data: Any) -> None:
        self._out.append(RestoreMigrateData(channel, data))

    def _seamless_done(self) -> None:
        self._out.append(MigrationCompleted(MigrationMode.SEAMLESS))


# --- client --------------------------------------------------------------------------------------


class ClientState(Enum):
    IDLE = auto()
    LINKING_MAIN = auto()  # after MAIN_MIGRATE_BEGIN
    LINKING_MAIN_SEAMLESS = auto()  # after MAIN_MIGRATE_BEGIN_SEAMLESS
    HANDSHAKE = auto()  # DST_DO_SEAMLESS sent; other links proceed meanwhile
    LINKING = auto()  # semi-seamless, other links pending
    LINKING_SEAMLESS = auto()
    CONNECTED = auto()  # CONNECTED sent on s1
    CONNECTED_SEAMLESS = auto()  # CONNECTED_SEAMLESS sent on s1; channels switch one by one
    WAIT_MAIN_INIT = auto()  # semi-seamless: main on s2, MSGC_MAIN_MIGRATE_END sent
    CONFIRMING = auto()  # seamless: every channel on s2; s1's sockets are kept until s2's main speaks
    ROLLING_BACK = auto()  # s2 failed before it confirmed: back on s1's sockets, waiting for its CANCEL
    MIGRATED = auto()  # final: a next migration needs a new machine, with s2 as its s1
    HOST_SWITCHED = auto()  # final: a new session on the new host


class ClientChannelState(Enum):
    ON_S1 = auto()
    WAIT_MIGRATE_DATA = auto()  # after MIGRATE(NEED_DATA_TRANSFER); outgoing messages retained
    FROZEN = auto()  # semi-seamless, between the reset and MAIN_INIT; outgoing messages retained
    ON_S2 = auto()
    HELD = auto()  # rolling back: on s1's socket again, outgoing messages retained until s1 cancels


_C, _CC = ClientState, ClientChannelState
_PRE_MIGRATION = (_C.LINKING_MAIN, _C.LINKING_MAIN_SEAMLESS, _C.HANDSHAKE, _C.LINKING, _C.LINKING_SEAMLESS)
_S2_MAIN_WITH_CAP = "s2 main linked (SEAMLESS_MIGRATE)"
_END_FROM_OLD_SERVER = "MAIN_MIGRATE_END from a server without SEMI_SEAMLESS_MIGRATE"
# Messages only the machine writes, so their order cannot be broken from outside.
_CLIENT_MACHINE_ONLY = (
    MsgcMigrateFlushMark, MsgcMigrateData, MsgcMainMigrateConnected, MsgcMainMigrateConnectedSeamless,
    MsgcMainMigrateConnectError, MsgcMainMigrateDstDoSeamless, MsgcMainMigrateEnd,
)
_S1_SESSION_INPUTS = (
    MsgMainMigrateBegin, MsgMainMigrateBeginSeamless, MsgMainMigrateCancel, MsgMainMigrateEnd,
    MsgMainMigrateSwitchHost,
)


class ClientMigration(_Role):
    """The client (spice-gtk's behaviour, 5.2-5.6) for one session."""

    TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.2: pre-migration
        (_C.IDLE, MsgMainMigrateBegin): (_C.LINKING_MAIN, "_link_main"),
        (_C.IDLE, MsgMainMigrateBeginSeamless): (_C.LINKING_MAIN_SEAMLESS, "_link_main"),
        (_C.LINKING_MAIN, "s2 main linked"): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN, _S2_MAIN_WITH_CAP): (_C.LINKING, "_link_others"),
        (_C.LINKING_MAIN_SEAMLESS, "s2 main linked"): (_C.LINKING, "_link_others"),  # not seamless, unasked
        (_C.LINKING_MAIN_SEAMLESS, _S2_MAIN_WITH_CAP): (_C.HANDSHAKE, "_do_seamless"),
        (_C.HANDSHAKE, "s2 linked"): (_C.HANDSHAKE, None),
        (_C.HANDSHAKE, MsgMainMigrateDstSeamlessAck): (_C.LINKING_SEAMLESS, "_check_all_linked"),
        (_C.HANDSHAKE, MsgMainMigrateDstSeamlessNack): (_C.LINKING, "_check_all_linked"),
        (_C.LINKING, "s2 linked"): (_C.LINKING, None),
        (_C.LINKING_SEAMLESS, "s2 linked"): (_C.LINKING_SEAMLESS, None),
        (_C.LINKING, "all linked"): (_C.CONNECTED, "_send_connected"),
        (_C.LINKING_SEAMLESS, "all linked"): (_C.CONNECTED_SEAMLESS, "_send_connected"),
        **{(state, "s2 link failed"): (_C.IDLE, "_connect_error") for state in _PRE_MIGRATION},
        **{(state, MsgMainMigrateCancel): (_C.IDLE, "_abort")
           for state in (*_PRE_MIGRATION, _C.CONNECTED, _C.CONNECTED_SEAMLESS)},
        # 5.3: semi-seamless
        (_C.CONNECTED, MsgMainMigrateEnd): (_C.WAIT_MAIN_INIT, "_switch_main"),
        (_C.CONNECTED, _END_FROM_OLD_SERVER): (_C.CONNECTED, None),  # spice-gtk ignores it
        (_C.WAIT_MAIN_INIT, MsgMainInit): (_C.MIGRATED, "_switch_others"),
        # 5.4: seamless, the channel table does the work
        (_C.CONNECTED_SEAMLESS, MsgMigrate): (_C.CONNECTED_SEAMLESS, "_channel_input"),
        (_C.CONNECTED_SEAMLESS, MsgMigrateData): (_C.CONNECTED_SEAMLESS, "_channel_input"),
        (_C.CONNECTED_SEAMLESS, "all switched"): (_C.CONFIRMING, "_await_confirmation"),
        (_C.CONNECTED_SEAMLESS, "s2 spoke"): (_C.CONNECTED_SEAMLESS, "_note_s2_spoke"),
        (_C.CONFIRMING, "s2 spoke"): (_C.MIGRATED, "_seamless_done"),
        (_C.CONFIRMING, "confirmation due"): (_C.MIGRATED, "_seamless_done"),
        # Not in spice-gtk: s2 fails before it confirmed. While s1 still holds the session (our s1
        # keeps it until s2 reports it restored) the client goes back to s1's sockets; s1 answers
        # with MIGRATE_CANCEL once it has resumed the session, and what was retained or written to
        # s2 meanwhile goes to s1 (at least once). Without that CANCEL the session ends.
        (_C.CONNECTED_SEAMLESS, "s2 failed"): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.CONFIRMING, "s2 failed"): (_C.ROLLING_BACK, "_return_to_s1"),
        (_C.ROLLING_BACK, "s2 failed"): (_C.ROLLING_BACK, None),
        (_C.ROLLING_BACK, MsgMainMigrateCancel): (_C.ROLLING_BACK, "_s1_took_back"),
        (_C.ROLLING_BACK, "all back"): (_C.IDLE, "_rolled_back"),
        (_C.ROLLING_BACK, MsgMigrateData): (_C.ROLLING_BACK, "_channel_input"),
        # 5.6: switch host, whenever s1 gives up on s2
        **{(state, MsgMainMigrateSwitchHost): (_C.HOST_SWITCHED, "_switch_host")
           for state in (_C.IDLE, *_PRE_MIGRATION, _C.CONNECTED)},
    }

    CHANNEL_TABLE: ClassVar[Mapping[tuple, tuple]] = {
        # 5.4: per channel, SPICE_MSG_MIGRATE from s1
        (_CC.ON_S1, "MIGRATE"): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, "MIGRATE(NEED_FLUSH)"): (_CC.ON_S2, "_flush_and_switch"),
        (_CC.ON_S1, "MIGRATE(NEED_DATA_TRANSFER)"): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.ON_S1, "MIGRATE(NEED_FLUSH|NEED_DATA_TRANSFER)"): (_CC.WAIT_MIGRATE_DATA, "_flush_mark"),
        (_CC.WAIT_MIGRATE_DATA, MsgMigrateData): (_CC.ON_S2, "_switch_with_data"),
        # rolling back
        (_CC.ON_S1, "return"): (_CC.HELD, None),
        (_CC.ON_S2, "return"): (_CC.HELD, "_switch_back"),
        (_CC.WAIT_MIGRATE_DATA, "return"): (_CC.WAIT_MIGRATE_DATA, None),
        (_CC.HELD, "return"): (_CC.HELD, None),
        (_CC.WAIT_MIGRATE_DATA, "MIGRATE_DATA for nobody"): (_CC.HELD, "_drop_migrate_data"),
        (_CC.HELD, "resume"): (_CC.ON_S1, "_release"),
        (_CC.WAIT_MIGRATE_DATA, "resume"): (_CC.WAIT_MIGRATE_DATA, None),
        # 5.3: semi-seamless, main at MAIN_MIGRATE_END, the others at MAIN_INIT
        (_CC.ON_S1, "switch"): (_CC.ON_S2, "_switch"),
        (_CC.ON_S1, "freeze"): (_CC.FROZEN, None),
        (_CC.FROZEN, "switch"): (_CC.ON_S2, "_switch"),
        # 5.5: MIGRATE_CANCEL switches back whatever had switched
        (_CC.ON_S1, "switch back"): (_CC.ON_S1, None),
        (_CC.WAIT_MIGRATE_DATA, "switch back"): (_CC.ON_S1, "_release"),
        (_CC.ON_S2, "switch back"): (_CC.ON_S1, "_switch_back"),
    }

    def __init__(self, session_id: int, channels: Iterable[Channel], server_main_caps: Sequence[int]) -> None:
        """``channels``: every channel object of the session (5.9.7), main included or not."""
        ordered = [MAIN, *(channel for channel in channels if channel != MAIN)]
        super().__init__(_C.IDLE, dict.fromkeys(ordered, _CC.ON_S1))
        self.session_id = session_id
        self.server_main_caps = tuple(server_main_caps)
        self.mode: MigrationMode | None = None
        self.dst_info: MigrationDstInfo | None = None
        self._src_version = 0
        self._pending_links: set[Channel] = set()
        self._destination_open = False
        self._retained: dict[Channel, list[Message]] = {channel: [] for channel in ordered}
        # Written to s2 before it confirmed: sent to s1 again if the migration rolls back.
        self._unconfirmed: dict[Channel, list[Message]] = {channel: [] for channel in ordered}
        self._s2_spoke = False
        self._post_migration = False  # SPICE_MSG_MIGRATE arrived: some channel has begun to switch
        self._cancelled = False  # rolling back: s1's CANCEL came; channels resume as they drain
        self.rolled_back = False  # this attempt ended back on s1 after s1's CANCEL
        self.last_resent: dict[Channel, int] = {}  # after a rollback: messages written to s2 and resent

    # inputs

    def receive(self, peer: Peer, channel: Channel, message: Message) -> list:
        """A message read from ``peer`` on ``channel``. The owner still handles ordinary messages
        (MAIN_INIT included) itself; the migration messages are consumed here."""
        out = self._begin_call()
        kind = type(message)
        state = self._channel_state(channel)
        if peer is Peer.S1:
            if state is _CC.WAIT_MIGRATE_DATA and kind is not MsgMigrateData:
                # 5.4 step 2: the switch is aborted and the channel stays on s1; messages retained
                # meanwhile go to s1 with the next send().
                self.channels[channel] = _CC.ON_S1
                raise RemoteProtocolError(f"{kind.__name__} on channel {channel} where MIGRATE_DATA must follow MIGRATE")
            if state not in (_CC.ON_S1, _CC.WAIT_MIGRATE_DATA, _CC.HELD):
                raise LocalProtocolError(f"channel {channel} has left s1: its s1 connection is not read")
            if kind in (MsgMigrate, MsgMigrateData):
                self._fire(kind, channel, message)
            elif kind in _S1_SESSION_INPUTS:
                if channel != MAIN:
                    raise RemoteProtocolError(f"{kind.__name__} on channel {channel}")
                if kind is MsgMainMigrateCancel and self.state is _C.CONNECTED_SEAMLESS and self._post_migration:
                    # Post-migration: s1 took the session back, whether or not we saw s2 fail.
                    # MIGRATE_DATA may still be on its way on other channels: they drain it first.
                    self._fire("s2 failed")
                end_ignored = kind is MsgMainMigrateEnd and not has_cap(
                    self.server_main_caps, MainCap.SEMI_SEAMLESS_MIGRATE
                )
                self._fire(_END_FROM_OLD_SERVER if end_ignored else kind, message, error=RemoteProtocolError)
        elif channel == MAIN and kind in (MsgMainMigrateDstSeamlessAck, MsgMainMigrateDstSeamlessNack, MsgMainInit):
            self._fire(kind, message)
        elif channel == MAIN and self.state in (_C.HANDSHAKE, _C.WAIT_MAIN_INIT):
            raise RemoteProtocolError(f"{kind.__name__} from s2 main in state {self.state.name}")
        elif state is not _CC.ON_S2:
            raise LocalProtocolError(f"channel {channel} is frozen on s2: its connection is not read yet")
        return out

    def s2_linked(self, channel: Channel, main_caps: Sequence[int] = ()) -> list:
        """The link of ``channel`` to s2 succeeded; for main, ``main_caps`` are s2's main caps."""
        out = self._begin_call()
        if channel == MAIN:
            self._fire(_S2_MAIN_WITH_CAP if has_cap(main_caps, MainCap.SEAMLESS_MIGRATE) else "s2 main linked")
        else:
            if channel not in self._pending_links:
                raise LocalProtocolError(f"no link of channel {channel} to s2 is pending")
            self._pending_links.discard(channel)
            self._fire("s2 linked")
        self._check_all_linked()
        return out

    def s2_spoke(self) -> list:
        """s2's main channel sent something after main switched: it has the session (s2 speaks
        once every channel is restored; spice-gtk too lets go of s1 only then)."""
        out = self._begin_call()
        if self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._fire("s2 spoke")
        return out

    def confirmation_due(self) -> list:
        """s2 said nothing within the grace the owner allows after the last switch: done anyway."""
        out = self._begin_call()
        if self.state is _C.CONFIRMING:
            self._fire("confirmation due")
        return out

    def s2_failed(self) -> list:
        """A connection to s2 broke during seamless post-migration, before s2 confirmed."""
        out = self._begin_call()
        self._fire("s2 failed")
        return out

    def s2_link_failed(self, channel: Channel) -> list:
        """TCP error, 10 s connect timeout or a non-OK link result on the way to s2."""
        out = self._begin_call()
        self._fire("s2 link failed")
        return out

    def send(self, channel: Channel, message: Message) -> list:
        """Every message the owner writes on a channel: routed to the server the channel is on, or
        retained while the channel is between servers."""
        out = self._begin_call()
        if isinstance(message, _CLIENT_MACHINE_ONLY):
            raise LocalProtocolError(f"{type(message).__name__} is sent by the migration machine, not the owner")
        state = self._channel_state(channel)
        if state in (_CC.WAIT_MIGRATE_DATA, _CC.FROZEN, _CC.HELD):
            self._retained[channel].append(message)
        else:
            self._release(channel)
            out.append(Send(channel, message, Peer.S2 if state is _CC.ON_S2 else Peer.S1))
            if state is _CC.ON_S2 and self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
                self._unconfirmed[channel].append(message)
        return out

    # session actions

    def _link_main(self, message: Message) -> None:
        self.dst_info, self._destination_open = message.dst_info, True
        self._src_version = getattr(message, "src_mig_version", 0)
        self._out.append(LinkDestination(self.dst_info, self.session_id, (MAIN,)))

    def _link_others(self) -> None:
        others = tuple(channel for channel in self.channels if channel != MAIN)
        self._pending_links = set(others)
        if others:
            self._out.append(LinkDestination(self.dst_info, self.session_id, others))

    def _do_seamless(self) -> None:
        self._out.append(Send(MAIN, MsgcMainMigrateDstDoSeamless(self._src_version), Peer.S2))
        self._link_others()

    def _check_all_linked(self, answer: Message | None = None) -> None:
        if self.state in (_C.LINKING, _C.LINKING_SEAMLESS) and not self._pending_links:
            self._fire("all linked")

    def _send_connected(self) -> None:
        seamless = self.state is _C.CONNECTED_SEAMLESS
        self.mode = MigrationMode.SEAMLESS if seamless else MigrationMode.SEMI_SEAMLESS
        connected = MsgcMainMigrateConnectedSeamless() if seamless else MsgcMainMigrateConnected()
        self._out.append(Send(MAIN, connected, Peer.S1))

    def _connect_error(self) -> None:
        self._out.append(Send(MAIN, MsgcMainMigrateConnectError(), Peer.S1))
        self._reset_attempt()

    def _abort(self, message: Message) -> None:
        for channel in self.channels:
            self._fire_channel(channel, "switch back")
        self._reset_attempt()

    def _reset_attempt(self) -> None:
        self.mode, self._pending_links, self._destination_open = None, set(), False
        self._post_migration = False
        self._out.append(DropDestination())

    def _switch_main(self, message: Message) -> None:
        self._out.append(ResetChannels())
        self._retained = {channel: [] for channel in self.channels}  # 5.3 step 1: unsent queues go
        self._fire_channel(MAIN, "switch")
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, "freeze")
        self._out.append(Send(MAIN, MsgcMainMigrateEnd(), Peer.S2))

    def _switch_others(self, message: Message) -> None:
        self.session_id = message.session_id
        for channel in self.channels:
            if channel != MAIN:
                self._fire_channel(channel, "switch")
        self._out.append(MigrationCompleted(MigrationMode.SEMI_SEAMLESS))

    def _channel_input(self, channel: Channel, message: Message) -> None:
        if self.state is _C.ROLLING_BACK:  # MIGRATE_DATA of a channel that had not switched yet
            self._fire_channel(channel, "MIGRATE_DATA for nobody", message)
            if self._cancelled:
                self._resume(channel)
                self._check_all_back()
            return
        self._post_migration = True
        if type(message) is MsgMigrate:
            if message.flags & ~MIGRATE_FLAGS_MASK:
                raise RemoteProtocolError(f"MIGRATE flags {message.flags:#x} on channel {channel}")
            self._fire_channel(channel, _migrate_input(message.flags), error=RemoteProtocolError)
        else:
            self._fire_channel(channel, MsgMigrateData, message)
        if all(state is _CC.ON_S2 for state in self.channels.values()):
            self._fire("all switched")

    def _await_confirmation(self) -> None:
        if self._s2_spoke:
            self._fire("s2 spoke")
        else:
            self._out.append(AwaitConfirmation())

    def _note_s2_spoke(self) -> None:
        self._s2_spoke = True

    def _seamless_done(self) -> None:
        self._unconfirmed = {channel: [] for channel in self.channels}
        self._out.append(CloseSource())
        self._out.append(MigrationCompleted(MigrationMode.SEAMLESS))

    def _return_to_s1(self) -> None:
        for channel in self.channels:
            self._fire_channel(channel, "return")
        self._out.append(AwaitRollback())

    def _s1_took_back(self, message: Message) -> None:
        self._cancelled = True
        self.last_resent = {channel: len(sent) for channel, sent in self._unconfirmed.items()}
        for channel in self.channels:
            self._resume(channel)
        self._check_all_back()

    def _resume(self, channel: Channel) -> None:
        """Rolled back: a channel back on s1 (not one still draining its MIGRATE_DATA) sends s1 first
        what s2 may never have received, then what it held meanwhile."""
        if self.channels[channel] is _CC.HELD:
            self._retained[channel][:0] = self._unconfirmed[channel]
            self._unconfirmed[channel] = []
            self._fire_channel(channel, "resume")

    def _check_all_back(self) -> None:
        if self._cancelled and all(state is _CC.ON_S1 for state in self.channels.values()):
            self._fire("all back")

    def _rolled_back(self) -> None:
        self._cancelled = False
        self.rolled_back = True
        self._reset_attempt()
        self._out.append(RolledBack())

    def _switch_host(self, message: Message) -> None:
        if self._destination_open:
            self._reset_attempt()
        self.session_id = 0
        self._out.append(SwitchHost(message.dst_info))

    # channel actions

    def _flush_mark(self, channel: Channel) -> None:
        # Written at once, ahead of the queued messages, which stay retained for s2.
        self._out.append(Send(channel, MsgcMigrateFlushMark(), Peer.S1))

    def _switch(self, channel: Channel) -> None:
        self._out.append(SwitchChannel(channel, Peer.S2))
        self._release(channel)

    def _flush_and_switch(self, channel: Channel) -> None:
        self._flush_mark(channel)
        self._switch(channel)

    def _switch_with_data(self, channel: Channel, message: MsgMigrateData) -> None:
        self._out.append(SwitchChannel(channel, Peer.S2))
        # The body goes back byte for byte: it is opaque to the client (6).
        self._out.append(Send(channel, MsgcMigrateData(message.data), Peer.S2))
        self._release(channel)

    def _switch_back(self, channel: Channel) -> None:
        self._out.append(SwitchChannel(channel, Peer.S1))

    def _drop_migrate_data(self, channel: Channel, message: MsgMigrateData) -> None:
        self._out.append(DropMigrateData(channel, message.data))

    def _release(self, channel: Channel) -> None:
        state = self.channels[channel]
        peer = Peer.S2 if state is _CC.ON_S2 else Peer.S1
        retained, self._retained[channel] = self._retained[channel], []
        self._out.extend(Send(channel, message, peer) for message in retained)
        if peer is Peer.S2 and self.state in (_C.CONNECTED_SEAMLESS, _C.CONFIRMING):
            self._unconfirmed[channel] += retained

