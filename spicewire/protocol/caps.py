"""Capability bitmaps (PROTOCOL.md 1.3): capability N is bit N % 32 of u32 word N // 32."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spicewire.errors import CodecError

_U32_MAX = 0xFFFFFFFF


def caps_to_words(caps: Iterable[int]) -> list[int]:
    """The fewest u32 words that hold every capability in ``caps``; no caps gives no words."""
    words: list[int] = []
    for cap in caps:
        cap = int(cap)
        if cap < 0:
            raise CodecError(f"capability number {cap} is negative")
        index, bit = divmod(cap, 32)
        if index >= len(words):
            words.extend([0] * (index + 1 - len(words)))
        words[index] |= 1 << bit
    return words


def words_to_caps(words: Iterable[int]) -> frozenset[int]:
    """The capability numbers set in ``words``."""
    caps = set()
    for index, word in enumerate(words):
        if not 0 <= word <= _U32_MAX:
            raise CodecError(f"capability word {index} = {word} is not a u32")
        while word:
            low = word & -word  # lowest set bit: visits only set bits, not all 32
            caps.add(index * 32 + low.bit_length() - 1)
            word ^= low
    return frozenset(caps)


def has_cap(words: Sequence[int], cap: int) -> bool:
    """Whether ``cap`` is set; a peer that sent fewer words simply lacks the higher caps."""
    index, bit = divmod(int(cap), 32)
    return 0 <= index < len(words) and bool(words[index] >> bit & 1)
