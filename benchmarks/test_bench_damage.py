"""Damage tracking of a 1920x1080 frame: damage_tiles beside numpy's array_equal over the same two
frames (the issue's reference: one read of both frames, the memory-read limit), in one run.

Two cases: identical frames (the idle screen, every byte compared) and a frame with a few changed
tiles (a clock or a brush stroke: those tiles found and copied into the shadow).
"""

import numpy as np
import pytest

HEIGHT, WIDTH, TILE = 1080, 1920, 64
CHANGED_TILES = [(0, 0), (3, 7), (3, 8), (8, 15), (16, 29), (12, 2), (7, 20), (16, 0)]  # the last row is ragged


@pytest.fixture(scope="module")
def frames():
    current = np.random.default_rng(7).integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    return current, current.copy()


@pytest.fixture(scope="module")
def changed(frames):
    """(current, shadow, restore): current differs from shadow in CHANGED_TILES by one byte near each
    tile's bottom right, where a comparison finds it last; restore() puts the shadow back after a copy."""
    current, _ = frames
    current = current.copy()
    shadow = current.copy()
    for ty, tx in CHANGED_TILES:
        y, x = min(ty * TILE + TILE - 1, HEIGHT - 1), tx * TILE + TILE - 1
        current[y, x, 1] ^= 0xFF
    stale = [(ty, tx, shadow[ty * TILE : ty * TILE + TILE, tx * TILE : tx * TILE + TILE].copy())
             for ty, tx in CHANGED_TILES]

    def restore():
        for ty, tx, pixels in stale:
            shadow[ty * TILE : ty * TILE + TILE, tx * TILE : tx * TILE + TILE] = pixels

    return current, shadow, restore


def dirty_map():
    return np.zeros((-(-HEIGHT // TILE), -(-WIDTH // TILE)), dtype=np.uint8)


@pytest.mark.benchmark(group="damage 1920x1080, identical")
def test_damage_identical_compiled(benchmark, compiled, frames):
    current, shadow = frames
    dirty = dirty_map()
    benchmark.extra_info.update(nbytes=current.nbytes)
    count = benchmark.pedantic(compiled.damage_tiles, (current, shadow, TILE, dirty), rounds=50, warmup_rounds=3)
    assert count == 0


@pytest.mark.benchmark(group="damage 1920x1080, identical")
def test_damage_identical_array_equal(benchmark, frames):
    current, shadow = frames
    benchmark.extra_info.update(nbytes=current.nbytes)
    assert benchmark.pedantic(np.array_equal, (current, shadow), rounds=50, warmup_rounds=3)


@pytest.mark.benchmark(group="damage 1920x1080, identical")
def test_damage_identical_pure_twin(benchmark, pure, frames):
    current, shadow = frames
    dirty = dirty_map()
    benchmark.extra_info.update(nbytes=current.nbytes)
    assert benchmark.pedantic(pure.damage_tiles, (current, shadow, TILE, dirty), rounds=5, warmup_rounds=1) == 0


@pytest.mark.benchmark(group="damage 1920x1080, 8 tiles changed")
def test_damage_changed_compiled(benchmark, compiled, changed):
    current, shadow, restore = changed
    dirty = dirty_map()
    benchmark.extra_info.update(nbytes=current.nbytes, tiles=len(CHANGED_TILES))

    def setup():
        restore()  # untimed: each round finds and copies the same tiles
        return (current, shadow, TILE, dirty), {}

    count = benchmark.pedantic(compiled.damage_tiles, setup=setup, rounds=50, warmup_rounds=3)
    assert count == len(CHANGED_TILES)
    assert np.array_equal(np.argwhere(dirty).tolist(), sorted(CHANGED_TILES))


@pytest.mark.benchmark(group="damage 1920x1080, 8 tiles changed")
def test_damage_changed_array_equal(benchmark, changed):
    current, shadow, restore = changed
    restore()
    benchmark.extra_info.update(nbytes=current.nbytes)
    assert not benchmark.pedantic(np.array_equal, (current, shadow), rounds=50, warmup_rounds=3)
