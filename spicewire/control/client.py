"""A minimal HTTP/1.1 client for another server's control API (s1 asking s2, and the CLI)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import gevent
from gevent import socket, ssl

from spicewire.addresses import Address
from spicewire.errors import MigrationError
from spicewire.tlssocket import TlsSocket, send_batches

log = logging.getLogger(__name__)
HTTPS = "https://"  # before a control API's HOST:PORT: reach it over TLS


class ControlClient:
    """A minimal HTTP/1.1 client for another server's control API, on gevent sockets (so two
    servers in one process can talk without monkey-patching)."""

    def __init__(self, host: str, port: int, token: str | None = None, timeout: float = 30.0,
                 *, unix: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.unix = unix  # a Unix socket's path: then host and port are unused
        self.tls = tls  # HTTPS: the server's certificate is verified with it (host name included)

    @property
    def address(self) -> str:
        label = control_label(self.host, self.port, self.unix)
        return f"https://{label}" if self.tls is not None else label

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        return self._request("GET", path, b"", "application/json", timeout)

    def post_json(self, path: str, body: object, timeout: float | None = None) -> Any:
        return self._request("POST", path, json.dumps(body).encode(), "application/json", timeout)

    def post_bytes(self, path: str, body: bytes, timeout: float | None = None) -> Any:
        return self._request("POST", path, body, "application/octet-stream", timeout)

    def post_stream(self, path: str, batches: Iterable[list[Any]], size: int, timeout: float | None = None) -> Any:
        """A body of ``size`` bytes sent batch by batch (lists of buffers, each batch asked for once
        the one before is written, in one system call where it fits): views into the sender's
        memory, never joined into one."""
        return self._request("POST", path, b"", "application/octet-stream", timeout, batches, size)

    def _request(
        self, method: str, path: str, body: bytes, content_type: str, timeout: float | None = None,
        batches: Iterable[list[Any]] = (), size: int | None = None,
    ) -> Any:
        """The answer's JSON (None for an empty body); MigrationError for any status but 200.
        ``timeout`` bounds the whole request, connecting to the last byte, not each socket call:
        a peer that trickles its answer cannot stretch it. Running out is a TimeoutError (an OSError)."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {'localhost' if self.unix else self.address}", "Connection: close",
                f"Content-Type: {content_type}", f"Content-Length: {len(body) if size is None else size}"]
        if self.token:
            head.append(f"Authorization: Bearer {self.token}")
        limit = timeout or self.timeout
        late = TimeoutError(f"{method} {path}: no answer from {self.address} within {limit:.3g} s")
        with gevent.Timeout(limit, late), connect_control(self.host, self.port, self.unix, limit, self.tls) as sock:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            send_batches(sock, batches)
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
        status_line, _, rest = bytes(data).partition(b"\r\n")
        _, _, payload = rest.partition(b"\r\n\r\n")
        try:
            status = int(status_line.split()[1])
            answer = json.loads(payload) if payload.strip() else None
        except (IndexError, ValueError) as err:
            raise MigrationError(f"{method} {path}: unreadable answer from {self.address}: {err}") from None
        if status != 200:
            message = answer.get("error") if isinstance(answer, dict) else payload[:200].decode(errors="replace")
            raise MigrationError(f"{method} {path} on {self.address}: {status} {message}")
        return answer


def control_label(host: str, port: int, unix: str | None) -> str:
    """How errors name a control API: ``unix:PATH`` or ``HOST:PORT``."""
    return f"unix:{unix}" if unix is not None else str(Address(host, port))


def control_tls_context(x509_dir: str | None) -> ssl.SSLContext:
    """HTTPS to another server's control API, verified as the SPICE clients verify: the chain
    against ``x509_dir``'s ca-cert.pem (the QEMU layout both servers share), then the host name."""
    if x509_dir is None:
        raise MigrationError("an https control API is verified with the CA of this server's x509 directory; "
                             "this server has none")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.options |= ssl.OP_NO_RENEGOTIATION  # TlsSocket's writes never wait for a read
    try:
        context.load_verify_locations(cafile=os.path.join(x509_dir, "ca-cert.pem"))
    except (OSError, ssl.SSLError) as err:
        raise MigrationError(f"cannot load the CA for an https control API: {err}") from None
    return context


def connect_control(
    host: str, port: int, unix: str | None, timeout: float, tls: ssl.SSLContext | None = None
) -> socket.socket:
    """A connected socket to a control API: the Unix socket at ``unix``, else ``(host, port)``,
    through TLS with ``tls``."""
    if unix is None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is None:
            return sock
        # OpenSSL over memory BIOs: a pre-copy's body leaves 256 KiB of records per system call.
        tls_sock = TlsSocket(sock, tls, server_side=False, server_hostname=host)
        try:
            tls_sock.do_handshake()
        except OSError:
            tls_sock.close()
            raise
        return tls_sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(unix)
    except OSError:
        sock.close()
        raise
    return sock
