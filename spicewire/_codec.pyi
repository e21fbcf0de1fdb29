"""The compiled codec's API (_codec.pyx); the pure twin _codec_py.py has the same one."""

from collections.abc import Iterable
from typing import Any, Literal, TypeAlias, overload

import numpy as np
import numpy.typing as npt
import typing_extensions

from spicewire._codec_layout import DEFAULT_MAX_SIZE as DEFAULT_MAX_SIZE

# Anything exporting a C-contiguous buffer. numpy declares ndarray.__buffer__ only for Python 3.12
# and later, so arrays are named apart from the buffer protocol.
Buffer: TypeAlias = typing_extensions.Buffer | npt.NDArray[Any]

@overload
def parse_header(buf: Buffer, offset: int = 0, mini: Literal[True] = True) -> tuple[int, int] | None: ...
@overload
def parse_header(buf: Buffer, offset: int, mini: Literal[False]) -> tuple[int, int, int, int] | None: ...
@overload
def parse_header(buf: Buffer, *, mini: Literal[False]) -> tuple[int, int, int, int] | None: ...
@overload
def parse_header(buf: Buffer, offset: int = 0, mini: bool = True) -> tuple[int, ...] | None: ...
def scan(
    buf: Buffer, mini: bool = True, max_size: int = ...
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint16], npt.NDArray[np.uint32], int]: ...
def packed_size(chunks: Iterable[Buffer]) -> int: ...
def pack_chunks(chunks: Iterable[Buffer], out: npt.NDArray[np.uint8] | None = None) -> npt.NDArray[np.uint8]: ...
def unpack_chunks(buf: Buffer) -> list[memoryview]: ...
def damage_tiles(
    current: npt.NDArray[np.uint8],
    shadow: npt.NDArray[np.uint8],
    tile: int,
    dirty: npt.NDArray[np.uint8],
    copy: bool = True,
) -> int: ...
def fault_in(buf: Buffer, step: int = ..., advise: bool = True) -> None: ...
