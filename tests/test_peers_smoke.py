"""Smoke tests of the real-peer harness: spice-gtk <-> QEMU spice-server, tshark decoding.

These validate tests/peers/ against upstream software only (our own server is not involved), so
later interoperability tests can trust the driver, the QEMU fixture and the capture helpers.
"""

from __future__ import annotations

import pytest

from . import peers
from .peers import echo_bios
from .peers import tshark as ts
from .peers.qemu import QemuSpice, SpicePort
from .peers.spicegtk import run_driver

pytestmark = pytest.mark.peer

PORT_NAME = "org.test.echo"


@pytest.fixture
def qemu_virtio_port():
    """QEMU with PORT_NAME on a virtserialport and no guest: the port is never opened."""
    peers.require("qemu")
    with QemuSpice(ports=[SpicePort(PORT_NAME, "virtio")], paused=True, lifetime=120) as q:
        yield q


@pytest.fixture
def qemu_echo():
    """QEMU whose BIOS echoes COM1, with PORT_NAME wired to COM1: an echoing SPICE port."""
    peers.require("qemu")
    with QemuSpice(ports=[SpicePort(PORT_NAME, "isa")], bios=echo_bios.build(),
                   lifetime=180) as q:
        yield q


def _linked(rep: dict) -> set[tuple[str, int]]:
    return {(c["type_name"], c["id"]) for c in rep["linked_channels"]}


def test_echo_bios_image_layout():
    img = echo_bios.build()
    assert len(img) == 0x10000
    assert img[0xFFF0:0xFFF5] == bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # jmp F000:0000
    assert img[0] == 0xFA  # cli


def test_spicegtk_links_main_and_port(qemu_virtio_port):
    peers.require("spicegtk")
    q = qemu_virtio_port
    assert q.qmp_command("query-spice")["enabled"] is True
    rep = run_driver(q.spice_port, port_name=PORT_NAME, timeout=15)
    assert rep["ok"], rep
    assert rep["returncode"] == 0
    assert {("main", 0), ("port", 0)} <= _linked(rep), rep["linked_channels"]
    assert rep["port_name"] == PORT_NAME
    # no guest driver opened the virtserialport: PORT_INIT said opened=0
    assert rep["port_opened"] is False
    assert rep["bytes_sent"] == 0


def test_spicegtk_reports_wrong_port_name_as_timeout(qemu_virtio_port):
    peers.require("spicegtk")
    rep = run_driver(qemu_virtio_port.spice_port, port_name="no.such.port", timeout=3)
    assert not rep["ok"]
    assert rep["returncode"] == 1
    assert "timeout" in rep["error"]
    assert [p["name"] for p in rep["port_channels"]] == [PORT_NAME]


def test_spicegtk_password_accepted_and_refused():
    peers.require("qemu", "spicegtk")
    with QemuSpice(ports=[SpicePort(PORT_NAME, "none")], password="s3cret", paused=True,
                   lifetime=120) as q:
        good = run_driver(q.spice_port, password="s3cret", port_name=PORT_NAME, timeout=15)
        assert good["ok"], good
        bad = run_driver(q.spice_port, password="wrong", port_name=PORT_NAME, timeout=15)
        assert not bad["ok"]
        assert bad["returncode"] == 1
        assert "error-auth" in bad["error"], bad["error"]


@pytest.mark.parametrize("nbytes", [1, 4099, 65536])
def test_spicegtk_echo_through_qemu(qemu_echo, nbytes):
    peers.require("spicegtk")
    rep = run_driver(qemu_echo.spice_port, port_name=PORT_NAME, send_bytes=nbytes,
                     expect_echo=True, timeout=60)
    assert rep["ok"], rep
    assert rep["port_opened"] is True
    assert rep["bytes_sent"] == rep["bytes_received"] == nbytes
    assert rep["sha256_sent"] == rep["sha256_received"]
    assert rep["first_mismatch"] is None


def test_tshark_decodes_spicegtk_qemu_session(qemu_echo):
    peers.require("spicegtk", "tshark")
    port = qemu_echo.spice_port
    with ts.Capture(port) as cap:
        rep = run_driver(port, port_name=PORT_NAME, send_bytes=3000, expect_echo=True,
                         timeout=60)
    try:
        assert rep["ok"], rep
        names = ts.spice_field_names(cap.path, port)
        # link stage of every channel and the main-channel startup are decoded
        for field in ("spice.magic", "spice.major_version", "spice.minor_version",
                      "spice.conn_id", "spice.channel_type", "spice.channel_id",
                      "spice.num_common_caps", "spice.num_channel_caps", "spice.caps_offset",
                      "spice.x509_subjectpublickeyinfo", "spice.auth_select_client",
                      "spice.ticket_client", "spice.main_session_id", "spice.message_type"):
            assert field in names, (field, sorted(names))
        links = ts.decode_fields(cap.path, port, ["spice.magic", "spice.channel_type"],
                                 display_filter="spice.link_client")
        linked_types = {int(t) for row in links for t in row["spice.channel_type"]}
        assert {1, 10} <= linked_types, links
        bad = ts.problems(cap.path, port)  # malformed frames or expert errors
        assert bad == [], bad
    finally:
        cap.cleanup()
