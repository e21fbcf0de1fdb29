"""Hypothesis strategies for the wire structs, built from the same declarations the codec compiles
(``WireStruct.LAYOUT``): the message property tests and the parser fuzzing draw from these."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from spicewire.protocol import framing
from spicewire.protocol import messages as m

# Any text a C peer can carry: no NUL, and no lone surrogates (not encodable as UTF-8 at all).
C_TEXT = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=12)


def scalar(kind: m.Scalar) -> st.SearchStrategy[int]:
    bits = kind.size * 8
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind.signed else st.integers(0, (1 << bits) - 1)


def field_values(kind: object, values: dict) -> st.SearchStrategy:
    """Values of one field of ``kind``; ``values`` holds the fields drawn before it (a When
    field is present only if its predicate holds on the field it depends on)."""
    if isinstance(kind, m.Scalar):
        return scalar(kind)
    if isinstance(kind, m.FixedBytes):
        return st.binary(min_size=kind.n, max_size=kind.n)
    if isinstance(kind, m.Rest):
        return st.binary(max_size=48)
    if isinstance(kind, m.Padding):
        return st.integers(0, 32)
    if isinstance(kind, m.CString):
        return C_TEXT
    if isinstance(kind, m.Pointer):
        return C_TEXT if kind.nonnull else st.none() | C_TEXT
    if isinstance(kind, (m.Array, m.CountedArray)):
        return st.lists(wire_values(kind.item), max_size=3).map(tuple)
    if isinstance(kind, m.When):
        if not kind.predicate(values[kind.on]):
            return st.none()  # absent on the wire, so absent after decoding
        return scalar(m.Scalar(kind.struct.format[-1]))
    if isinstance(kind, m.SubMessages):
        sub = st.builds(framing.SubMessage, st.integers(0, 0xFFFF), st.binary(max_size=12))
        return st.lists(sub, max_size=3).map(tuple)
    if isinstance(kind, m.Nested):
        return wire_values(kind.cls)
    raise AssertionError(f"no strategy for the wire kind {kind!r}: add one")


def wire_values(cls: type[m.WireStruct]) -> st.SearchStrategy:
    """Valid instances of ``cls``."""

    @st.composite
    def build(draw: Callable) -> m.WireStruct:
        values: dict = {}
        for name, kind in cls.LAYOUT:
            values[name] = draw(field_values(kind, values))
        for name, kind in cls.LAYOUT:
            if isinstance(kind, m.CountedArray):
                values[kind.on] = len(values[name])
        return cls(**values)

    return build()
