"""What every fuzz target shares: a bounded, reproducible budget, the committed corpus, byte mutations
of valid inputs, and both codec backends.

- In CI (``CI=true``) Hypothesis is derandomized: the same examples every run, so a run's time is
  bounded and a failure reproduces. Elsewhere it explores anew each run with the same budget;
  ``SPICEWIRE_FUZZ_SCALE=N`` multiplies every budget for a longer local campaign.
- ``tests/corpus/<target>/`` holds the valid seeds and every input that once found a bug; each
  target replays its corpus before anything random. ``SPICEWIRE_FUZZ_SAVE=1`` writes an input that
  fails a target there, to commit with its fix.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from spicewire import _codec_py, codec

try:
    from spicewire import _codec as _codec_compiled
except ImportError:  # the compiled half skips, as in conftest.compiled_codec (and fails in CI)
    _codec_compiled = None

IN_CI = os.environ.get("CI") == "true"
SCALE = max(1, int(os.environ.get("SPICEWIRE_FUZZ_SCALE", "1")))
SAVE = os.environ.get("SPICEWIRE_FUZZ_SAVE", "") not in ("", "0")
CORPUS = Path(__file__).parent / "corpus"


def budget(examples: int) -> settings:
    """Hypothesis settings for one fuzz target: ``examples`` (scaled), derandomized in CI, and no
    example database there (CI starts from nothing each run anyway)."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=IN_CI,
        database=None if IN_CI else settings.default.database,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def corpus(target: str) -> list[tuple[str, bytes]]:
    """The committed inputs of ``target``, by file name, in name order."""
    folder = CORPUS / target
    if not folder.is_dir():
        return []
    return [(path.name, path.read_bytes()) for path in sorted(folder.iterdir()) if path.is_file()]


def save(target: str, data: bytes, prefix: str = "found") -> Path:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run(target: str, check: Callable[[bytes], None], data: bytes) -> None:
    """``check(data)``; with SPICEWIRE_FUZZ_SAVE set, an input it fails on joins the corpus first."""
    try:
        check(data)
    except BaseException:
        if SAVE:
            save(target, data)
        raise


# Values a length or count field is most often wrong by.
_BOUNDARY = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def mutations(seed: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    """``count`` variations of a valid input: bit flips, bytes set, cuts, insertions, duplicated
    runs, and u16/u32 fields overwritten with boundary values or the input's own length."""
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rng.randrange(1, 4)):
            kind = rng.randrange(7)
            at = rng.randrange(len(data) + 1)
            if kind == 0 and data:
                data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
            elif kind == 1 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif kind == 2:
                del data[at:]
            elif kind == 3:
                data[at:at] = rng.randbytes(rng.randrange(1, 9))
            elif kind == 4 and data:
                end = min(len(data), at + rng.randrange(1, 33))
                data[at:at] = data[at:end]
            elif kind in (5, 6) and len(data) >= 4:
                fmt = "<I" if kind == 5 else "<H"
                at = min(at, len(data) - struct.calcsize(fmt))
                value = rng.choice((*_BOUNDARY, len(data), len(data) + 1, max(len(data) - 1, 0)))
                struct.pack_into(fmt, data, at, value & (0xFFFFFFFF if kind == 5 else 0xFFFF))
        yield bytes(data)


_CODEC_FUNCTIONS = ("parse_header", "scan", "pack_chunks", "packed_size", "unpack_chunks", "damage_tiles")


@pytest.fixture(params=["cython", "python"])
def backend(request, monkeypatch):
    """The whole stack on one codec backend: spicewire.codec's functions are the compiled ones or
    the pure twin's (every caller reaches them through the module, so this switches all of them)."""
    if request.param == "cython":
        if _codec_compiled is None:
            reason = "spicewire._codec is not built (run `make build`)"
            if IN_CI:
                pytest.fail(reason)
            pytest.skip(reason)
        impl = _codec_compiled
    else:
        impl = _codec_py
    for name in _CODEC_FUNCTIONS:
        monkeypatch.setattr(codec, name, getattr(impl, name))
    monkeypatch.setattr(codec, "BACKEND", request.param)
    return request.param
