"""A test certificate authority, made with ``cryptography``: x509 directories as QEMU and
``spicewire serve --x509-dir`` read them.

    ca = TestCA()                                   # its own key and self-signed certificate
    tls_dir = ca.x509_dir(tmp_path / "s1")          # ca-cert.pem, server-cert.pem, server-key.pem
    expired = ca.x509_dir(tmp_path / "old", expired=True)
    ca.cert_path                                    # what a client verifies with (ca-file)
    SUBJECT, SUBJECT_TEXT                           # the server's subject, and spice-gtk's spelling of it

A second ``TestCA()`` is a wrong CA for the first one's servers.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SUBJECT = x509.Name([
    x509.NameAttribute(NameOID.COUNTRY_NAME, "CZ"),
    x509.NameAttribute(NameOID.LOCALITY_NAME, "Brno"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spicewire tests"),
    x509.NameAttribute(NameOID.COMMON_NAME, "spicewire-server"),
])
# spice-gtk's cert-subject form: the subject's RDNs in order, "k=v" joined by commas.
SUBJECT_TEXT = "C=CZ,L=Brno,O=spicewire tests,CN=spicewire-server"

_serials = itertools.count(1000)
_DAY = datetime.timedelta(days=1)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    __test__ = False  # a helper, not a pytest class

    def __init__(self, name: str = "spicewire test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(next(_serials))
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.cert_path: Path | None = None

    def server_cert(self, subject: x509.Name = SUBJECT, *, expired: bool = False,
                    hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server at ``hosts`` (its SAN: IPs and DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(next(_serials))
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_cert(self, path: Path) -> Path:
        """This CA's certificate in ``path`` (a client's ca-file)."""
        path.write_bytes(self.cert_pem)
        self.cert_path = path
        return path

    def x509_dir(self, path: Path, subject: x509.Name = SUBJECT, *, expired: bool = False) -> Path:
        """A QEMU x509 directory for one server certificate this CA signed."""
        path.mkdir(parents=True, exist_ok=True)
        cert, key = self.server_cert(subject, expired=expired)
        (path / "ca-cert.pem").write_bytes(self.cert_pem)
        (path / "server-cert.pem").write_bytes(cert)
        (path / "server-key.pem").write_bytes(key)
        (path / "server-key.pem").chmod(0o600)
        return path
