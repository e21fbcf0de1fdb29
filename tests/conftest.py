import os

import gevent
import pytest
from hypothesis import HealthCheck, settings

from spicewire import _codec_py

# Hypothesis fails an example that takes longer than 200 ms, and a test whose data comes too slowly:
# wall-clock checks that a loaded machine trips. Durations belong in benchmarks.
settings.register_profile("spicewire", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("spicewire")

try:
    from spicewire import _codec as _codec_compiled
except ImportError:  # not built: the compiled half of every codec test skips (and fails in CI)
    _codec_compiled = None

IN_CI = os.environ.get("CI") == "true"


def compiled_codec():
    if _codec_compiled is None:
        reason = "spicewire._codec is not built (run `make build`)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return _codec_compiled


@pytest.fixture(params=["cython", "python"])
def codec_impl(request):
    """Every codec test runs once against each backend."""
    return compiled_codec() if request.param == "cython" else _codec_py


@pytest.fixture
def both_codecs():
    """(compiled, pure) for tests that demand the two agree."""
    return compiled_codec(), _codec_py


pytest_plugins = ["tests.served"]  # the `serve` fixture: `spicewire serve` in a subprocess


@pytest.fixture
def within_30_s():
    """A bound for a test that waits on servers: a hang fails it instead of the whole run."""
    with gevent.Timeout(30, AssertionError("the test took longer than 30 s")):
        yield


@pytest.fixture
def within_60_s():
    """The same bound for tests that start several servers or move large state."""
    with gevent.Timeout(60, AssertionError("the test took longer than 60 s")):
        yield


@pytest.fixture
def nodes():
    """nodes(n, **kw) -> n more in-process servers with their control APIs (tests/test_migration.Node
    with ``kw``), each stopped at the end of the test."""
    from tests.test_migration import Node

    made: list[Node] = []

    def make(n: int = 2, **kw) -> list[Node]:
        made.extend(Node(**kw) for _ in range(n))
        return made[-n:]

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def new_node(nodes):
    """new_node() -> one more server, as ``nodes(1)`` makes it."""
    return lambda: nodes(1)[0]


@pytest.fixture
def gevent_idles(monkeypatch):
    """How many times ``gevent.idle()`` was called (a one-item list): the turns a loop gave the
    hub's other greenlets."""
    count = [0]
    real = gevent.idle

    def counted(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(gevent, "idle", counted)
    return count
