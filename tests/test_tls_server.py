"""The server's TLS listener: links inside TLS, the per-channel policy (NEED_SECURED and
NEED_UNSECURED before authentication), the x509 directory's problems at start, and bad TLS input
that ends one connection with one log line. Python's ssl is the client, at the socket level."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys

import gevent
import gevent.ssl
import pytest

from spicewire import cli
from spicewire.errors import LinkError
from spicewire.protocol import messages as m
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.server.net import ServerConfig, SpiceServer
from spicewire.server.tls import load_server_tls
from tests import serverkit
from tests.serverkit import DEFAULT_PORTS, ECHO, link_error_of, link_mess_bytes, raw_connect, running_server
from tests.tlsca import SUBJECT_TEXT, TestCA

PASSWORD = "s3cret"


@pytest.fixture(autouse=True)
def deadline():
    """Every test here ends within 20 s, even if a server never answers."""
    timeout = gevent.Timeout(20, TimeoutError("test took longer than 20 s"))
    timeout.start()
    yield
    timeout.close()


@pytest.fixture(scope="module")
def ca():
    return TestCA()


@pytest.fixture
def x509(ca, tmp_path):
    return ca.x509_dir(tmp_path / "x509")


def tls_config(directory, **overrides) -> ServerConfig:
    fields = {"host": "127.0.0.1", "port": 0, "tls_port": 0, "x509_dir": str(directory),
              "port_channels": list(DEFAULT_PORTS), "password": PASSWORD, **overrides}
    return ServerConfig(**fields)


def client_context(ca: TestCA) -> ssl.SSLContext:
    """What a client verifying the server against ``ca`` uses (gevent's, as the test runs unpatched)."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    return context


def tls_wrap(ca: TestCA):
    context = client_context(ca)
    return lambda sock: context.wrap_socket(sock, server_hostname="127.0.0.1")


def tls_channel(server: SpiceServer, ca: TestCA, connection_id: int, channel_type: int, channel_id: int = 0,
                password: str | None = PASSWORD) -> serverkit.RawChannel:
    cls = serverkit.PortChannel if channel_type == ChannelType.PORT else serverkit.RawChannel
    return cls.link(server.tls_address, connection_id, channel_type, channel_id, password=password, wrap=tls_wrap(ca))


def plain_channel(server: SpiceServer, connection_id: int, channel_type: int, channel_id: int = 0,
                  password: str | None = PASSWORD) -> serverkit.RawChannel:
    cls = serverkit.PortChannel if channel_type == ChannelType.PORT else serverkit.RawChannel
    return cls.link(server.address, connection_id, channel_type, channel_id, password=password)


def link_refusal(address, channel_type: int, connection_id: int = 0, channel_id: int = 0, wrap=None) -> int:
    """The link error a server answers a bare link request with: only the request goes out, no
    ticket, so an answer proves the check comes before authentication."""
    sock = raw_connect(address)
    if wrap is not None:
        sock = wrap(sock)
    try:
        sock.sendall(link_mess_bytes(connection_id, channel_type, channel_id))
        return link_error_of(serverkit.read_until_closed(sock))
    finally:
        sock.close()


def failures(server: SpiceServer, reason: str) -> float:
    return server.metrics.link_failures.labels(reason)._value.get()


# --- links over TLS ---------------------------------------------------------------------------


def test_a_session_links_and_echoes_over_tls_on_a_tls_only_server(ca, x509):
    with running_server(tls_config(x509, port=None)) as server:
        with pytest.raises(LookupError):
            _ = server.address  # no plain listener
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        echo = tls_channel(server, ca, session_id, ChannelType.PORT, ECHO)
        assert isinstance(echo.sock, gevent.ssl.SSLSocket) and echo.sock.version() in ("TLSv1.2", "TLSv1.3")
        data = bytes(range(256)) * 1024
        echo.send_data(data)
        assert echo.read_data(len(data)) == data
        assert server.sessions[session_id].ports[ECHO].connection is not None


def test_the_certificate_the_server_presents_is_the_one_in_the_directory(ca, x509):
    tls = load_server_tls(str(x509))
    assert tls.subject == "CN=spicewire-server,O=spicewire tests,L=Brno,C=CZ"  # RFC 4514: reversed
    assert SUBJECT_TEXT == "C=CZ,L=Brno,O=spicewire tests,CN=spicewire-server"
    assert tls.validity_problem() is None
    with running_server(tls_config(x509)) as server:
        sock = tls_wrap(ca)(raw_connect(server.tls_address))
        try:
            der = sock.getpeercert(binary_form=True)
        finally:
            sock.close()
    assert der == ssl.PEM_cert_to_DER_cert((x509 / "server-cert.pem").read_text())


# --- the channel policy -----------------------------------------------------------------------


def test_a_plain_link_to_a_secured_channel_gets_need_secured_before_authentication(ca, x509):
    with running_server(tls_config(x509, secure_channels={"main"})) as server:
        assert link_refusal(server.address, ChannelType.MAIN) == LinkErr.NEED_SECURED
        assert failures(server, "need_secured") == 1
        # The same channel over TLS links; ports are either (the default), so the plain port serves them.
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        echo = plain_channel(server, session_id, ChannelType.PORT, ECHO)
        echo.send_data(b"either port")
        assert echo.read_data(11) == b"either port"


def test_all_channels_secured_refuses_every_plain_link(ca, x509):
    with running_server(tls_config(x509, secure_channels={"all"})) as server:
        for channel_type in (ChannelType.MAIN, ChannelType.PORT, ChannelType.DISPLAY):
            assert link_refusal(server.address, channel_type, 0x1234) == LinkErr.NEED_SECURED
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        main.expect(m.MsgMainInit)


def test_a_tls_link_to_a_plain_only_channel_gets_need_unsecured(ca, x509):
    with running_server(tls_config(x509, secure_channels={"all"}, plaintext_channels={"port"})) as server:
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        code = link_refusal(server.tls_address, ChannelType.PORT, session_id, ECHO, wrap=tls_wrap(ca))
        assert code == LinkErr.NEED_UNSECURED  # the channel's name beats "all"
        assert failures(server, "need_unsecured") == 1
        echo = plain_channel(server, session_id, ChannelType.PORT, ECHO)
        echo.send_data(b"plain")
        assert echo.read_data(5) == b"plain"


def test_without_a_policy_either_port_serves_every_channel(ca, x509):
    with running_server(tls_config(x509)) as server:
        main = plain_channel(server, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        echo = tls_channel(server, ca, session_id, ChannelType.PORT, ECHO)
        echo.send_data(b"mixed")
        assert echo.read_data(5) == b"mixed"


def test_the_password_is_still_checked_inside_tls(ca, x509):
    with running_server(tls_config(x509, port=None)) as server:
        with pytest.raises(LinkError) as refused:
            tls_channel(server, ca, 0, ChannelType.MAIN, password="wrong")
        assert refused.value.code == LinkErr.PERMISSION_DENIED


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"port": None, "tls_port": None, "x509_dir": None}, "no listener"),
    ({"tls_port": None, "x509_dir": None, "secure_channels": {"main"}}, "NEED_SECURED sends clients nowhere"),
    ({"port": None, "plaintext_channels": {"port"}}, "NEED_UNSECURED sends clients nowhere"),
    ({"secure_channels": {"main"}, "plaintext_channels": {"main"}}, "both TLS-only and plain-only"),
    ({"secure_channels": {"mian"}}, "unknown channel 'mian'"),
    ({"x509_dir": None}, "go together"),
    ({"tls_port": 65536}, "tls_port must be 0-65535"),
])
def test_configurations_that_cannot_work_are_refused(x509, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        tls_config(x509, **overrides)


# --- the x509 directory -----------------------------------------------------------------------


def test_a_missing_file_is_named_at_start(x509):
    (x509 / "server-key.pem").unlink()
    with pytest.raises(ValueError, match=r"cannot read .*server-key\.pem"):
        SpiceServer(tls_config(x509))


def test_a_key_of_another_certificate_is_refused_at_start(ca, x509):
    _, other_key = ca.server_cert()
    (x509 / "server-key.pem").write_bytes(other_key)
    with pytest.raises(ValueError, match="do not make a certificate and its key"):
        SpiceServer(tls_config(x509))


def test_a_cipher_list_that_selects_nothing_is_refused_at_start(x509):
    with pytest.raises(ValueError, match="selects no cipher"):
        SpiceServer(tls_config(x509, tls_ciphers="NO-SUCH-CIPHER"))


def test_a_server_certificate_from_another_ca_is_warned_about(x509, caplog):
    (x509 / "ca-cert.pem").write_bytes(TestCA("another CA").cert_pem)
    with caplog.at_level(logging.WARNING, logger="spicewire.server.tls"):
        SpiceServer(tls_config(x509))
    assert "is not signed by" in caplog.text


# --- bad TLS input: one connection ends, with one line ----------------------------------------


def _handshake_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]


def test_plain_spice_on_the_tls_port_ends_that_connection_only(ca, x509, caplog):
    with running_server(tls_config(x509)) as server, caplog.at_level(logging.INFO):
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        echo = tls_channel(server, ca, session_id, ChannelType.PORT, ECHO)
        sock = raw_connect(server.tls_address)
        sock.sendall(link_mess_bytes(0, ChannelType.MAIN))
        answer = serverkit.read_until_closed(sock)
        sock.close()
        assert not answer.startswith(b"REDQ")  # no SPICE answer in plain: at most a TLS alert
        echo.send_data(b"still here")
        assert echo.read_data(10) == b"still here"
        assert failures(server, "tls_handshake") == 1
    [line] = _handshake_lines(caplog)
    assert "does not speak TLS" in line and "plain SPICE on the TLS port" in line


def test_a_client_that_stops_mid_handshake_is_dropped_at_the_deadline(ca, x509, caplog):
    with running_server(tls_config(x509, link_timeout=0.5)) as server, caplog.at_level(logging.INFO):
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        session_id = main.expect(m.MsgMainInit).session_id
        # Half a ClientHello, then silence.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        machine = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            machine.do_handshake()
        hello = outgoing.read()
        sock = raw_connect(server.tls_address)
        sock.sendall(hello[: len(hello) // 2])
        assert serverkit.read_until_closed(sock) == b""  # closed by the server, without a word
        sock.close()
        assert failures(server, "tls_handshake") == 1
        echo = tls_channel(server, ca, session_id, ChannelType.PORT, ECHO)
        echo.send_data(b"fine")
        assert echo.read_data(4) == b"fine"
    [line] = _handshake_lines(caplog)
    assert "no handshake within 0.5 s" in line


def test_a_client_that_leaves_mid_handshake_ends_only_its_connection(ca, x509, caplog):
    with running_server(tls_config(x509)) as server, caplog.at_level(logging.INFO):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        machine = client_context(ca).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            machine.do_handshake()
        sock = raw_connect(server.tls_address)
        sock.sendall(outgoing.read()[:20])
        sock.close()
        serverkit.wait_until(lambda: failures(server, "tls_handshake") == 1, what="the handshake failure counted")
        main = tls_channel(server, ca, 0, ChannelType.MAIN)
        main.expect(m.MsgMainInit)
    assert len(_handshake_lines(caplog)) == 1


def test_an_expired_certificate_fails_each_tls_connection_with_the_reason(ca, tmp_path, caplog):
    expired = ca.x509_dir(tmp_path / "expired", expired=True)
    with caplog.at_level(logging.INFO), running_server(tls_config(expired)) as server:
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            tls_channel(server, ca, 0, ChannelType.MAIN)
        serverkit.wait_until(lambda: failures(server, "tls_handshake") == 1, what="the refused handshake counted")
        main = plain_channel(server, 0, ChannelType.MAIN)  # the plain port is unaffected
        main.expect(m.MsgMainInit)
    assert any("expired" in r.getMessage() and r.levelno == logging.WARNING and r.name == "spicewire.server.tls"
               for r in caplog.records), "no warning at start"
    [line] = _handshake_lines(caplog)
    assert "client refused our certificate; the server certificate expired at" in line


def test_a_client_trusting_another_ca_is_refused_by_itself_and_logged_here(x509, caplog):
    with running_server(tls_config(x509)) as server, caplog.at_level(logging.INFO):
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_channel(server, TestCA("a stranger"), 0, ChannelType.MAIN)
        serverkit.wait_until(lambda: failures(server, "tls_handshake") == 1, what="the refused handshake counted")
    [line] = _handshake_lines(caplog)
    assert "client refused our certificate)" in line  # no date problem to add


# --- spicewire serve --------------------------------------------------------------------------

SERVE_TLS = ["serve", "--tls-port", "127.0.0.1:0", "--x509-dir", "d", "--disable-ticketing"]


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--disable-ticketing"], "serve needs a listener: --listen, --tls-port or both"),
    (["serve", "--tls-port", "127.0.0.1:0", "--disable-ticketing"], "--tls-port and --x509-dir go together"),
    (["serve", "--listen", "127.0.0.1:0", "--x509-dir", "d", "--disable-ticketing"], "go together"),
    (["serve", "--listen", "127.0.0.1:0", "--tls-ciphers", "HIGH", "--disable-ticketing"], "needs --tls-port"),
    (["serve", "--listen", "127.0.0.1:0", "--secure-channels", "main", "--disable-ticketing"],
     "--secure-channels needs --tls-port"),
    ([*SERVE_TLS, "--plaintext-channels", "port"], "--plaintext-channels needs --listen"),
    ([*SERVE_TLS, "--secure-channels", "main,mian"], "unknown channel mian"),
    ([*SERVE_TLS, "--listen", "127.0.0.1:0", "--secure-channels", "main", "--plaintext-channels", "main"],
     "both name main"),
    (["serve", "--listen", "127.0.0.1:0", "--password", "x" * 61], "at most 60 bytes"),
    (["serve", "--listen", "127.0.0.1:0", "--password-file", "/nonexistent/pw"], "--password-file: cannot read"),
    (["serve", "--listen", "127.0.0.1:0", "--password-file", "p", "--disable-ticketing"], "not allowed with"),
])
def test_serve_refuses_tls_and_password_arguments_that_cannot_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_with_a_bad_x509_directory_exits_1_naming_the_file(tmp_path, x509):
    (x509 / "ca-cert.pem").unlink()
    result = subprocess.run([sys.executable, "-m", "spicewire", "serve", "--tls-port", "127.0.0.1:0",
                             "--x509-dir", str(x509), "--disable-ticketing"], capture_output=True, text=True,
                            timeout=15)
    assert result.returncode == 1
    assert f"cannot serve: TLS: cannot read {x509 / 'ca-cert.pem'}" in result.stderr


def test_serve_tls_only_reports_its_listeners(serve, x509):
    served = serve("--tls-port", "127.0.0.1:0", "--x509-dir", str(x509), "--disable-ticketing",
                   "--secure-channels", "all", plain=False)
    status = served.get("/status")
    assert status["listen"] is None
    assert status["tls_listen"] == {"host": "127.0.0.1", "port": served.address[1]}
    assert status["config"]["secure_channels"] == ["all"]
    assert "serving SPICE over TLS on" in served.output() and "serving SPICE on" not in served.output()
