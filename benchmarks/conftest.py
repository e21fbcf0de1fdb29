import numpy as np
import pytest

from spicewire import _codec_py

try:
    from spicewire import _codec as _compiled
except ImportError:
    _compiled = None


@pytest.fixture(scope="session")
def compiled():
    if _compiled is None:
        pytest.skip("spicewire._codec is not built")
    return _compiled


@pytest.fixture(scope="session")
def pure():
    return _codec_py


@pytest.fixture(scope="session")
def mini_stream():
    """1,000,000 back-to-back mini-header messages with 0-64 byte bodies, built with numpy."""
    rng = np.random.default_rng(2026)
    count = 1_000_000
    sizes = rng.integers(0, 65, count).astype(np.uint32)
    types = rng.integers(1, 300, count).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(sizes.astype(np.int64) + 6)[:-1]])
    buf = rng.integers(0, 256, int(sizes.sum()) + 6 * count, dtype=np.uint8)
    for k in range(2):
        buf[starts + k] = (types >> (8 * k)) & 0xFF
    for k in range(4):
        buf[starts + 2 + k] = (sizes >> (8 * k)) & 0xFF
    return buf.tobytes(), count
