"""Freed memory goes back to the system a step at a time (spicewire/server/heap.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.monkey
import pytest

from spicewire.control.client import ControlClient
from spicewire.server.heap import RELEASE_STEP, Releaser, release_free_memory, trim_in_thread
from spicewire.server.session import Limits, PortState
from tests.served import bound_addresses
from tests.serverkit import DEFAULT_PORTS, ECHO, SINK, MainSession, port_state, running_server, wait_until

MIB = 1 << 20


def mib_queue(count: int) -> deque:
    return deque(bytearray(MIB) for _ in range(count))


class Steps:
    """A trim that records what was still held each time it ran, and lets the hub run meanwhile
    (as a trim in a worker thread does)."""

    def __init__(self, releaser_queues: list[deque]) -> None:
        self.queues = releaser_queues
        self.held_at_trims: list[int] = []
        self.events: list[str] = []

    def __call__(self) -> None:
        self.held_at_trims.append(sum(len(q) for q in self.queues))
        self.events.append("trim")
        gevent.sleep(0.001)


@pytest.mark.parametrize("step_mib", [1, 4, 13, 14])
def test_a_large_drop_goes_a_step_at_a_time_with_a_trim_after_each(step_mib):
    """13 MiB in two queues: a trim after every step's MiB, the last step whatever is left; the
    hub runs between the steps. A step of 13 MiB (exactly all of it) is one step; 14, more than
    all of it, is not a drop for steps at all."""
    queues = [mib_queue(10), mib_queue(3)]
    steps = Steps(queues)
    releaser = Releaser(step=step_mib * MIB, trim=steps)

    def ticker() -> None:
        while releaser.busy:
            steps.events.append("tick")
            gevent.sleep(0.0005)

    releaser.drop(queues, 13 * MIB)
    if step_mib > 13:  # less than a step: at once, no trim of its own
        assert not releaser.busy and all(not q for q in queues) and steps.held_at_trims == []
        return
    assert releaser.busy and releaser.pending == 13 * MIB
    gevent.spawn(ticker).join(timeout=5)
    expected = list(range(13 - step_mib, -1, -step_mib))
    if expected[-1] != 0:
        expected.append(0)
    assert steps.held_at_trims == expected
    assert releaser.trims == len(expected) and releaser.pending == 0 and not releaser.busy
    if len(expected) > 1:  # the hub ran between two steps
        first, last = steps.events.index("trim"), len(steps.events) - 1 - steps.events[::-1].index("trim")
        assert "tick" in steps.events[first:last]


def test_a_drop_while_steps_run_joins_them_and_a_small_one_alone_goes_at_once():
    steps = Steps([])
    releaser = Releaser(step=4 * MIB, trim=steps)
    big, small, later = mib_queue(8), mib_queue(1), mib_queue(1)
    steps.queues.extend([big, small])
    releaser.drop([big], 8 * MIB)
    releaser.drop([small, deque()], MIB)  # while busy: queued behind the big one
    assert len(small) == 1
    wait_until(lambda: not releaser.busy, what="the steps to end")
    assert not big and not small and steps.held_at_trims == [5, 1, 0]
    releaser.drop([later], MIB)  # alone and under a step: freed now, without a trim
    assert not later and releaser.trims == 3


def test_close_lets_go_of_the_rest_at_once():
    steps = Steps([])
    releaser = Releaser(step=MIB, trim=steps)
    queue = mib_queue(50)
    releaser.drop([queue], 50 * MIB)
    gevent.sleep(0.003)
    releaser.close()
    assert not queue and not releaser.busy
    with pytest.raises(ValueError):
        Releaser(step=0)


def test_the_trim_runs_in_a_worker_thread_and_really_trims():
    get_ident = gevent.monkey.get_original("_thread", "get_ident")
    ran_in: list[int] = []
    trim_in_thread(lambda: ran_in.append(get_ident()))
    assert ran_in and ran_in[0] != get_ident()
    trim_in_thread()  # glibc's malloc_trim: returns, whatever it gave back
    release_free_memory()


@contextmanager
def sink_backlog(size: int) -> Iterator[tuple[Any, MainSession, PortState]]:
    """A running server whose one session's sink is paused with ``size`` bytes queued for it."""
    with running_server(limits=Limits(to_device=size + (4 << 20))) as server:
        session = MainSession(server.address)
        session.attach_channels()
        sink = session.open_port(SINK)
        port = port_state(server, session.session_id, SINK)
        port.device.pause()
        sink.send_data(os.urandom(MIB) * (size // MIB))
        wait_until(lambda: port.to_device_bytes == size, what="the backlog to queue")
        yield server, session, port


def test_a_session_that_leaves_with_a_large_backlog_is_freed_in_steps():
    """A paused sink holding 3 steps and a bit: when its session ends, the budget has it back at
    once and the server's releaser lets go of it in four steps."""
    with sink_backlog(3 * RELEASE_STEP + MIB) as (server, session, port):
        held = port.to_device
        trims = server.releaser.trims
        session.close()
        wait_until(lambda: not server.sessions, what="the session to end")
        assert server.budget.used == 0 and not port.to_device
        wait_until(lambda: not server.releaser.busy, what="the releaser to finish")
        assert not held and server.releaser.trims - trims == 4


@pytest.mark.parametrize("steps", [0, 3])
def test_a_device_that_fails_with_a_backlog_lets_go_of_it_through_the_releaser(steps):
    """A sink whose write raises once it resumes with a backlog (a step under, or 3 steps and a
    bit): its queues go to the server's releaser (a trim after each step), the budget has the
    bytes back at once, and the session's other ports go on."""
    size = steps * RELEASE_STEP + MIB
    with sink_backlog(size) as (server, session, port):
        held = port.to_device
        trims = server.releaser.trims
        given: list[int] = []
        drop = server.releaser.drop
        server.releaser.drop = lambda queues, n: (given.append(n), drop(queues, n))  # type: ignore[method-assign]

        def broken(data: memoryview) -> int:
            raise OSError("the device's disk is gone")

        port.device.write = broken  # type: ignore[method-assign]
        port.device.resume()
        wait_until(lambda: port.failed is not None, what="the device to fail")
        assert given == [size] and server.budget.used == 0 and not port.to_device
        wait_until(lambda: not server.releaser.busy, what="the releaser to finish")
        # A drop under a step goes at once; a larger one in steps, each with its trim.
        assert not held and server.releaser.trims - trims == (steps + 1 if steps else 0)
        assert session.session_id in server.sessions  # only the port ended
        echo = session.open_port(ECHO)
        echo.send_data(b"still here")
        assert echo.read_data(10) == b"still here"


def test_a_big_session_s_memory_goes_back_to_the_system_through_the_steps(tmp_path):
    """`spicewire serve` itself: a session that leaves with 100 MiB queued in its paused sink
    (the releaser's path, not the server's occasional trim): the RSS comes back near idle, and
    GET /status shows nothing left to release."""
    size = 100 << 20
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
            "--control-token", "t", "--disable-ticketing", "--port-buffer-mib", str((size >> 20) + 8),
            *(a for name, kind in DEFAULT_PORTS for a in ("--port-channel", f"{name}={kind}"))]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        address, control_address = bound_addresses(proc, log)
        control = ControlClient(*control_address, token="t", timeout=10)
        idle = vm_rss(proc.pid)
        session = MainSession(address)
        session.attach_channels()
        sink = session.open_port(SINK)
        sink_name = DEFAULT_PORTS[SINK][0]
        control.post_json(f"/sessions/{session.session_id:08x}/ports/{sink_name}/pause", {})
        sink.send_data(os.urandom(MIB) * (size // MIB))
        wait_until(lambda: control.get_json("/status")["memory"]["used"] >= size, what="the backlog to queue")
        loaded = vm_rss(proc.pid)
        assert loaded > idle + size
        session.close()
        wait_until(lambda: not control.get_json("/sessions").get("sessions"), what="the session to end")
        wait_until(lambda: control.get_json("/status")["memory"]["releasing"] == 0, what="the steps to end")
        wait_until(lambda: vm_rss(proc.pid) <= idle + (size >> 2), timeout=10,
                   what=f"RSS back near idle ({idle >> 20} MiB; loaded {loaded >> 20} MiB)")
    finally:
        proc.kill()
        proc.wait(timeout=5)


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read())[1]) << 10


def test_a_trim_that_fails_is_logged_and_the_release_goes_on(caplog):
    def failing() -> None:
        raise RuntimeError("no thread pool any more")

    releaser = Releaser(step=MIB, trim=failing)
    queue = mib_queue(3)
    releaser.drop([queue], 3 * MIB)
    wait_until(lambda: not releaser.busy, what="the steps to end")
    assert not queue and releaser.trims == 3
    assert "could not go back to the system: no thread pool any more" in caplog.text
