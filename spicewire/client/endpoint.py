"""Where a session's channels link, and over what, as spice-gtk chooses (``src/spice-session.c``,
``src/spice-channel.c``): TLS for the channels named in ``secure_channels`` (or ``all``) and when
the server has no plain port; otherwise the plain port first, and TLS after a NEED_SECURED.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gevent import socket

from spicewire.addresses import Address
from spicewire.client.channels import link_channel
from spicewire.client.tls import ClientTls, TlsUnavailable
from spicewire.errors import LinkError
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.protocol.link import LinkEstablished
from spicewire.protocol.messages import MigrationDstInfo

log = logging.getLogger(__name__)

ALL_CHANNELS = "all"
# QEMU passes a client_migrate_info without a port as -1, which reaches the wire as 0xFFFF
# (PROTOCOL.md 5.1): beside a TLS port it means "no plain port", not port 65535.
_ABSENT_PORT = 0xFFFF


def channel_names(names: Iterable[str]) -> frozenset[str]:
    """``secure_channels`` as given (``main``, ``port``... or ``all``); ValueError for an unknown name."""
    known = {t.name.lower() for t in ChannelType} | {ALL_CHANNELS}
    chosen = frozenset(name.strip().lower() for name in names if name.strip())
    unknown = sorted(chosen - known)
    if unknown:
        raise ValueError(f"unknown channel {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return chosen


@dataclass(frozen=True)
class Endpoint:
    """A server as the client reaches it: its plain and TLS ports (0: none) and the TLS to use."""

    host: str
    port: int
    tls_port: int = 0
    tls: ClientTls | None = None
    secure_channels: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return str(Address(self.host, self.port or self.tls_port))

    def wants_tls(self, channel_type: int) -> bool:
        if not self.port:
            return True
        return bool({ALL_CHANNELS, ChannelType(channel_type).name.lower()} & self.secure_channels)

    def link(
        self, connection_id: int, channel_type: int, channel_id: int, *, password: str | None,
        channel_caps: Iterable[int] = (), timeout: float = 10.0,
    ) -> tuple[socket.socket, LinkEstablished]:
        """Link one channel (LinkError when refused, CertificateRejected when TLS verification
        fails, TlsUnavailable when it must be TLS and cannot)."""
        link = functools.partial(link_channel, connection_id=connection_id, channel_type=channel_type,
                                 channel_id=channel_id, password=password, channel_caps=channel_caps,
                                 timeout=timeout)
        if not self.wants_tls(channel_type):
            try:
                return link(self.host, self.port)
            except LinkError as err:
                if err.code != LinkErr.NEED_SECURED or not self.tls_port:
                    raise
            log.info("%s channel: %s:%d needs TLS; linking to TLS port %d", ChannelType(channel_type).name,
                     self.host, self.port, self.tls_port)
        if not self.tls_port:
            raise TlsUnavailable(f"{self.host} has no TLS port for the {ChannelType(channel_type).name} channel")
        if self.tls is None:
            raise TlsUnavailable(f"{self.host} offers the {ChannelType(channel_type).name} channel only over "
                                 "TLS and this client has no CA file configured")
        return link(self.host, self.tls_port, wrap=functools.partial(self.tls.wrap, host=self.host))

    def destination(self, dst: MigrationDstInfo) -> Endpoint:
        """s2 as a MIGRATE_BEGIN or SWITCH_HOST names it, reached with this endpoint's TLS setup:
        the CA stays, the subject is s2's (none given: s2's host name is checked)."""
        port = 0 if dst.sport and dst.port == _ABSENT_PORT else dst.port
        tls = None if self.tls is None else self.tls.for_subject(dst.cert_subject)
        return Endpoint(dst.host, port, dst.sport, tls, self.secure_channels)
