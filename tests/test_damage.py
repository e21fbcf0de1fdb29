"""Damage tracking: codec.damage_tiles on both backends (through codec_impl), the two held equal by
Hypothesis, the compiled one against guard pages, and the Damage tracker's rectangles."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spicewire.damage import Damage
from spicewire.protocol.graphics import Rect

from .guarded import GuardedArena


def frames(height, width, seed=0):
    current = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return current, current.copy()


def dirty_for(height, width, tile):
    return np.full((-(-height // tile), -(-width // tile)), 0xEE, dtype=np.uint8)


def expected_dirty(current, shadow, tile):
    """Tile by tile with plain slicing: the definition, written apart from both backends."""
    height, width = current.shape[:2]
    out = np.zeros((-(-height // tile), -(-width // tile)), dtype=np.uint8)
    for ty in range(out.shape[0]):
        for tx in range(out.shape[1]):
            rows, cols = slice(ty * tile, ty * tile + tile), slice(tx * tile, tx * tile + tile)
            out[ty, tx] = not np.array_equal(current[rows, cols], shadow[rows, cols])
    return out


# --- damage_tiles: what it finds ------------------------------------------------------------------


def test_identical_frames_have_no_dirty_tile_and_every_mark_is_cleared(codec_impl):
    current, shadow = frames(100, 130)
    dirty = dirty_for(100, 130, 64)
    assert codec_impl.damage_tiles(current, shadow, 64, dirty) == 0
    assert dirty.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_one_changed_byte_dirties_exactly_its_tile(codec_impl):
    current, shadow = frames(200, 300)
    current[130, 70, 2] ^= 1
    dirty = dirty_for(200, 300, 64)
    assert codec_impl.damage_tiles(current, shadow, 64, dirty) == 1
    assert np.argwhere(dirty).tolist() == [[2, 1]]


def test_a_change_in_the_last_pixel_of_a_ragged_surface_is_found(codec_impl):
    current, shadow = frames(65, 129)  # one pixel past a tile edge both ways
    current[64, 128, 3] ^= 0x80
    dirty = dirty_for(65, 129, 64)
    assert codec_impl.damage_tiles(current, shadow, 64, dirty) == 1
    assert np.argwhere(dirty).tolist() == [[1, 2]]
    assert np.array_equal(shadow, current)


@pytest.mark.parametrize("tile", [1, 3, 7, 64])
def test_one_byte_changed_in_every_tile_dirties_every_tile(codec_impl, tile):
    height, width = 23, 31
    current, shadow = frames(height, width, seed=tile)
    # a different byte position in each tile: first row, last row, last column, the X byte
    for ty in range(-(-height // tile)):
        for tx in range(-(-width // tile)):
            y = min(ty * tile + (ty + tx) % tile, height - 1)
            x = min(tx * tile + (ty * 3 + tx) % tile, width - 1)
            current[y, x, (ty + tx) % 4] ^= 0xFF
    dirty = dirty_for(height, width, tile)
    assert codec_impl.damage_tiles(current, shadow, tile, dirty) == dirty.size
    assert dirty.all()
    assert np.array_equal(shadow, current)


def test_tiles_of_one_pixel_mark_each_changed_pixel(codec_impl):
    current, shadow = frames(5, 6)
    current[0, 0, 0] ^= 1
    current[4, 5, 1] ^= 1
    current[2, 3, 3] ^= 1
    dirty = dirty_for(5, 6, 1)
    assert codec_impl.damage_tiles(current, shadow, 1, dirty) == 3
    assert np.argwhere(dirty).tolist() == [[0, 0], [2, 3], [4, 5]]


@pytest.mark.parametrize("tile", [50, 51, 1000, 2**62])
def test_a_tile_larger_than_the_surface_is_the_whole_surface(codec_impl, tile):
    current, shadow = frames(50, 40)
    current[49, 0, 0] ^= 1
    dirty = np.zeros((1, 1), dtype=np.uint8)
    assert codec_impl.damage_tiles(current, shadow, tile, dirty) == 1
    assert dirty.tolist() == [[1]]
    assert np.array_equal(shadow, current)


@pytest.mark.parametrize("shape", [(0, 10), (10, 0), (0, 0)])
def test_an_empty_surface_has_no_tiles(codec_impl, shape):
    current = np.zeros((*shape, 4), dtype=np.uint8)
    dirty = dirty_for(*shape, 4)
    assert codec_impl.damage_tiles(current, current.copy(), 4, dirty) == 0


def test_copy_brings_the_shadow_up_to_date_only_in_dirty_tiles(codec_impl):
    current, shadow = frames(128, 128)
    current[:] = 1
    shadow[:] = 1
    current[10, 10] = 9
    before = shadow.copy()
    dirty = dirty_for(128, 128, 64)
    codec_impl.damage_tiles(current, shadow, 64, dirty)
    assert np.array_equal(shadow, current)
    assert np.array_equal(shadow[64:], before[64:]) and np.array_equal(shadow[:, 64:], before[:, 64:])


def test_copy_false_leaves_the_shadow_alone_and_accepts_a_read_only_one(codec_impl):
    current, shadow = frames(70, 70)
    current[69, 69, 0] ^= 1
    shadow.flags.writeable = False
    dirty = dirty_for(70, 70, 32)
    assert codec_impl.damage_tiles(current, shadow, 32, dirty, copy=False) == 1
    assert codec_impl.damage_tiles(current, shadow, 32, dirty, copy=False) == 1
    assert dirty[2, 2] == 1
    assert shadow[69, 69, 0] != current[69, 69, 0]


def test_a_second_pass_after_copy_finds_nothing(codec_impl):
    current, shadow = frames(90, 200)
    current[::7, ::11] ^= 0x5A
    dirty = dirty_for(90, 200, 16)
    assert codec_impl.damage_tiles(current, shadow, 16, dirty) > 0
    assert codec_impl.damage_tiles(current, shadow, 16, dirty) == 0
    assert not dirty.any()


# --- damage_tiles: what it refuses ----------------------------------------------------------------


def good_args(height=20, width=30, tile=8):
    current, shadow = frames(height, width)
    return current, shadow, tile, dirty_for(height, width, tile)


def bad_cases():
    """(label, args) for every argument the contract refuses with ValueError."""
    current, shadow, tile, dirty = good_args()
    read_only = shadow.copy()
    read_only.flags.writeable = False
    read_only_dirty = dirty.copy()
    read_only_dirty.flags.writeable = False
    wide = np.zeros((20, 60, 4), dtype=np.uint8)
    backing = np.zeros(dirty.size + shadow.size, dtype=np.uint8)
    return [
        ("tile 0", (current, shadow, 0, dirty)),
        ("tile negative", (current, shadow, -64, dirty)),
        ("current is bytes", (current.tobytes(), shadow, tile, dirty)),
        ("current 2-D", (current.reshape(20, 120), shadow, tile, dirty)),
        ("current 3 channels", (current[:, :, :3].copy(), shadow, tile, dirty)),
        ("current uint16", (current.view(np.uint16), shadow, tile, dirty)),
        ("current int8", (current.view(np.int8), shadow, tile, dirty)),
        ("current 4-D", (current[None], shadow, tile, dirty)),
        ("current strided", (wide[:, ::2], shadow, tile, dirty)),
        ("current Fortran order", (np.asfortranarray(current), shadow, tile, dirty)),
        ("shadow strided", (current, wide[:, ::2], tile, dirty)),
        ("shadow smaller", (current, shadow[:19], tile, dirty)),
        ("shadow uint32", (current, shadow.view(np.uint32), tile, dirty)),
        ("shadow read-only with copy", (current, read_only, tile, dirty)),
        ("shadow is current", (current, current, tile, dirty)),
        ("shadow overlaps current", (wide.reshape(-1)[:2400].reshape(20, 30, 4),
                                     wide.reshape(-1)[8:2408].reshape(20, 30, 4), tile, dirty)),
        ("dirty a list", (current, shadow, tile, dirty.tolist())),
        ("dirty too small", (current, shadow, tile, dirty[:, :3].copy())),
        ("dirty too large", (current, shadow, tile, np.zeros((4, 5), np.uint8))),
        ("dirty transposed shape", (current, shadow, tile, np.zeros((4, 3), np.uint8))),
        ("dirty flat", (current, shadow, tile, dirty.reshape(-1))),
        ("dirty bool", (current, shadow, tile, dirty.astype(bool))),
        ("dirty Fortran order", (current, shadow, tile, np.asfortranarray(np.zeros((3, 4), np.uint8)))),
        ("dirty read-only", (current, shadow, tile, read_only_dirty)),
        ("dirty inside shadow", (current, backing[: shadow.size].reshape(shadow.shape), tile,
                                 backing[shadow.size - 1 :][: dirty.size].reshape(dirty.shape))),
    ]


@pytest.mark.parametrize(("label", "args"), bad_cases(), ids=[label for label, _ in bad_cases()])
def test_bad_arguments_raise_value_error(codec_impl, label, args):
    with pytest.raises(ValueError):
        codec_impl.damage_tiles(*args)


@pytest.mark.parametrize(("label", "args"), bad_cases(), ids=[label for label, _ in bad_cases()])
def test_bad_arguments_raise_the_same_message_on_both_backends(both_codecs, label, args):
    compiled, pure = both_codecs
    with pytest.raises(ValueError) as fast:
        compiled.damage_tiles(*args)
    with pytest.raises(ValueError) as slow:
        pure.damage_tiles(*args)
    assert str(fast.value) == str(slow.value)


def test_a_refused_call_writes_nothing(codec_impl):
    current, shadow, tile, dirty = good_args()
    current[0, 0, 0] ^= 1
    before = shadow.copy()
    with pytest.raises(ValueError):
        codec_impl.damage_tiles(current, shadow, tile, dirty[:, :3].copy())
    assert np.array_equal(shadow, before)


# --- the backends agree; the compiled one stays in bounds -----------------------------------------


@st.composite
def frame_pairs(draw):
    height = draw(st.integers(0, 40))
    width = draw(st.integers(0, 40))
    tile = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shadow = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    current = shadow.copy()
    changes = draw(st.integers(0, 6))
    if height and width:
        for _ in range(changes):
            y, x, c = rng.integers(0, height), rng.integers(0, width), rng.integers(0, 4)
            current[y, x, c] ^= 1 + rng.integers(0, 255)
    return current, shadow, tile, draw(st.booleans())


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frame_pairs())
def test_both_backends_agree(both_codecs, case):
    current, shadow, tile, copy = case
    compiled, pure = both_codecs
    results = []
    for impl in (compiled, pure):
        mine = shadow.copy()
        dirty = dirty_for(*current.shape[:2], tile)
        count = impl.damage_tiles(current, mine, tile, dirty, copy=copy)
        results.append((count, dirty.tolist(), mine.tobytes()))
    assert results[0] == results[1]
    assert results[0][1] == expected_dirty(current, shadow, tile).tolist()


def test_compiled_damage_tiles_stays_inside_its_arrays(both_codecs):
    """Each array ends right at a guard page; any read or write past one kills the process."""
    compiled, _ = both_codecs
    rng = np.random.default_rng(11)
    arenas = [GuardedArena(64 * 64 * 4) for _ in range(3)]
    for _ in range(300):
        height, width, tile = (int(v) for v in rng.integers(1, 64, 3))
        base = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        changed = base.copy()
        changed[rng.integers(0, height), rng.integers(0, width), rng.integers(0, 4)] ^= 0xFF
        changed[height - 1, width - 1, 3] ^= rng.integers(0, 2, dtype=np.uint8)
        current = arenas[0].at_end(changed.tobytes()).reshape(changed.shape)
        shadow = arenas[1].at_end(base.tobytes()).reshape(base.shape)
        dims = (-(-height // tile), -(-width // tile))
        dirty = arenas[2].empty_at_end(dims[0] * dims[1]).reshape(dims)
        expected = expected_dirty(changed, base, tile)
        assert compiled.damage_tiles(current, shadow, tile, dirty) == expected.sum()
        assert np.array_equal(dirty, expected) and np.array_equal(shadow, changed)


# --- Damage: rectangles ---------------------------------------------------------------------------


def test_a_new_tracker_sees_nothing_on_a_black_screen():
    damage = Damage(100, 100, tile=10)
    assert damage.collect(np.zeros((100, 100, 4), np.uint8)) == []
    assert damage.dirty_count == 0


def test_one_changed_pixel_is_one_tile_rect():
    damage = Damage(100, 100, tile=10)
    frame = damage.shadow.copy()
    frame[55, 23] = 7
    assert damage.collect(frame) == [Rect(top=50, left=20, bottom=60, right=30)]
    assert damage.dirty_count == 1
    assert np.array_equal(damage.shadow, frame)


def test_a_run_of_tiles_along_a_row_is_one_rect():
    damage = Damage(100, 100, tile=10)
    frame = damage.shadow.copy()
    frame[5, 10:40] = 1
    assert damage.collect(frame) == [Rect(0, 10, 10, 40)]
    assert damage.dirty_count == 3


def test_the_same_run_in_consecutive_tile_rows_merges_into_one_taller_rect():
    damage = Damage(100, 100, tile=10)
    frame = damage.shadow.copy()
    frame[15:45, 31:59] = 1
    assert damage.collect(frame) == [Rect(10, 30, 50, 60)]
    assert damage.dirty_count == 12


def test_different_runs_in_consecutive_rows_stay_apart():
    damage = Damage(40, 40, tile=10)
    frame = damage.shadow.copy()
    frame[0, 0:20] = 1  # row 0: tiles 0-1
    frame[10, 0:30] = 1  # row 1: tiles 0-2, not the same run
    frame[20, 0:20] = 1  # row 2: tiles 0-1 again: a new rect, not joined across row 1
    assert damage.collect(frame) == [Rect(0, 0, 10, 20), Rect(10, 0, 20, 30), Rect(20, 0, 30, 20)]


def test_two_runs_in_a_row_are_two_rects_in_left_to_right_order():
    damage = Damage(30, 100, tile=10)
    frame = damage.shadow.copy()
    frame[0:30, 80] = 1
    frame[0:30, 5] = 1
    frame[12, 40] = 1
    assert damage.collect(frame) == [Rect(0, 0, 30, 10), Rect(0, 80, 30, 90), Rect(10, 40, 20, 50)]


def test_rects_are_clipped_to_the_surface_edge():
    damage = Damage(65, 129, tile=64)
    frame = damage.shadow.copy()
    frame[64, 0:129] = 3
    assert damage.collect(frame) == [Rect(64, 0, 65, 129)]


def test_the_rects_cover_exactly_the_dirty_tiles():
    rng = np.random.default_rng(5)
    damage = Damage(97, 131, tile=8)
    for _ in range(20):
        frame = damage.shadow.copy()
        for _ in range(rng.integers(1, 30)):
            frame[rng.integers(0, 97), rng.integers(0, 131)] ^= 0x11
        rects = damage.collect(frame)
        covered = np.zeros((97, 131), dtype=np.int64)
        for r in rects:
            covered[r.top : r.bottom, r.left : r.right] += 1
        tiles = np.kron(damage.dirty, np.ones((8, 8), dtype=np.int64))[:97, :131]
        assert np.array_equal(covered, tiles)  # every dirty pixel once, nothing else
        assert sum(r.area for r in rects) == int(tiles.sum())


def test_invalidate_makes_the_next_collect_the_whole_surface_once():
    damage = Damage(50, 70, tile=16)
    frame = np.full((50, 70, 4), 9, np.uint8)
    damage.collect(frame)
    damage.invalidate()
    assert damage.collect(frame) == [Rect(0, 0, 50, 70)]
    assert damage.dirty_count == damage.dirty.size == 4 * 5
    assert damage.collect(frame) == []


def test_invalidate_copies_the_framebuffer_into_the_shadow():
    damage = Damage(20, 20)
    frame = np.random.default_rng(1).integers(0, 256, (20, 20, 4), dtype=np.uint8)
    damage.invalidate()
    damage.collect(frame)
    assert np.array_equal(damage.shadow, frame)


def test_a_framebuffer_of_another_size_is_refused_even_after_invalidate():
    damage = Damage(20, 20)
    with pytest.raises(ValueError):
        damage.collect(np.zeros((20, 21, 4), np.uint8))
    damage.invalidate()
    with pytest.raises(ValueError):
        damage.collect(np.zeros((21, 20, 4), np.uint8))


@pytest.mark.parametrize(("height", "width", "tile"), [(-1, 5, 64), (5, -1, 64), (5, 5, 0)])
def test_a_tracker_of_impossible_geometry_is_refused(height, width, tile):
    with pytest.raises(ValueError):
        Damage(height, width, tile)
