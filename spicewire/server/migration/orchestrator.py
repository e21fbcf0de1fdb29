"""One server's migrations, as source and as destination: the announcements s2 accepts migrating
clients by, the device state s1 sends (the part of a VM migration QEMU would carry), and the whole
migration of every session for ``POST /migrate`` and ``spicewire migrate``.

Order, as QEMU's lessons demand: announce to s2, BEGIN every session, wait for every client's
answer, and only then stop the devices, move their state and start post-migration. A client that
could not reach s2 simply stays on s1, its devices running.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event

from spicewire import codec, devices
from spicewire.addresses import Address
from spicewire.control.client import ControlClient
from spicewire.errors import LocalProtocolError, MigrationError
from spicewire.logs import context, epoch_of, session_label
from spicewire.protocol import messages as m
from spicewire.protocol import migration as mig
from spicewire.server import events
from spicewire.server.migration.common import mode_label, prefaulted
from spicewire.server.migration.destination import PREFAULT_MIN, Announcement, SessionDestination
from spicewire.server.migration.source import PackBuffers, SessionSource, pack_device_states
from spicewire.server.session import PortConnection, PortState, Session

if TYPE_CHECKING:
    from spicewire.server.net import SpiceServer

log = logging.getLogger(__name__)

LANDING_MARGIN = 0.5  # s
STATUS_TIMEOUT = 2.0  # for one "have they landed?" request to s2
UNREACHABLE_TRIES = 3  # consecutive refused status requests after which s2 counts as gone
MAX_PREPARED_STREAMS = 2  # s1 prepares segment buffers for this many big MIGRATE_DATA at once


class MigrationManager:
    """One server's migrations, as source and as destination."""

    def __init__(self, server: SpiceServer) -> None:
        self.server = server
        self.seamless_enabled = True
        self.announcements: dict[int, Announcement] = {}
        self.completed: dict[int, dict] = {}  # session id -> its last destination report
        self.failed: dict[int, str] = {}  # session id -> why its migration here broke off

    # --- destination -------------------------------------------------------------------------

    def announce(self, sessions: list[dict], ttl: float) -> int:
        expires = time.monotonic() + ttl
        for entry in sessions:
            sid = int(entry["session_id"])
            if sid == 0 or sid in self.server.sessions:
                raise MigrationError(f"session {sid:08x} cannot migrate here: it is in use")
            ports = [(int(p[0]), str(p[1]), str(p[2])) for p in entry["ports"]]
            for _, _, kind in ports:
                devices.factory(kind)  # unknown kinds fail the announcement, not the migration
            ann = self.announcements[sid] = Announcement(sid, ports, expires)
            self.completed.pop(sid, None)  # an earlier visit's report must not answer for this one
            self.failed.pop(sid, None)
            for port in entry["ports"]:
                in_flight = int(port[3]) if len(port) > 3 else 0
                if in_flight >= PREFAULT_MIN:
                    # Room for the SWPD framing around the bytes, and for what arrives until FLUSH_MARK.
                    size = int(in_flight * 1.02) + (4 << 20)
                    ann.buffers[int(port[0])] = gevent.get_hub().threadpool.spawn(prefaulted, size)
        return len(sessions)

    def expects(self, session_id: int) -> bool:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return False
        if time.monotonic() > ann.expires:
            del self.announcements[session_id]
            return False
        return True

    def arriving_session(self, session_id: int) -> Session | None:
        ann = self.announcements.get(session_id)
        if ann is None or ann.session is not None:
            return None
        limits = self.server.config.limits
        session = Session(
            id=session_id,
            ports={cid: PortState(cid, name, devices.factory(kind)(), limits) for cid, name, kind in ann.ports},
        )
        for cid, chunks in ann.device_state.items():
            session.ports[cid].device.restore(chunks)
        ann.session = session
        session.migration = SessionDestination(self, session)
        return session

    def arriving_main_linked(self, session: Session) -> None:
        if not isinstance(session.migration, SessionDestination):
            raise LocalProtocolError(f"session {session.id:08x} is not arriving here")
        session.migration.main_linked()

    def port_linked(self, session: Session, handler: PortConnection) -> None:
        if isinstance(session.migration, SessionDestination):
            session.migration.port_linked(handler)

    def receive_device_states(self, body: bytes | bytearray | memoryview) -> int:
        """The saved devices of announced sessions (``pack_device_states``)."""
        chunks = codec.unpack_chunks(body)
        index = json.loads(bytes(chunks[0]))
        # Every entry is checked before any is used: a batch is taken whole or not at all, and a
        # device never restores from chunks its index only promised.
        plan, pos = [], 1
        for entry in index:
            sid, cid, count = int(entry["session_id"], 16), int(entry["port"]), int(entry["chunks"])
            ann = self.announcements.get(sid)
            if ann is None:
                raise MigrationError(f"device state for session {sid:08x}, which was not announced")
            if cid not in {port[0] for port in ann.ports}:
                raise MigrationError(f"device state for port {cid} of session {sid:08x}, which has no such port")
            if count < 0 or pos + count > len(chunks):
                raise MigrationError(f"device state index promises {count} chunks at {pos}; there are {len(chunks)}")
            plan.append((ann, cid, [bytes(c) for c in chunks[pos : pos + count]]))
            pos += count
        if pos != len(chunks):
            raise MigrationError(f"device state body holds {len(chunks) - pos} chunks no index entry names")
        for ann, cid, saved in plan:
            ann.device_state[cid] = saved
            if ann.session is not None:
                ann.session.ports[cid].device.restore(saved)
        return len(plan)

    def session_ended(self, session: Session) -> None:
        if isinstance(session.migration, SessionSource):
            session.migration.client_gone()
        elif isinstance(session.migration, SessionDestination):
            log.warning("session %08x: the client left before its migration here completed", session.id,
                        extra=context(session.id))
            self.server.metrics.migration("destination", None, "failed")
            self.failed.setdefault(session.id, "the client left the destination before the migration completed")
            session.migration = None
        ann = self.announcements.get(session.id)
        if ann is not None and ann.session is session:
            del self.announcements[session.id]

    def abort(self, session_ids: list[int]) -> int:
        """s1 rolled these sessions back: end what exists of them here, forget their announcements."""
        aborted = 0
        for sid in session_ids:
            ann = self.announcements.pop(sid, None)
            session = ann.session if ann is not None else None
            if session is None or not isinstance(session.migration, SessionDestination):
                continue
            self.failed[sid] = "aborted by the source"
            log.info("session %08x: the source took the session back; dropping it here", sid, extra=context(sid))
            self.server.metrics.migration("destination", None, "aborted")
            self.server.events.emit(events.MIGRATION_ROLLED_BACK, session_id=session_label(sid), role="destination",
                                    client=session.client)
            session.close_ports("the source took the session back")
            if session.main is not None:
                session.main.transport.close("the source took the session back")
            aborted += 1
        return aborted

    # --- source: the whole migration ---------------------------------------------------------

    def migrate(
        self, to: tuple[str, int], to_control: tuple[str, int], mode: mig.MigrationMode, timeout: float = 30.0,
        to_token: str | None = None,
    ) -> dict:
        """Migrate every session to ``to``; returns the report ``spicewire migrate`` prints.

        Phases, in order: announce to s2, pre-migration (BEGIN, every client's answer), the device
        state, the switch, the landing. Whatever fails in any of them, and however, no session is
        left half migrated here (``_undo``): a later migration finds every session as it was."""
        started = time.time()
        sessions = [s for s in self.server.sessions.values() if s.main is not None and s.migration is None]
        peer = ControlClient(*to_control, token=to_token)
        target = f"{Address(*to)} (control {peer.address})"
        log.info("migrating %d sessions to %s, %s", len(sessions), target, mode_label(mode))
        for session in sessions:
            self.server.events.emit(events.MIGRATION_STARTED, session_id=session_label(session.id),
                                    mode=mode_label(mode), to=str(Address(*to)))
        sources: list[SessionSource] = []  # filled as they are made, so a failure finds them all
        announced = False
        try:
            self._announce(peer, sessions, timeout)
            announced = True
            ready, switch_host, deadline = self._pre_migrate(sessions, sources, to, mode, timeout)
            pre_migration = time.time() - started
            ready, moved_devices = self._move_device_states(peer, ready)
            for source in ready:
                source.finish()
            for source in switch_host:
                source.finish(switch_host=True)
            landed = self._land(peer, ready, deadline, timeout)
        except BaseException as err:
            reason = f"the migration failed: {type(err).__name__}: {err}"
            for source in sources:
                self._undo(source, reason)
            if announced and sessions and isinstance(err, Exception):
                self._forget_announced(peer, sessions)
            if isinstance(err, Exception):
                log.error("migration to %s failed, every session stays here: %s", target, err)
                for session in sessions:
                    self.server.metrics.migration("source", mode_label(mode), "failed")
                    self.server.events.emit(events.MIGRATION_FAILED, session_id=session_label(session.id),
                                            mode=mode_label(mode), to=str(Address(*to)), error=str(err))
            raise
        report: dict = {"to": str(Address(*to)), "mode_requested": mode_label(mode), "sessions": []}
        if ready and len(landed) < len(ready):
            report["error"] = f"{len(ready) - len(landed)} sessions did not arrive on the destination in time"
        for source in sources:
            report["sessions"].append(self._session_report(source, landed.get(f"{source.session.id:08x}")))
        report.update(
            pre_migration_s=round(pre_migration, 6),
            total_s=round(time.time() - started, 6),
            device_state_bytes=moved_devices,
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
    def _announce(peer: ControlClient, sessions: list[Session], timeout: float) -> None:
        try:
            peer.post_json("/migration/announce", {
                "ttl": timeout + 60,
                "sessions": [{"session_id": session_label(s.id), "ports": [[cid, p.name, p.device.kind, p.in_flight]
                                                            for cid, p in s.ports.items()]}
                             for s in sessions],
            })
        except OSError as err:
            raise MigrationError(f"cannot reach the destination's control API at {peer.address}: {err}") from None

    def _pre_migrate(
        self, sessions: list[Session], sources: list[SessionSource], to: tuple[str, int], mode: mig.MigrationMode,
        timeout: float,
    ) -> tuple[list[SessionSource], list[SessionSource], float]:
        """BEGIN every session and wait for every client's answer; returns the sessions whose client
        reached s2, those that can only switch host at the end, and the migration's deadline."""
        dst = m.MigrationDstInfo(port=to[1], sport=0, host=to[0], cert_subject=None)
        big = sum(1 for s in sessions for p in s.ports.values() if p.in_flight >= PackBuffers.SIZE)
        pack_buffers = PackBuffers(2 * min(big, MAX_PREPARED_STREAMS))
        for session in sessions:
            source = SessionSource(session, timeout)
            source.pack_buffers = pack_buffers
            session.migration = source
            sources.append(source)
            source.begin(dst, mode)
        # A client without SEMI_SEAMLESS_MIGRATE gets no BEGIN (5.1): it can only be told to
        # reconnect to s2 from scratch, at the end, losing its state (5.6).
        switch_host = [s for s in sources if s.machine.mode is mig.MigrationMode.SWITCH_HOST]
        deadline = time.monotonic() + timeout
        for source in sources:  # the machine answers ConnectComplete(False) at its own timeout
            if source not in switch_host:
                source.connected.wait(max(0.0, deadline - time.monotonic()) + 1.0)
        ready = [s for s in sources if s.connected.ready() and s.connect_succeeded]
        for source in sources:
            if source not in ready and source not in switch_host:
                # Never a lossy fallback for a client that tried: it stays here, working.
                source.error = source.error or "the client could not connect to the destination"
                source.cancel(source.error)
        return ready, switch_host, deadline

    @staticmethod
    def _move_device_states(peer: ControlClient, ready: list[SessionSource]) -> tuple[list[SessionSource], int]:
        """Stop the devices (the VM pauses) and send their state to s2; a session whose state did
        not get there stays here. Returns the sessions that go on, and the bytes sent."""
        if not ready:
            return ready, 0
        for source in ready:
            source.stop_devices()
        state = pack_device_states(s.session for s in ready)
        try:
            peer.post_bytes("/migration/device-state", state)
        except (MigrationError, OSError) as err:
            for source in ready:
                source.cancel(f"device state could not reach the destination at {peer.address}: {err}")
            return [], 0
        return ready, len(state)

    def _land(self, peer: ControlClient, ready: list[SessionSource], deadline: float, timeout: float) -> dict:
        """Wait until s2 has every session; roll back those it did not take. Returns s2's reports
        of the sessions that landed, by hex id."""
        # Decide before the machines' own post-migration timers would disconnect the clients: a
        # session that did not land can still be taken back then.
        timers = [t for t in (s.machine.get_timer() for s in ready) if t is not None]
        landing = min([time.monotonic() + timeout, *(t - LANDING_MARGIN for t in timers)])
        answers = self._wait_landed(peer, ready, landing) if ready else {}
        landed = {sid: entry for sid, entry in answers.items() if "failed" not in entry}
        rolled_back = []
        for source in ready:
            sid = f"{source.session.id:08x}"
            if sid not in landed and source.can_roll_back:
                why = answers.get(sid, {}).get("failed") or "the destination did not take the session in time"
                source.roll_back(why)
                rolled_back.append(sid)
        if rolled_back:
            try:
                peer.post_json("/migration/abort", {"sessions": rolled_back}, timeout=STATUS_TIMEOUT)
            except (MigrationError, OSError) as err:
                log.info("could not tell the destination at %s to drop %d sessions: %s", peer.address,
                         len(rolled_back), err)
        for source in ready:
            main = source.session.main
            if f"{source.session.id:08x}" in landed and main is not None:
                # It lives on s2 now; a client still holding an s1 socket has no use for it.
                main.transport.close("the session migrated away")
        for source in ready:  # their final counts (what a semi-seamless switch dropped) come at the end
            source.finished.wait(max(0.0, min(1.0, deadline + timeout - time.monotonic())))
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
    def _forget_announced(peer: ControlClient, sessions: list[Session]) -> None:
        """s2 may hold announcements (and half sessions) of a migration that failed here."""
        ids = [f"{s.id:08x}" for s in sessions]
        try:
            peer.post_json("/migration/abort", {"sessions": ids}, timeout=STATUS_TIMEOUT)
        except (MigrationError, OSError) as err:
            log.info("could not tell the destination at %s to drop %d announced sessions: %s", peer.address,
                     len(ids), err)

    @staticmethod
    def _wait_landed(peer: ControlClient, sources: list[SessionSource], deadline: float) -> dict:
        """Ask the destination until every session has completed there or the deadline passed."""
        ids = ",".join(f"{s.session.id:08x}" for s in sources)
        landed: dict = {}
        # Asking s2 costs it CPU right when it restores; ask once everything has left here.
        while not all(s.switched for s in sources) and time.monotonic() < deadline:
            gevent.sleep(0.001)
        delay, unreachable = 0.002, 0
        while True:
            try:
                # A short timeout: a destination that hangs must not outlast the deadline.
                wait = min(STATUS_TIMEOUT, max(0.2, deadline - time.monotonic()))
                landed = peer.get_json(f"/migration/completed?ids={ids}", timeout=wait)
                unreachable = 0
            except MigrationError as err:  # names the address itself
                log.warning("cannot ask the destination how the migration went: %s", err)
            except OSError as err:
                unreachable += 1
                log.warning("cannot ask the destination at %s how the migration went: %s", peer.address, err)
                if unreachable >= UNREACHABLE_TRIES:  # gone: what has not landed never will
                    return {sid: {"failed": f"the destination is unreachable at {peer.address}: {err}"}
                            for sid in (f"{s.session.id:08x}" for s in sources) if sid not in landed} | landed
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
            "session_id": f"{source.session.id:08x}",
            "migrated": landed is not None,
            "mode": landed["mode"] if landed else ("switch-host" if switched_host else None),
            "in_flight_bytes_moved": source.moved,
            "bytes_dropped": source.dropped,
            "error": source.error,
        }
        if "connected" in times:
            entry["pre_migration_s"] = round(times["connected"] - times["begin"], 6)
        if not landed and "migrate_sent" in times and "client_left" in times and not switched_host:
            entry["error"] = entry["error"] or "lost: the client left the source but never arrived on the destination"
        if landed and "migrate_sent" in times:
            completed = epoch_of(landed["times"]["completed"])  # s2's clock: one host, or synchronised ones
            entry["downtime_s"] = round(completed - times["migrate_sent"], 6)
            entry["total_s"] = round(completed - times["begin"], 6)
        return entry
