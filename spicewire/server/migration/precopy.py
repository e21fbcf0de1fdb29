"""Pre-copy of queued port bytes: most of a port's backlog reaches s2 before the switch.

A byte queued on a port never changes until it is consumed (written to the device, or sent to the
client). So during pre-migration, while the session keeps running, s1 sends each big port's queued
bytes of both directions straight to s2 over the server-to-server path, in rounds: each round
carries what was queued since the one before, until little is added or the rounds run out. At the
switch the port's MIGRATE_DATA (SWPD version 2) carries its state record, the bytes queued after
the last round, and per direction a reference to what s2 holds: the stream offset and length of
the pre-copied bytes, how many of them were consumed meanwhile, and their digest. s2 checks the
digest against what it received before it restores anything from it.

The digest guards against our own bugs (an offset off by one, a round lost or sent twice, regions
mixed up), not against an attacker: the s1 -> s2 path is authenticated by the peer token (and TLS
if asked), and the MIGRATE_DATA through the client by its HMAC. So it need not be cryptographic,
and it must not be slow: every pre-copied byte is hashed on both ends, on cores the sessions and
the socket copy share. XXH3-128 runs at memory speed (about 20 GB/s here), SHA-256 at 1.7 GB/s even
with the CPU's SHA instructions, which capped the pre-copy near 0.4x a plain socket copy. A
128-bit digest misses an accidental change with odds of 2^-128. s2 names the digests it takes in
its announcement's answer (``port_precopy_digests``) and s1 names the one it uses in each entry;
a peer that names none (spicewire before the choice) speaks SHA-256.

Offsets are positions in a direction's byte stream on s1: ``PortState.to_device_total`` (and
``to_client_total``) counts every byte ever queued, so a queue holds the stream from
``total - queued`` to ``total``. s2 keeps one region per port and direction; a round that starts
past the region's end (the device consumed bytes s2 never got) starts the region afresh there.

One round is one ``POST /migration/port-precopy?migration=ID`` whose body is::

    u32 index size | JSON index | the bytes of each index entry, in index order

and each entry ``{"session_id", "port", "dir": "to_device"|"to_client", "offset", "length",
"capacity", "digest"}``. ``capacity`` is the most s1 asks the region to hold on s2, with the first
entry for it; s2 answers ``{"held": entries, "capacities": [...]}``, the most each entry's region may
hold there (no more than a MIGRATE_DATA of the announced backlog could bring). s1 never sends past
it; what does not fit travels in MIGRATE_DATA. s2 faults memory in as the rounds need it: first
the buffer it faulted in for the port's MIGRATE_DATA when the session was announced, then more in
segments. The memory the MIGRATE_DATA's tail then lands in (TAIL_ROOM at most) is faulted in
between rounds, before the last one, when s1 asks whether s2 is prepared for the switch. All of
it is held in s2's memory budget until the announcement ends (MigrationManager.hold_for): a
segment the budget has no room for refuses the round (507), a tail room is left out.

Whatever fails (s2 refuses, a request breaks, time runs short) ends the pre-copy of every port of
that migration: their whole state then goes through the client as without it. s2 drops what it
holds of a session when the session's announcement ends (landed, failed, aborted, expired).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import gevent
import numpy as np
import xxhash

from spicewire.devices import whole_number
from spicewire.errors import MigrationError
from spicewire.logs import parse_session_label, session_label
from spicewire.protocol import migration as mig
from spicewire.protocol.migrate_data import PrecopyRef, RegionRef
from spicewire.server.migration.common import prefaulted
from spicewire.server.session import PortState
from spicewire.turns import BulkTurns

if TYPE_CHECKING:
    from spicewire.server.migration.destination import Announcement
    from spicewire.server.migration.orchestrator import Peer
    from spicewire.server.migration.source import SessionSource

log = logging.getLogger(__name__)

PRECOPY_MIN = 16 << 20
"""Ports holding at least this many bytes are pre-copied. A smaller backlog costs the downtime a
few ms through the client, less than its pre-copy costs s2 in memory faulted in for it and a
request per round."""
PRECOPY_ROUNDS = 6
PRECOPY_SETTLED = 64 << 10
"""A round that would carry less than this is left to MIGRATE_DATA. A round costs pre-migration
about a millisecond (a request to s2); a MiB left to MIGRATE_DATA cost the downtime one to two
(1 MiB here: a client writing 6 MB/s left 0.3-1 MiB to the tail, and 1 GiB paused migrated in
2.7-8 ms; with 64 KiB, 1.7-2.4 ms)."""
PRECOPY_VERSION = 2  # what s2 answers an announcement with when it takes port pre-copies
TAIL_ROOM = 64 << 20
"""The most s2 faults in for a pre-copied port's MIGRATE_DATA, its tail: what is queued after the
last round (a larger tail lands in fresh memory). It gets twice what the port's largest round
after the first carried (about what it queues between two rounds), at least TAIL_ROOM_MIN: on the
2-core VM the pre-copy was measured on, fresh pages cost 1.5-3 ms a MiB of CPU, and a fixed 16 MiB
faulted in right before the last round cost a 1 GiB paused session's downtime 0.4-0.8 ms (its tail
was 0-64 KiB)."""
TAIL_ROOM_MIN = 1 << 20
SEGMENT = 64 << 20  # memory s2 adds to a region at a time, beyond the announcement's buffer
PIECE = 1 << 20  # bytes s1 hands the socket at a time (one sendmsg of many queue chunks)
RECEIVE_READ = 1 << 20  # s2's most per read: hashed right after, from the cache
MAX_INDEX = 1 << 20
DIRECTIONS = ("to_device", "to_client")
_INDEX_SIZE = struct.Struct("<I")

DIGESTS: dict[str, Callable[[], Any]] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
"""The digests a pre-copied region is checked with, by name, the one s1 prefers first."""
LEGACY_DIGEST = "sha256"  # what a peer that names no digest speaks
DIGEST_FIELD = 32  # the digest's room in the SWPD reference; a shorter one is padded with zeros


def choose_digest(features: dict) -> str:
    """The digest s1 uses with an s2 whose announcement answer was ``features``."""
    offered = features.get("port_precopy_digests")
    if not isinstance(offered, list):
        return LEGACY_DIGEST
    return next((name for name in DIGESTS if name in offered), LEGACY_DIGEST)


def reference_digest(digest: Any) -> bytes:
    """``digest``'s value as the SWPD reference carries it."""
    return digest.digest().ljust(DIGEST_FIELD, b"\0")


def _queue(port: PortState, direction: str) -> tuple[deque, int, int]:
    """A direction's queue, the bytes it holds, and the stream offset just past its last byte."""
    if direction == "to_device":
        return port.to_device, port.to_device_bytes, port.to_device_total
    return port.to_client, port.to_client_bytes, port.to_client_total


def last_bytes(queue: deque, count: int) -> list[memoryview]:
    """Views of the last ``count`` bytes of ``queue``, oldest first (no copy)."""
    views: list[memoryview] = []
    for chunk in reversed(queue):
        if count <= 0:
            break
        view = memoryview(chunk)
        if view.nbytes > count:
            view = view[view.nbytes - count:]
        views.append(view)
        count -= view.nbytes
    views.reverse()
    return views


@dataclass
class SentRegion:
    """s1's record of one direction of one port: what s2 holds of the stream."""

    capacity: int
    kind: str  # the digest's name in DIGESTS
    start: int = 0
    length: int = 0
    digest: Any = field(init=False)

    def __post_init__(self) -> None:
        self.digest = DIGESTS[self.kind]()

    @property
    def end(self) -> int:
        return self.start + self.length

    def restart(self, offset: int) -> None:
        """The region starts again at stream offset ``offset``, empty."""
        self.start, self.length, self.digest = offset, 0, DIGESTS[self.kind]()

    def reference(self, head: int) -> RegionRef:
        """What MIGRATE_DATA says of this region once the queue's first byte is at ``head``."""
        skip = min(self.length, max(0, head - self.start))
        return RegionRef(self.start, self.length, skip, reference_digest(self.digest))


@dataclass
class PortPrecopy:
    """One port's pre-copy on s1, both directions."""

    session_id: int
    port: PortState
    regions: dict[str, SentRegion]

    def due(self, direction: str) -> tuple[int, int]:
        """(offset, length) of what the next round sends this way: the bytes queued since the
        region's end, from the queue's first byte if the device consumed past that end, and no
        more than the region's capacity holds."""
        region = self.regions[direction]
        _, queued, total = _queue(self.port, direction)
        head = total - queued
        offset = max(region.end, head) if region.length else head
        afresh = offset != region.end or not region.length  # the region starts again at ``offset``
        room = region.capacity if afresh else region.capacity - region.length
        return offset, max(0, min(total - offset, room))

    def state(self, base: mig.PortMigrateData) -> mig.PortMigrateData:
        """``base`` (the record, without the queues) as SWPD version 2: the reference to what s2
        holds, and of the queues only what follows it."""
        refs, tails = {}, {}
        for direction in DIRECTIONS:
            queue, queued, total = _queue(self.port, direction)
            region = self.regions[direction]
            head = total - queued
            refs[direction] = region.reference(head)
            tails[direction] = last_bytes(queue, total - max(head, region.end))
        return replace(base, pending=tails["to_device"], to_client=tails["to_client"],
                       precopy=PrecopyRef(refs["to_device"], refs["to_client"]))


def _capacity(queued: int) -> int:
    """The most a region may hold on s2, asked for with its first round: the queue now, and room
    for what joins it while the rounds run (s2 faults memory in as the bytes come, not up to this)."""
    return queued + queued // 4 + (64 << 20)


def plan_precopies(sources: list[SessionSource], kind: str) -> list[PortPrecopy]:
    """The ports worth pre-copying, each region sized for its queue now plus headroom, checked
    with the digest ``kind``."""
    plans = []
    for source in sources:
        for port in source.ports.values():
            if port.in_flight < PRECOPY_MIN:
                continue
            regions = {d: SentRegion(_capacity(_queue(port, d)[1]), kind) for d in DIRECTIONS}
            plans.append(PortPrecopy(source.session.id, port, regions))
    return plans


def _batches(chunks: list, start: int, length: int) -> Iterator[list]:
    """``length`` bytes of ``chunks`` from byte ``start`` of the first on, as lists of PIECE bytes
    (the last one fewer) for one system call each: the chunks themselves, and a view of one only
    where a list begins or ends inside it. A queue is thousands of 64 KiB DATA
    messages: the lists are cut from ``chunks`` by bisection, not built a chunk at a time (a few
    objects a chunk cost more than the socket's copy of it)."""
    ends = list(accumulate(map(len, chunks)))
    pos, stop = start, start + length
    while pos < stop:
        upto = min(stop, pos + PIECE)
        first, last = bisect_right(ends, pos), bisect_left(ends, upto)
        batch = chunks[first:last + 1]
        cut_head, cut_tail = pos - (ends[first] - len(chunks[first])), ends[last] - upto
        if first == last:
            batch[0] = memoryview(batch[0])[cut_head:len(batch[0]) - cut_tail]
        else:
            if cut_head:
                batch[0] = memoryview(batch[0])[cut_head:]
            if cut_tail:
                batch[-1] = memoryview(batch[-1])[:len(batch[-1]) - cut_tail]
        yield batch
        pos = upto


def _hashed(batches: Iterator[list], digest: Any) -> Iterator[list]:
    """``batches`` for the socket, each hashed into ``digest`` right after the socket copied it,
    while its bytes are still in or near the cache: XXH3 then took 10-18% of s1's time in a
    round (perf), the socket's copy most of the rest. A worker thread hashing beside the send
    was slower (four paired runs: 0.56-0.75x of a direct copy against 0.67-0.87x in line): it
    competes with s2 for the other core and reads the bytes again."""
    for batch in batches:
        yield batch
        for part in batch:
            digest.update(part)


def _nothing() -> None:
    pass


def precopy_ports(migration: Peer, sources: list[SessionSource], prepare: Callable[[], None] = _nothing) -> int:
    """Pre-copy the big ports of ``sources`` to s2 in rounds; each source's ``port_precopies``
    holds those that got there. Returns the bytes sent; a failure sends the rest through the
    client (no port of the migration is pre-copied then).

    ``prepare()`` runs once, before the round that would be the last (the next would carry less
    than PRECOPY_SETTLED, or none is left): s1 waits there for s2 to fault in what the tails land
    in. The sessions run on meanwhile, and what they queue goes in that round, not in the tails
    (waiting after the last round instead, 0.1-0.2 s here, grew the tail from 0-128 KiB to 1-1.6
    MiB and the downtime with it, by 2-3 ms)."""
    plans = plan_precopies(sources, choose_digest(migration.features))
    if not plans:
        return 0
    by_session = {source.session.id: source for source in sources}
    sent = 0
    prepared = False
    try:
        for round_no in range(PRECOPY_ROUNDS):
            due = sum(plan.due(direction)[1] for plan in plans for direction in DIRECTIONS)
            if not prepared and (_settled(round_no, due) or round_no == PRECOPY_ROUNDS - 1):
                prepare()
                prepared = True
            entries, pieces, size = _next_round(plans)
            if _settled(round_no, size):
                break
            index = json.dumps(entries).encode()
            body = [_INDEX_SIZE.pack(len(index)) + index]
            total_size = len(body[0]) + size

            def stream(body: list = body, items: list = pieces) -> Iterator[list]:
                yield body
                for (chunks, start), region, length, _ in items:
                    yield from _hashed(_batches(chunks, start, length), region.digest)

            answer = migration.client.post_stream(f"/migration/port-precopy?migration={migration.id}", stream(),
                                                  total_size, migration.left())
            capacities = answer.get("capacities") if isinstance(answer, dict) else None
            if answer.get("held") != len(entries) or not isinstance(capacities, list) or len(capacities) != len(
                    entries) or not all(whole_number(c) for c in capacities):
                raise MigrationError(f"the destination took {answer!r:.200} of {len(entries)} pre-copy entries")
            for (_, region, length, plan), capacity in zip(pieces, capacities, strict=True):
                region.length += length
                region.capacity = min(region.capacity, capacity)
                by_session[plan.session_id].moved += length
            sent += size
    except (MigrationError, OSError) as err:
        log.warning("port pre-copy to %s failed, the ports' whole state goes through the clients: %s",
                    migration.client.address, err)
        for source in sources:
            source.port_precopies.clear()
        return sent
    for plan in plans:
        if any(region.length for region in plan.regions.values()):
            by_session[plan.session_id].port_precopies[plan.port.channel_id] = plan
    return sent


def _settled(round_no: int, size: int) -> bool:
    """Whether a round ``round_no`` of ``size`` bytes is left to MIGRATE_DATA (the first goes
    whatever its size)."""
    return not size or (round_no > 0 and size < PRECOPY_SETTLED)


def _next_round(plans: list[PortPrecopy]) -> tuple[list[dict], list[tuple], int]:
    """What the next round carries: its index entries, each entry's bytes (the queue's chunks as
    they are now, and where in the first its bytes begin) with the region they extend, and their
    total. A region that cannot extend starts afresh."""
    entries: list[dict] = []
    pieces: list[tuple] = []
    size = 0
    for plan in plans:
        for direction in DIRECTIONS:
            offset, length = plan.due(direction)
            if not length:
                continue
            region = plan.regions[direction]
            queue, queued, total = _queue(plan.port, direction)
            chunks = list(queue)  # the device may consume and the client add while the round is sent
            if offset != region.end or not region.length:
                region.restart(offset)
            entries.append({"session_id": session_label(plan.session_id), "port": plan.port.channel_id,
                            "dir": direction, "offset": offset, "length": length, "capacity": region.capacity,
                            "digest": region.kind})
            pieces.append(((chunks, offset - (total - queued)), region, length, plan))
            size += length
    return entries, pieces, size


# --- s2 ------------------------------------------------------------------------------------------


@dataclass
class HeldRegion:
    """s2: one direction of one port's pre-copied bytes, in segments of memory faulted in ahead,
    filled front to back; at most ``capacity`` bytes."""

    capacity: int
    kind: str  # the digest's name in DIGESTS, as s1 named it
    segments: list[np.ndarray] = field(default_factory=list)
    start: int = 0
    length: int = 0
    later_round: int = 0  # the most an entry after the region's first carried (tail_room)
    digest: Any = field(init=False)

    def __post_init__(self) -> None:
        self.digest = DIGESTS[self.kind]()

    def restart(self, offset: int) -> None:
        """The region starts again at stream offset ``offset``, empty (its segments stay)."""
        self.start, self.length, self.digest = offset, 0, DIGESTS[self.kind]()

    @property
    def allocated(self) -> int:
        return sum(len(segment) for segment in self.segments)

    def slices(self, begin: int, end: int) -> list[np.ndarray]:
        """The segment slices that hold bytes ``begin`` to ``end`` of the region, in order."""
        out, base = [], 0
        for segment in self.segments:
            low, high = max(begin, base), min(end, base + len(segment))
            if low < high:
                out.append(segment[low - base:high - base])
            base += len(segment)
        return out

    def views(self, skip: int) -> list[memoryview]:
        return [piece.data for piece in self.slices(skip, self.length)]


def tail_room(most: int, regions: list[HeldRegion]) -> int:
    """The memory s2 faults in for the tail of a port whose pre-copy holds ``regions`` (at most
    ``most``): twice the largest later rounds of its two directions, at least TAIL_ROOM_MIN."""
    return min(most, max(TAIL_ROOM_MIN, 2 * sum(region.later_round for region in regions)))


class PrecopyNoRoom(MigrationError):
    """s2's memory budget cannot hold more of a pre-copy: the round is refused. ``unread``: the
    bytes of its body not read yet (discard_body)."""

    unread = 0


def discard_body(stream: Any, n: int) -> None:
    """Read ``n`` bytes of a pre-copy body and drop them: the rest of a refused round, so that s1
    hears the refusal rather than a reset while it still sends."""
    reader = _reader(stream)
    scratch = memoryview(bytearray(min(n, RECEIVE_READ)))
    while n:
        got = reader.readinto(scratch[:min(n, len(scratch))])
        if not got:
            raise ValueError(f"the pre-copy body ended {n} bytes early")
        n -= got


class PrecopyMismatch(MigrationError):
    """What s2 holds is not what s1's MIGRATE_DATA says it sent: nothing is restored from it."""


def restore_precopy(ann: Announcement, channel_id: int, data: mig.PortMigrateData) -> tuple[list, list]:
    """The queues of a port restored from an SWPD version 2: the pre-copied bytes still queued,
    then those MIGRATE_DATA carried, per direction. PrecopyMismatch if s2 does not hold exactly
    what the reference names."""
    assert data.precopy is not None
    out = []
    for direction, ref, tail in (("to_device", data.precopy.to_device, data.pending),
                                 ("to_client", data.precopy.to_client, data.to_client)):
        held = ann.precopied.get((channel_id, direction))
        if not ref.length:
            out.append(list(tail))
            continue
        if held is None or held.start != ref.start or held.length != ref.length:
            what = "nothing" if held is None else f"{held.length} bytes from {held.start}"
            raise PrecopyMismatch(f"port {channel_id} {direction}: MIGRATE_DATA names {ref.length} pre-copied bytes "
                                  f"from {ref.start}, this server holds {what}")
        if reference_digest(held.digest) != ref.digest:
            raise PrecopyMismatch(f"port {channel_id} {direction}: the pre-copied bytes' digest ({held.kind}) does "
                                  "not match the one in MIGRATE_DATA; nothing is restored from them")
        out.append([*held.views(ref.skip), *tail])
    return out[0], out[1]


def receive_port_precopy(manager: Any, migration_id: str, stream: Any, size: int) -> dict:
    """s2: one pre-copy round read from ``stream`` (``size`` bytes), each entry's bytes straight
    into its region. Every entry is checked before any byte is taken."""
    head = _read_exactly(stream, _INDEX_SIZE.size)
    (index_size,) = _INDEX_SIZE.unpack(head)
    if index_size > MAX_INDEX or _INDEX_SIZE.size + index_size > size:
        raise ValueError(f"a pre-copy index of {index_size} bytes in a body of {size}")
    entries = json.loads(_read_exactly(stream, index_size))
    if not isinstance(entries, list):
        raise TypeError("a pre-copy index is a list")
    targets = [_target(manager, migration_id, entry) for entry in entries]
    if _INDEX_SIZE.size + index_size + sum(target[4] for target in targets) != size:
        raise ValueError("the pre-copy entries do not add up to the body's size")
    capacities: list[int] = []
    taken = _INDEX_SIZE.size + index_size  # of the body's bytes, so far
    for ann, key, offset, capacity, length, kind in targets:
        held = ann.precopied.get(key)
        if held is None:
            held = ann.precopied[key] = HeldRegion(capacity, kind)
        if kind != held.kind:
            raise ValueError(f"a pre-copy entry hashed with {kind} for a region hashed with {held.kind}")
        if not held.length or offset != held.start + held.length:
            if held.length and offset < held.start + held.length:
                raise ValueError(f"a pre-copy entry at {offset} overlaps the {held.length} bytes held "
                                 f"from {held.start}")
            held.restart(offset)
        at = held.length
        if at + length > held.capacity:
            raise ValueError(f"a pre-copy entry of {length} bytes does not fit the region's {held.capacity - at} "
                             "left")
        try:
            _grow(manager, ann, key, held, at + length)
        except PrecopyNoRoom as err:
            err.unread = size - taken
            raise
        digest = held.digest.copy()  # kept only once the entry is whole
        for piece in held.slices(at, at + length):
            _receive_hashed(stream, piece, digest)
        taken += length
        held.length, held.digest = at + length, digest
        if at:
            held.later_round = max(held.later_round, length)
        capacities.append(held.capacity)
    return {"held": len(targets), "capacities": capacities}


def _grow(manager: Any, ann: Announcement, key: tuple[int, str], held: HeldRegion, size: int) -> None:
    """Memory faulted in for ``size`` bytes of a region. Its first segment, for client->device
    bytes, is the buffer the announcement faulted in for the port's MIGRATE_DATA (which now carries
    only the tail); more come as rounds need them, at least SEGMENT each, faulted in by a worker
    thread off the hub, never past the region's capacity. Each is held in the memory budget until
    the announcement ends (MigrationManager.hold_for): one the budget has no room for refuses the
    round (PrecopyNoRoom), and the ports' state goes through the client."""
    pool = gevent.get_hub().threadpool
    if not held.segments and key[1] == "to_device" and (job := ann.buffers.pop(key[0], None)) is not None:
        buffer = job.get()
        if buffer is not None:
            held.segments.append(buffer[:held.capacity])
            # The MIGRATE_DATA, the tail now, still lands in memory faulted in ahead, so the
            # downtime pays for no page it touches; but between rounds, before the last one
            # (Announcement.tail_rooms, precopy_ports' ``prepare``). Faulted in beside the first
            # round, 64 MiB of it (0.1-0.2 s of CPU on a 2-core VM) took 1 GiB's pre-copy from a
            # median of 0.83x a direct socket copy to 0.67x (nine runs each).
            ann.tail_rooms[key[0]] = min(TAIL_ROOM, len(buffer))
    while held.allocated < size:
        segment = min(held.capacity - held.allocated, max(SEGMENT, size - held.allocated))
        if not manager.hold_for(ann, segment):
            if manager.announcements.get(ann.session_id) is not ann:  # hold_for holds nothing for it
                raise ValueError(f"session {session_label(ann.session_id)}'s migration ended here during its pre-copy")
            raise PrecopyNoRoom(f"session {session_label(ann.session_id)} port {key[0]} {key[1]}: no room in this "
                                f"server's memory budget for {segment} more bytes of pre-copy")
        held.segments.append(pool.apply(prefaulted, (segment,)))


def _target(manager: Any, migration_id: str,
            entry: Any) -> tuple[Announcement, tuple[int, str], int, int, int, str]:
    if not isinstance(entry, dict):
        raise TypeError("a pre-copy entry is an object")
    sid = parse_session_label(entry["session_id"])
    cid, direction = entry["port"], entry["dir"]
    offset, length, capacity = entry["offset"], entry["length"], entry["capacity"]
    kind = entry.get("digest", LEGACY_DIGEST)  # an s1 from before the choice names none
    if direction not in DIRECTIONS or not all(whole_number(v) for v in (cid, offset, length, capacity)) or not (
            isinstance(kind, str) and kind in DIGESTS):
        raise ValueError(f"bad pre-copy entry {entry!r:.200}")
    ann = manager.announcements.get(sid)
    if ann is None or ann.migration_id != migration_id or cid not in {p[0] for p in ann.ports}:
        raise ValueError(f"pre-copy for session {entry['session_id']} port {cid}, which this migration "
                         "did not announce")
    from spicewire.server.migration.destination import migrate_data_limit  # it imports this module

    # No more than a MIGRATE_DATA of the announced backlog could bring: s1 learns it in the answer.
    capacity = min(capacity, migrate_data_limit(ann.in_flight.get(cid, 0), manager.server.config.limits))
    return ann, (cid, direction), offset, capacity, length, kind


def _read_exactly(stream: Any, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise ValueError(f"the pre-copy body ended {n - len(data)} bytes early")
    return data


def _reader(stream: Any) -> Any:
    """What a pre-copy body's bytes are read from: the socket's reader under a WSGI input
    (gevent's Input copies through bytes; its reader reads into a buffer given)."""
    return getattr(stream, "rfile", stream)


def _receive_hashed(stream: Any, into: np.ndarray, digest: Any) -> None:
    """Read ``len(into)`` bytes straight into ``into`` (the socket's reader under a WSGI input),
    hashing each read as it lands, while it is still in the cache."""
    reader = _reader(stream)
    view = into.data
    pos, total = 0, len(into)
    turns = BulkTurns()
    while pos < total:
        n = reader.readinto(view[pos:min(total, pos + RECEIVE_READ)])
        if not n:
            raise ValueError(f"the pre-copy body ended {total - pos} bytes early")
        digest.update(view[pos:pos + n])
        pos += n
        turns.share(n)  # a socket that never runs dry would keep the hub (turns.py)
