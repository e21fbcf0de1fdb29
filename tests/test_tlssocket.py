"""TlsSocket (spicewire/tlssocket.py): TLS through memory BIOs on a gevent socket. Bytes arrive
intact and in order on both sides of WRITE_CHUNK and RAW_READ; a write holds at most one chunk of
ciphertext; a read gets several records at once; a corrupted record after good ones hands over the
good bytes first, then fails; the end of the stream reads as 0; a refused certificate reaches the
server as the client's alert. A read never waits for a write: it returns without yielding when
the alert it made finds the socket full (a server reads every connection into one shared buffer),
and what it could not send goes out once the socket takes it, before any later write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pathlib
import ssl
import sys
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from spicewire import tlssocket
from spicewire.client.tls import CertificateRejected, ClientTls
from spicewire.server.tls import ServerTLS, load_server_tls
from spicewire.tlssocket import RAW_READ, WRITE_CHUNK, TlsSocket

from .tlsca import SUBJECT, SUBJECT_TEXT, TestCA

RECORD = 16 << 10  # TLS's largest record payload


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def server_tls(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    return load_server_tls(str(ca.x509_dir(tmp_path_factory.mktemp("x509"), SUBJECT)))


@pytest.fixture(scope="module")
def client_tls(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> ClientTls:
    return ClientTls(str(ca.write_cert(tmp_path_factory.mktemp("ca") / "ca.pem")), SUBJECT_TEXT)


SMALL_BUFFER = 64 << 10  # kernel buffers for the tests that fill the server's socket


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(server side, client side); ``small``: the server's send buffer and the client's receive
    buffer SMALL_BUFFER, so filling the server's socket takes well under a MiB."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.socket()
    if small:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)  # before the window is offered
    client.settimeout(10)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    if small:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    server.settimeout(10)
    listener.close()
    return server, client


def tls_pair(server_tls: ServerTLS, client_tls: ClientTls, small: bool = False) -> tuple[TlsSocket, TlsSocket]:
    """(server side, client side), handshake done."""
    raw_server, raw_client = tcp_pair(small)
    server = server_tls.wrap(raw_server)
    handshake = gevent.spawn(server.do_handshake)
    client = client_tls.wrap(raw_client, "127.0.0.1")
    handshake.get(timeout=10)
    return server, client


@pytest.fixture
def pair(server_tls: ServerTLS, client_tls: ClientTls) -> Iterator[tuple[TlsSocket, TlsSocket]]:
    server, client = tls_pair(server_tls, client_tls)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def small_pair(server_tls: ServerTLS, client_tls: ClientTls) -> Iterator[tuple[TlsSocket, TlsSocket]]:
    server, client = tls_pair(server_tls, client_tls, small=True)
    # The server's session tickets read: what the client has unread from here on is ours.
    server.sendall(b"!")
    assert client.recv(1) == b"!"
    yield server, client
    server.close()
    client.close()


def read_exactly(sock: TlsSocket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        assert n, f"EOF after {got} of {size} bytes"
        got += n
    return bytes(buf)


@pytest.mark.parametrize("size", [WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1, RAW_READ - 1, RAW_READ,
                                  RAW_READ + 1, 3 * WRITE_CHUNK + 7, 1])
def test_bytes_arrive_intact_both_ways(pair: tuple[TlsSocket, TlsSocket], size: int) -> None:
    server, client = pair
    data = os.urandom(size)
    sender = gevent.spawn(client.sendall, data)
    assert read_exactly(server, size) == data
    sender.get(timeout=10)
    back = gevent.spawn(server.sendall, memoryview(data))
    assert read_exactly(client, size) == data
    back.get(timeout=10)


def ciphertext_held_per_send(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records, for every send a TlsSocket makes, how much ciphertext it held then."""
    held: list[int] = []
    send_pending = TlsSocket._send_pending

    def spy(self: TlsSocket) -> None:
        held.append(len(self._unsent) + self._outgoing.pending)
        send_pending(self)

    monkeypatch.setattr(TlsSocket, "_send_pending", spy)
    return held


@pytest.mark.parametrize(("size", "chunks"), [(WRITE_CHUNK - 1, 1), (WRITE_CHUNK, 1), (WRITE_CHUNK + 1, 2)])
def test_a_write_holds_at_most_one_chunk_of_ciphertext(
    pair: tuple[TlsSocket, TlsSocket], monkeypatch: pytest.MonkeyPatch, size: int, chunks: int,
) -> None:
    server, client = pair
    held = ciphertext_held_per_send(monkeypatch)
    reader = gevent.spawn(read_exactly, server, size)
    client.sendall(os.urandom(size))
    reader.get(timeout=10)
    assert len(held) == chunks
    records = -(-min(size, WRITE_CHUNK) // RECORD)
    assert max(held) <= min(size, WRITE_CHUNK) + records * 64  # a record's header, tag and type


def test_one_read_takes_many_records_and_no_more_than_asked(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    data = os.urandom(8 * RECORD)
    client.sendall(data)
    # Everything sent is in the kernel's buffer once a byte of the last record is readable.
    first = read_exactly(server, 1)
    buf = bytearray(len(data))
    n = server.recv_into(buf)
    assert n > RECORD  # several records decrypted in one call (SSLSocket returns one)
    rest = read_exactly(server, len(data) - 1 - n)
    assert first + bytes(buf[:n]) + rest == data
    client.sendall(b"abcdef")
    assert server.recv(2) == b"ab"
    assert server.recv(10) == b"cdef"  # the rest of a record waits for the next call


def test_the_end_of_the_stream_reads_as_zero(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    client.sendall(b"last words")
    socket.socket.shutdown(client, socket.SHUT_WR)
    assert read_exactly(server, 10) == b"last words"
    assert server.recv_into(bytearray(10)) == 0
    assert server.recv(10) == b""


def test_good_records_before_a_corrupted_one_are_read_first(pair: tuple[TlsSocket, TlsSocket]) -> None:
    server, client = pair
    good = os.urandom(3 * RECORD)
    client.sendall(good)
    # A record forged in place of the next one: the right header, a body that fails its tag.
    forged = memoryview(bytes([23, 3, 3, 0x40, 0x11]) + os.urandom(0x4011))
    while forged:  # past the TLS layer: the plain socket's send
        forged = forged[socket.socket.send(client, forged) :]
    got = read_exactly(server, len(good))  # every good byte, though the bad record came with them
    assert hashlib.sha256(got).digest() == hashlib.sha256(good).digest()
    with pytest.raises(ssl.SSLError) as err:
        server.recv_into(bytearray(RECORD))
    assert err.value.reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"


def test_a_refused_certificate_reaches_the_server_as_the_clients_alert(
    server_tls: ServerTLS, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    stranger = ClientTls(str(TestCA().write_cert(tmp_path_factory.mktemp("other") / "ca.pem")), SUBJECT_TEXT)
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    handshake = gevent.spawn(server.do_handshake)
    with pytest.raises(CertificateRejected):
        stranger.wrap(raw_client, "127.0.0.1")
    with pytest.raises(ssl.SSLError) as err:
        handshake.get(timeout=10)
    assert err.value.reason == "TLSV1_ALERT_UNKNOWN_CA"  # sent before the client closed
    server.close()


def test_plain_bytes_fail_the_servers_handshake(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.sendall(b"REDQ" + bytes(20))  # a SPICE link header where a ClientHello belongs
    with pytest.raises(ssl.SSLError) as err:
        server.do_handshake()
    assert err.value.reason == "WRONG_VERSION_NUMBER"
    server.close()
    raw_client.close()


def test_a_handshake_cut_short_is_an_eof(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.close()
    with pytest.raises(ssl.SSLEOFError):
        server.do_handshake()
    server.close()


def test_one_raw_buffer_serves_every_socket_of_a_thread() -> None:
    view = tlssocket._raw_buffer()
    assert len(view) == RAW_READ
    assert tlssocket._raw_buffer() is view


@pytest.mark.parametrize(("size", "sends"), [(WRITE_CHUNK - 1, 1), (WRITE_CHUNK, 1), (WRITE_CHUNK + 1, 2)])
def test_many_buffers_go_out_one_chunk_of_records_at_a_time(
    pair: tuple[TlsSocket, TlsSocket], monkeypatch: pytest.MonkeyPatch, size: int, sends: int,
) -> None:
    server, client = pair
    data = os.urandom(size)
    piece = 64 << 10  # a pre-copy queue's views
    buffers = [memoryview(data)[start : start + piece] for start in range(0, size, piece)]
    held = ciphertext_held_per_send(monkeypatch)
    reader = gevent.spawn(read_exactly, server, size)
    client.send_buffers(buffers)
    assert reader.get(timeout=10) == data
    assert len(held) == sends
    assert max(held) <= WRITE_CHUNK + (WRITE_CHUNK // RECORD) * 64  # each record's header, tag and type


def test_a_socket_nobody_handshook_runs_the_handshake_at_its_first_read_or_write(
    server_tls: ServerTLS, client_tls: ClientTls,
) -> None:
    """As an HTTPS server's accepted socket: the handshake runs inside the first read's deadline."""
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    first_read = gevent.spawn(read_exactly, server, 5)
    client = TlsSocket(raw_client, client_tls._context, server_side=False, server_hostname="127.0.0.1")
    client.sendall(b"hello")
    assert first_read.get(timeout=10) == b"hello"
    assert server.version() == client.version() == "TLSv1.3"
    server.close()
    client.close()


def test_plain_bytes_at_a_first_read_fail_it(server_tls: ServerTLS) -> None:
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    raw_client.sendall(b"POST /migration/port-precopy HTTP/1.1\r\n\r\n")  # HTTP where a ClientHello belongs
    with pytest.raises(ssl.SSLError) as err:
        server.recv_into(bytearray(100))
    assert err.value.reason == "HTTP_REQUEST"
    server.close()
    raw_client.close()


def test_an_https_control_api_reads_through_a_tls_socket_and_logs_plain_http(
    ca: TestCA, tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """The control API's accepted HTTPS connections are TlsSockets (a pre-copy body is read 256 KiB
    of records a system call); plain HTTP to it ends that connection with a log line, and the
    API keeps answering."""
    from spicewire.control.client import ControlClient, control_tls_context
    from spicewire.control.server import ControlServer
    from spicewire.server.net import ServerConfig, SpiceServer

    x509 = str(ca.x509_dir(tmp_path_factory.mktemp("control"), SUBJECT))
    spice = SpiceServer(ServerConfig(host="127.0.0.1", port=0, tls_port=0, x509_dir=x509))
    assert spice.tls is not None
    control = ControlServer(spice, token="t", tls=spice.tls.context)
    control.start()
    try:
        host, port = control.address
        client = ControlClient(host, port, "t", timeout=10, tls=control_tls_context(x509))
        wraps: list[TlsSocket] = []
        init = TlsSocket.__init__

        def spy(self: TlsSocket, *args: object, **kwargs: object) -> None:
            init(self, *args, **kwargs)  # type: ignore[arg-type]
            wraps.append(self)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(TlsSocket, "__init__", spy)
            assert client.get_json("/status")["tls_listen"] is not None
        assert len(wraps) == 2  # the client's end and the server's
        with caplog.at_level("INFO", logger="spicewire.control.server"):
            plain = socket.create_connection((host, port), timeout=10)
            plain.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert plain.recv(100) == b""
            plain.close()
        assert any("TLS: HTTP_REQUEST" in r.getMessage() for r in caplog.records), caplog.text
        assert client.get_json("/status")["tls_listen"] is not None
    finally:
        control.stop()


def fill_with_raw_bytes(sock: TlsSocket) -> int:
    """Writes raw bytes (past the TLS layer) until the socket takes no more; returns how many."""
    filled = 0
    for piece in (b"\0" * (16 << 10), b"\0"):  # then byte by byte: no room left at all
        while True:
            try:
                filled += socket.socket.send(sock, piece, 0, 0.0)  # type: ignore[call-arg]  # 0: never wait
            except BlockingIOError:
                break
    return filled


def drain_raw_bytes(sock: TlsSocket, size: int) -> None:
    """Reads ``size`` raw bytes (past the TLS layer)."""
    buf = bytearray(64 << 10)
    while size:
        n = socket.socket.recv_into(sock, buf, min(size, len(buf)))
        assert n, "EOF in the raw bytes"
        size -= n


def send_forged_record(sock: TlsSocket) -> None:
    """A record with the right header and a body that fails its tag, past the TLS layer."""
    forged = memoryview(bytes([23, 3, 3, 0x40, 0x11]) + os.urandom(0x4011))
    while forged:
        forged = forged[socket.socket.send(sock, forged) :]


def test_a_read_returns_without_yielding_while_its_alert_waits_for_a_full_socket(
    small_pair: tuple[TlsSocket, TlsSocket], pair: tuple[TlsSocket, TlsSocket],
) -> None:
    """A server reads every connection into one buffer: a read that yielded to wait for its
    alert (a bad record after good ones) to fit into a full socket would let another
    connection's read overwrite the bytes it just decrypted. The alert goes out once the
    socket takes it, with no write after it."""
    server, client = small_pair
    other_server, other_client = pair
    backlog = fill_with_raw_bytes(server)  # a client not reading
    good = os.urandom(3 * RECORD)
    client.sendall(good)
    send_forged_record(client)
    other_client.sendall(bytes(len(good)))
    shared = bytearray(RAW_READ)
    others: list[int] = []

    def other_connection() -> None:  # runs as soon as the read yields
        others.append(other_server.recv_into(shared))
        drain_raw_bytes(client, backlog)  # the server's socket takes bytes again

    other = gevent.spawn(other_connection)
    n = server.recv_into(shared)
    assert not others, "the read yielded"
    assert bytes(shared[:n]) == good
    other.get(timeout=10)
    assert others == [len(good)]
    with pytest.raises(ssl.SSLError) as alert:  # the server's alert, sent once its socket took it
        read_exactly(client, 1)
    assert alert.value.reason == "SSLV3_ALERT_BAD_RECORD_MAC"
    with pytest.raises(ssl.SSLError) as err:
        server.recv_into(shared)
    assert err.value.reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"


@pytest.mark.parametrize("size", [WRITE_CHUNK - 1, WRITE_CHUNK, WRITE_CHUNK + 1])
def test_ciphertext_a_read_left_unsent_goes_before_the_next_write(
    small_pair: tuple[TlsSocket, TlsSocket], size: int,
) -> None:
    """Records OpenSSL made during a read that the full socket did not take (here more than a
    socket holds, standing in for an alert) wait in the TlsSocket; the next write sends them
    first, whichever of it and the background send gets to the socket first."""
    server, client = small_pair
    made_during_read = os.urandom(1 << 20)
    server._tls.write(made_during_read)
    server._send_ready()
    assert server._unsent, "the socket took it all: nothing to keep in order"
    written = os.urandom(size)
    writer = gevent.spawn(server.sendall, written)
    assert read_exactly(client, len(made_during_read) + size) == made_during_read + written
    writer.get(timeout=10)
    assert not server._unsent and not server._outgoing.pending


def renegotiate(sock: TlsSocket) -> None:
    """Starts a TLS 1.2 renegotiation, which Python's ssl module has no call for: OpenSSL's
    SSL_renegotiate on the SSL* of the socket's SSLObject (CPython's _ssl._SSLSocket keeps it
    right after the object header and its Socket field)."""
    name = ctypes.util.find_library("ssl")
    if name is None or not ssl.OPENSSL_VERSION.startswith(f"OpenSSL {name.rsplit('.', 1)[-1]}."):
        pytest.skip(f"no libssl matching Python's {ssl.OPENSSL_VERSION} to call SSL_renegotiate in")
    libssl = ctypes.CDLL(name)
    libssl.SSL_renegotiate.argtypes = [ctypes.c_void_p]
    libssl.SSL_version.argtypes = [ctypes.c_void_p]
    sslobj = sock._tls._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(sslobj) + sys.getsizeof(object()) + ctypes.sizeof(ctypes.c_void_p))
    assert libssl.SSL_version(pointer.value) == 0x0303  # TLS 1.2: the pointer is the connection's
    assert libssl.SSL_renegotiate(pointer.value) == 1
    with pytest.raises(ssl.SSLWantReadError):
        sock._tls.do_handshake()  # the ClientHello, into the outgoing BIO
    sock._send_pending()


def test_a_refused_renegotiation_is_answered_while_the_read_waits_for_data(
    ca: TestCA, server_tls: ServerTLS, tmp_path: pathlib.Path,
) -> None:
    """A TLS 1.2 client asking to renegotiate gets the server's no_renegotiation alert at once,
    not once the server next writes or reads application data (the client waits for it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the chain is verified; the name does not matter here
    context.load_verify_locations(cafile=ca.write_cert(tmp_path / "ca.pem"))
    raw_server, raw_client = tcp_pair()
    server = server_tls.wrap(raw_server)
    handshake = gevent.spawn(server.do_handshake)
    client = TlsSocket(raw_client, context, server_side=False, server_hostname="127.0.0.1")
    client.do_handshake()
    handshake.get(timeout=10)
    assert server.version() == "TLSv1.2"
    reader = gevent.spawn(read_exactly, server, 5)
    renegotiate(client)
    with pytest.raises(ssl.SSLError) as err:
        while True:  # the client reads the server's answer to its ClientHello
            client._fill()
            try:
                client._tls.do_handshake()
            except ssl.SSLWantReadError:
                continue
    assert err.value.reason == "NO_RENEGOTIATION"
    assert not reader.ready()  # still waiting for application data
    reader.kill()
    server.close()
    client.close()
