"""spice-gtk over TLS to `spicewire serve`, with a CA the test makes: the echo intact, the server's
certificate verified by spice-gtk (a wrong CA or subject refused), NEED_SECURED followed by
spice-gtk on its own, and credentials changed at runtime (an expired password refuses spice-gtk,
and does not strand a migrating one)."""

from __future__ import annotations

import pytest

from . import peers
from .peers.spicegtk import run_driver, start_driver
from .test_spicegtk_migration import assert_landed, migrate, sessions, wait_streaming
from .tlsca import SUBJECT_TEXT, TestCA

pytestmark = pytest.mark.peer

ECHO = "org.spicewire.echo"
PORTS = ("--port-channel", f"{ECHO}=echo", "--port-channel", "org.spicewire.sink=sink")
ALL_CHANNELS = {("main", 0), ("port", 0), ("port", 1)}


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def x509(ca, tmp_path):
    return ca.x509_dir(tmp_path / "x509")


@pytest.fixture
def ca_file(ca, tmp_path):
    return str(ca.write_cert(tmp_path / "ca.pem"))


def serve_tls(serve, x509, *extra: str, plain: bool = False):
    return serve("--tls-port", "127.0.0.1:0", "--x509-dir", str(x509), *PORTS, *extra, plain=plain)


def linked(rep: dict) -> set[tuple[str, int]]:
    return {(c["type_name"], c["id"]) for c in rep["linked_channels"]}


def test_spicegtk_echoes_over_tls_to_a_tls_only_server(serve, x509, ca_file):
    peers.require("spicegtk")
    served = serve_tls(serve, x509, "--disable-ticketing", "--secure-channels", "all")
    tls_port = served.address[1]
    rep = run_driver(None, tls_port=tls_port, ca_file=ca_file, cert_subject=SUBJECT_TEXT, port_name=ECHO,
                     send_bytes=4 << 20, expect_echo=True, timeout=60)
    assert rep["ok"], rep
    assert linked(rep) == ALL_CHANNELS
    assert rep["sha256_received"] == rep["sha256_sent"] and rep["bytes_received"] == 4 << 20
    assert set(rep["peers"].values()) == {f"127.0.0.1:{tls_port}"}  # every channel on the TLS port


def test_spicegtk_without_a_subject_checks_the_host_name(serve, x509, ca_file):
    peers.require("spicegtk")
    served = serve_tls(serve, x509, "--disable-ticketing")
    rep = run_driver(None, tls_port=served.address[1], ca_file=ca_file, port_name=ECHO, send_bytes=4096,
                     expect_echo=True, timeout=30)
    assert rep["ok"], rep  # 127.0.0.1 is in the certificate's SAN


def test_spicegtk_refuses_a_server_certificate_from_another_ca(serve, x509, tmp_path):
    peers.require("spicegtk")
    served = serve_tls(serve, x509, "--disable-ticketing")
    stranger = str(TestCA("a stranger").write_cert(tmp_path / "stranger.pem"))
    rep = run_driver(None, tls_port=served.address[1], ca_file=stranger, cert_subject=SUBJECT_TEXT,
                     port_name=ECHO, timeout=15)
    assert not rep["ok"] and "error-tls" in (rep.get("error") or ""), rep
    assert "TLS handshake failed" in served.output()
    assert served.get("/sessions")["sessions"] == []


def test_spicegtk_refuses_a_server_certificate_with_another_subject(serve, x509, ca_file):
    peers.require("spicegtk")
    served = serve_tls(serve, x509, "--disable-ticketing")
    rep = run_driver(None, tls_port=served.address[1], ca_file=ca_file, port_name=ECHO, timeout=15,
                     cert_subject="C=CZ,L=Brno,O=spicewire tests,CN=somebody-else")
    assert not rep["ok"] and "error-tls" in (rep.get("error") or ""), rep
    assert served.get("/sessions")["sessions"] == []


def test_spicegtk_refuses_an_expired_server_certificate_and_the_server_says_why(serve, ca, ca_file, tmp_path):
    peers.require("spicegtk")
    served = serve_tls(serve, ca.x509_dir(tmp_path / "expired", expired=True), "--disable-ticketing")
    rep = run_driver(None, tls_port=served.address[1], ca_file=ca_file, cert_subject=SUBJECT_TEXT,
                     port_name=ECHO, timeout=15)
    assert not rep["ok"] and "error-tls" in (rep.get("error") or ""), rep
    log = served.output()
    assert "clients will refuse it until it is replaced" in log  # at start
    assert "(the client refused our certificate; the server certificate expired at" in log
    assert served.get("/status")["sessions"] == 0


def test_spicegtk_told_need_secured_on_the_plain_port_reconnects_over_tls(serve, x509, ca_file):
    peers.require("spicegtk")
    served = serve_tls(serve, x509, "--disable-ticketing", "--secure-channels", "all", plain=True)
    tls_port = served.tls_address[1]
    # spice-gtk is given both ports and no secure-channels: it tries plain first.
    rep = run_driver(served.address[1], tls_port=tls_port, ca_file=ca_file, cert_subject=SUBJECT_TEXT,
                     port_name=ECHO, send_bytes=1 << 20, expect_echo=True, timeout=30)
    assert rep["ok"], rep
    assert linked(rep) == ALL_CHANNELS
    assert set(rep["peers"].values()) == {f"127.0.0.1:{tls_port}"}
    assert "link refused: NEED_SECURED" in served.output()


def test_spicegtk_is_refused_once_the_password_expired(serve, x509, ca_file, tmp_path):
    peers.require("spicegtk")
    password = tmp_path / "password"
    password.write_text("tls-s3cret\n")
    served = serve_tls(serve, x509, "--password-file", str(password))
    tls = {"tls_port": served.address[1], "ca_file": ca_file, "cert_subject": SUBJECT_TEXT}
    rep = run_driver(None, **tls, password="tls-s3cret", port_name=ECHO, send_bytes=4096, expect_echo=True,
                     timeout=30)
    assert rep["ok"], rep
    served.request("POST", "/password", {"expires_in": 0})
    rep = run_driver(None, **tls, password="tls-s3cret", port_name=ECHO, timeout=15)
    assert not rep["ok"] and "error-auth" in (rep.get("error") or ""), rep
    served.request("POST", "/password", {"password": "renewed"})
    rep = run_driver(None, **tls, password="renewed", port_name=ECHO, send_bytes=4096, expect_echo=True,
                     timeout=30)
    assert rep["ok"], rep


def test_spicegtk_migrates_although_the_password_expired_on_s2(serve, tmp_path):
    peers.require("spicegtk")
    s1 = serve("--password", "on-s1", *PORTS)
    s2 = serve("--password", "on-s2", *PORTS)
    s2.request("POST", "/password", {"expires_in": 0})
    driver = start_driver(s1.address[1], password="on-s1", port_name=ECHO, expect_echo=True, stream_seconds=60,
                          max_inflight=256 << 10, timeout=30)
    with driver:
        wait_streaming(s1, driver, 1 << 20)
        entry = assert_landed(migrate(s1, s2), "seamless")
        wait_streaming(s2, driver, 1 << 20)
        (session,) = sessions(s2)
        assert session["session_id"] == entry["session_id"]
        assert sessions(s1) == []
        driver.stop_stream()
        rep = driver.report()
    assert rep["ok"], rep
    assert rep["stream"]["mismatch"] is None, rep["stream"]
