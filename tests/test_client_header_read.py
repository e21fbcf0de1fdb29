"""HEADER_READ, what the client asks of s1 per read while it waits for a MIGRATE_DATA header: a
body that arrives whole with the header's read, and one whose last byte needs a second read, go
to s2 byte-exact (one below, at and one above the size that fills that first read)."""

from __future__ import annotations

import pytest

from spicewire.client import ClientSession
from spicewire.client.migration import HEADER_READ
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, Msgc
from spicewire.protocol.framing import MINI_HEADER

from .test_client_migration import PORT_NAME, dst_info, fake_pair, seen

__all__ = ["fake_pair"]  # the fixture, used by name


@pytest.mark.parametrize("over", [-1, 0, 1])
def test_a_body_around_one_header_read_is_relayed_byte_exact(fake_pair, over):
    s1, s2 = fake_pair
    s1.big_size = HEADER_READ - MINI_HEADER.size + over  # header and body: HEADER_READ + over bytes
    with ClientSession("127.0.0.1", s1.port) as session:
        session.open_port(PORT_NAME)
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMainMigrateBeginSeamless(dst_info(s2.port), 1))
        assert session.migration_connected_event.wait(5)
        assert seen(s1.events, ("s1", "main", "MsgcMainMigrateConnectedSeamless"))
        s1.migrating = True
        s1.conns[ChannelType.MAIN, 0].send(m.MsgMigrate(3))
        s1.conns[ChannelType.PORT, 0].send(m.MsgMigrate(3))
        report = session.wait_migrated(timeout=30)
        assert report is not None and report["mode"] == "seamless", report
        assert s2.received == (Msgc.MIGRATE_DATA, s1.big_size, s1.sent_digest)
        assert report["relayed"]["port:0"] == s1.big_size
        assert session.connected_to == ("127.0.0.1", s2.port)
