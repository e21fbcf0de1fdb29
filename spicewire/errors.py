"""One root error for the package; leaves say who broke the rules and, where SPICE has one, which
link error code answers it."""

from __future__ import annotations


class SpiceError(Exception):
    """Root of every error spicewire raises on purpose."""


class CodecError(SpiceError, ValueError):
    """Bytes that cannot be decoded: truncated, inconsistent or out of range."""


class MessageTooLarge(CodecError):
    """A header announced a body larger than the receiver accepts."""

    def __init__(self, size: int, limit: int, offset: int = 0) -> None:
        super().__init__(f"message body of {size} bytes at offset {offset} exceeds the limit of {limit}")
        self.size = size
        self.limit = limit
        self.offset = offset


class ProtocolError(SpiceError):
    """A legal-looking byte stream carried an illegal sequence."""


class RemoteProtocolError(ProtocolError):
    """The peer did something the protocol forbids; the connection must end."""

    def __init__(self, message: str, link_error: int | None = None) -> None:
        super().__init__(message)
        self.link_error = link_error


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug in the caller)."""


class LinkError(SpiceError):
    """A link attempt ended with a non-zero SpiceLinkErr (1.7)."""

    def __init__(self, code: int, message: str = "") -> None:
        from spicewire.protocol.enums import LinkErr

        try:
            name = LinkErr(code).name
        except ValueError:
            name = f"unknown({code})"
        super().__init__(f"link failed: {name}" + (f": {message}" if message else ""))
        self.code = code
