"""TLS for the client, verified the way spice-gtk verifies (spice-common ``common/ssl_verify.c``).

The chain must verify against the configured CA. Then, at the leaf:

- with a subject (``host_subject``, or the ``cert_subject`` of a MIGRATE_BEGIN), the certificate's
  whole subject must equal it, entry by entry and in order, compared as OpenSSL's X509_NAME_cmp
  compares names (case and runs of white space in string values do not count);
- without one, the host name: Python's own check (SAN DNS names and IP addresses; the CN only for
  a name when the certificate has no SAN, as spice-gtk does). spice-gtk also looks at the CN for an
  IP address; OpenSSL, and so this client, only at SAN IP entries.

All of it happens in ``ClientTls.wrap``, before the link message: a connection that fails
verification never carries a ticket.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier
from gevent import socket, ssl

from spicewire.errors import PeerFault, SpiceError
from spicewire.tlssocket import TlsSocket


class SubjectSyntaxError(SpiceError, ValueError):
    """A subject string that spice-gtk's grammar does not accept."""


class CertificateRejected(PeerFault, ConnectionError):
    """The server's certificate failed verification: its chain, host name or subject."""


class TlsUnavailable(SpiceError, ConnectionError):
    """A channel must go over TLS and this client has no TLS configured (or the server no TLS port)."""


# The attribute names OpenSSL's X509_NAME_add_entry_by_txt accepts, short and long, for the
# attributes certificates use; anything else may be given as a dotted OID.
_ATTRIBUTES = {
    "2.5.4.3": ("CN", "commonName"),
    "2.5.4.4": ("SN", "surname"),
    "2.5.4.5": ("serialNumber",),
    "2.5.4.6": ("C", "countryName"),
    "2.5.4.7": ("L", "localityName"),
    "2.5.4.8": ("ST", "stateOrProvinceName"),
    "2.5.4.9": ("street", "streetAddress"),
    "2.5.4.10": ("O", "organizationName"),
    "2.5.4.11": ("OU", "organizationalUnitName"),
    "2.5.4.12": ("title",),
    "2.5.4.13": ("description",),
    "2.5.4.15": ("businessCategory",),
    "2.5.4.17": ("postalCode",),
    "2.5.4.41": ("name",),
    "2.5.4.42": ("GN", "givenName"),
    "2.5.4.43": ("initials",),
    "2.5.4.44": ("generationQualifier",),
    "2.5.4.46": ("dnQualifier",),
    "2.5.4.65": ("pseudonym",),
    "1.2.840.113549.1.9.1": ("emailAddress",),
    "0.9.2342.19200300.100.1.1": ("UID", "userId"),
    "0.9.2342.19200300.100.1.25": ("DC", "domainComponent"),
}
_OID_BY_NAME = {name: oid for oid, names in _ATTRIBUTES.items() for name in names}
_DOTTED_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_ASCII_SPACE = re.compile(r"[ \t\n\v\f\r]+")
_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def parse_subject(text: str) -> list[tuple[str, str]]:
    """A host or cert subject as spice-gtk reads it: ``(oid, value)`` pairs, in order
    (SubjectSyntaxError for an attribute OpenSSL does not know, or a malformed string)."""
    return [_entry(text, key, value) for key, value in split_subject(text)]


def split_subject(text: str) -> list[tuple[str, str]]:
    """``k=v,k=v`` into ``(key, value)`` pairs: spice-gtk's grammar, keys not yet looked up.

    A backslash escapes a backslash or a comma and nothing else; spaces before a key are skipped,
    the rest is kept; a value may hold ``=``; a trailing comma ends the list. A missing ``=``, an
    empty value or a lone backslash is a SubjectSyntaxError."""
    entries: list[tuple[str, str]] = []
    key: list[str] = []
    value: list[str] | None = None  # None while the key is read
    chars = iter(text)
    for ch in chars:
        escaped = ch == "\\"
        if escaped:
            ch = next(chars, "")
            if ch not in ("\\", ","):
                raise SubjectSyntaxError(f"subject {text!r}: a backslash escapes only '\\' and ','")
        if value is None:
            if ch == " " and not key and not escaped:
                continue
            if ch == "," and not escaped:
                raise SubjectSyntaxError(f"subject {text!r}: {''.join(key)!r} has no '='")
            if ch == "=" and not escaped:
                value = []
            else:
                key.append(ch)
        elif ch == "," and not escaped:
            entries.append(_pair(text, key, value))
            key, value = [], None
        else:
            value.append(ch)
    if value is not None:
        entries.append(_pair(text, key, value))
    elif key:
        raise SubjectSyntaxError(f"subject {text!r}: {''.join(key)!r} has no '='")
    return entries


def _pair(text: str, key: list[str], value: list[str]) -> tuple[str, str]:
    if not value:
        raise SubjectSyntaxError(f"subject {text!r}: {''.join(key)!r} has an empty value")
    return "".join(key), "".join(value)


def _entry(text: str, key: str, value: str) -> tuple[str, str]:
    oid = _OID_BY_NAME.get(key) or (key if _DOTTED_OID.fullmatch(key) else None)
    if oid is None:
        raise SubjectSyntaxError(f"subject {text!r}: unknown attribute {key!r}")
    if oid == "2.5.4.6" and len(value.encode()) != 2:  # OpenSSL refuses a countryName of another length
        raise SubjectSyntaxError(f"subject {text!r}: a country is two letters, not {value!r}")
    return oid, value


def _canonical(value: str) -> str:
    """A string value as X509_NAME_cmp sees it: ASCII white space trimmed and runs of it made one
    space, ASCII letters lowered."""
    return _ASCII_SPACE.sub(" ", value).strip(" ").translate(_ASCII_UPPER)


def subject_matches(cert: x509.Certificate, expected: Iterable[tuple[str, str]]) -> bool:
    """Whether the certificate's subject is ``expected`` (from parse_subject): the same entries,
    one per RDN, in the same order, equal once canonical."""
    wanted = list(expected)
    rdns = list(cert.subject.rdns)
    if len(rdns) != len(wanted):
        return False
    for rdn, (oid, value) in zip(rdns, wanted, strict=True):
        attributes = list(rdn)
        if len(attributes) != 1:  # spice-gtk's grammar makes one attribute per RDN
            return False
        got = attributes[0]
        if got.oid != ObjectIdentifier(oid) or not isinstance(got.value, str):
            return False
        if _canonical(got.value) != _canonical(value):
            return False
    return True


def format_subject(cert: x509.Certificate) -> str:
    """The certificate's subject in spice-gtk's ``k=v,k=v`` form (for error messages and
    ``cert-subject`` arguments): what ``parse_subject`` reads back."""
    parts = []
    for attribute in cert.subject:
        dotted = attribute.oid.dotted_string
        key = _ATTRIBUTES[dotted][0] if dotted in _ATTRIBUTES else dotted
        value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
        parts.append(f"{key}={_escape(value)}")
    return ",".join(parts)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


@dataclass(frozen=True)
class ClientTls:
    """How this client opens TLS: the CA the server's chain must lead to, and the subject its leaf
    must have (None: the host name is checked instead)."""

    ca_file: str
    host_subject: str | None = None
    ciphers: str | None = None
    # Made once (a bad subject or an unreadable CA file is the caller's mistake, said at once),
    # shared by every link.
    _expected: list[tuple[str, str]] | None = dataclasses.field(init=False, repr=False, compare=False)
    _context: ssl.SSLContext = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_expected", parse_subject(self.host_subject) if self.host_subject else None)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.ca_file)
        context.options |= ssl.OP_NO_RENEGOTIATION  # TlsSocket's writes never wait for a read
        context.check_hostname = self._expected is None
        if self.ciphers:
            context.set_ciphers(self.ciphers)
        object.__setattr__(self, "_context", context)

    def for_subject(self, subject: str | None) -> ClientTls:
        """The same CA with another subject to verify (a migration's cert_subject; empty: the host name)."""
        return dataclasses.replace(self, host_subject=subject or None)

    def wrap(self, sock: socket.socket, host: str) -> TlsSocket:
        """Run the TLS handshake on ``sock`` (bounded by its timeout) and verify the server; the
        socket is closed and CertificateRejected raised if verification fails."""
        tls = TlsSocket(sock, self._context, server_side=False, server_hostname=host)
        try:
            tls.do_handshake()
        except ssl.SSLCertVerificationError as err:
            tls.close()
            raise CertificateRejected(f"TLS to {host}: {err.verify_message or err}") from err
        except OSError:
            tls.close()
            raise
        if self._expected is not None:
            der = tls.getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der) if der else None
            if cert is None or not subject_matches(cert, self._expected):
                tls.close()
                got = "no certificate" if cert is None else repr(format_subject(cert))
                raise CertificateRejected(f"TLS to {host}: subject {got} is not {self.host_subject!r}")
        return tls


def is_tls(sock: socket.socket) -> bool:
    return isinstance(sock, TlsSocket)


def shutdown_read(sock: socket.socket) -> None:
    """Shut the read side, so a reader gets what is queued and then EOF. On a TLS socket the
    record layer stays: TlsSocket keeps the plain socket's ``shutdown`` (SSLSocket's dropped it)."""
    sock.shutdown(socket.SHUT_RD)
