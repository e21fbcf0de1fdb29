"""Large DATA messages from our client reach the device intact after a seamless migration.

A regression test for issue 8: s2 restored a port channel's reader with a float64 bulk allocator,
so every client DATA body of MessageReader.BULK_BODY bytes or more reaching s2 after a seamless
migration arrived with the right length and the wrong bytes. The suite had missed it because every
migration test wrote in 64 KiB messages (``PortChannel.write`` splits); these tests send one
message of the given size with ``PortChannel.send``.
"""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest

from spicewire.protocol import messages as m
from spicewire.protocol.framing import MessageReader

from .serverkit import wait_until
from .test_migration import SINK, Node, connect, only_entry

BULK = MessageReader.BULK_BODY  # bodies this large or larger are gathered into a bulk buffer


@pytest.fixture
def s1_s2():
    with gevent.Timeout(30, AssertionError("the test took longer than 30 s")):
        servers = Node(), Node()
        try:
            yield servers
        finally:
            for node in servers:
                node.stop()


def sink_sees(node: Node, session_id: int, data: bytes) -> None:
    """The sink on ``node`` has consumed exactly ``data`` (after what it had before: none here)."""
    wait_until(lambda: node.port(session_id, SINK)["device"]["bytes_in"] >= len(data), 10,
               what=f"{len(data)} bytes at the sink")
    device = node.port(session_id, SINK)["device"]
    assert device["bytes_in"] == len(data)
    assert device["sha256"] == hashlib.sha256(data).hexdigest(), "the sink received other bytes"


def test_one_512_kib_message_after_a_seamless_migration_reaches_the_sink_intact(s1_s2):
    s1, s2 = s1_s2
    session = connect(s1)
    sink = session.open_port(SINK)
    entry = only_entry(s1.migrate_to(s2))
    assert entry["migrated"] and entry["mode"] == "seamless", entry
    assert session.wait_migrated(10) is not None
    data = os.urandom(512 << 10)
    sink.send(m.MsgcSpicevmcData(data))  # one message, not PortChannel.write's 64 KiB pieces
    sink_sees(s2, session.session_id, data)
    session.close()


@pytest.mark.parametrize("size", [BULK - 1, BULK, BULK + 1, 4 << 20], ids=lambda n: f"{n}B")
def test_one_message_on_either_side_of_the_bulk_threshold_after_migrating_there_and_back(s1_s2, size):
    """Back on s1 the channel is a restored one too: both servers must take the message intact."""
    s1, s2 = s1_s2
    session = connect(s1)
    sink = session.open_port(SINK)
    sent = hashlib.sha256()
    total = 0
    for here, there in ((s1, s2), (s2, s1)):
        assert only_entry(here.migrate_to(there))["migrated"]
        assert session.wait_migrated(10) is not None
        data = os.urandom(size)
        sink.send(m.MsgcSpicevmcData(data))
        sent.update(data)
        total += size
        wait_until(lambda there=there, total=total: there.port(session.session_id, SINK)["device"]["bytes_in"]
                   >= total, 10, what=f"{total} bytes at the sink")
        device = there.port(session.session_id, SINK)["device"]
        assert device["bytes_in"] == total
        assert device["sha256"] == sent.hexdigest(), f"the sink received other bytes after {total} bytes"
    session.close()
