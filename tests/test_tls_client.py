"""Our client over TLS (CHANNELS.md section 2): spice-gtk's subject grammar and comparison, the
chain and host-name checks, no byte of the link (let alone the ticket) over a connection that
failed verification, NEED_SECURED, and migrations between TLS and plain servers with an echo
stream running.

The servers run in this process; the certificates come from a CA made for each test module.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys

import gevent
import gevent.event
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from gevent import socket, ssl
from gevent.server import StreamServer

from spicewire import aio, cli
from spicewire.client import ClientSession
from spicewire.client import connect as threaded_connect
from spicewire.client.endpoint import Endpoint
from spicewire.client.tls import (
    CertificateRejected,
    ClientTls,
    SubjectSyntaxError,
    TlsUnavailable,
    format_subject,
    is_tls,
    parse_subject,
    shutdown_read,
    split_subject,
    subject_matches,
)
from spicewire.control.client import ControlClient, control_tls_context
from spicewire.control.server import ControlServer
from spicewire.errors import LinkError, MigrationError
from spicewire.protocol.enums import ChannelType
from spicewire.protocol.messages import MigrationDstInfo
from spicewire.server.net import ServerConfig, SpiceServer

from . import peers
from .peers import echo_bios
from .peers.qemu import QemuSpice, SpicePort
from .served import TOKEN
from .test_client_migration import PORT_NAME as QEMU_PORT
from .test_client_migration import echo as qemu_echo
from .test_client_migration import migrate_vm
from .test_client_migration import wait_for as qemu_wait_for
from .tlsca import TestCA

ECHO = "org.spicewire.echo"
PASSWORD = "tls-ticket"


pytestmark = pytest.mark.usefixtures("within_60_s")  # a hang fails the test, not the run


# --- certificates ---------------------------------------------------------------------------------


def _name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def x509_dir(ca: TestCA, path, subject: x509.Name, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> str:
    """QEMU's layout (ca-cert.pem, server-cert.pem, server-key.pem) for a server at ``hosts``."""
    cert, key = ca.server_cert(subject, hosts=hosts)
    path.mkdir(parents=True)
    (path / "ca-cert.pem").write_bytes(ca.cert_pem)
    (path / "server-cert.pem").write_bytes(cert)
    (path / "server-key.pem").write_bytes(key)
    return str(path)


def certificate(ca: TestCA, subject: x509.Name) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.server_cert(subject)[0])


S1_SUBJECT = _name((NameOID.COUNTRY_NAME, "XX"), (NameOID.ORGANIZATION_NAME, "Spicewire, Tests"),
                   (NameOID.COMMON_NAME, "s1.example"))
S2_SUBJECT = _name((NameOID.COUNTRY_NAME, "XX"), (NameOID.ORGANIZATION_NAME, "Spicewire, Tests"),
                   (NameOID.COMMON_NAME, "s2.example"))
S1_TEXT = "C=XX,O=Spicewire\\, Tests,CN=s1.example"
S2_TEXT = "C=XX,O=Spicewire\\, Tests,CN=s2.example"


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def ca_file(ca, tmp_path) -> str:
    return str(ca.write_cert(tmp_path / "client-ca.pem"))


# --- spice-gtk's subject grammar (common/ssl_verify.c subject_to_x509_name) ---------------------------


@pytest.mark.parametrize(("text", "pairs"), [
    ("CN=a", [("CN", "a")]),
    ("k=v,l=w", [("k", "v"), ("l", "w")]),
    ("  CN=a", [("CN", "a")]),  # spaces before a key are skipped
    ("CN=a,   O=b", [("CN", "a"), ("O", "b")]),
    ("CN= a ", [("CN", " a ")]),  # ... and nowhere else
    ("", []),
    ("    ", []),
    ("CN=a,", [("CN", "a")]),  # a trailing comma ends the list
    ("CN=a,   ", [("CN", "a")]),
    ("O=x\\,y,CN=z", [("O", "x,y"), ("CN", "z")]),
    ("O=x\\\\,CN=z", [("O", "x\\"), ("CN", "z")]),
    ("\\,=v", [(",", "v")]),  # an escaped comma belongs to the key too
    ("CN=a=b", [("CN", "a=b")]),
])
def test_subject_grammar_reads_what_spice_gtk_reads(text, pairs):
    assert split_subject(text) == pairs


@pytest.mark.parametrize("text", ["CN=", "CN", ",", "CN,O=b", "CN=a\\b", "CN=a\\", "CN=a,,O=b"])
def test_subject_grammar_refuses_what_spice_gtk_refuses(text):
    with pytest.raises(SubjectSyntaxError):
        split_subject(text)


def test_a_subject_names_attributes_openssl_knows():
    assert parse_subject("C=XX,ST=s,L=l,O=o,OU=u,CN=c,emailAddress=e@x,2.5.4.5=7") == [
        ("2.5.4.6", "XX"), ("2.5.4.8", "s"), ("2.5.4.7", "l"), ("2.5.4.10", "o"), ("2.5.4.11", "u"),
        ("2.5.4.3", "c"), ("1.2.840.113549.1.9.1", "e@x"), ("2.5.4.5", "7"),
    ]
    for bad in ("cn=x", "Foo=x", "C=XXX"):  # short names are case-sensitive; a country has two letters
        with pytest.raises(SubjectSyntaxError):
            parse_subject(bad)


def test_the_whole_subject_is_compared_in_order_as_x509_name_cmp_does(ca):
    cert = certificate(ca, S1_SUBJECT)
    assert subject_matches(cert, parse_subject(S1_TEXT))
    assert subject_matches(cert, parse_subject("C=xx,O=  SPICEWIRE\\,   tests ,CN=S1.Example"))  # case, spaces
    assert not subject_matches(cert, parse_subject("C=XX,O=Spicewire\\, Tests"))  # one entry short
    assert not subject_matches(cert, parse_subject(S1_TEXT + ",OU=x"))  # one too many
    assert not subject_matches(cert, parse_subject("O=Spicewire\\, Tests,C=XX,CN=s1.example"))  # order
    assert not subject_matches(cert, parse_subject(S2_TEXT))
    assert not subject_matches(cert, parse_subject("C=XX,O=Spicewire\\, Tests,CN=s1.exampl"))


def test_format_subject_gives_back_what_parse_subject_reads(ca):
    cert = certificate(ca, S1_SUBJECT)
    assert format_subject(cert) == S1_TEXT
    assert subject_matches(cert, parse_subject(format_subject(cert)))


# --- servers ------------------------------------------------------------------------------------------


class Node:
    """An in-process server with a plain port (``plain``), a TLS port (``tls_dir``) or both."""

    def __init__(self, *, plain: bool = True, tls_dir: str | None = None, secure: frozenset[str] = frozenset(),
                 password: str | None = None, control_tls: bool = False, token: str | None = None) -> None:
        self.spice = SpiceServer(ServerConfig(
            host="127.0.0.1", port=0 if plain else None, tls_port=0 if tls_dir else None, x509_dir=tls_dir,
            secure_channels=secure, password=password, port_channels=[(ECHO, "echo")],
        ))
        self.spice.start()
        self.token = token
        self.peer_token = None if token else "peer-token"  # a control token opens /migration/* itself
        self.control = ControlServer(self.spice, "127.0.0.1", 0, token=token, peer_token=self.peer_token,
                                     tls=self.spice.tls.context if control_tls and self.spice.tls else None)
        self.control.start()
        self.control_url = f"{'https://' if control_tls else ''}127.0.0.1:{self.control.address[1]}"
        self.api = ControlClient(*self.control.address, token=token, timeout=60,
                                 tls=control_tls_context(tls_dir) if control_tls else None)
        self.port = self.spice.address[1] if plain else 0
        self.tls_port = self.spice.tls_address[1] if tls_dir else 0

    def migrate_to(self, other: Node, subject: str | None = None, timeout: float = 20.0,
                   to_token: str | None = None, mode: str = "seamless") -> dict:
        return self.api.post_json("/migrate", {
            "to": f"127.0.0.1:{other.port}", "to_control": other.control_url, "to_token": to_token or other.token,
            "to_peer_token": other.peer_token,
            "to_tls_port": other.tls_port, "to_cert_subject": subject, "mode": mode, "timeout": timeout,
        })

    def stop(self) -> None:
        self.control.stop()
        self.spice.stop()


@pytest.fixture
def node():
    made: list[Node] = []

    def make(**kw) -> Node:
        made.append(Node(**kw))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def _echo(port, size: int = 256 << 10) -> None:
    data = os.urandom(size)
    writer = gevent.spawn(port.write, data)
    assert port.receive(len(data), timeout=20) == data
    writer.get()


def _sockets(session: ClientSession) -> list[socket.socket]:
    return [ch.sock for _, ch in session.all_channels()]


# --- connecting -----------------------------------------------------------------------------------------


def test_a_tls_only_server_is_reached_over_tls_verified_by_subject(ca, ca_file, node, tmp_path):
    s1 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT), password=PASSWORD)
    with ClientSession("127.0.0.1", 0, PASSWORD, tls_port=s1.tls_port, ca_file=ca_file,
                       host_subject=S1_TEXT) as session:
        _echo(session.open_port(ECHO))
        assert all(is_tls(sock) for sock in _sockets(session))


def test_without_a_subject_the_host_name_is_verified(ca, ca_file, node, tmp_path):
    s1 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))
    with ClientSession("127.0.0.1", 0, tls_port=s1.tls_port, ca_file=ca_file) as session:
        _echo(session.open_port(ECHO))
    with ClientSession("localhost", 0, tls_port=s1.tls_port, ca_file=ca_file) as session:
        assert is_tls(session.main.sock)


def test_a_certificate_for_another_host_is_refused(ca, ca_file, node, tmp_path):
    s1 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT, ("192.0.2.7", "elsewhere.example")))
    with pytest.raises(CertificateRejected, match=r"127\.0\.0\.1"):
        ClientSession("127.0.0.1", 0, tls_port=s1.tls_port, ca_file=ca_file).connect()
    # The subject, when given, is what counts (spice-gtk verifies one or the other).
    with ClientSession("127.0.0.1", 0, tls_port=s1.tls_port, ca_file=ca_file, host_subject=S1_TEXT) as session:
        assert is_tls(session.main.sock)


class RecordingTlsServer:
    """A TLS listener with ``x509_dir``'s certificate that records every byte a client sends after
    the handshake: a client that refuses the certificate must send none."""

    def __init__(self, x509_dir: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*(os.path.join(x509_dir, f"server-{part}.pem") for part in ("cert", "key")))
        self.received = bytearray()
        self.handshakes = 0
        self.done = gevent.event.Event()
        self._server = StreamServer(("127.0.0.1", 0), self._handle)
        self._server.start()
        self.port = self._server.server_port

    def _handle(self, sock, _address) -> None:
        try:
            tls = self.context.wrap_socket(sock, server_side=True)
            self.handshakes += 1
            while data := tls.recv(65536):
                self.received += data
        except OSError:
            pass  # a client that refused the certificate ends the handshake or the connection
        finally:
            sock.close()
            self.done.set()

    def stop(self) -> None:
        self._server.stop()


@pytest.mark.parametrize("case", ["wrong CA", "wrong subject", "wrong host"])
def test_no_link_byte_goes_over_a_connection_that_failed_verification(case, ca, ca_file, tmp_path):
    issuer = TestCA("another CA") if case == "wrong CA" else ca
    hosts = ("elsewhere.example",) if case == "wrong host" else ("127.0.0.1", "localhost")
    server = RecordingTlsServer(x509_dir(issuer, tmp_path / "x", S1_SUBJECT, hosts))
    try:
        subject = S2_TEXT if case == "wrong subject" else None if case == "wrong host" else S1_TEXT
        with pytest.raises(CertificateRejected):
            ClientSession("127.0.0.1", 0, PASSWORD, tls_port=server.port, ca_file=ca_file,
                          host_subject=subject).connect()
        assert server.done.wait(10)
        assert server.received == b""
        # The chain and the host name fail the handshake itself; the subject is checked once it
        # completed, and what the client then did not send is the point.
        assert server.handshakes == (1 if case == "wrong subject" else 0)
    finally:
        server.stop()


def test_need_secured_moves_that_channel_to_the_tls_port(ca, ca_file, node, tmp_path):
    s1 = node(tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT), secure=frozenset({"port"}), password=PASSWORD)
    with ClientSession("127.0.0.1", s1.port, PASSWORD, tls_port=s1.tls_port, ca_file=ca_file) as session:
        port = session.open_port(ECHO)
        assert not is_tls(session.main.sock)  # main may stay in plain
        assert is_tls(port.sock)
        _echo(port)


def test_need_secured_without_a_tls_port_known_is_a_link_error(ca, node, tmp_path):
    s1 = node(tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT), secure=frozenset({"all"}))
    with pytest.raises(LinkError, match=r"NEED_SECURED"):
        ClientSession("127.0.0.1", s1.port).connect()


def test_secure_channels_all_never_uses_the_plain_port(ca, ca_file, node, tmp_path):
    s1 = node(tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))
    with ClientSession("127.0.0.1", s1.port, tls_port=s1.tls_port, ca_file=ca_file,
                       secure_channels=["all"]) as session:
        session.open_port(ECHO)
        assert all(is_tls(sock) for sock in _sockets(session))


def test_a_tls_only_server_without_a_ca_configured_is_tls_unavailable(ca, node, tmp_path):
    s1 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))
    with pytest.raises(TlsUnavailable):
        ClientSession("127.0.0.1", 0, tls_port=s1.tls_port).connect()


def test_the_destination_endpoint_keeps_the_ca_and_takes_s2s_subject(ca_file):
    s1 = Endpoint("h1", 5900, 5901, ClientTls(ca_file, S1_TEXT))
    with_subject = s1.destination(MigrationDstInfo(port=0, sport=6001, host="h2", cert_subject=S2_TEXT))
    assert (with_subject.host, with_subject.port, with_subject.tls_port) == ("h2", 0, 6001)
    assert with_subject.tls == ClientTls(ca_file, S2_TEXT)
    by_name = s1.destination(MigrationDstInfo(port=0xFFFF, sport=6001, host="h2", cert_subject=None))
    assert by_name.port == 0 and by_name.tls is not None and by_name.tls.host_subject is None
    assert by_name.wants_tls(ChannelType.MAIN)
    plain = s1.destination(MigrationDstInfo(port=6000, sport=0, host="h2", cert_subject=None))
    assert plain.port == 6000 and not plain.wants_tls(ChannelType.PORT)



# --- the MIGRATE_DATA relay through TLS -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_pair(ca, tmp_path_factory):
    """tls_pair() -> (far, near): a connected pair whose bytes go through TLS (far is the server)."""
    tls_dir = x509_dir(ca, tmp_path_factory.mktemp("pair") / "x509", S1_SUBJECT)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*(os.path.join(tls_dir, f"server-{part}.pem") for part in ("cert", "key")))
    client = ClientTls(os.path.join(tls_dir, "ca-cert.pem"), S1_TEXT)

    def make():
        far, near = socket.socketpair()
        accepting = gevent.spawn(server.wrap_socket, far, server_side=True)
        near = client.wrap(near, "127.0.0.1")  # the two handshakes run together
        return accepting.get(timeout=10), near

    return make


def _plain_pair():
    return socket.socketpair()



def test_shutting_the_read_side_of_a_tls_socket_keeps_what_arrived_readable(tls_pair):
    """A frozen channel's reader drains its connection to EOF: on TLS the records that arrived are
    still decrypted (SSLSocket.shutdown would drop the record layer and hand out raw records)."""
    far, near = tls_pair()
    far.sendall(b"arrived before the freeze")  # a socketpair: in near's buffer once this returns
    shutdown_read(near)
    got = bytearray()
    while data := near.recv(65536):
        got += data
    assert got == b"arrived before the freeze"
    far.close()
    near.close()

@pytest.mark.parametrize("sides", ["s1", "s2", "both"])
@pytest.mark.parametrize("offset", [-1, 0, 1], ids=["under", "at", "over"])
def test_the_relay_through_tls_copies_in_bounded_pieces_either_side_of_relay_chunk(
        monkeypatch, tls_pair, sides, offset):
    """TLS records cannot be spliced: with TLS on either side the body is decrypted and encrypted
    again through one RELAY_CHUNK buffer, one byte under, at and over it, and nothing past the
    body is read from s1."""
    from spicewire.client import migration as client_migration

    chunk = 4096
    monkeypatch.setattr(client_migration, "RELAY_CHUNK", chunk)
    count = chunk + offset
    s1_far, s1_near = tls_pair() if sides in ("s1", "both") else _plain_pair()
    s2_far, s2_near = tls_pair() if sides in ("s2", "both") else _plain_pair()
    payload, after = os.urandom(count), b"next message"
    s1_far.sendall(payload + after)
    held = client_migration.relay(s1_near, s2_near, count, "port:1")
    assert held == min(count, chunk)  # the copy path: splice would move the records themselves
    received = bytearray()
    while len(received) < count:
        received += s2_far.recv(65536)
    assert bytes(received) == payload
    assert s1_near.recv(65536) == after
    for sock in (s1_far, s1_near, s2_near, s2_far):
        sock.close()


def test_a_large_body_through_tls_on_both_sides_is_exact_and_holds_one_relay_chunk(tls_pair):
    from spicewire.client import migration as client_migration

    count = (3 << 20) + 17
    s1_far, s1_near = tls_pair()
    s2_far, s2_near = tls_pair()
    payload = os.urandom(count)
    writer = gevent.spawn(s1_far.sendall, payload)
    received = bytearray()

    def drain():
        while len(received) < count and (data := s2_far.recv(1 << 20)):
            received.extend(data)

    reader = gevent.spawn(drain)
    held = client_migration.relay(s1_near, s2_near, count, "port:1")
    writer.get(timeout=10)
    reader.get(timeout=10)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert held == client_migration.RELAY_CHUNK
    for sock in (s1_far, s1_near, s2_near, s2_far):
        sock.close()

# --- migrations -----------------------------------------------------------------------------------------


def _migrate_with_echo(session: ClientSession, s1: Node, s2: Node, subject: str | None) -> dict:
    """Migrate seamlessly while an echo stream runs through it; every byte must come back."""
    port = session.open_port(ECHO)
    _echo(port, 64 << 10)  # the stream runs on s1
    data = os.urandom(8 << 20)
    received = bytearray()

    def read_all() -> None:
        while len(received) < len(data):
            chunk = port.receive(None, timeout=30)
            assert chunk, "the port closed"
            received.extend(chunk)

    reader = gevent.spawn(read_all)
    writer = gevent.spawn(port.write, data)
    gevent.sleep(0)  # the writer has begun: the migration meets it mid-stream
    report = s1.migrate_to(s2, subject)
    writer.get(timeout=30)
    reader.get(timeout=30)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
    assert report["migrated"] == 1, report
    assert session.migrations[-1]["result"] == "completed", session.migrations[-1]
    _echo(port)  # and on s2
    return report


@pytest.mark.parametrize("kind", ["tls-to-tls", "plain-to-tls", "tls-to-plain"])
def test_a_seamless_migration_across_tls_and_plain_keeps_every_byte(kind, ca, ca_file, node, tmp_path):
    s1_tls, s2_tls = kind.startswith("tls"), kind.endswith("-tls")
    s1 = node(plain=not s1_tls, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT) if s1_tls else None)
    s2 = node(plain=not s2_tls, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT) if s2_tls else None)
    session = ClientSession("127.0.0.1", s1.port, tls_port=s1.tls_port, ca_file=ca_file,
                            host_subject=S1_TEXT if s1_tls else None)
    with session:
        assert all(is_tls(sock) == s1_tls for sock in _sockets(session))
        _migrate_with_echo(session, s1, s2, S2_TEXT if s2_tls else None)
        assert all(is_tls(sock) == s2_tls for sock in _sockets(session))
        expected = s2.tls_port if s2_tls else s2.port
        assert session.connected_to == ("127.0.0.1", expected)
        assert session.migrations[-1]["relayed"], "the in-flight data went through the MIGRATE_DATA relay"



def test_a_semi_seamless_migration_between_tls_only_servers_reopens_every_channel_over_tls(
        ca, ca_file, node, tmp_path):
    """Semi-seamless freezes the ports on their s1 TLS connections (the reader drains them and
    parks) and resumes them on new TLS connections to s2, verified by s2's subject."""
    s1 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))
    s2 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT))
    with ClientSession("127.0.0.1", 0, tls_port=s1.tls_port, ca_file=ca_file, host_subject=S1_TEXT) as session:
        port = session.open_port(ECHO)
        _echo(port)
        report = s1.migrate_to(s2, S2_TEXT, mode="semi-seamless")
        assert report["migrated"] == 1, report
        assert session.wait_migrated(timeout=20)["mode"] == "semi-seamless"
        _echo(port)
        assert {sock.getpeername()[1] for sock in _sockets(session)} == {s2.tls_port}
        assert all(is_tls(sock) for sock in _sockets(session))

def test_a_tls_destination_verified_by_host_name_when_begin_has_no_subject(ca, ca_file, node, tmp_path):
    s1 = node()
    s2 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT))
    with ClientSession("127.0.0.1", s1.port, ca_file=ca_file) as session:
        _migrate_with_echo(session, s1, s2, None)
        assert is_tls(session.main.sock)


def test_a_destination_whose_subject_differs_is_refused_and_the_session_stays(ca, ca_file, node, tmp_path):
    s1 = node()
    s2 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT))
    with ClientSession("127.0.0.1", s1.port, ca_file=ca_file) as session:
        port = session.open_port(ECHO)
        report = s1.migrate_to(s2, S1_TEXT)  # not what s2's certificate says
        assert report["migrated"] == 0
        assert session.migrations[-1]["result"] == "connect-error", session.migrations[-1]
        assert any("subject" in e for e in session.migrations[-1]["errors"])
        assert not is_tls(session.main.sock)
        _echo(port)  # still on s1


def test_a_client_without_tls_answers_connect_error_at_once_for_a_tls_only_destination(ca, node, tmp_path):
    s1 = node()
    s2 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT))
    with ClientSession("127.0.0.1", s1.port) as session:
        port = session.open_port(ECHO)
        report = s1.migrate_to(s2, S2_TEXT)
        assert report["migrated"] == 0
        migration = session.migrations[-1]
        assert migration["result"] == "connect-error"
        assert any("CA file" in e for e in migration["errors"]), migration
        assert migration["timings"]["begin_to_connected"] is None
        _echo(port)



# --- the s1 -> s2 control path over HTTPS -----------------------------------------------------------------


def test_s1_reaches_s2s_control_api_over_https_verified_with_its_x509_ca(ca, ca_file, node, tmp_path):
    s1 = node(tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))  # its ca-cert.pem verifies s2's control API
    s2 = node(plain=False, tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT), control_tls=True, token="s2-token")
    assert s2.api.get_json("/status")["sessions"] == 0  # HTTPS, with the token
    with ClientSession("127.0.0.1", s1.port, ca_file=ca_file) as session:
        _migrate_with_echo(session, s1, s2, S2_TEXT)
        assert is_tls(session.main.sock)


def test_the_https_control_path_refuses_another_ca_and_a_wrong_token(ca, ca_file, node, tmp_path):
    s1 = node(tls_dir=x509_dir(ca, tmp_path / "s1", S1_SUBJECT))
    stranger = node(tls_dir=x509_dir(TestCA("another CA"), tmp_path / "x", S2_SUBJECT), control_tls=True,
                    token="t")
    s2 = node(tls_dir=x509_dir(ca, tmp_path / "s2", S2_SUBJECT), control_tls=True, token="s2-token")
    with ClientSession("127.0.0.1", s1.port, ca_file=ca_file) as session:
        port = session.open_port(ECHO)
        with pytest.raises(MigrationError, match=r"502.*CERTIFICATE_VERIFY_FAILED"):
            s1.migrate_to(stranger, S2_TEXT)
        with pytest.raises(MigrationError, match=r"502.*401"):
            s1.migrate_to(s2, S2_TEXT, to_token="wrong")
        assert not s2.spice.sessions and not stranger.spice.sessions
        _echo(port)  # on s1, as before
        assert session.migrations == []  # no client was sent anywhere

# --- QEMU, as Proxmox runs it ---------------------------------------------------------------------------


@pytest.mark.peer
def test_our_client_follows_a_tls_only_qemu_migration_set_up_as_proxmox_does(ca, ca_file, tmp_path):
    """Both QEMUs TLS-only with seamless-migration=on; client_migrate_info with port=0, the TLS
    port and s2's certificate subject. The client follows over TLS and the port keeps echoing."""
    peers.require("qemu")
    bios = echo_bios.build()
    qemus = [
        QemuSpice(ports=[SpicePort(QEMU_PORT, "isa")], bios=bios, spice_opts="seamless-migration=on", plain=False,
                  x509_dir=x509_dir(ca, tmp_path / name, subject), lifetime=120, incoming=name == "s2")
        for name, subject in (("s1", S1_SUBJECT), ("s2", S2_SUBJECT))
    ]
    s1, s2 = qemus
    with s1, s2, ClientSession("127.0.0.1", 0, tls_port=s1.tls_port, ca_file=ca_file,
                               host_subject=S1_TEXT) as session:
        port = session.open_port(QEMU_PORT)
        assert qemu_echo(port, b"hello s1\n" * 10)
        s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=0,
                       **{"tls-port": s2.tls_port, "cert-subject": S2_TEXT})
        assert qemu_wait_for(session.migration_connected_event.is_set, 15), session.migrations
        assert migrate_vm(s1, s2) == "completed"
        report = session.wait_migrated(timeout=20)
        assert report is not None, (session.migrations, s1.log(), s2.log())
        assert report["mode"] == "seamless" and report["destination"] == f"127.0.0.1:{s2.tls_port}", report
        assert qemu_echo(port, b"hello s2 after migration\n" * 10), s2.log()
        assert {sock.getpeername()[1] for sock in _sockets(session)} == {s2.tls_port}
        assert all(is_tls(sock) for sock in _sockets(session))



# --- threads and asyncio ---------------------------------------------------------------------------------


def test_threaded_and_asyncio_connects_take_the_tls_keywords(ca, ca_file, serve, tmp_path):
    served = serve("--tls-port", "127.0.0.1:0", "--x509-dir", x509_dir(ca, tmp_path / "s1", S1_SUBJECT),
                   "--disable-ticketing", plain=False)
    tls = {"tls_port": served.address[1], "ca_file": ca_file, "host_subject": S1_TEXT}
    with threaded_connect("127.0.0.1", 0, **tls) as session:
        port = session.open_port("org.test.echo")
        port.write(b"through a thread")
        assert port.read(16, timeout=10) == b"through a thread"

    async def main() -> bytes:
        async with aio.connect("127.0.0.1", 0, **tls) as session:
            port = await session.open_port("org.test.echo")
            await port.write(b"through asyncio")
            return await port.read(15, timeout=10)

    assert asyncio.run(main()) == b"through asyncio"
    with pytest.raises(CertificateRejected):
        threaded_connect("127.0.0.1", 0, **{**tls, "host_subject": S2_TEXT})

# --- the command line -----------------------------------------------------------------------------------


def test_connect_and_migrate_on_the_command_line_between_tls_only_servers(ca, ca_file, serve, tmp_path):
    s1, s2 = (serve("--tls-port", "127.0.0.1:0", "--x509-dir", x509_dir(ca, tmp_path / name, subject),
                    "--disable-ticketing", plain=False) for name, subject in (("s1", S1_SUBJECT), ("s2", S2_SUBJECT)))
    spicewire = [sys.executable, "-m", "spicewire"]
    client = subprocess.Popen(
        [*spicewire, "connect", "127.0.0.1:0", "--tls-port", str(s1.address[1]), "--ca-file", ca_file,
         "--host-subject", S1_TEXT, "--port-channel", "org.test.echo", "--send-mib", "2", "--expect-echo",
         "--wait-migration", "60", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "first transfer done" in client.stderr.readline()
        migrate = subprocess.run(
            [*spicewire, "migrate", "--control", "127.0.0.1:{}".format(*s1.control[1:]), "--to", "127.0.0.1:0",
             "--to-tls-port", str(s2.address[1]), "--to-cert-subject", S2_TEXT,
             "--to-control", "127.0.0.1:{}".format(*s2.control[1:]), "--token", TOKEN, "--to-token", TOKEN],
            capture_output=True, text=True, timeout=60)
        assert migrate.returncode == 0, (migrate.stdout, migrate.stderr)
        assert json.loads(migrate.stdout)["migrated"] == 1
        out, err = client.communicate(timeout=60)
    finally:
        client.kill()
    report = json.loads(out)
    assert report["ok"], (report, err)
    assert report["after_migration"]["server"] == f"127.0.0.1:{s2.address[1]}"
    assert report["after_migration"]["sha256_received"] == report["after_migration"]["sha256_sent"]
    assert report["migration"]["mode"] == "seamless"


@pytest.mark.parametrize(("argv", "message"), [
    (["connect", "127.0.0.1:0", "--port-channel", "p"], "or 0 with --tls-port"),
    (["connect", "127.0.0.1:5900", "--tls-port", "5901", "--port-channel", "p"], "needs --ca-file"),
    (["connect", "127.0.0.1:5900", "--tls-port", "0", "--port-channel", "p"], "--tls-port: expected a port"),
    (["connect", "127.0.0.1:5900", "--ca-file", "f", "--host-subject", "CN", "--port-channel", "p"],
     "--host-subject: subject 'CN'"),
    (["connect", "127.0.0.1:5900", "--secure-channels", "mian", "--port-channel", "p"], "unknown channel mian"),
    (["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:0", "--to-control", "127.0.0.1:5801"],
     "or 0 with --to-tls-port"),
    (["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:5901", "--to-control", "127.0.0.1:5801",
      "--to-cert-subject", "XX=y"], "unknown attribute 'XX'"),
    (["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:5901", "--to-control", "https://127.0.0.1"],
     "expected HOST:PORT"),
    (["serve", "--listen", "127.0.0.1:0", "--disable-ticketing", "--control", "127.0.0.1:0", "--control-tls"],
     "--control-tls needs --x509-dir"),
])
def test_tls_arguments_are_checked_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
