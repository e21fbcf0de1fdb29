"""Migrate-data bodies (PROTOCOL.md section 6): what s1 sends in MIGRATE_DATA and s2 restores from.

Every body starts with SpiceMigrateDataHeader ``u32 magic, u32 version``. spice-server's formats
(main ``MNMD``, spicevmc ``SVMD``) are built and parsed byte-exact, pointers being u32 offsets from
the first header byte. For spicewire <-> spicewire port channels there is also ``SWPD``, which
carries hundreds of MiB of buffered port data without per-chunk copies::

    0   4s   magic    b"SWPD"
    4   u32  version  1, or 2 with a pre-copy reference
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
        [1]     version 2 only: the pre-copy reference, 112 bytes, per direction (client->device
                first, then device->client) u64 start, u64 length, u64 skip, 32-byte digest
                (the kind the pre-copy's rounds named: SHA-256, or XXH3-128 padded with zeros):
                s2 holds ``length`` bytes of that direction's stream from offset ``start`` (sent
                to it over the server-to-server path before the switch), whose digest must be
                the one given; bytes ``skip`` onwards are still queued and come before the ones
                that follow here
        then    client->device bytes not yet written to the device, oldest first
        then    device->client bytes the device produced before it stopped, not yet sent
        last    device-specific state, opaque (may be empty)

Why containers: s1 never holds the in-flight state twice. A server sends each container's index
and then its chunks straight from the queues, many per sendmsg (``PortMigrateDataWriter.gathered``);
``segments`` packs one container at a time into a reused buffer instead. s2 gathers the whole body
in one buffer and keeps memoryviews into it, so restoring copies nothing.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from spicewire import _codec_layout as layout
from spicewire import codec
from spicewire.errors import CodecError
from spicewire.protocol import graphics, messages
from spicewire.protocol.enums import ChannelType

Buffer = bytes | bytearray | memoryview

SPICEVMC_CHANNELS = frozenset({ChannelType.USBREDIR, ChannelType.PORT, ChannelType.WEBDAV})
"""Channels whose migrate data is spice-server's SVMD (or, between spicewire peers, SWPD)."""


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
"""Every per-channel version above, spicewire's included (SWPD has a version 2, SWPD_PRECOPY)."""
SWPD_PRECOPY = 2
"""The SWPD version with a pre-copy reference: s1 sends it only to an s2 that took the pre-copy."""
CHAR_DEVICE_VERSION = 1
U32_MAX = 0xFFFFFFFF

_HEADER = struct.Struct("<II")  # magic, version
_CHAR_DEVICE = struct.Struct("<IBIIIII")  # 25 bytes (6.1)
_MAIN_TAIL = struct.Struct("<BI8sBIIIBIB")  # the 32 bytes after the agent char device (6.2)
_PORT_STATE = struct.Struct("<IIQQQIIIIQ8x")  # 64 bytes, SWPD chunk 0
_REGION_REF = struct.Struct("<QQQ32s")  # start, length, skip, digest: one direction of SWPD chunk 1
SWPD_SEGMENT = 8 << 20  # one container's bytes while building: the size of the reused buffer
GATHER_SMALL = 16 << 10  # PortMigrateDataWriter.gathered joins chunks under this with their neighbours
_CONTAINER_TOTAL = struct.Struct("<Q")  # codec container total_size, at offset 16
SPICEVMC_MIGRATE_DATA_SIZE = _HEADER.size + _CHAR_DEVICE.size  # 33
MAIN_MIGRATE_DATA_SIZE = SPICEVMC_MIGRATE_DATA_SIZE + _MAIN_TAIL.size  # 65
_AGENT_FILTER_RESULTS = 4  # OK, DISCARD, PROTO_ERROR, MONITORS_CONFIG
_VD_AGENT_MESSAGE_SIZE = 20


def parse_migrate_data_header(body: Buffer, magic: MigrateDataMagic, newest: int = MIGRATE_DATA_VERSION) -> int:
    """The version of a body that must start with ``magic``; newer than ``newest`` (the one
    spice-server's channels have, unless ours has another) is refused (no down-conversion exists, 6)."""
    if len(body) < _HEADER.size:
        raise CodecError(f"migrate data of {len(body)} bytes has no header")
    got, version = _HEADER.unpack_from(body)
    if got != magic:
        raise CodecError(f"migrate data magic {got.to_bytes(4, 'little')!r}, expected {magic.name}")
    if version > newest:
        raise CodecError(f"{magic.name} migrate data version {version} is newer than {newest}")
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


# SVMD and MNMD bodies both start with the header and one char device's state (main's is the agent).


def _pack_device_body(magic: MigrateDataMagic, device: CharDeviceMigrateData) -> tuple[bytearray, list]:
    out = bytearray(_HEADER.pack(magic, MIGRATE_DATA_VERSION))
    deferred: list = []
    device._pack(out, deferred)
    return out, deferred


def _parse_device_body(body: Buffer, magic: MigrateDataMagic, fixed_size: int, what: str) -> CharDeviceMigrateData:
    if len(body) < fixed_size:
        raise CodecError(f"{what} migrate data needs {fixed_size} bytes, got {len(body)}")
    parse_migrate_data_header(body, magic)
    return CharDeviceMigrateData._parse(body, _HEADER.size, fixed_size)


def build_spicevmc_migrate_data(device: CharDeviceMigrateData = CharDeviceMigrateData()) -> bytes:
    """An ``SVMD`` body (usbredir/port/webdav): 33 bytes plus the pending write bytes."""
    return _patch_pointers(*_pack_device_body(MigrateDataMagic.SPICEVMC, device))


def parse_spicevmc_migrate_data(body: Buffer) -> CharDeviceMigrateData:
    """Validated as spice-server does (5.8): a short body or ``connected`` = 0 is fatal there."""
    device = _parse_device_body(body, MigrateDataMagic.SPICEVMC, SPICEVMC_MIGRATE_DATA_SIZE, "spicevmc")
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
    out, deferred = _pack_device_body(MigrateDataMagic.MAIN, state.agent)
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
    agent = _parse_device_body(body, MigrateDataMagic.MAIN, MAIN_MIGRATE_DATA_SIZE, "main")
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
class RegionRef:
    """One direction of a port's pre-copy as s1 sent it (SWPD version 2, chunk 1)."""

    start: int = 0  # the stream offset of the first byte s2 holds
    length: int = 0  # bytes s2 holds
    skip: int = 0  # of those, consumed (written to the device, or sent to the client) since
    digest: bytes = bytes(32)  # of the ``length`` bytes, in the kind the pre-copy named (precopy.DIGESTS)

    def __post_init__(self) -> None:
        if not 0 <= self.skip <= self.length or len(self.digest) != 32:
            raise CodecError(f"pre-copy reference skips {self.skip} of {self.length} bytes")


@dataclass(frozen=True, slots=True)
class PrecopyRef:
    to_device: RegionRef
    to_client: RegionRef

    def encode(self) -> bytes:
        return b"".join(_REGION_REF.pack(r.start, r.length, r.skip, r.digest) for r in (self.to_device, self.to_client))

    @classmethod
    def decode(cls, data: Buffer) -> PrecopyRef:
        if len(data) != 2 * _REGION_REF.size:
            raise CodecError(f"SWPD pre-copy reference of {len(data)} bytes, expected {2 * _REGION_REF.size}")
        first, second = (_REGION_REF.unpack_from(data, i * _REGION_REF.size) for i in range(2))
        return cls(RegionRef(*first), RegionRef(*second))


@dataclass(frozen=True, slots=True)
class PortMigrateData:
    """spicewire's port-channel state (``SWPD``, layout in the module docstring). With
    ``precopy``, ``pending`` and ``to_client`` are what follows the pre-copied bytes."""

    ack_generation: int = 0
    ack_window: int = 0
    serial: int = 0
    client_serial: int = 0
    num_client_tokens: int = U32_MAX
    num_send_tokens: int = U32_MAX
    device_state: Buffer = b""
    pending: Sequence[Buffer] = ()
    to_client: Sequence[Buffer] = ()
    precopy: PrecopyRef | None = None

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
        self._reference = state.precopy.encode() if state.precopy is not None else None
        self.version = SWPD_PRECOPY if state.precopy is not None else MIGRATE_DATA_VERSION
        references = [len(self._reference)] if self._reference is not None else []
        lengths = [len(self._record), *references, *pending_lengths, *to_client_lengths,
                   memoryview(state.device_state).nbytes]
        self._plan = _segment_plan(lengths, segment)  # chunk counts per container
        sizes, start = [], 0
        for count in self._plan:
            sizes.append(layout.data_start(count) + sum(lengths[start : start + count]))
            start += count
        self._container_sizes = sizes
        self.size = _HEADER.size + sum(sizes)

    @property
    def header(self) -> bytes:
        return _HEADER.pack(MigrateDataMagic.PORT, self.version)

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

    def gathered(self, batch: int) -> Iterator[list[bytes | memoryview]]:
        """The body after its header, the same bytes as the segments, as lists of about ``batch``
        bytes for one sendmsg each: every container's index (built here) and its chunks as the
        views they are, never packed. A chunk larger than ``batch`` is cut into views; chunks
        under GATHER_SMALL are joined (copied) with their neighbours, as a view each would cost
        more in calls (the MAC's, the socket's) than the copy."""
        out: list[bytes | memoryview] = []
        small: list[bytes | memoryview] = []
        size = small_size = 0
        for chunks in self.chunk_groups():
            views = [layout.byte_view(chunk) for chunk in chunks]
            small.append(layout.container_index([len(view) for view in views]))
            small_size += len(small[-1])
            for view in views:
                if len(view) < GATHER_SMALL:
                    small.append(view)
                    small_size += len(view)
                    if small_size < GATHER_SMALL:
                        continue
                    view = memoryview(b"".join(small))
                elif small_size:
                    out.append(b"".join(small))
                    size += small_size
                small, small_size = [], 0
                for start in range(0, len(view), batch):
                    out.append(view[start : start + batch])
                    size += len(out[-1])
                    if size >= batch:
                        yield out
                        out, size = [], 0
        if small_size:  # not empty chunks alone (a port's device state): no sendmsg of nothing
            out.append(b"".join(small))
        if out:
            yield out

    def _chunks(self) -> Iterator[Buffer]:
        yield self._record
        if self._reference is not None:
            yield self._reference
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
    precopy = parse_migrate_data_header(view, MigrateDataMagic.PORT, newest=SWPD_PRECOPY) == SWPD_PRECOPY
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
    reference = None
    if precopy:
        if len(chunks) < 3:
            raise CodecError("SWPD version 2 needs a pre-copy reference chunk")
        reference = PrecopyRef.decode(chunks[1])
        chunks = [chunks[0], *chunks[2:]]
    if 1 + pending_count + to_client_count + 1 != len(chunks):
        raise CodecError(f"SWPD announces {pending_count} + {to_client_count} buffers, holds {len(chunks) - 2}")
    pending = chunks[1 : 1 + pending_count]
    to_client = chunks[1 + pending_count : -1]
    if pending_size != sum(len(c) for c in pending) or to_client_size != sum(len(c) for c in to_client):
        raise CodecError("SWPD buffer sizes do not add up to the sizes its record announces")
    return PortMigrateData(
        generation, window, serial, client_serial, client_tokens, send_tokens, chunks[-1], tuple(pending),
        tuple(to_client), reference,
    )


_OTHER_MAGICS: dict[int, MigrateDataMagic] = {
    ChannelType.INPUTS: MigrateDataMagic.INPUTS,
    ChannelType.DISPLAY: MigrateDataMagic.DISPLAY,
    ChannelType.SMARTCARD: MigrateDataMagic.SMARTCARD,
}


@dataclass
class HeldInput:
    """An inputs-channel message that arrived while the screen was stopped for a migration: it
    reaches the screen once the screen runs again, on s1 or on s2, never applied to a screen whose
    picture has already been sent away and never lost."""

    msg_type: int
    body: bytes


@dataclass
class InputsState:
    """The inputs channel's migrate data: spice-server's ICMD record, then (spicewire to
    spicewire) what the client typed and moved while the screen was stopped."""

    record: graphics.InputsMigrateData
    held: list[HeldInput]


HELD_TAG = b"SWIH"
_HELD_HEAD = struct.Struct("<4sI")
_HELD_ITEM = struct.Struct("<HI")


def build_inputs_migrate_data(motion_count: int, held: Sequence[HeldInput]) -> bytes:
    """ICMD, then ``SWIH``, u32 count, and per held message u16 type, u32 size and its body. A
    spice-server s2 reads the ICMD record and nothing after it."""
    out = bytearray(graphics.InputsMigrateData(motion_count=motion_count).encode())
    out += _HELD_HEAD.pack(HELD_TAG, len(held))
    for item in held:
        out += _HELD_ITEM.pack(item.msg_type, len(item.body))
        out += item.body
    return bytes(out)


def parse_inputs_migrate_data(body: Buffer) -> InputsState:
    view = memoryview(body)
    record = graphics.InputsMigrateData.decode(view[:graphics.INPUTS_MIGRATE_SIZE])
    rest = view[graphics.INPUTS_MIGRATE_SIZE:]
    if not len(rest):
        return InputsState(record, [])  # a spice-server s1: the motion count only
    if len(rest) < _HELD_HEAD.size:
        raise CodecError(f"held inputs: {len(rest)} bytes, the header needs {_HELD_HEAD.size}")
    tag, count = _HELD_HEAD.unpack_from(rest)
    if tag != HELD_TAG:
        raise CodecError(f"held inputs: tag {bytes(tag)!r}, expected {HELD_TAG!r}")
    pos, held = _HELD_HEAD.size, []
    for _ in range(count):
        if pos + _HELD_ITEM.size > len(rest):
            raise CodecError("held inputs: truncated")
        msg_type, size = _HELD_ITEM.unpack_from(rest, pos)
        pos += _HELD_ITEM.size
        if pos + size > len(rest):
            raise CodecError("held inputs: a message runs past the end")
        item = HeldInput(msg_type, bytes(rest[pos:pos + size]))
        # Each must be an inputs message this side can decode: CodecError otherwise, now, not
        # when the screen takes it. Checked, not decoded: a dozen of them wait in the downtime.
        messages.check_decodable(ChannelType.INPUTS, messages.Direction.CLIENT_TO_SERVER, msg_type, item.body)
        held.append(item)
        pos += size
    if pos != len(rest):
        raise CodecError(f"held inputs: {len(rest) - pos} bytes after the last message")
    return InputsState(record, held)


def parse_migrate_data(channel_type: int, body: Buffer) -> Any:
    """What s2 restores a channel from: MainMigrateData, CharDeviceMigrateData (SVMD),
    PortMigrateData (SWPD), DisplayMigrateData (SWDD), InputsState (ICMD), or for other channels
    the header-checked body."""
    if channel_type == ChannelType.MAIN:
        return parse_main_migrate_data(body)
    if channel_type == ChannelType.DISPLAY and bytes(body[:4]) == b"SWDD":
        return graphics.DisplayMigrateData.decode(body)
    if channel_type == ChannelType.INPUTS:
        return parse_inputs_migrate_data(body)
    if channel_type in SPICEVMC_CHANNELS:
        if bytes(body[:4]) == b"SWPD":
            return parse_port_migrate_data(body)
        return parse_spicevmc_migrate_data(body)
    if channel_type in _OTHER_MAGICS:
        parse_migrate_data_header(body, _OTHER_MAGICS[channel_type])
        return body
    raise CodecError(f"channel type {channel_type} has no migrate data")
