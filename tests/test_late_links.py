"""A channel the client links to s1 after the migration began migrates with the others.

spice-gtk opens a port channel once main's CHANNELS_LIST names it; on a loaded machine that link can
reach s1 after MIGRATE_BEGIN_SEAMLESS, and spice-gtk links its twin to s2 as well. s2 then waits for
that port's MIGRATE_DATA: s1 must send the port its MIGRATE at the switch like the others (it did
not, and the session rolled back when its time ran out: 1 run in 25 of the TLS migration test under
load, and once in CI).
"""

from __future__ import annotations

import gevent
import gevent.event
import pytest

from spicewire.errors import LocalProtocolError
from spicewire.protocol.caps import caps_to_words
from spicewire.protocol.enums import ChannelType, MainCap, MigrateFlags
from spicewire.protocol.messages import MigrationDstInfo, MsgcMainMigrateConnectedSeamless, MsgMigrate
from spicewire.protocol.migration import MigrationMode, SourceMigration
from spicewire.server.migration.source import SessionSource
from spicewire.server.net import SpiceServer

from .test_migration import ECHO, SINK_ID, only_entry
from .test_precopy import making_pnodes

pnodes = pytest.fixture(making_pnodes, name="pnodes")
pytestmark = pytest.mark.usefixtures("within_60_s")

PORT_CHANNEL = (ChannelType.PORT, SINK_ID)


def test_a_channel_joins_until_the_switch_and_not_after():
    seamless_client = caps_to_words(
        [MainCap.SEMI_SEAMLESS_MIGRATE, MainCap.AGENT_CONNECTED_TOKENS, MainCap.SEAMLESS_MIGRATE])
    machine = SourceMigration([(ChannelType.PORT, 0)], seamless_client)
    assert machine.takes_channels
    machine.channel_linked(PORT_CHANNEL)
    assert machine.flags[PORT_CHANNEL] == MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER
    with pytest.raises(LocalProtocolError, match="cannot join"):
        SourceMigration([PORT_CHANNEL], []).channel_linked(PORT_CHANNEL)  # twice
    machine.begin(MigrationDstInfo(port=1, sport=0, host="127.0.0.1"), MigrationMode.SEAMLESS, 0.0)
    machine.receive((ChannelType.MAIN, 0), MsgcMainMigrateConnectedSeamless())
    assert machine.takes_channels
    sent = machine.finish(0.0, switch_host=False)
    migrates = {out.channel for out in sent if isinstance(getattr(out, "message", None), MsgMigrate)}
    assert migrates == {(ChannelType.MAIN, 0), (ChannelType.PORT, 0), PORT_CHANNEL}
    assert not machine.takes_channels


@pytest.mark.peer
def test_a_port_spicegtk_links_to_s1_after_begin_migrates_with_the_others(pnodes, monkeypatch):
    """The sink's link to s1 is held until the migration began; spice-gtk links its twin to s2.
    The session lands on s2 with both ports, and the echo stream stays byte-exact."""
    from . import peers
    from .peers.spicegtk import start_driver

    peers.require("spicegtk")
    s1, s2 = pnodes(False, False)
    began = gevent.event.Event()
    real_attach, real_begin = SpiceServer.attach, SessionSource.begin
    late: list[object] = []

    def attach(self, established, conn, channel):
        if self is s1.spice and established.channel_type == ChannelType.PORT and established.channel_id == SINK_ID:
            began.wait(30)
            late.append(conn)
        return real_attach(self, established, conn, channel)

    def begin(self, dst_info, mode):
        real_begin(self, dst_info, mode)
        began.set()

    monkeypatch.setattr(SpiceServer, "attach", attach)
    monkeypatch.setattr(SessionSource, "begin", begin)
    driver = start_driver(s1.address[1], port_name=ECHO, expect_echo=True, stream_seconds=60, timeout=20)
    with driver:
        def echoed(node) -> int:
            return sum(node.port(sid, ECHO)["device"].get("bytes_in", 0) for sid in node.spice.sessions)

        deadline = gevent.get_hub().loop.now() + 20
        while not (s1.spice.sessions and echoed(s1) > 1 << 20):
            assert gevent.get_hub().loop.now() < deadline, "spice-gtk's echo stream did not start"
            gevent.sleep(0.05)
        (session_id,) = s1.spice.sessions
        assert s1.spice.sessions[session_id].ports[SINK_ID].connection is None  # held back
        entry = only_entry(s1.migrate_to(s2))
        assert late, "the sink never linked to s1"
        assert entry["migrated"] and entry["mode"] == "seamless" and entry["bytes_dropped"] == 0, entry
        ports = s2.spice.sessions[session_id].ports
        assert ports[SINK_ID].connection is not None and ports[0].connection is not None
        before = echoed(s2)
        deadline = gevent.get_hub().loop.now() + 20
        while echoed(s2) < before + (1 << 20):
            assert gevent.get_hub().loop.now() < deadline, "the stream did not go on through s2"
            gevent.sleep(0.05)
        driver.stop_stream()
        # The servers run in this process: wait for the driver on the hub, then read its report.
        deadline = gevent.get_hub().loop.now() + 30
        while driver.proc.poll() is None:
            assert gevent.get_hub().loop.now() < deadline, "the driver did not finish"
            gevent.sleep(0.05)
        rep = driver.report()
    assert rep["ok"], str({k: v for k, v in rep.items() if k != "events"})
    stream = rep["stream"]
    assert stream["mismatch"] is None and stream["byte_exact"], stream
    assert stream["bytes_echoed"] == stream["bytes_written"], stream
