"""Display, inputs and cursor payloads that are more than a row of fields (CHANNELS.md 1.2-1.4):
rectangles, the images inside DRAW_COPY, cursor shapes, and the display and inputs migrate data.

The plain messages of these channels are declared in ``messages.py`` like every other; what lives
here are the layouts with pointers into the body and bulk pixel data, built and parsed by hand so
a 1080p frame is copied once, not field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Rect:
    """SpiceRect: ``top`` and ``left`` inside, ``bottom`` and ``right`` one past the edge."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)


@dataclass(frozen=True)
class CursorShape:
    """A cursor image: ``pixels`` is height x width x 4 uint8 in SPICE's ALPHA layout (B, G, R, A
    in memory), ``hot_x``/``hot_y`` the pointer's tip."""

    pixels: np.ndarray
    hot_x: int = 0
    hot_y: int = 0
    unique: int = 0  # the client may cache shapes by this id; 0 with no CACHE_ME flag

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])
