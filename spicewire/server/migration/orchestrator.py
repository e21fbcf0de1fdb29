"""One server's migrations, as source and as destination: the announcements s2 accepts migrating
clients by, the device state s1 sends (the part of a VM migration QEMU would carry), and the whole
migration of every session for ``POST /migrate`` and ``spicewire migrate``.

Order, as QEMU's lessons demand: announce to s2, BEGIN every session, wait for every client's
answer, and only then stop the devices, move their state and start post-migration. A client that
could not reach s2 simply stays on s1, its devices running.
"""

from __future__ import annotations

import gc
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import numpy as np

from spicewire import codec, devices
from spicewire.addresses import Address
from spicewire.control.client import ControlClient, control_tls_context
from spicewire.errors import LocalProtocolError, MigrationError
from spicewire.logs import context, epoch_of, parse_session_label, session_label
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.protocol import state_auth
from spicewire.server import events
from spicewire.server.display import (
    DISPLAY_STATE_VERSION,
    DisplayState,
    GraphicsConnection,
    Precopy,
    ScreenUpdate,
    announce_screen,
    announced_screen,
    check_precopy,
    prepare_update,
    take_precopy,
)
from spicewire.server.migration.common import collector_paused, mode_label, prefaulted
from spicewire.server.migration.destination import (
    PREFAULT_BATCH,
    PREFAULT_MIN,
    Announcement,
    SessionDestination,
    prefault_room,
)
from spicewire.server.migration.precopy import DIGESTS, PIECE, PRECOPY_VERSION, precopy_ports
from spicewire.server.migration.source import SessionSource, pack_device_states
from spicewire.server.session import PortConnection, PortState, Session

if TYPE_CHECKING:
    from gevent.threadpool import ThreadPool

    from spicewire.server.net import SpiceServer

log = logging.getLogger(__name__)


LANDING_MARGIN = 0.5  # s
STATUS_TIMEOUT = 2.0  # for one "have they landed?" request to s2
FIRST_ASK_WITHIN = 0.05  # s: s1 asks s2 once every client left s1, or this long after the switch began
UNREACHABLE_TRIES = 3  # consecutive refused status requests after which s2 counts as gone
MAX_ANNOUNCED = 10_000  # sessions announced here and not yet landed, failed or expired, all migrations together
# Bytes prefaulted for announced backlogs at once; past it, buffers come as data does. None: the
# server's memory budget, which bounds what it may hold anyway. A fixed 1 GiB here left a 1 GiB
# backlog unprefaulted, and s2 then faulted its pages in during the downtime (~2 ms per MiB).
PREFAULT_BUDGET: int | None = None
PREPARED_WAIT = 10.0
"""Seconds s1 waits, before the port pre-copy and again before it stops the devices, for s2 to
have faulted in the memory the big MIGRATE_DATA bodies land in (``/migration/prepared``). Without
pre-copy the pre-migration is a few ms and a 512 MiB prefault some 150 ms: s2 then waited for its
tail inside the downtime, the page faults sharing the two cores with the relay; with it, the first
round waited for the prefault the same way. Past it the migration goes on, and the bytes land in
whatever is faulted in by then."""
PREPARED_WAIT_MAX = 60.0  # s2 holds a /migration/prepared request this long at most
MAX_REMEMBERED = 2 * MAX_ANNOUNCED  # sessions whose migration here ended and whose outcome s2 still answers for


class MigrationBusy(MigrationError):
    """A ``/migrate`` while another runs on this server: two would BEGIN the same clients twice."""


class UnknownMigration(MigrationError):
    """A server-to-server call names a migration that has no announced sessions here (a caller
    that does not know the id is not the source that announced it)."""


def _not_reported(sources: list[SessionSource], landed: dict, why: str) -> dict:
    """``landed``, and every other session of ``sources`` failed for ``why``."""
    waiting = (session_label(s.session.id) for s in sources)
    return {sid: {"failed": why} for sid in waiting if sid not in landed} | landed


def _landing(entry: object) -> bool:
    """One session in s2's ``/migration/completed`` answer: ``{"failed": why}``, or its report
    with the mode and when it completed (which the downtime is measured to)."""
    if not isinstance(entry, dict):
        return False
    if "failed" in entry:
        return True
    times = entry.get("times")
    if not (isinstance(entry.get("mode"), str) and isinstance(times, dict) and isinstance(times.get("completed"), str)):
        return False
    try:
        epoch_of(times["completed"])
    except ValueError:
        return False
    return True


class Peer:
    """s2 as one migration sees it: its control API, the migration's id, and when time is up."""

    def __init__(self, client: ControlClient, migration_id: str, end: float) -> None:
        self.client, self.id, self.end = client, migration_id, end
        # The key s2 checks every MIGRATE_DATA's MAC with (state_auth), given in the announcement:
        # fresh for each attempt, so the one-time keys derived from it serve this attempt only.
        self.state_key = state_auth.MigrationKey.fresh()
        self.features: dict = {}  # what s2 said it takes beyond the baseline, in its answer to it
        self.precopied = 0  # queued port bytes sent to s2 before the switch
        self.precopy_s = 0.0  # the time its rounds took, the sessions running meanwhile
        self.prepare_s = 0.0  # the wait between them for s2 to fault in what the tails land in

    def left(self) -> float:
        """What is left of the migration's time, for the next call; none left is a failure."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise MigrationError(f"the migration's time ran out before a call to {self.client.address}")
        return left


PRECOPY_BATCH = 64 << 20  # pictures per pre-copy request, at most (one session's may be more)


def precopy_batches(sources: list[SessionSource]) -> list[list[SessionSource]]:
    """Sessions grouped so each pre-copy request carries about PRECOPY_BATCH bytes of pictures:
    s2 holds a request's body whole, and a server of big screens must not need it all at once."""
    batches: list[list[SessionSource]] = []
    size = 0
    for source in sources:
        display = source.session.display
        need = 2 * display.screen.framebuffer.nbytes if display is not None else 0
        if not batches or size + need > PRECOPY_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(source)
        size += need
    return batches


def _prefault_batch(pool: ThreadPool, wanted: list[tuple[gevent.event.AsyncResult[np.ndarray], int]]) -> None:
    """Fault in the buffers ``wanted`` (each result gets a buffer of its size) in one worker-thread
    job: a job each would cost the hub more than the faulting, and spawn waits for a free thread."""

    def deliver(job: gevent.event.AsyncResult[list[np.ndarray]]) -> None:
        buffers = job.get() if job.successful() else None
        if buffers is not None:
            for (result, _), buffer in zip(wanted, buffers, strict=True):
                result.set(buffer)
        else:  # each port's MIGRATE_DATA gets fresh memory when it comes (take_buffer)
            for result, _ in wanted:
                result.set_exception(job.exception or RuntimeError("the prefault job returned nothing"))

    pool.spawn(_prefaulted_each, [room for _, room in wanted]).rawlink(deliver)


def _prefaulted_each(sizes: list[int]) -> list[np.ndarray]:
    return [prefaulted(size) for size in sizes]


class MigrationManager:
    """One server's migrations, as source and as destination."""

    def __init__(self, server: SpiceServer) -> None:
        self.server = server
        self.seamless_enabled = True
        self.announcements: dict[int, Announcement] = {}
        self.completed: dict[int, dict] = {}  # session id -> its last destination report
        self.failed: dict[int, str] = {}  # session id -> why its migration here broke off
        self.migration_of: dict[int, str] = {}  # session id -> the migration that last announced it
        self._sweeper: gevent.Greenlet | None = None
        self._migrating: str | None = None  # the id of the /migrate running here as source
        # Bytes prefaulted (or being prefaulted) for the live announcements, counted as they come
        # and go: a sum over them for each port made an announcement of N sessions cost N^2 steps.
        self._prefaulted = 0

    # --- destination -------------------------------------------------------------------------

    def features(self, state_key: bool, offered_auth: object = None, offered_display: object = None) -> dict:
        """What an announcement's answer tells s1 this server takes: MAC-checked MIGRATE_DATA
        (with the key it was given, in the state_auth version agreed from s1's offer
        ``offered_auth``), the display's record in the device state (DISPLAY_STATE_VERSION, when
        s1 offered it), and port pre-copies (unless ``--no-precopy``) with the digests they may be
        checked with."""
        return {**({"state_auth": state_auth.negotiate(offered_auth)} if state_key else {}),
                **({"display_state": DISPLAY_STATE_VERSION} if offered_display == DISPLAY_STATE_VERSION else {}),
                **({"port_precopy": PRECOPY_VERSION, "port_precopy_digests": list(DIGESTS)}
                   if self.server.config.precopy else {}),
                "prepared": 1}

    def prepared(self, migration_id: str, wait: float) -> bool:
        """Whether the landing buffers of every session the migration ``migration_id`` announced
        here are faulted in, once they are or ``wait`` seconds passed (s1 asks before the port
        pre-copy, and before its last round or the stop: PREPARED_WAIT). The tail rooms the port
        pre-copies left owed are faulted in now."""
        announced = [ann for ann in self.announcements.values() if ann.migration_id == migration_id]
        for ann in announced:
            ann.fault_in_tail_rooms(self.hold_for)
        jobs = [job for ann in announced for job in ann.buffers.values()]
        pending = [job for job in jobs if not job.ready()]
        if pending:
            gevent.wait(pending, timeout=wait)
        return all(job.ready() for job in jobs)

    def announce(self, migration_id: str, sessions: list[dict], ttl: float, state_key: bytes | None = None,
                 offered_auth: object = None, offered_display: object = None) -> int:
        """Expect ``sessions`` (``session_id`` as a number) in the migration ``migration_id``, for
        ``ttl`` seconds at most; with ``state_key`` their MIGRATE_DATA must carry its MAC, in the
        state_auth version agreed from s1's offer ``offered_auth``. Every
        entry is checked before any is registered: a refused announcement leaves nothing behind."""
        self.sweep()
        renewed = sum(1 for e in sessions if getattr(self.announcements.get(int(e["session_id"])), "migration_id",
                                                     None) == migration_id)
        if len(self.announcements) - renewed + len(sessions) > MAX_ANNOUNCED:
            raise MigrationError(f"{len(self.announcements)} sessions are announced here already; {len(sessions)} "
                                 f"more would pass the limit of {MAX_ANNOUNCED}: retry later")
        seen: set[int] = set()
        for entry in sessions:
            sid = int(entry["session_id"])
            if sid == 0 or sid in self.server.sessions:
                raise MigrationError(f"session {sid:08x} cannot migrate here: it is in use")
            other = self.announcements.get(sid)
            if other is not None and other.migration_id != migration_id:
                raise MigrationError(f"session {sid:08x} cannot migrate here: another migration announced it")
            if sid in seen:
                raise ValueError(f"session {sid:08x} is announced twice")
            seen.add(sid)
            for port in entry["ports"]:
                devices.factory(str(port[2]))  # unknown kinds fail the announcement, not the migration
            if entry.get("display") is not None:
                announced_screen(entry["display"])
        expires = time.monotonic() + ttl
        pool = gevent.get_hub().threadpool
        batch: list[tuple[gevent.event.AsyncResult[np.ndarray], int]] = []  # small backlogs' buffers, one job's worth
        batched = 0
        for entry in sessions:
            sid = int(entry["session_id"])
            self.end_announcement(sid)  # the same migration announcing again starts it afresh
            ports = [(int(p[0]), str(p[1]), str(p[2])) for p in entry["ports"]]
            in_flight = {int(p[0]): int(p[3]) if len(p) > 3 else 0 for p in entry["ports"]}
            ann = self.announcements[sid] = Announcement(sid, ports, expires, migration_id, in_flight,
                                                         ticket=entry.get("ticket"), client=entry.get("client"))
            ann.state_key = (state_auth.MigrationKey(state_key, state_auth.negotiate(offered_auth))
                             if state_key is not None else None)
            if entry.get("display") is not None:
                ann.display = DisplayState(announced_screen(entry["display"])(), self.server.config.display_options)
                ann.display.stop()  # it runs once the session has landed here
                ann.display_direct = offered_display == DISPLAY_STATE_VERSION
            self.migration_of.pop(sid, None)  # to the end of the order: the newest are kept longest
            self.migration_of[sid] = migration_id
            self.completed.pop(sid, None)  # an earlier visit's report must not answer for this one
            self.failed.pop(sid, None)
            for cid, size in in_flight.items():
                room = prefault_room(size)
                # Only what fits the budget: a big (or lying) announcement must not hold memory
                # the real transfers need; beyond it MIGRATE_DATA gets its buffer when it arrives.
                if room and self.hold_for(ann, room):
                    if size >= PREFAULT_MIN:
                        ann.buffers[cid] = pool.spawn(prefaulted, room)
                    else:
                        buffer: gevent.event.AsyncResult[np.ndarray] = gevent.event.AsyncResult()
                        ann.buffers[cid] = buffer
                        batch.append((buffer, room))
                        batched += room
                        if batched >= PREFAULT_BATCH:
                            _prefault_batch(pool, batch)
                            batch, batched = [], 0
        if batch:
            _prefault_batch(pool, batch)
        # The sessions' objects, hundreds of thousands in a big server, are not garbage: each full
        # collection while the migrations run would walk them all again (tens of ms each).
        gc.freeze()
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_until_empty)
        self._forget_oldest()
        return len(sessions)

    def _forget_oldest(self) -> None:
        """What this server remembers of migrations here (each session's migration id, report or
        failure) is bounded like the announcements: the oldest go first. The live ones are the
        newest, and s1 asks about a migration only within its time."""
        for record in (self.migration_of, self.completed, self.failed):
            while len(record) > MAX_REMEMBERED:
                del record[next(iter(record))]

    def hold_for(self, ann: Announcement, size: int) -> bool:
        """Whether ``size`` more bytes of memory for ``ann``'s migration fit PREFAULT_BUDGET and the
        server's memory budget. If they do, they are reserved until the announcement ends
        (end_announcement): its prefault, the pre-copy's regions, the tail rooms."""
        if self.announcements.get(ann.session_id) is not ann:
            return False  # it ended (end_announcement released what it held): nothing more is held for it
        memory = self.server.budget
        budget = PREFAULT_BUDGET if PREFAULT_BUDGET is not None else memory.limit
        if not memory.admits(size) or self._prefaulted + size > budget:  # admits counts a refusal
            return False
        memory.reserve(size)
        ann.prefaulted += size
        self._prefaulted += size
        return True

    @property
    def prefaulted(self) -> int:
        """Bytes prefaulted (or being prefaulted) for the live announcements."""
        return self._prefaulted

    def end_announcement(self, session_id: int) -> None:
        """The session's migration here is over (it completed, failed, or was aborted)."""
        ann = self.announcements.pop(session_id, None)
        if ann is not None:
            self.server.budget.release(ann.prefaulted)
            self._prefaulted -= ann.prefaulted
            ann.prefaulted = 0
            ann.release()
            if not self.announcements:
                gc.unfreeze()  # the last migration here ended: its objects may become garbage again
        sweeper = self._sweeper
        if not self.announcements and sweeper is not None and sweeper is not gevent.getcurrent():
            sweeper.kill(block=False)  # nothing left to expire: it would only keep this server alive
            self._sweeper = None

    def sweep(self) -> None:
        """End the announcements whose time is up, with whatever arrived of their sessions."""
        now = time.monotonic()
        for sid in [sid for sid, ann in self.announcements.items() if now > ann.expires]:
            log.info("session %08x: its announcement expired", sid, extra=context(sid))
            self._drop(sid, "the announcement expired before the migration completed")

    def _sweep_until_empty(self) -> None:
        try:
            while self.announcements:
                soonest = min(ann.expires for ann in self.announcements.values())
                gevent.sleep(max(0.0, soonest - time.monotonic()) + 0.01)
                self.sweep()
        finally:
            if self._sweeper is gevent.getcurrent():  # a later one may have taken over already
                self._sweeper = None

    def in_progress(self, migration_id: str) -> bool:
        """Whether a migration of that id has announced sessions here that have not ended yet."""
        self.sweep()
        return any(ann.migration_id == migration_id for ann in self.announcements.values())

    def expects(self, session_id: int) -> bool:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return False
        if time.monotonic() > ann.expires:
            del self.announcements[session_id]
            return False
        return True

    def claim_target(self, session_id: int, host: str, any_address: bool) -> str | None:
        """A migration target link (MAIN, connection_id = ``session_id``) from ``host`` passed its
        ticket: None if it may become the session (and no later one may), else why not. Only the
        client host s1 announced, unless ``any_address`` (clients behind a changing NAT)."""
        if not self.expects(session_id):
            return "no migration announced this session"
        ann = self.announcements[session_id]
        if ann.target_claimed:
            return "the session's target link was taken already"
        if not any_address and ann.client is not None and ann.client != host:
            return f"the source announced the session's client at another host, not {host}"
        ann.target_claimed = True
        return None

    def ticket(self, session_id: int) -> str | None:
        """The ticket a live announcement of this session carries (its channels may link with it)."""
        ann = self.announcements.get(session_id)
        if ann is None or time.monotonic() > ann.expires:
            return None
        return ann.ticket

    def arriving_session(self, session_id: int) -> Session | None:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return None
        limits, budget = self.server.config.limits, self.server.budget
        session = Session(
            id=session_id,
            ports={cid: PortState(cid, name, devices.factory(kind)(), limits, budget, self.server.let_go)
                   for cid, name, kind in ann.ports},
        )
        for cid, chunks in ann.device_state.items():
            session.ports[cid].device.restore(chunks)
        for port in session.ports.values():
            port.hold()  # until the migration completes (SessionDestination._completed)
        session.display = ann.display
        ann.session = session
        session.migration = SessionDestination(self, session)
        return session

    def arriving_main_linked(self, session: Session) -> None:
        if not isinstance(session.migration, SessionDestination):
            raise LocalProtocolError(f"session {session.id:08x} is not arriving here")
        session.migration.main_linked()

    def port_linked(self, session: Session, handler: PortConnection | GraphicsConnection) -> None:
        if isinstance(session.migration, SessionDestination):
            session.migration.port_linked(handler)
        elif isinstance(session.migration, SessionSource):
            session.migration.channel_linked(handler)

    def receive_device_states(self, migration_id: str, body: bytes | bytearray | memoryview) -> dict:
        """The saved devices of sessions announced in ``migration_id`` (``pack_device_states``).

        A batch whose shape is wrong (an index that promises chunks the body lacks, ...) is refused
        whole. An entry for a session this migration did not announce, or has no such port, is
        skipped and named in the answer: nothing outside the migration is touched."""
        if not self.in_progress(migration_id):
            raise UnknownMigration(f"no migration {migration_id} in progress here")
        chunks = codec.unpack_chunks(body)
        index = json.loads(bytes(chunks[0]))
        if not isinstance(index, list):
            raise TypeError(f"the device state index is a {type(index).__name__}, not a list")
        # Every entry is checked before any is used: a device never restores from chunks its
        # index only promised.
        plan, pos = [], 1
        skipped: list[dict] = []
        screens: list[ScreenUpdate] = []
        for entry in index:
            if not isinstance(entry, dict):
                raise TypeError(f"a device state index entry is a {type(entry).__name__}, not an object")
            if entry.get("display"):
                pos = self._plan_display(migration_id, entry, chunks, pos, screens, skipped)
                continue
            text, cid, count = entry["session_id"], entry["port"], entry["chunks"]
            try:
                sid = parse_session_label(text)
            except ValueError:
                raise ValueError(f"bad session id {text!r:.40} in the device state index") from None
            if not (devices.whole_number(cid) and devices.whole_number(count)):
                raise ValueError(f"bad port {cid!r:.20} or chunk count {count!r:.20} in the device state index")
            if pos + count > len(chunks):
                raise MigrationError(f"device state index promises {count} chunks at {pos}; there are {len(chunks)}")
            in_flight = entry.get("in_flight", 0)
            if not devices.whole_number(in_flight):
                raise ValueError(f"bad in_flight {in_flight!r:.20} in the device state index")
            saved, pos = chunks[pos : pos + count], pos + count
            ann = self.announcements.get(sid)
            if ann is None or ann.migration_id != migration_id:
                skipped.append({"session_id": text, "port": cid, "reason": "not announced in this migration"})
            elif cid not in {port[0] for port in ann.ports}:
                skipped.append({"session_id": text, "port": cid, "reason": "no such port announced"})
            else:
                state = [bytes(c) for c in saved]
                kind = next(port[2] for port in ann.ports if port[0] == cid)
                devices.factory(kind)().restore(state)  # raises for a state the device cannot take
                plan.append((ann, cid, state, in_flight))
        if pos != len(chunks):
            raise MigrationError(f"device state body holds {len(chunks) - pos} chunks no index entry names")
        for update in screens:
            update.apply()
        for ann, cid, state, in_flight in plan:
            ann.device_state[cid] = state
            ann.in_flight[cid] = max(ann.in_flight.get(cid, 0), in_flight)
            if ann.session is not None:
                ann.session.ports[cid].device.restore(state)
                if isinstance(ann.session.migration, SessionDestination):
                    ann.session.migration.in_flight_reported(cid)
        return {"restored": len(plan) + len(screens), "skipped": skipped}

    def _plan_display(self, migration_id: str, entry: dict, chunks: list[memoryview], pos: int,
                      screens: list[ScreenUpdate], skipped: list[dict]) -> int:
        """One session's screen in a device-state batch: its own state and the tiles changed since
        the pre-copy. Checked here; applied with the rest once the whole batch is."""
        text, count, screen_chunks = entry["session_id"], entry["chunks"], entry["screen_chunks"]
        record = entry.get("channel") is True  # the display channel's record follows (DISPLAY_STATE_VERSION)
        whole = devices.whole_number(count) and devices.whole_number(screen_chunks)
        if not whole or count != screen_chunks + 4 + record:
            raise ValueError(f"bad chunk counts {count!r:.20}/{screen_chunks!r:.20} for a screen")
        if pos + count > len(chunks):
            raise MigrationError(f"device state index promises {count} chunks at {pos}; there are {len(chunks)}")
        ann = self.announcements.get(parse_session_label(text))
        if ann is None or ann.migration_id != migration_id or ann.display is None:
            skipped.append({"session_id": text, "display": True, "reason": "no screen announced in this migration"})
        else:
            saved = chunks[pos:pos + count]
            screens.append(prepare_update(ann.display, saved[:screen_chunks], saved[screen_chunks:screen_chunks + 4],
                                          saved[-1] if record else None))
        return pos + count

    def receive_display_precopy(self, migration_id: str, body: bytes | bytearray | memoryview) -> dict:
        """The pictures of sessions ``migration_id`` announced, sent during pre-migration while
        their screens still run (``pack_display_precopy``): at the stop only what changed since
        follows, with the device state."""
        if not self.in_progress(migration_id):
            raise UnknownMigration(f"no migration {migration_id} in progress here")
        chunks = codec.unpack_chunks(body)
        index = json.loads(bytes(chunks[0]))
        if not isinstance(index, list) or len(chunks) != 1 + 2 * len(index):
            raise ValueError("a display pre-copy has an index and two surfaces per session")
        taken: list[tuple[DisplayState, int]] = []
        skipped: list[str] = []
        for i, text in enumerate(index):  # all checked first: a refused batch changes no screen
            ann = self.announcements.get(parse_session_label(text))
            if ann is None or ann.migration_id != migration_id or ann.display is None:
                skipped.append(text)
                continue
            check_precopy(ann.display, chunks[1 + 2 * i], chunks[2 + 2 * i])
            taken.append((ann.display, i))
        for display, i in taken:
            take_precopy(display, chunks[1 + 2 * i], chunks[2 + 2 * i])
        return {"taken": len(taken), "skipped": skipped}

    def session_ended(self, session: Session) -> None:
        if isinstance(session.migration, SessionSource):
            session.migration.client_gone()
        elif isinstance(session.migration, SessionDestination):
            log.warning("session %08x: the client left before its migration here completed", session.id,
                        extra=context(session.id))
            self.server.metrics.migration("destination", None, "failed")
            self.failed.setdefault(session.id, "the client left the destination before the migration completed")
            session.migration.release()
        ann = self.announcements.get(session.id)
        if ann is not None and ann.session is session:
            self.end_announcement(session.id)

    def abort(self, migration_id: str, session_ids: list[int]) -> int:
        """s1 took these sessions of its migration back: end what exists of them here, forget their
        announcements. Sessions the migration did not announce are left alone."""
        if not self.in_progress(migration_id):
            raise UnknownMigration(f"no migration {migration_id} in progress here")
        aborted = 0
        for sid in session_ids:
            ann = self.announcements.get(sid)
            if ann is not None and ann.migration_id == migration_id:
                aborted += self._drop(sid, "aborted by the source")
        return aborted

    def _drop(self, sid: int, reason: str) -> int:
        """End an announcement and whatever arrived of its session; 1 if a session was ended."""
        ann = self.announcements.get(sid)
        session = ann.session if ann is not None else None
        self.end_announcement(sid)
        if session is None or not isinstance(session.migration, SessionDestination):
            return 0
        self.failed[sid] = reason
        log.info("session %08x: %s; dropping it here", sid, reason, extra=context(sid))
        self.server.metrics.migration("destination", None, "aborted")
        self.server.events.emit(events.MIGRATION_ROLLED_BACK, session_id=session_label(sid), role="destination",
                                client=session.client)
        session.close_ports(reason)
        if session.main is not None:
            session.main.transport.close(reason)
        session.migration.release()
        return 1

    # --- source: the whole migration ---------------------------------------------------------

    def migrate(
        self, to: tuple[str, int], to_control: tuple[str, int], mode: mig.MigrationMode, timeout: float = 30.0,
        to_token: str | None = None, *, to_tls_port: int = 0, to_cert_subject: str | None = None,
        to_control_tls: bool = False, to_peer_token: str | None = None,
    ) -> dict:
        """Migrate every session to ``to``; returns the report ``spicewire migrate`` prints.

        ``to_tls_port`` and ``to_cert_subject`` tell clients s2's TLS port (``to``'s port 0: it
        has no other) and the subject its certificate must have (None: its host name). With
        ``to_control_tls`` s2's control API is reached over HTTPS, verified against this server's
        CA (its x509 directory's ca-cert.pem). Every call to s2 carries ``to_peer_token``, else
        ``to_token``: s2 takes ``/migration/*`` only from a peer that knows its secret. One
        migration runs at a time; another meanwhile is a MigrationBusy.

        Phases, in order: announce to s2, pre-migration (BEGIN, every client's answer), the device
        state, the switch, the landing. Whatever fails in any of them, and however, no session is
        left half migrated here (``_undo``): a later migration finds every session as it was."""
        if self._migrating is not None:
            raise MigrationBusy(f"migration {self._migrating} is running on this server; one at a time")
        migration_id = secrets.token_hex(8)
        self._migrating = migration_id
        # Every object now alive outlives the migration (or goes when its session leaves): full
        # collections in the middle of it would walk them all, tens of ms each in a big server.
        gc.freeze()
        try:
            return self._migrate(migration_id, to, to_control, mode, timeout, to_peer_token or to_token,
                                 to_tls_port, to_cert_subject, to_control_tls)
        finally:
            self._migrating = None
            gc.unfreeze()

    def _migrate(
        self, migration_id: str, to: tuple[str, int], to_control: tuple[str, int], mode: mig.MigrationMode,
        timeout: float, peer_token: str | None, to_tls_port: int, to_cert_subject: str | None,
        to_control_tls: bool,
    ) -> dict:
        started, end = time.time(), time.monotonic() + timeout
        sessions = [s for s in self.server.sessions.values() if s.main is not None and s.migration is None]
        # Every call to s2 names the migration: s2 takes device state and aborts only with it.
        tls = control_tls_context(self.server.config.x509_dir) if to_control_tls else None
        migration = Peer(ControlClient(*to_control, token=peer_token, tls=tls), migration_id, end)
        dst = m.MigrationDstInfo(port=to[1], sport=to_tls_port, host=to[0], cert_subject=to_cert_subject or None)
        peer = migration.client
        target = f"{Address(*to)} (control {peer.address})"
        log.info("migration %s: %d sessions to %s, %s", migration.id, len(sessions), target, mode_label(mode))
        for session in sessions:
            self.server.events.emit(events.MIGRATION_STARTED, session_id=session_label(session.id),
                                    mode=mode_label(mode), to=str(Address(*to)))
        sources: list[SessionSource] = []  # filled as they are made, so a failure finds them all
        try:
            self._announce(migration, sessions, timeout)
            display_direct = migration.features.get("display_state") == DISPLAY_STATE_VERSION
            ready, switch_host = self._pre_migrate(sessions, sources, dst, mode, end, display_direct)
            ready = self._precopy_displays(migration, ready)
            # The pre-copy lands in the announced buffers too and takes them over for its
            # regions; it asks again before its last round, when s2 faults in what the tails
            # will land in. Without a pre-copy, s1 asks again here, before the stop.
            self._await_landing_memory(migration, ready)
            if not self._precopy_ports(migration, ready):
                self._await_landing_memory(migration, ready)
            pre_migration = time.time() - started
            ready, moved_devices = self._move_device_states(migration, ready)
            # The switch makes a burst of short-lived objects (every channel's MIGRATE, FLUSH_MARK,
            # MIGRATE_DATA, and the sessions that leave); collected as it ends, not in its middle.
            with collector_paused():
                for source in ready:
                    source.finish()
                for source in switch_host:
                    source.finish(switch_host=True)
                landed = self._land(migration, ready, end)
        except BaseException as err:
            reason = f"the migration failed: {type(err).__name__}: {err}"
            for source in sources:
                self._undo(source, reason)
            # Also after a failed announcement: s2 may have taken it and lost or garbled its answer.
            if sessions and isinstance(err, Exception):
                self._forget_announced(migration, [session_label(s.id) for s in sessions])
            if isinstance(err, Exception):
                log.error("migration to %s failed, every session stays here: %s", target, err)
                for session in sessions:
                    self.server.metrics.migration("source", mode_label(mode), "failed")
                    self.server.events.emit(events.MIGRATION_FAILED, session_id=session_label(session.id),
                                            mode=mode_label(mode), to=str(Address(*to)), error=str(err))
            raise
        # Whatever did not move (stayed, rolled back, switched host) leaves no announcement on s2.
        self._forget_announced(migration, [session_label(s.id) for s in sessions if session_label(s.id) not in landed])
        report: dict = {"to": str(Address(*to)), "mode_requested": mode_label(mode), "migration_id": migration.id,
                        "sessions": []}
        if ready and len(landed) < len(ready):
            report["error"] = f"{len(ready) - len(landed)} sessions did not arrive on the destination in time"
        for source in sources:
            report["sessions"].append(self._session_report(source, landed.get(session_label(source.session.id))))
        report.update(
            pre_migration_s=round(pre_migration, 6),
            total_s=round(time.time() - started, 6),
            device_state_bytes=moved_devices,
            precopied_bytes=migration.precopied,
            precopy_s=round(migration.precopy_s, 6),
            prepare_s=round(migration.prepare_s, 6),
            state_auth=migration.state_key.version,  # None: an s2 from before the MAC checks none
            migrated=sum(1 for s in report["sessions"] if s["migrated"]),
            switched_host=sum(1 for s in report["sessions"] if s["mode"] == "switch-host"),
            lost=sum(1 for s in report["sessions"] if (s["error"] or "").startswith("lost")),
            rolled_back=sum(1 for s in report["sessions"] if (s["error"] or "").startswith("rolled back")),
            stayed=sum(1 for s in report["sessions"] if not s["migrated"] and s["mode"] != "switch-host"
                       and not (s["error"] or "").startswith("lost")),
        )
        for entry in report["sessions"]:
            self._record(entry, mode, to)
        log.info(
            "migration to %s done in %.3f s: %d migrated, %d stayed (%d rolled back), %d switched host, %d lost; "
            "%d bytes of device state%s", target, report["total_s"], report["migrated"], report["stayed"],
            report["rolled_back"], report["switched_host"], report["lost"], moved_devices,
            f"; {report['error']}" if "error" in report else "",
        )
        return report

    def _record(self, entry: dict, mode: mig.MigrationMode, to: tuple[str, int]) -> None:
        """One session's outcome on s1: its log line, its metrics, its event."""
        sid, error = entry["session_id"], entry["error"] or ""
        result = ("migrated" if entry["migrated"] else "switched-host" if entry["mode"] == "switch-host"
                  else "rolled-back" if error.startswith("rolled back") else "lost" if error.startswith("lost")
                  else "stayed")
        mode_name = entry["mode"] or mode_label(mode)
        downtime = entry.get("downtime_s")
        fields = {"session_id": sid, "mode": mode_name, "result": result, "to": str(Address(*to)),
                  "downtime_s": downtime, "in_flight_bytes_moved": entry["in_flight_bytes_moved"],
                  "bytes_dropped": entry["bytes_dropped"], "error": entry["error"]}
        self.server.metrics.migration("source", mode_name, result, downtime)
        kind = {"migrated": events.MIGRATION_COMPLETED, "switched-host": events.MIGRATION_COMPLETED,
                "rolled-back": events.MIGRATION_ROLLED_BACK}.get(result, events.MIGRATION_FAILED)
        self.server.events.emit(kind, **fields)
        level = logging.INFO if result in ("migrated", "switched-host") else logging.WARNING
        log.log(
            level, "session %s migration to %s: %s, %s, downtime %s, %d bytes moved, %d dropped%s", sid,
            Address(*to), result, mode_name, "n/a" if downtime is None else f"{downtime * 1000:.3f} ms",
            entry["in_flight_bytes_moved"], entry["bytes_dropped"], f": {error}" if error else "",
            extra={"session": sid},
        )

    @staticmethod
    def _await_landing_memory(migration: Peer, ready: list[SessionSource]) -> None:
        """While the ``ready`` sessions still run: wait up to PREPARED_WAIT for s2 to have faulted
        in the memory their big MIGRATE_DATA bodies (or port pre-copies) land in, so neither the
        downtime nor the pre-copy waits for those page faults or shares the cores with them. An
        s2 that does not offer ``prepared`` is not asked; one that does not answer, or a migration
        out of time, is the later calls' concern."""
        wait = min(PREPARED_WAIT, migration.end - time.monotonic())
        if not ready or wait <= 0 or migration.features.get("prepared") != 1:
            return
        try:
            answer = migration.client.get_json(f"/migration/prepared?migration={migration.id}&wait={wait:.3f}",
                                               timeout=wait + STATUS_TIMEOUT)
        except (MigrationError, OSError) as err:
            log.warning("migration %s: cannot ask the destination whether its landing memory is ready: %s",
                        migration.id, err)
            return
        if not (isinstance(answer, dict) and answer.get("prepared") is True):
            log.info("migration %s: the destination's landing memory was not ready within %.1f s; switching anyway",
                     migration.id, wait)

    def _announce(self, migration: Peer, sessions: list[Session], timeout: float) -> None:
        peer = migration.client
        # Each session's ticket (what its client linked with) goes along, so a password that
        # expired or changed on s2 cannot strand the client halfway: s2 takes it for that
        # session's channels until the announcement ends.
        tickets = self.server.tickets
        hosts = self.server.client_hosts
        try:
            answer = peer.post_json("/migration/announce", {
                "migration": migration.id,
                "state_key": migration.state_key.secret.hex(),
                "state_auth": state_auth.VERSION,  # an s2 that speaks less answers the version it checks
                "display_state": DISPLAY_STATE_VERSION,  # an s2 that takes it says so in its answer
                "ttl": timeout + 60,
                "sessions": [{"session_id": session_label(s.id), "ports": [[cid, p.name, p.device.kind, p.in_flight]
                                                            for cid, p in s.ports.items()],
                              **({"display": announce_screen(s.display)} if s.display is not None else {}),
                              **({"ticket": tickets[s.id]} if tickets.get(s.id) else {}),
                              # Its target link on s2 is taken from this host only.
                              **({"client": hosts[s.id]} if hosts.get(s.id) else {})}
                             for s in sessions],
            }, timeout=migration.left())
        except OSError as err:
            raise MigrationError(f"cannot reach the destination's control API at {peer.address}: {err}") from None
        if not (isinstance(answer, dict) and answer.get("announced") == len(sessions)):
            # Not our s2 (or a broken one): nothing it says later could be trusted either.
            raise MigrationError(f"the destination's control API at {peer.address} did not take the announcement "
                                 f"of {len(sessions)} sessions; it answered {answer!r:.100}")
        # An older s2 answers {"announced": n} alone: then neither MACs nor pre-copies, as before.
        migration.features = answer

    def _pre_migrate(
        self, sessions: list[Session], sources: list[SessionSource], dst: m.MigrationDstInfo,
        mode: mig.MigrationMode, end: float, display_direct: bool = False,
    ) -> tuple[list[SessionSource], list[SessionSource]]:
        """BEGIN every session and wait for every client's answer, until ``end`` at most; returns
        the sessions whose client reached s2, and those that can only switch host at the end.
        ``display_direct``: s2 takes the display's record in the device state (DISPLAY_STATE_VERSION)."""
        for session in sessions:
            source = SessionSource(session, max(0.001, end - time.monotonic()), display_direct=display_direct)
            session.migration = source
            sources.append(source)
            source.begin(dst, mode)
        # A client without SEMI_SEAMLESS_MIGRATE gets no BEGIN (5.1): it can only be told to
        # reconnect to s2 from scratch, at the end, losing its state (5.6).
        switch_host = [s for s in sources if s.machine.mode is mig.MigrationMode.SWITCH_HOST]
        for source in sources:  # the machine answers ConnectComplete(False) at its own timeout
            if source not in switch_host:
                source.connected.wait(max(0.0, end - time.monotonic()))
        ready = [s for s in sources if s.connected.ready() and s.connect_succeeded]
        for source in sources:
            if source not in ready and source not in switch_host:
                # Never a lossy fallback for a client that tried: it stays here, working.
                source.error = source.error or "the client could not connect to the destination"
                source.cancel(source.error)
        return ready, switch_host

    def _precopy_ports(self, migration: Peer, ready: list[SessionSource]) -> bool:
        """Send the big ports' queued bytes to s2 while the sessions keep running (precopy.py);
        whatever does not get there goes through the clients at the switch, as without it. Each
        session's MIGRATE_DATA gets its MAC from here on if s2 checks them. Whether it asked s2
        for its landing memory between its rounds."""
        if migration.state_key.agree(migration.features.get("state_auth")):
            for source in ready:
                source.state_key = migration.state_key
        if self.server.config.precopy and migration.features.get("port_precopy") == PRECOPY_VERSION:
            started = time.perf_counter()
            waits: list[float] = []  # for s2's landing memory, between the rounds (once at most)

            def prepare() -> None:
                asked = time.perf_counter()
                self._await_landing_memory(migration, ready)
                waits.append(time.perf_counter() - asked)

            migration.precopied = precopy_ports(migration, ready, prepare)
            migration.prepare_s = sum(waits)
            migration.precopy_s = time.perf_counter() - started - migration.prepare_s
            return bool(waits)
        return False

    @staticmethod
    def _precopy_displays(migration: Peer, ready: list[SessionSource]) -> list[SessionSource]:
        """Send every screen's picture to s2 while the screens keep running, as QEMU pre-copies a
        VM's RAM: at the stop only the tiles changed since travel, so the downtime does not grow
        with the surface. A session whose pre-copy did not get there stays here."""
        with_display = [s for s in ready if s.session.display is not None]
        if not with_display:
            return ready
        peer = migration.client
        try:
            for batch in precopy_batches(with_display):
                index, chunks = [], []
                for source in batch:
                    display = source.session.display
                    assert display is not None
                    source.precopy = Precopy(display)
                    index.append(session_label(source.session.id))
                    chunks.extend(source.precopy.chunks())
                # The pictures go as they are (no container packed, then copied to bytes: two
                # copies of up to PRECOPY_BATCH on the hub), and the send shares the hub (turns.py).
                body, size = codec.gathered_chunks([json.dumps(index).encode(), *chunks], PIECE)
                answer = peer.post_stream(f"/migration/display-precopy?migration={migration.id}", body, size,
                                          migration.left())
                if not isinstance(answer, dict) or answer.get("skipped"):
                    raise MigrationError(f"the destination skipped screens: {answer!r:.200}")
        except (MigrationError, OSError) as err:
            for source in with_display:
                source.cancel(f"the screen's pre-copy could not reach the destination at {peer.address}: {err}")
            return [s for s in ready if s not in with_display]
        return ready

    @staticmethod
    def _move_device_states(migration: Peer, ready: list[SessionSource]) -> tuple[list[SessionSource], int]:
        """Stop the devices (the VM pauses) and send their state to s2; a session whose state did
        not get there stays here. Returns the sessions that go on, and the bytes sent."""
        if not ready:
            return ready, 0
        for source in ready:
            source.stop_devices()
        records = {s.session.id: record for s in ready if (record := s.display_record()) is not None}
        state = pack_device_states([s.session for s in ready],
                                   {s.session.id: s.precopy for s in ready if s.precopy is not None}, records)
        peer = migration.client
        try:
            answer = peer.post_bytes(f"/migration/device-state?migration={migration.id}", state, migration.left())
            if not isinstance(answer, dict) or answer.get("skipped"):
                raise MigrationError(f"the destination skipped device state: {answer!r:.200}")
        except (MigrationError, OSError) as err:
            for source in ready:
                source.cancel(f"device state could not reach the destination at {peer.address}: {err}")
            return [], 0
        return ready, len(state)

    def _land(self, migration: Peer, ready: list[SessionSource], end: float) -> dict:
        """Wait until s2 has every session; roll back those it did not take. Returns s2's reports
        of the sessions that landed, by hex id."""
        # Decide before the machines' own post-migration timers would disconnect the clients: a
        # session that did not land can still be taken back then.
        timers = [t for t in (s.machine.get_timer() for s in ready) if t is not None]
        landing = min([end, *(t - LANDING_MARGIN for t in timers)])
        answers = self._wait_landed(migration, ready, landing) if ready else {}
        landed = {sid: entry for sid, entry in answers.items() if "failed" not in entry}
        for source in ready:
            sid = session_label(source.session.id)
            if sid not in landed:
                why = answers.get(sid, {}).get("failed") or "the destination did not take the session in time"
                if source.can_roll_back:
                    source.roll_back(why)
                else:  # its report says why s1 cannot tell where it went (s2 unreachable, or it failed there)
                    source.not_landed = why
        for source in ready:
            main = source.session.main
            if session_label(source.session.id) in landed and main is not None:
                # It lives on s2 now; a client still holding an s1 socket has no use for it.
                main.transport.close("the session migrated away")
        for source in ready:  # their final counts (what a semi-seamless switch dropped) come at the end
            source.finished.wait(max(0.0, min(1.0, end - time.monotonic())))
        return landed

    @staticmethod
    def _undo(source: SessionSource, reason: str) -> None:
        """Give a session back to s1 after a failure anywhere in the migration: cancelled before
        post-migration, rolled back after it where a seamless switch still can be. A session whose
        client was already sent away (END, or MIGRATE_DATA it can no longer take back) is left to
        its machine, whose timer disconnects a client that does not leave."""
        if source.session.migration is not source:
            return  # already over: cancelled, rolled back, or its client left
        try:
            if source.can_roll_back:
                source.roll_back(reason)
                return
            if "migrate_sent" not in source.times:
                source.cancel(reason)
                return
        except Exception:
            log.exception("session %08x: the migration could not be undone cleanly; detaching it", source.session.id)
            source.error = source.error or reason
            source.detach()
            source.resume_devices()

    @staticmethod
    def _forget_announced(migration: Peer, ids: list[str]) -> None:
        """Abort on s2 the sessions of this migration that did not move: their announcements (and
        half sessions) would otherwise live until they expire. Within what is left of the
        migration's time; once that is spent, in the background, so ``/migrate`` still answers on time."""
        if not ids:
            return
        peer = migration.client

        def send(timeout: float) -> None:
            try:
                peer.post_json("/migration/abort", {"migration": migration.id, "sessions": ids}, timeout=timeout)
            except (MigrationError, OSError) as err:
                log.info("could not tell the destination at %s to drop %d announced sessions: %s", peer.address,
                         len(ids), err)

        left = migration.end - time.monotonic()
        if left > 0:
            send(min(STATUS_TIMEOUT, left))
        else:
            gevent.spawn(send, STATUS_TIMEOUT)

    @staticmethod
    def _wait_landed(migration: Peer, sources: list[SessionSource], deadline: float) -> dict:
        """Ask the destination until every session has completed there or the deadline passed."""
        peer = migration.client
        landed: dict = {}
        # Asking s2 costs both servers CPU (~0.3-0.5 ms each), and while the clients switch that
        # is CPU their switch waits for. A client leaves s1 once s2 has spoken to it (its session
        # completed there), so ask once they all left. One that stays (s2 failed its session and it
        # waits for a rollback) is asked about FIRST_ASK_WITHIN later.
        gevent.wait([s.finished for s in sources], timeout=max(0.0, min(FIRST_ASK_WITHIN, deadline - time.monotonic())))
        delay, unreachable = 0.002, 0
        while True:
            try:
                # Only the sessions not heard of yet: a report on s2 is final for its migration,
                # and re-sending 500 of them every few ms would cost both servers CPU mid-switch.
                waiting = [sid for sid in (session_label(s.session.id) for s in sources) if sid not in landed]
                # A short timeout: a destination that hangs must not outlast the deadline.
                wait = min(STATUS_TIMEOUT, max(0.001, deadline - time.monotonic()))
                answer = peer.get_json(f"/migration/completed?migration={migration.id}&ids={','.join(waiting)}",
                                       timeout=wait)
                if not (isinstance(answer, dict) and all(map(_landing, answer.values()))):
                    # Counted as a failed request: a destination that keeps saying nonsense is gone.
                    raise OSError(f"an answer that is not a landing report: {answer!r:.100}")
                asked = set(waiting)
                landed.update((sid, entry) for sid, entry in answer.items() if sid in asked)
                unreachable = 0
            except (MigrationError, OSError) as err:
                # An error for an answer, time after time (an s2 that lost the migration, a broken
                # one), tells no more than no answer: both count, or s1 asked until the deadline.
                unreachable += 1
                why = (f"the destination cannot say how it went: {err}" if isinstance(err, MigrationError)
                       else f"the destination is unreachable at {peer.address}: {err}")  # MigrationError names it
                log.warning("cannot ask how the migration went: %s", why)
                if unreachable >= UNREACHABLE_TRIES:  # gone: what has not landed never will
                    return _not_reported(sources, landed, why)
            if len(landed) == len(sources) or time.monotonic() > deadline:
                return landed
            if all(s.finished.is_set() for s in sources):
                delay = 0.05  # every client left s1; a late one on s2 is all that can change
            gevent.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _session_report(source: SessionSource, landed: dict | None) -> dict:
        times = source.times
        switched_host = source.machine.mode is mig.MigrationMode.SWITCH_HOST and "migrate_sent" in times
        entry = {
            "session_id": session_label(source.session.id),
            "migrated": landed is not None,
            "mode": landed["mode"] if landed else ("switch-host" if switched_host else None),
            "in_flight_bytes_moved": source.moved,
            "bytes_dropped": source.dropped,
            "error": source.error,
        }
        if "connected" in times:
            entry["pre_migration_s"] = round(times["connected"] - times["begin"], 6)
        if not landed and "migrate_sent" in times and "client_left" in times and not switched_host:
            entry["error"] = entry["error"] or ("lost: the client left the source and the destination never reported "
                                                f"its arrival: {source.not_landed or 'no answer'}")
        if landed and "migrate_sent" in times:
            completed = epoch_of(landed["times"]["completed"])  # s2's clock: one host, or synchronised ones
            entry["downtime_s"] = round(completed - times["migrate_sent"], 6)
            entry["total_s"] = round(completed - times["begin"], 6)
        return entry
