"""One root error for the package; leaves say who broke the rules and, where SPICE has one, which
link error code answers it.

Whose fault: ``PeerFault`` marks what the peer did (a body over our limit, an illegal sequence, a
deadline it let pass); that connection ends and it is logged as the peer's doing. A
``LocalProtocolError`` is ours: a bug in the caller, never the peer's. This module imports nothing
from the rest of spicewire, so the codec and every layer can raise these.
"""

from __future__ import annotations

from typing import ClassVar


class SpiceError(Exception):
    """Root of every error spicewire raises on purpose."""


class PeerFault(SpiceError):
    """Raised because of what the peer sent, or failed to send in time; not a bug on our side."""


class CodecError(SpiceError, ValueError):
    """Bytes that cannot be decoded: truncated, inconsistent or out of range."""


class MessageTooLarge(CodecError, PeerFault):
    """A header announced a body larger than the receiver accepts."""

    def __init__(self, size: int, limit: int, offset: int = 0) -> None:
        super().__init__(f"message body of {size} bytes at offset {offset} exceeds the limit of {limit}")
        self.size = size
        self.limit = limit
        self.offset = offset


class ProtocolError(SpiceError):
    """A legal-looking byte stream carried an illegal sequence."""


class RemoteProtocolError(ProtocolError, PeerFault):
    """The peer did something the protocol forbids; the connection must end."""

    def __init__(self, message: str, link_error: int | None = None) -> None:
        super().__init__(message)
        self.link_error = link_error


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug in the caller)."""


class SpiceTimeout(SpiceError, TimeoutError):
    """A protocol deadline passed."""


class LinkTimeout(SpiceTimeout, RemoteProtocolError):
    """The peer did not complete the link handshake by its deadline."""


class LinkError(SpiceError):
    """A link attempt ended with a non-zero SpiceLinkErr (1.7)."""

    names: ClassVar[dict[int, str]] = {}
    """SpiceLinkErr names by code, registered by protocol/enums.py where the codes are defined."""

    def __init__(self, code: int, message: str = "") -> None:
        name = self.names.get(int(code), f"unknown({int(code)})")
        super().__init__(f"link failed: {name}" + (f": {message}" if message else ""))
        self.code = code


class MigrationError(SpiceError):
    """A migration could not start, or its servers could not talk to each other."""


class PeerStalled(SpiceTimeout, PeerFault):
    """The peer went silent in the middle of a message for longer than allowed."""


class ReadTimeout(SpiceTimeout):
    """A read's timeout passed before the bytes it asked for arrived. Nothing was consumed: what
    had arrived stays buffered for the next read (``available`` says how much)."""

    def __init__(self, message: str, available: int = 0) -> None:
        super().__init__(message)
        self.available = available


class SessionClosed(SpiceError, ConnectionError):
    """The session or channel is closed: by ``close()``, or by the server. Raised by a call that
    needs it open; a read at the end of the stream returns what is left instead, then ``b""``."""
