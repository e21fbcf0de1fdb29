"""spice-gtk (the client library behind remote-viewer and virt-manager) against `spicewire serve`.

The driver runs under Debian's python3 with spice-gtk through GObject introspection; the server
is a real `spicewire serve` process.
"""

import time

import pytest

from . import peers
from .peers import tshark as ts
from .peers.spicegtk import run_driver, start_driver

pytestmark = pytest.mark.peer

ECHO = "org.spicewire.echo"
PORTS = ("--port-channel", f"{ECHO}=echo", "--port-channel", "org.spicewire.sink=sink")


def test_spicegtk_links_every_channel_and_echoes_8_mib_byte_for_byte(serve):
    peers.require("spicegtk")
    served = serve("--disable-ticketing", *PORTS)
    rep = run_driver(served.address[1], port_name=ECHO, send_bytes=8 << 20, expect_echo=True, timeout=60)
    assert rep["ok"], rep
    assert {(c["type_name"], c["id"]) for c in rep["linked_channels"]} == {("main", 0), ("port", 0), ("port", 1)}
    assert rep["bytes_received"] == rep["bytes_sent"] == 8 << 20
    assert rep["sha256_received"] == rep["sha256_sent"]
    assert sorted(p["name"] for p in rep["port_channels"]) == [ECHO, "org.spicewire.sink"]


def test_spicegtk_with_the_right_password_echoes(serve):
    peers.require("spicegtk")
    served = serve("--password", "s3cret", *PORTS)
    rep = run_driver(served.address[1], password="s3cret", port_name=ECHO, send_bytes=1 << 20,
                     expect_echo=True, timeout=60)
    assert rep["ok"], rep


def test_spicegtk_with_a_wrong_password_is_refused(serve):
    peers.require("spicegtk")
    served = serve("--password", "s3cret", *PORTS)
    rep = run_driver(served.address[1], password="nope", port_name=ECHO, timeout=15)
    assert not rep["ok"]
    assert "error-auth" in (rep.get("error") or ""), rep


def test_spicegtk_data_reaches_the_sink_with_the_same_sha256(serve):
    peers.require("spicegtk")
    served = serve("--disable-ticketing", *PORTS)
    sent = 4 << 20
    # The driver holds its session open after writing until we have read the sink (SIGTERM ends
    # a hold and the report stands), so how long the sink takes does not matter.
    driver = start_driver(served.address[1], port_name="org.spicewire.sink", send_bytes=sent, timeout=60, hold=60)
    with driver:
        sinks = []
        deadline = time.monotonic() + 30
        while not sinks and time.monotonic() < deadline and driver.proc.poll() is None:
            sinks = [p["device"] for s in served.get("/sessions")["sessions"] for p in s["ports"]
                     if p["name"] == "org.spicewire.sink" and p["device"]["bytes_in"] == sent]
            time.sleep(0.05)
        driver.terminate()
        rep = driver.report()
    assert rep["ok"], rep
    assert sinks and sinks[0]["sha256"] == rep["sha256_sent"]


def test_tshark_decodes_a_spicegtk_session_with_spicewire_serve(serve):
    peers.require("spicegtk", "tshark")
    served = serve("--disable-ticketing", *PORTS)
    port = served.address[1]
    with ts.Capture(port) as cap:
        rep = run_driver(port, port_name=ECHO, send_bytes=3000, expect_echo=True, timeout=30)
    try:
        assert rep["ok"], rep
        names = ts.spice_field_names(cap.path, port)
        for field in ("spice.magic", "spice.major_version", "spice.conn_id", "spice.channel_type",
                      "spice.x509_subjectpublickeyinfo", "spice.ticket_client",
                      "spice.main_session_id", "spice.main_num_channels", "spice.message_type"):
            assert field in names, (field, sorted(names))
        links = ts.decode_fields(cap.path, port, ["spice.channel_type"], display_filter="spice.link_client")
        assert {int(t) for row in links for t in row["spice.channel_type"]} == {1, 10}
        assert ts.problems(cap.path, port) == []
    finally:
        cap.cleanup()
