"""spice-gtk writing 1 MiB and 4 MiB per ``write_async`` to an echo port, across seamless migrations
back and forth, every echoed byte checked (issue 8).

spice-gtk sends each ``spice_port_channel_write_async`` buffer as one SPICEVMC_DATA message, so these
writes reach the server as bodies far above MessageReader.BULK_BODY: on a channel s2 restored
seamlessly they took the bulk path that wrote uint8 bytes into float64 memory ("echo wrong byte" a
few MiB after the first migration, and the second migration failed). The other spice-gtk tests
write 64 KiB at a time, below that path.
"""

import pytest

from . import peers
from .peers.spicegtk import start_driver
from .test_spicegtk_migration import (
    CHANNELS,
    ECHO,
    PORTS,
    assert_landed,
    assert_whole_session_on,
    connections_to,
    migrate,
    sessions,
    wait_for,
    wait_streaming,
)

pytestmark = pytest.mark.peer

MIB = 1 << 20
MIGRATIONS = 3  # s1 -> s2 -> s1 -> s2: each server takes large writes on a restored channel
ECHOED_AFTER_EACH = 24 * MIB  # echoed on each destination before the next migration


def echoed_on(served) -> int:
    """Bytes the session's echo device on ``served`` has taken (its count migrates with it)."""
    return sum(p["device"]["bytes_in"] for s in sessions(served) for p in s["ports"] if p["name"] == ECHO)


def running(driver) -> bool:
    """True while the driver runs; a driver that stopped (at a wrong echoed byte, say) fails the test
    with its own account."""
    if driver.proc.poll() is not None:
        rep = driver.report()
        pytest.fail(f"spice-gtk driver ended early: {rep.get('error')}; stream: {rep.get('stream')}")
    return True


@pytest.mark.parametrize("write_sizes", [(MIB,), (4 * MIB,), (MIB, 4 * MIB, 64 << 10)],
                         ids=["1MiB", "4MiB", "mixed"])
def test_large_writes_echo_byte_exact_through_seamless_migrations_back_and_forth(serve, write_sizes):
    peers.require("spicegtk")
    servers = [serve(*PORTS), serve(*PORTS)]
    window = 2 * max(write_sizes)  # one write in flight while the previous one is echoed
    extra = ["--write-sizes", ",".join(map(str, write_sizes))]
    driver = start_driver(servers[0].address[1], port_name=ECHO, expect_echo=True, stream_seconds=90,
                          max_inflight=window, timeout=20, extra=extra)
    with driver:
        wait_streaming(servers[0], driver)
        session_id = sessions(servers[0])[0]["session_id"]
        for n in range(MIGRATIONS):
            src, dst = servers[n % 2], servers[(n + 1) % 2]
            wait_for(lambda dst=dst: not sessions(dst), 5, "the old server to drop the session")
            assert_landed(migrate(src, dst), "seamless")
            wait_for(lambda dst=dst: running(driver) and connections_to(driver, dst) == CHANNELS, 5,
                     "every channel on the destination")
            assert_whole_session_on(dst, session_id)
            start = echoed_on(dst)
            wait_for(lambda dst=dst, start=start: running(driver) and echoed_on(dst) >= start + ECHOED_AFTER_EACH,
                     30, f"{ECHOED_AFTER_EACH >> 20} MiB of large writes echoed on the destination")
        driver.stop_stream()
        rep = driver.report()
    assert rep["ok"], {k: rep.get(k) for k in ("error", "stream", "stderr")}
    stream = rep["stream"]
    assert stream["mismatch"] is None and stream["byte_exact"], stream
    assert stream["bytes_echoed"] == stream["bytes_written"] >= MIGRATIONS * ECHOED_AFTER_EACH, stream
    # Every write was whole, of the size its turn asked for (none cut by the window).
    writes = stream["writes_of_sizes"]
    assert stream["bytes_written"] == sum(write_sizes[i % len(write_sizes)] for i in range(writes)), stream
    assert rep["port_inits"] == 1  # seamless: no PORT_INIT after a switch (5.9 item 8)
