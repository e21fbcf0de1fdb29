"""Authenticated migrate data: what s1 sends through the client carries an HMAC s2 checks.

spice-server's s2 believes whatever MIGRATE_DATA the client relays. Between spicewire servers, s1
gives s2 a random key per migration over the server-to-server path (the announcement), and appends
to every channel's MIGRATE_DATA body a trailer::

    body | b"SWMA" | HMAC-SHA256(key, context | body)

``context`` binds the tag to one session and one channel (u32 session id, u8 channel type, u8
channel id), so a body cannot be moved to another channel or session either. s2 strips the
trailer before it parses anything, and restores nothing from a body whose tag does not match.

The tag is computed over the body as it is built: a streamed SWPD updates it segment by segment,
as each segment is packed (``StateMac.update``), never with a second pass over the state.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from spicewire.errors import CodecError

Buffer = bytes | bytearray | memoryview

KEY_SIZE = 32
TAG = b"SWMA"
TRAILER_SIZE = len(TAG) + hashlib.sha256().digest_size
_CONTEXT = struct.Struct("<4sIBB")


class StateAuthError(CodecError):
    """A MIGRATE_DATA body whose tag is missing or does not match: rewritten on the way, or not
    from the source this migration's key belongs to."""


class StateMac:
    """HMAC-SHA256 of one channel's MIGRATE_DATA body, fed in pieces. OpenSSL's update releases
    the GIL for large pieces, so a worker thread can run it beside the packing."""

    def __init__(self, key: bytes, session_id: int, channel: tuple[int, int]) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a state key is {KEY_SIZE} bytes, not {len(key)}")
        self._mac = hmac.new(key, _CONTEXT.pack(b"SWMC", session_id, channel[0], channel[1]), "sha256")

    def update(self, piece: Buffer) -> None:
        self._mac.update(piece)

    def trailer(self) -> bytes:
        return TAG + self._mac.digest()


def seal(key: bytes, session_id: int, channel: tuple[int, int], body: Buffer) -> bytes:
    """The trailer for a body built whole."""
    mac = StateMac(key, session_id, channel)
    mac.update(body)
    return mac.trailer()


def unseal(key: bytes, session_id: int, channel: tuple[int, int], data: Buffer) -> memoryview:
    """The body of ``data`` (a view, no copy) once its trailer is checked; StateAuthError if it
    has none or it does not match."""
    mac = StateMac(key, session_id, channel)
    mac.update(_split(data)[0])
    return opened(mac, data)


def opened(mac: StateMac, data: Buffer) -> memoryview:
    """The body of ``data`` once its trailer matches ``mac``, which was fed that body already (as
    it arrived: s2 hashes a large one while it lands); StateAuthError if it does not."""
    body, trailer = _split(data)
    if not hmac.compare_digest(mac.trailer(), trailer):
        raise StateAuthError("migrate data does not match its authentication tag: it was changed on the way")
    return body


def _split(data: Buffer) -> tuple[memoryview, bytes]:
    view = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
    if len(view) < TRAILER_SIZE or bytes(view[-TRAILER_SIZE:-TRAILER_SIZE + len(TAG)]) != TAG:
        raise StateAuthError("migrate data carries no authentication trailer")
    return view[:-TRAILER_SIZE], bytes(view[-TRAILER_SIZE:])
