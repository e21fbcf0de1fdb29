"""Screens: the registry, the base bookkeeping (pointer, keys, cursor, save/restore), the clock's
picture and its cheap redraws, and painting."""

import re
import time

import numpy as np
import pytest

from spicewire import screens
from spicewire.damage import Damage
from spicewire.protocol.enums import ButtonMask, MouseButton
from spicewire.screens import PALETTE, ScreenContext, key_name

S1 = ScreenContext(server_name="s1", listen="127.0.0.1:5900", session_id=0xAADCE55B)
S2 = ScreenContext(server_name="s2-elsewhere", listen="127.0.0.1:5901", session_id=0xAADCE55B)

KEY_1, KEY_2, KEY_3, KEY_9, KEY_C, KP_4 = 0x02, 0x03, 0x04, 0x0A, 0x2E, 0x4B
LEFT = ButtonMask.LEFT


def pixel(rgb):
    """A colour as the framebuffer holds it: B, G, R, X."""
    return [rgb[2], rgb[1], rgb[0], 0xFF]


class WallClock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


# --- registry -------------------------------------------------------------------------------------


def test_the_built_in_kinds_are_registered():
    assert {"clock", "paint"} <= set(screens.kinds())


def test_factory_makes_a_new_screen_of_the_default_size_per_call():
    make = screens.factory("paint")
    first, second = make(), make()
    assert first is not second
    assert (first.width, first.height) == (screens.DEFAULT_WIDTH, screens.DEFAULT_HEIGHT) == (1024, 768)
    assert first.kind == "paint"


def test_factory_defaults_each_side_on_its_own():
    assert screens.factory("paint", 300)().framebuffer.shape == (768, 300, 4)
    assert screens.factory("paint", None, 200)().framebuffer.shape == (200, 1024, 4)


def test_factory_takes_a_size():
    screen = screens.factory("clock", 320, 200)()
    assert (screen.width, screen.height) == (320, 200)
    assert screen.framebuffer.shape == (200, 320, 4)


def test_factory_refuses_an_unknown_kind_naming_the_known_ones():
    with pytest.raises(ValueError, match="clock"):
        screens.factory("nope")


@pytest.mark.parametrize(("width", "height"), [(-1, 10), (10, -5), (0, 10), (10, 0), (screens.MAX_SIDE + 1, 10),
                                             (10, 99999)])
def test_factory_refuses_an_impossible_size_at_once(width, height):
    with pytest.raises(ValueError):
        screens.factory("paint", width, height)


@pytest.mark.parametrize(("width", "height"), [(screens.MAX_SIDE, 1), (1, screens.MAX_SIDE), (1, 1)])
def test_factory_takes_sides_up_to_max_side(width, height):
    screen = screens.factory("paint", width, height)()
    assert screen.framebuffer.shape == (height, width, 4)


def test_register_adds_a_kind_the_factory_makes():
    @screens.register("test-blank")
    class Blank(screens.Screen):
        pass

    try:
        assert "test-blank" in screens.kinds()
        assert isinstance(screens.factory("test-blank", 8, 8)(), Blank)
        assert Blank.kind == "test-blank"
    finally:
        screens._KINDS.pop("test-blank")


@pytest.mark.parametrize("kind", ["clock", "paint"])
def test_the_framebuffer_is_c_contiguous_xrgb_with_the_x_byte_set(kind):
    screen = screens.factory(kind, 64, 48)()
    fb = screen.framebuffer
    assert fb.dtype == np.uint8 and fb.shape == (48, 64, 4) and fb.flags.c_contiguous
    assert (fb[:, :, 3] == 0xFF).all()


# --- base bookkeeping -----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "name"), [
    (0x01, "Escape"), (0x02, "1"), (0x0B, "0"), (0x10, "q"), (0x1E, "a"), (0x2E, "c"), (0x32, "m"),
    (0x1C, "Return"), (0x39, "space"), (0x3B, "F1"), (0x44, "F10"), (0x58, "F12"), (0x4B, "KP_4"),
    (0x38, "Alt_L"), (0x138, "Alt_R"), (0x1D, "Control_L"), (0x11D, "Control_R"), (0x11C, "KP_Enter"),
    (0x148, "Up"), (0x150, "Down"), (0x14B, "Left"), (0x153, "Delete"), (0x15B, "Super_L"),
])
def test_key_name_spells_set_1_scancodes_and_extended_ones(code, name):
    assert key_name(code) == name


def test_key_name_of_an_unknown_scancode_shows_the_code():
    assert key_name(0x7F) == "scancode_0x7f"
    assert key_name(0x1FF) == "scancode_0x1ff"


def test_keys_down_and_up_are_tracked_by_name():
    screen = screens.factory("paint", 32, 32)()
    screen.key_down(0x2A)
    screen.key_down(0x1E)
    screen.key_up(0x2A)
    status = screen.status()
    assert status["keys_down"] == ["a"]
    assert status["last_key"] == "a"
    assert status["key_presses"] == 2


def test_the_pointer_starts_in_the_middle_and_moves_by_motion():
    screen = screens.factory("clock", 100, 80)()
    assert screen.pointer == (50, 40)
    screen.mouse_motion(7, -5, 0)
    assert screen.pointer == (57, 35)


@pytest.mark.parametrize(("dx", "dy", "expected"), [(-1000, 0, (0, 40)), (1000, 1000, (99, 79)), (0, -41, (50, 0))])
def test_motion_is_clamped_to_the_screen(dx, dy, expected):
    screen = screens.factory("clock", 100, 80)()
    screen.mouse_motion(dx, dy, 0)
    assert screen.pointer == expected


def test_a_position_is_clamped_to_the_screen():
    screen = screens.factory("clock", 100, 80)()
    screen.mouse_position(2**32 - 1, 3, 0)
    assert screen.pointer == (99, 3)


def test_buttons_and_modifiers_are_kept():
    screen = screens.factory("clock", 10, 10)()
    screen.mouse_press(MouseButton.RIGHT, ButtonMask.RIGHT)
    screen.key_modifiers(5)
    assert (screen.buttons, screen.modifiers) == (ButtonMask.RIGHT, 5)
    screen.mouse_release(MouseButton.RIGHT, 0)
    assert screen.buttons == 0
    assert screen.status()["mouse_events"] == 2


def test_set_cursor_bumps_the_version():
    screen = screens.factory("clock", 10, 10)()
    version = screen.cursor_version
    shape = screen.cursor
    assert shape is not None and shape.pixels.shape[2] == 4 and (shape.pixels[:, :, 3] > 0).any()
    screen.set_cursor(None, visible=False)
    assert screen.cursor_version == version + 1
    assert (screen.cursor, screen.cursor_visible) == (None, False)


# --- clock ----------------------------------------------------------------------------------------


def clock_screen(width=640, height=480, wall=None):
    return screens.ClockScreen(width, height, wall_clock=wall or WallClock())


def ink_in(fb, rows, cols, rgb):
    return bool((fb[rows, cols] == pixel(rgb)).all(axis=2).any())


def test_the_clock_writes_its_lines_and_the_time_in_ink():
    screen = clock_screen()
    screen.attach(S1)
    fb = screen.framebuffer
    info = slice(screen.margin, screen.clock_top)
    clock = slice(screen.clock_top, screen.clock_top + screen.clock_height)
    assert ink_in(fb, info, slice(None), screen.ink)
    assert ink_in(fb, clock, slice(0, screen.clock_width), screen.clock_ink)
    assert (fb[clock.stop :] == pixel(screen.background)).all()  # nothing below the clock


def test_the_clock_shows_the_wall_time_to_a_tenth():
    wall = WallClock(1_700_000_123.45)
    screen = clock_screen(wall=wall)
    expected = time.strftime("%H:%M:%S", time.localtime(wall.now)) + ".4"
    assert screen.status()["clock"] == expected
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d", expected)


def test_a_tick_in_the_same_tenth_changes_nothing():
    wall = WallClock(100.01)
    screen = clock_screen(wall=wall)
    before = screen.framebuffer.copy()
    wall.now = 100.09
    screen.tick(0.0)
    assert np.array_equal(screen.framebuffer, before)


def test_between_ticks_only_the_clocks_tiles_change():
    wall = WallClock(100.0)
    screen = clock_screen(1024, 768, wall=wall)
    screen.attach(S1)
    damage = Damage(screen.height, screen.width, tile=64)
    damage.collect(screen.framebuffer)
    for step in range(1, 12):
        before = screen.framebuffer.copy()
        wall.now = 100.0 + step * 0.1 + 0.01
        screen.tick(wall.now)
        changed = np.argwhere((screen.framebuffer != before).any(axis=2))
        assert len(changed)
        assert changed[:, 0].min() >= screen.clock_top
        assert changed[:, 0].max() < screen.clock_top + screen.clock_height
        assert changed[:, 1].max() < screen.clock_width
        rects = damage.collect(screen.framebuffer)
        top = screen.clock_top // 64 * 64
        assert all(r.top >= top and r.bottom <= screen.clock_top + screen.clock_height + 63 for r in rects)
        assert all(r.right <= -(-screen.clock_width // 64) * 64 for r in rects)
        assert damage.dirty_count <= 3 * -(-screen.clock_width // 64)


def test_attaching_to_another_server_redraws_the_lines_only():
    screen = clock_screen()
    screen.attach(S1)
    before = screen.framebuffer.copy()
    screen.attach(S2)
    changed = np.argwhere((screen.framebuffer != before).any(axis=2))
    assert len(changed)
    assert changed[:, 0].max() < screen.clock_top
    assert screen.status()["server_name"] == "s2-elsewhere"


def test_attaching_again_to_the_same_server_draws_the_same_picture():
    screen = clock_screen()
    screen.attach(S1)
    before = screen.framebuffer.copy()
    screen.attach(S2)
    screen.attach(S1)
    assert np.array_equal(screen.framebuffer, before)


def test_a_tiny_clock_still_draws_without_error():
    screen = clock_screen(8, 8)
    screen.attach(S1)
    screen.tick(1.0)
    assert screen.framebuffer.shape == (8, 8, 4)


def test_the_clock_wants_ticks_and_paint_does_not():
    assert screens.ClockScreen.wants_ticks and not screens.PaintScreen.wants_ticks


# --- paint ----------------------------------------------------------------------------------------


def paint_screen():
    screen = screens.factory("paint", 200, 100)()
    screen.attach(S1)
    return screen


def painted(screen):
    return (screen.framebuffer != pixel(screen.background)).any(axis=2)


def test_a_new_canvas_is_blank():
    assert not painted(paint_screen()).any()


def test_a_left_click_paints_the_brush_around_the_pointer_in_black():
    screen = paint_screen()
    screen.mouse_position(50, 40, 0)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    ys, xs = np.nonzero(painted(screen))
    half = screen.brush // 2
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40 - half, 40 - half + screen.brush - 1,
                                                         50 - half, 50 - half + screen.brush - 1)
    assert screen.framebuffer[40, 50].tolist() == pixel(PALETTE[0])


def test_motion_with_the_left_button_paints_a_continuous_line():
    screen = paint_screen()
    screen.mouse_position(20, 50, 0)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    screen.mouse_motion(150, 0, LEFT)
    row = painted(screen)[50]
    assert row[20:171].all()  # no gaps, however fast the pointer went
    assert not painted(screen)[:40].any() and not painted(screen)[60:].any()


def test_positions_with_the_left_button_paint_where_they_point():
    screen = paint_screen()
    screen.mouse_position(10, 10, 0)
    screen.mouse_position(10, 80, LEFT)
    column = painted(screen)[:, 10]
    assert column[10:81].all()
    assert screen.framebuffer[80, 10].tolist() == pixel(PALETTE[0])


def test_moving_without_the_left_button_paints_nothing():
    screen = paint_screen()
    screen.mouse_motion(30, 10, 0)
    screen.mouse_position(5, 5, ButtonMask.RIGHT)
    screen.mouse_press(MouseButton.RIGHT, ButtonMask.RIGHT)
    assert not painted(screen).any()


def test_releasing_the_button_ends_the_stroke():
    screen = paint_screen()
    screen.mouse_position(10, 10, 0)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    screen.mouse_release(MouseButton.LEFT, 0)
    screen.mouse_position(150, 80, 0)
    assert not painted(screen)[40:].any()


@pytest.mark.parametrize(("code", "colour"), [(KEY_2, 1), (KEY_3, 2), (KEY_9, 8), (KP_4, 3)])
def test_number_keys_pick_the_colour(code, colour):
    screen = paint_screen()
    version = screen.cursor_version
    screen.key_down(code)
    screen.mouse_position(100, 50, 0)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    assert screen.framebuffer[50, 100].tolist() == pixel(PALETTE[colour])
    assert screen.status()["colour"] == colour + 1
    assert screen.cursor_version > version  # the cursor shows the new colour
    assert screen.cursor is not None
    assert screen.cursor.pixels[screen.cursor.hot_y, screen.cursor.hot_x].tolist() == [
        PALETTE[colour][2], PALETTE[colour][1], PALETTE[colour][0], 0xFF]


def test_red_is_stored_blue_green_red():
    screen = paint_screen()
    screen.key_down(KEY_2)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    x, y = screen.pointer
    assert screen.framebuffer[y, x].tolist() == [0x35, 0x39, 0xE5, 0xFF]


def test_c_clears_the_canvas():
    screen = paint_screen()
    screen.mouse_position(0, 0, LEFT)
    screen.mouse_position(199, 99, LEFT)
    assert painted(screen).any()
    screen.key_down(KEY_C)
    assert not painted(screen).any()


def test_other_keys_leave_the_canvas_and_colour_alone():
    screen = paint_screen()
    screen.mouse_press(MouseButton.LEFT, LEFT)
    before = screen.framebuffer.copy()
    for code in (0x1E, 0x0B, 0x148, 0x7F):
        screen.key_down(code)
    assert np.array_equal(screen.framebuffer, before)
    assert screen.status()["colour"] == 1


def test_the_brush_is_clipped_at_the_edges():
    screen = paint_screen()
    screen.mouse_position(0, 0, LEFT)
    screen.mouse_position(199, 99, LEFT)
    assert painted(screen)[0, 0] and painted(screen)[99, 199]


# --- save and restore -----------------------------------------------------------------------------


def test_paint_save_restore_round_trip_continues_the_stroke():
    screen = paint_screen()
    screen.key_down(KEY_3)
    screen.mouse_position(30, 30, 0)
    screen.mouse_press(MouseButton.LEFT, LEFT)
    screen.key_modifiers(2)
    chunks = screen.save()
    assert all(isinstance(chunk, bytes) for chunk in chunks)

    moved = screens.factory("paint", 200, 100)()
    moved.framebuffer[...] = screen.framebuffer  # the migration moves the canvas itself
    moved.restore(chunks)
    moved.attach(S2)
    assert moved.status() == screen.status()
    assert moved.cursor is not None and screen.cursor is not None
    assert np.array_equal(moved.cursor.pixels, screen.cursor.pixels)
    for s in (screen, moved):
        s.mouse_motion(0, 40, LEFT)  # the button is still down on both
    assert np.array_equal(moved.framebuffer, screen.framebuffer)
    assert moved.framebuffer[70, 30].tolist() == pixel(PALETTE[2])


@pytest.mark.parametrize("state", [b"[]", b"3", b'"paint"'])
def test_a_saved_state_that_is_not_an_object_is_refused(state):
    """It comes from another server: a TypeError (a 400 there), not an AttributeError (a 500)."""
    saved = paint_screen().save()
    with pytest.raises(TypeError, match="saved state is a JSON object"):
        screens.factory("paint", 200, 100)().restore([state, *saved[1:]])


def test_clock_save_restore_round_trip():
    screen = clock_screen()
    screen.attach(S1)
    screen.mouse_position(5, 6, ButtonMask.MIDDLE)
    screen.key_down(0x148)
    moved = clock_screen()
    moved.restore(screen.save())
    assert moved.status()["pointer"] == [5, 6]
    assert moved.status()["keys_down"] == ["Up"]
    assert moved.buttons == ButtonMask.MIDDLE


def test_restore_bumps_the_cursor_version():
    screen = paint_screen()
    moved = screens.factory("paint", 200, 100)()
    version = moved.cursor_version
    moved.restore(screen.save())
    assert moved.cursor_version > version


def test_restore_refuses_another_kind():
    with pytest.raises(ValueError, match="clock"):
        paint_screen().restore(clock_screen(200, 100).save())


def test_restore_refuses_another_size():
    with pytest.raises(ValueError, match="200x100"):
        screens.factory("paint", 201, 100)().restore(paint_screen().save())


def test_restore_refuses_a_colour_outside_the_palette():
    screen = paint_screen()
    state = screen.state()
    state["colour"] = len(PALETTE)
    with pytest.raises(ValueError, match="colour"):
        screen.load_state(state)
