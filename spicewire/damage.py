"""What changed on a surface since the client last got it, as a few rectangles to redraw.

``Damage`` keeps a shadow copy of the surface as the client has it (or will have it, once the draws
just collected arrive). ``collect`` compares the screen's framebuffer with the shadow in tiles
(``codec.damage_tiles``: compiled, without the GIL), brings the shadow up to date, and returns the
changed tiles merged into rectangles: a run of dirty tiles along a tile row is one rectangle, and the
same run in the tile rows below makes it taller. Fewer, larger DRAW_COPYs cost less than one per tile.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from spicewire import codec
from spicewire.protocol.graphics import Rect

DEFAULT_TILE = 64


class Damage:
    """Tracks one surface of ``height`` x ``width`` pixels in tiles of ``tile`` x ``tile``.

    A new tracker's shadow is black (all zeros); call ``invalidate`` when what the client shows is
    unknown (a new display channel, a client reset), and the next ``collect`` returns the whole
    surface. A migration that moves the client's picture writes it into ``shadow`` instead.
    """

    def __init__(self, height: int, width: int, tile: int = DEFAULT_TILE) -> None:
        if height < 0 or width < 0:
            raise ValueError(f"a surface cannot be {width}x{height}")
        if tile < 1:
            raise ValueError(f"tile must be >= 1, got {tile}")
        self.height = height
        self.width = width
        self.tile = tile
        self.shadow: npt.NDArray[np.uint8] = np.zeros((height, width, 4), dtype=np.uint8)
        # The tiles the last collect found changed, 1 each (``rects`` merges them).
        self.dirty: npt.NDArray[np.uint8] = np.zeros((-(-height // tile), -(-width // tile)), dtype=np.uint8)
        self.dirty_count = 0
        self._invalid = False

    def invalidate(self) -> None:
        self._invalid = True

    def collect(self, framebuffer: npt.NDArray[np.uint8]) -> list[Rect]:
        """The rectangles where ``framebuffer`` differs from the shadow, which then equals it."""
        # Compared even when invalid: it validates the framebuffer, and copies only what differs.
        self.dirty_count = codec.damage_tiles(framebuffer, self.shadow, self.tile, self.dirty)
        if self._invalid:
            self.dirty.fill(1)
            self.dirty_count = self.dirty.size
            self._invalid = False
            return [Rect(0, 0, self.height, self.width)] if self.dirty.size else []
        return self.rects() if self.dirty_count else []

    def rects(self) -> list[Rect]:
        """The dirty tiles of the last collect as rectangles, ordered by top edge, then left edge."""
        bands: list[tuple[int, int, int, int]] = []  # (top row, end row, first column, end column), in tiles
        open_runs: dict[tuple[int, int], int] = {}  # a run still growing downwards -> its top tile row
        for ty, row in enumerate(self.dirty):
            edges = np.flatnonzero(np.diff(row.astype(np.int8), prepend=0, append=0))
            runs = set(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
            ended = [run for run in open_runs if run not in runs]
            bands.extend((open_runs.pop(run), ty, *run) for run in ended)
            for run in runs:
                open_runs.setdefault(run, ty)
        bands.extend((top, len(self.dirty), *run) for run, top in open_runs.items())
        bands.sort(key=lambda band: (band[0], band[2]))
        tile = self.tile
        return [
            Rect(top=top * tile, left=first * tile, bottom=min(end_row * tile, self.height),
                 right=min(end * tile, self.width))
            for top, end_row, first, end in bands
        ]
