"""The server's TLS setup: a QEMU/libvirt x509 directory into an SSLContext.

QEMU's ``-spice x509-dir=DIR`` (and libvirt's ``spice_tls_x509_cert_dir``) hold three files by
fixed names; the same directory works here unchanged. Everything the operator can get wrong about
them (a missing or unreadable file, a key that does not match the certificate, an encrypted key,
ciphers that select nothing) is a ValueError at start that names the file and the reason, never a
failure on the first client.

An expired (or not yet valid) server certificate does not stop the server: a certificate also
expires while a server runs, and a replacement needs a restart either way. The server warns at
start, and each handshake a client refuses says in its log line that the certificate has expired.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from dataclasses import dataclass

import gevent.ssl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from gevent import socket

from spicewire.tlssocket import TlsSocket

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"


@dataclass(frozen=True)
class ServerTLS:
    """What a TLS listener needs: the context that wraps accepted sockets, and the certificate's
    validity (to explain a handshake a client refused)."""

    context: ssl.SSLContext
    subject: str  # the certificate's subject, as an operator compares it with --to-cert-subject
    not_before: datetime.datetime
    not_after: datetime.datetime

    def validity_problem(self, now: datetime.datetime | None = None) -> str | None:
        """Why a client would refuse the certificate by date now, or None while it is valid."""
        now = now or datetime.datetime.now(datetime.UTC)
        if now > self.not_after:
            return f"the server certificate expired at {self.not_after.isoformat()}"
        if now < self.not_before:
            return f"the server certificate is not valid before {self.not_before.isoformat()}"
        return None

    def wrap(self, sock: socket.socket) -> TlsSocket:
        """An accepted connection as a TLS socket; its ``do_handshake`` runs the handshake."""
        return TlsSocket(sock, self.context, server_side=True)


def _readable(x509_dir: str, name: str) -> str:
    path = os.path.join(x509_dir, name)
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as err:
        raise ValueError(f"TLS: cannot read {path}: {err.strerror or err}") from None
    return path


def _no_passphrase() -> str:
    # Without this callback OpenSSL would prompt on the terminal, which a service never answers.
    raise ValueError("encrypted")


def load_server_tls(x509_dir: str, ciphers: str | None = None) -> ServerTLS:
    """The server side of TLS from ``x509_dir`` (ca-cert.pem, server-cert.pem, server-key.pem):
    TLS 1.2 at least; ``ciphers`` is an OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are
    OpenSSL's own, as in QEMU's tls-ciphers). Clients are not asked for certificates, as
    spice-server does not ask."""
    if not os.path.isdir(x509_dir):
        raise ValueError(f"TLS: {x509_dir} is not a directory (it must hold {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})")
    ca_path, cert_path, key_path = (_readable(x509_dir, name) for name in (CA_CERT, SERVER_CERT, SERVER_KEY))
    # gevent's class, so wrapped sockets cooperate whether or not the process is monkey-patched.
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation: TlsSocket's writes never wait for a read (and TLS 1.3 has none anyway).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except ValueError:
        raise ValueError(f"TLS: {key_path} is encrypted; give the key without a passphrase") from None
    except ssl.SSLError as err:
        raise ValueError(f"TLS: {cert_path} and {key_path} do not make a certificate and its key: "
                         f"{err.reason or err}") from None
    try:
        context.load_verify_locations(cafile=ca_path)
    except ssl.SSLError as err:
        raise ValueError(f"TLS: {ca_path} holds no CA certificate: {err.reason or err}") from None
    if ciphers is not None:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"TLS: the cipher list {ciphers!r} selects no cipher") from None
    with open(cert_path, "rb") as file:
        cert = x509.load_pem_x509_certificate(file.read())
    with open(ca_path, "rb") as file:
        ca = x509.load_pem_x509_certificate(file.read())
    tls = ServerTLS(context, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc)
    problem = tls.validity_problem()
    if problem is not None:
        log.warning("TLS: %s (%s): clients will refuse it until it is replaced", problem, cert_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        # An intermediate CA in between is legitimate; a client with only ca-cert.pem will refuse it, though.
        log.warning("TLS: %s is not signed by %s: clients given that CA will refuse it", cert_path, ca_path)
    return tls
