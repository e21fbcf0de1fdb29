"""Capability bitmaps, PROTOCOL.md 1.3."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spicewire.errors import CodecError
from spicewire.protocol.caps import caps_to_words, has_cap, words_to_caps
from spicewire.protocol.enums import CommonCap, MainCap


def test_cap_n_is_bit_n_mod_32_of_word_n_div_32():
    assert caps_to_words([0]) == [1]
    assert caps_to_words([33]) == [0, 2]
    assert words_to_caps([0, 2]) == {33}


def test_no_caps_is_zero_words():
    assert caps_to_words([]) == []
    assert words_to_caps([]) == frozenset()


def test_word_count_is_smallest_holding_highest_bit():
    assert len(caps_to_words([31])) == 1
    assert len(caps_to_words([32])) == 2
    assert len(caps_to_words([3, 64])) == 3


def test_what_real_peers_advertise():
    gtk_common = [CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER]
    assert caps_to_words(gtk_common) == [0x09]
    server_common = [*gtk_common, CommonCap.AUTH_SPICE]
    assert caps_to_words(server_common) == [0x0B]
    assert caps_to_words(MainCap) == [0x0F]
    assert caps_to_words([MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.SEAMLESS_MIGRATE]) == [0x09]


def test_duplicate_caps_are_one_bit():
    assert caps_to_words([3, 3]) == [8]


def test_cap_beyond_the_words_sent_is_absent():
    assert has_cap([0x09], CommonCap.MINI_HEADER)
    assert not has_cap([0x09], CommonCap.AUTH_SPICE)
    assert not has_cap([0x09], 40)
    assert not has_cap([], 0)


def test_negative_cap_is_rejected():
    with pytest.raises(CodecError):
        caps_to_words([-1])


def test_word_that_is_not_u32_is_rejected():
    with pytest.raises(CodecError):
        words_to_caps([1 << 32])


@given(st.frozensets(st.integers(0, 32 * 40)))
def test_caps_round_trip_through_minimal_words(caps):
    words = caps_to_words(caps)
    assert words_to_caps(words) == caps
    assert words == [] or words[-1] != 0  # minimal: the last word carries the highest bit
    assert all(has_cap(words, cap) for cap in caps)
