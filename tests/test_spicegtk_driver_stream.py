"""The spice-gtk driver's streaming echo check (``EchoStream``), without spice-gtk: it must catch a
loss, a repeat and extra bytes, and resynchronise after a semi-seamless reset."""

import pytest

from .peers.spicegtk_driver import EchoStream, parse_args, stream_bytes, stream_word


def write_all(stream: EchoStream, n: int) -> bytes:
    out = b""
    while len(out) < n:
        epoch, data = stream.next_write(0.0)
        stream.written(epoch, len(data))
        out += data
    return out


def test_stream_words_say_their_epoch_and_offset():
    data = stream_bytes(3, 1000, 64)
    assert data == stream_bytes(3, 0, 2000)[1000:1064]
    assert stream_word(data[0:8]) == {"epoch": 3, "offset": 1000}
    assert stream_word(b"\0" * 8) is None


def test_an_exact_echo_in_odd_pieces_drains():
    s = EchoStream(chunk=4096, max_inflight=10000, rate=0, resync=False)
    s.started = 0.0
    sent = write_all(s, 10000)
    assert s.next_write(0.0) is None  # the window is full
    for i in range(0, len(sent), 777):
        assert s.received(sent[i:i + 777], 0.0, True)
    assert s.drained() and s.report()["byte_exact"]


def test_a_lost_chunk_is_a_mismatch_that_names_what_came_instead():
    s = EchoStream(chunk=4096, max_inflight=1 << 20, rate=0, resync=False)
    s.started = 0.0
    sent = write_all(s, 3 * 4096)
    assert s.received(sent[:4096], 0.0, True)
    assert not s.received(sent[8192:], 0.0, True)
    mm = s.report()["mismatch"]
    assert 4096 <= mm["offset"] < 4104 and mm["expected_word_at"] == 4096
    assert mm["received_word"] == {"epoch": 0, "offset": 8192}


def test_a_repeat_and_extra_bytes_are_mismatches():
    s = EchoStream(chunk=4096, max_inflight=1 << 20, rate=0, resync=False)
    s.started = 0.0
    sent = write_all(s, 4096)
    assert s.received(sent[:100], 0.0, True)
    assert not s.received(sent[:100], 0.0, True)  # repeated
    s = EchoStream(chunk=4096, max_inflight=1 << 20, rate=0, resync=False)
    s.started = 0.0
    sent = write_all(s, 4096)
    assert not s.received(sent + stream_bytes(0, 4096, 8), 0.0, True)
    assert s.report()["mismatch"]["kind"] == "more echoed than written"


def test_a_reset_starts_a_new_epoch_after_the_stale_bytes():
    s = EchoStream(chunk=4096, max_inflight=1 << 20, rate=0, resync=True)
    s.started = 0.0
    old = write_all(s, 4 * 4096)
    assert s.received(old[:5000], 0.0, True)  # then the reset loses the rest, but one late write
    s.reinit(1.0)
    new = write_all(s, 2 * 4096)
    assert s.received(old[12288:] + new[:100], 1.0, True)
    assert s.received(new[100:], 1.0, True)
    rep = s.report()
    first, second = rep["epochs"]
    assert first["stale_ranges"] == [{"from": 12288, "bytes": 4096, "exact": True}]
    assert first["lost"] == 4 * 4096 - 5000 - 4096
    assert second["echoed"] == second["written"] == 2 * 4096 and second["lost"] == 0
    assert rep["mismatch"] is None and not rep["byte_exact"] and s.drained()


def test_a_write_of_a_given_size_waits_until_the_window_has_room_for_all_of_it():
    """--write-sizes: a write is issued whole once it fits the window, never cut to what fits."""
    s = EchoStream(chunk=4096, max_inflight=10, rate=0, resync=False, write_sizes=(4,))
    s.started = 0.0
    first = write_all(s, 8)  # two writes of 4: 2 bytes of room are left
    assert s.received(first[:1], 0.0, True)  # 3 bytes of room: one short of a write
    assert s.next_write(0.0) is None
    assert s.received(first[1:2], 0.0, True)  # room for exactly one write
    epoch, data = s.next_write(0.0)
    assert (epoch, len(data), s.writes) == (0, 4, 3)


def test_write_sizes_may_fill_the_window_but_not_exceed_it():
    stream = ["--port", "1", "--expect-echo", "--stream-seconds", "1", "--max-inflight", "4096"]
    assert parse_args([*stream, "--write-sizes", "1024,4096"]).write_sizes == (1024, 4096)
    with pytest.raises(SystemExit):
        parse_args([*stream, "--write-sizes", "1024,4097"])
