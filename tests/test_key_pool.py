"""The link-key pool (spicewire/server/keys.py) with a fake key factory: it fills in the background
to its bound and no further, refills as links take keys, serves a burst from what is ready, and
makes a key on demand when it has none."""

import os
import threading

import gevent
import pytest

from spicewire.cli import build_parser
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.server.keys import KeyPool, _KeyMaker
from spicewire.server.net import ServerConfig
from tests.serverkit import MainSession, running_server

TIMEOUT = 10


class FakeKeys:
    """Numbered stand-ins for keys, remembering which thread made each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: list[tuple[int, int]] = []  # (key, native thread id)

    def __call__(self) -> int:
        with self.lock:
            key = len(self.made)
            self.made.append((key, threading.get_native_id()))
            return key

    def threads_of(self, keys) -> set[int]:
        return {thread for key, thread in self.made if key in set(keys)}


@pytest.fixture
def keys():
    return FakeKeys()


def started(keys: FakeKeys, size: int, threads: int = 1, refill_delay: float = 0.0) -> KeyPool:
    pool = KeyPool(size, threads, factory=keys, refill_delay=refill_delay)
    pool.start()
    assert pool.wait_full(TIMEOUT)
    return pool


@pytest.mark.parametrize("threads", [1, 3])
def test_the_pool_fills_to_its_bound_and_stops_there(keys, threads):
    pool = started(keys, 5, threads)
    try:
        assert pool.ready == 5 and pool.pending == 0 and len(keys.made) == 5
    finally:
        pool.stop()


def test_without_a_delay_the_pool_refills_as_links_take_keys(keys):
    pool = started(keys, 4)
    try:
        taken = [pool.pop(), pool.pop()]
        assert pool.ready == 2 and pool.pending == 1  # one thread: one key in the making
        assert pool.wait_full(TIMEOUT)
        assert pool.ready == 4 and pool.pending == 0 and len(keys.made) == 6
        assert len(set(taken + [pool.pop() for _ in range(4)])) == 6  # each key handed out once
    finally:
        pool.stop()


def test_with_a_delay_the_pool_refills_only_once_links_pause(keys):
    """The delay is far longer than the test: taking keys starts no refill."""
    pool = started(keys, 4, refill_delay=600)
    try:
        taken = [pool.pop(), pool.pop()]
        assert pool.ready == 2 and pool.pending == 0 and len(keys.made) == 4 and taken == [0, 1]
    finally:
        pool.stop()


def test_after_the_delay_the_pool_refills(keys):
    pool = started(keys, 3, refill_delay=0.01)
    try:
        pool.pop()
        assert pool.pending == 0  # not during the burst
        assert pool.wait_full(TIMEOUT) and pool.ready == 3 and len(keys.made) == 4
    finally:
        pool.stop()


@pytest.mark.parametrize("delay", [-0.1, float("nan"), float("inf")])
def test_a_bad_refill_delay_is_refused(keys, delay):
    with pytest.raises(ValueError, match="refill delay"):
        KeyPool(1, factory=keys, refill_delay=delay)


@pytest.mark.parametrize(("burst", "on_demand"), [(5, 0), (6, 0), (7, 1)])
def test_a_burst_is_served_from_the_pool_and_beyond_it_on_demand(keys, burst, on_demand):
    """Pops back to back (no refill can land in between) one under, at and one over the bound."""
    pool = started(keys, 6)
    try:
        background = keys.threads_of(range(6))
        served = [pool.pop() for _ in range(burst)]
        assert pool.made_on_demand == on_demand
        assert set(served[:6]) <= set(range(6))
        assert keys.threads_of(served[6:]).isdisjoint(background)  # made in the hub's pool instead
    finally:
        pool.stop()


def test_a_pool_of_zero_makes_every_key_on_demand(keys):
    pool = KeyPool(0, factory=keys, refill_delay=0)
    pool.start()
    try:
        assert pool.wait_full(TIMEOUT) and pool.ready == 0 and keys.made == []
        assert [pool.pop(), pool.pop()] == [0, 1] and pool.made_on_demand == 2 and pool.ready == 0
    finally:
        pool.stop()


def test_stop_drops_the_keys_and_makes_no_more(keys):
    pool = started(keys, 3)
    pool.stop()
    assert pool.ready == 0
    assert pool.pop() == 3 and pool.made_on_demand == 1 and pool.ready == 0 and len(keys.made) == 4


def test_a_failed_background_key_is_made_again_by_the_next_link(keys):
    failed = threading.Event()

    def flaky() -> int:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("no entropy today")
        return keys()

    pool = KeyPool(1, factory=flaky, refill_delay=0)
    pool.start()
    try:
        assert failed.wait(TIMEOUT)
        for _ in range(10_000):  # the failure's arrival in the hub: the loop yields until it lands
            if not pool.pending:
                break
            gevent.sleep(0)
        assert pool.pending == 0 and pool.ready == 0
        first = pool.pop()  # nothing ready: made on demand, and the background is started again
        assert pool.made_on_demand == 1
        assert pool.wait_full(TIMEOUT)
        assert {first, pool.pop()} == {0, 1} and pool.made_on_demand == 1
    finally:
        pool.stop()


@pytest.mark.parametrize(("field", "value"), [("key_pool", -1), ("key_pool", 1.5), ("key_pool_threads", 0),
                                              ("key_pool_threads", True), ("key_pool_refill_delay", -1.0),
                                              ("key_pool_refill_delay", float("nan"))])
def test_server_config_refuses_a_bad_key_pool(field, value):
    with pytest.raises(ValueError, match=field):
        ServerConfig(port=0, **{field: value})


def test_a_server_links_with_keys_from_its_pool():
    with running_server(key_pool=4, key_pool_refill_delay=0.01) as server:
        assert server.keys.wait_full(TIMEOUT)
        MainSession(server.address).attach_channels()
        assert server.keys.made_on_demand == 0
        assert server.keys.wait_full(TIMEOUT) and server.keys.ready == 4


def test_status_reports_the_key_pool():
    with running_server(key_pool=3) as server:
        control = ControlServer(server, "127.0.0.1", 0)
        control.start()
        try:
            assert server.keys.wait_full(TIMEOUT)
            client = ControlClient(*control.address)
            assert client.get_json("/status")["link_keys"] == {"ready": 3, "pool": 3, "made_on_demand": 0}
        finally:
            control.stop()


@pytest.mark.parametrize(("argv", "pool", "threads", "delay"), [
    ([], 64, 1, 0.5), (["--key-pool", "0", "--key-pool-refill-delay", "0"], 0, 1, 0.0),
    (["--key-pool", "1", "--key-pool-threads", "2", "--key-pool-refill-delay", "2.5"], 1, 2, 2.5),
])
def test_serve_takes_the_key_pool_options(argv, pool, threads, delay):
    args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:5900", *argv])
    assert (args.key_pool, args.key_pool_threads, args.key_pool_refill_delay) == (pool, threads, delay)


@pytest.mark.parametrize("argv", [["--key-pool", "-1"], ["--key-pool", "many"], ["--key-pool-threads", "0"],
                                  ["--key-pool-refill-delay", "-1"], ["--key-pool-refill-delay", "inf"]])
def test_serve_refuses_a_bad_key_pool_option(argv, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--listen", "127.0.0.1:5900", *argv])
    assert argv[0] in capsys.readouterr().err


def test_a_key_maker_whose_server_went_away_mid_key_exits_quietly(capfd):
    """A server killed while its child makes a key: the child finds the pipe closed and ends,
    with no traceback in the server's log (the child's stderr is the server's)."""
    maker = _KeyMaker()
    os.write(maker._requests, b"k")
    os.close(maker._keys)  # the server is gone: nobody reads the key being made
    os.close(maker._requests)
    _, status = os.waitpid(maker.pid, 0)
    assert status == 0 and "Traceback" not in capfd.readouterr().err
