"""s1 waits, before it stops the devices, for s2 to have faulted in the memory a big MIGRATE_DATA
lands in (``/migration/prepared``, orchestrator.PREPARED_WAIT): a prefault done within the wait
comes before the stop; one that is not goes on after it and the switch does not wait longer; an s2
that does not offer ``prepared`` is not asked. Every session arrives intact."""

from __future__ import annotations

import threading

import pytest

from spicewire.errors import MigrationError
from spicewire.server.migration import orchestrator
from spicewire.server.migration.orchestrator import MigrationManager
from spicewire.server.migration.source import SessionSource

from .test_migration import connect, drain_sink, fill_paused_sink, only_entry
from .test_precopy import MIB, making_pnodes

pnodes = pytest.fixture(making_pnodes, name="pnodes")

BODY = 6 * MIB  # over destination.PREFAULT_MIN: the backlog's buffer gets a prefault job of its own
MIGRATION = "0123456789abcdef"


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


@pytest.fixture
def steps(monkeypatch):
    """What happened, in order: s2 asked whether it is prepared ("asked"), its prefault done
    ("prefaulted"), s1's devices stopped ("stopped"). The prefault (a worker thread) waits for
    ``release``, which the test says what sets."""
    order: list[str] = []
    release = threading.Event()
    state = {"release_on": ("asked", "stopped")}
    real_prefaulted, real_prepared, real_stop = orchestrator.prefaulted, MigrationManager.prepared, \
        SessionSource.stop_devices

    def step(name: str) -> None:
        order.append(name)
        if name in state["release_on"]:
            release.set()

    def prefaulted(size: int):
        release.wait(30)
        order.append("prefaulted")
        return real_prefaulted(size)

    def prepared(self, migration_id: str, wait: float) -> bool:
        step("asked")
        return real_prepared(self, migration_id, wait)

    def stop_devices(self) -> None:
        step("stopped")
        real_stop(self)

    monkeypatch.setattr(orchestrator, "prefaulted", prefaulted)
    monkeypatch.setattr(MigrationManager, "prepared", prepared)
    monkeypatch.setattr(SessionSource, "stop_devices", stop_devices)
    return order, state


def migrate_intact(pnodes) -> None:
    s1, s2 = pnodes(False, False)
    session = connect(s1)
    digest = fill_paused_sink(s1, session, BODY)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"], entry
    drain_sink(s2, session.session_id, BODY, digest)
    session.close()


def test_the_devices_stop_once_the_landing_memory_is_in(pnodes, steps):
    order, _ = steps
    migrate_intact(pnodes)
    # Asked before the port pre-copy and again before the stop: the first ask waits it out.
    assert order == ["asked", "prefaulted", "asked", "stopped"]


def test_a_prefault_not_done_within_the_wait_does_not_hold_the_switch(pnodes, steps, monkeypatch):
    order, state = steps
    state["release_on"] = ("stopped",)  # the prefault ends only once the devices stopped
    monkeypatch.setattr(orchestrator, "PREPARED_WAIT", 0.05)
    migrate_intact(pnodes)
    assert order == ["asked", "asked", "stopped", "prefaulted"]


def test_an_s2_that_does_not_offer_prepared_is_not_asked(pnodes, steps, monkeypatch):
    order, state = steps
    state["release_on"] = ("stopped",)
    real_features = MigrationManager.features

    def older(self, *args, **kwargs) -> dict:
        return {key: value for key, value in real_features(self, *args, **kwargs).items() if key != "prepared"}

    monkeypatch.setattr(MigrationManager, "features", older)
    migrate_intact(pnodes)
    assert order == ["stopped", "prefaulted"]


@pytest.mark.parametrize("wait", ["0", str(orchestrator.PREPARED_WAIT_MAX)])
def test_prepared_answers_within_its_bounds(pnodes, wait):
    (s2,) = pnodes(False)
    answer = s2.api.get_json(f"/migration/prepared?migration={MIGRATION}&wait={wait}")
    assert answer == {"prepared": True}  # nothing announced: nothing to fault in


@pytest.mark.parametrize("wait", ["-1", str(orchestrator.PREPARED_WAIT_MAX + 1), "nan", "soon"])
def test_prepared_refuses_a_wait_out_of_bounds(pnodes, wait):
    (s2,) = pnodes(False)
    with pytest.raises(MigrationError, match="400"):
        s2.api.get_json(f"/migration/prepared?migration={MIGRATION}&wait={wait}")
