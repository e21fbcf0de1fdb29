"""``HOST:PORT`` as operators type it, parsed once for the command line and the control API (and
``unix:PATH``, where a control API may listen).

The host is an IPv4 address, a DNS name, or an IPv6 address in brackets (``[::1]:5900``): without
brackets the last colon of an IPv6 address would read as the port separator. Errors are one line
that says what was expected, since they reach a terminal or an HTTP 400 as they are.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

# RFC 1123 labels: letters, digits and inner hyphens, at most 63 characters each.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_PORT = 65535


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        """The spelling ``parse_address`` reads back: an IPv6 host goes in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: object, *, allow_port_zero: bool = False) -> Address:
    """``HOST:PORT`` with a port of 1-65535 (0 too with ``allow_port_zero``, for a listening
    socket the kernel gives a free port); ValueError with a one-line reason otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected HOST:PORT as a string, got {type(text).__name__}")
    lowest = 0 if allow_port_zero else 1
    expected = f"expected HOST:PORT (IPv6 as [ADDR]:PORT, port {lowest}-{MAX_PORT}), got {text!r}"
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not lowest <= int(port) <= MAX_PORT:
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{expected}: {host} is not an IPv6 address") from None
        return Address(host[1:-1], int(port))
    if ":" in host:
        raise ValueError(f"{expected}: put an IPv6 address in brackets")
    if not _is_host_name(host):
        raise ValueError(f"{expected}: {host!r} is not an IPv4 address or a host name")
    return Address(host, int(port))


def _is_host_name(host: str) -> bool:
    # A dotted quad is a valid name too, but 256.1.1.1 must not slip through as one.
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and name.isascii() and all(_LABEL.fullmatch(label) for label in name.split("."))


class UnixAddress(NamedTuple):
    """A Unix socket's path, as ``unix:PATH`` on the command line: the control API's owner-only door."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


def parse_control_address(text: object, *, allow_port_zero: bool = False) -> Address | UnixAddress:
    """``unix:PATH`` or ``HOST:PORT`` (as ``parse_address``)."""
    if isinstance(text, str) and text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path or "\0" in path:
            raise ValueError(f"expected unix:PATH with a path, got {text!r}")
        return UnixAddress(path)
    return parse_address(text, allow_port_zero=allow_port_zero)


def control_target(address: Address | UnixAddress) -> tuple[str, int, str | None]:
    """``(host, port, unix)`` as the control client and the event follower take them."""
    if isinstance(address, UnixAddress):
        return "", 0, address.path
    return address.host, address.port, None
