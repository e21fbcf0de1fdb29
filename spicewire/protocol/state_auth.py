"""Authenticated migrate data: what s1 sends through the client carries a MAC s2 checks.

spice-server's s2 believes whatever MIGRATE_DATA the client relays. Between spicewire servers, s1
gives s2 a random secret per migration over the server-to-server path (the announcement), and
appends to every channel's MIGRATE_DATA body a trailer. Three versions, agreed in the announcement
(s1 offers the highest it speaks as ``"state_auth"``, s2 answers the one it will check):

- **1**: ``body | b"SWMA" | HMAC-SHA256(secret, context | body)``.
- **2**: ``body | b"SWM2" | Poly1305(one_time_key, body)`` with
  ``one_time_key = HMAC-SHA256(secret, b"SWM2" | context)``. Poly1305 runs at several times
  HMAC-SHA256's rate, and the relay of a large body through the client should not wait for a hash.
- **3**: ``body | b"SWM3" | GMAC(one_time_key, body)`` with
  ``one_time_key = HMAC-SHA256(secret, b"SWM3" | context)``: the 16-byte tag of AES-256-GCM with
  the body as associated data, nothing encrypted, and a nonce of 12 zero bytes (the key is never
  used twice, see below). Each side feeds the MAC every batch right after the socket copied it,
  from the cache, where GMAC (carry-less multiplication, as in TLS's AES-GCM) passed a GiB in
  0.026 s against Poly1305's 0.077 (from memory: 0.11 against 0.16 s) on the 2-core Intel Xeon VM
  the fallback relay is measured on.

``context`` (u32 session id, u8 channel type, u8 channel id) binds the tag to one session and one
channel, so a body cannot be moved to another channel or session either. s2 strips the trailer
before it parses anything, and restores nothing from a body whose tag does not match.

Why a version-2 or -3 key is used once. Poly1305, and GMAC under a fixed nonce, are one-time MACs:
whoever sees two bodies tagged with the same key (the client sees every MIGRATE_DATA it relays)
can solve for the key's hash part and forge a third. The one-time key depends only on what both
servers know before the body lands (s2 hashes a large body as it arrives, so it needs the key from
the first byte): the secret, and the (session, channel) the body belongs to. Each pair is
therefore tagged at most once per secret:

- the secret is fresh for each migration attempt (``MigrationKey.fresh``, made by the orchestrator
  for one ``/migrate``); a retried or rolled-back migration is a new attempt with a new secret;
- a session migrates once per attempt and each of its channels sends one MIGRATE_DATA; and rather
  than rest on that, ``MigrationKey.mac`` hands out each (session, channel)'s MAC only once: a
  second body for the same pair raises ``KeyReuse`` before any byte of it is tagged;
- s2 checks the same way: a second MIGRATE_DATA for a pair it has checked is refused.

The tag is computed over the body as it goes out: a streamed SWPD updates it batch by batch, each
batch of queue views just before the socket copies it (``StateMac.update``), never with a second
pass over the state.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

from spicewire.errors import CodecError

Buffer = bytes | bytearray | memoryview

KEY_SIZE = 32
VERSIONS = (1, 2, 3)
VERSION = max(VERSIONS)  # what s1 offers
TAGS = {1: b"SWMA", 2: b"SWM2", 3: b"SWM3"}
# Whether a version's MAC is fed from a worker thread. hashlib's HMAC lets go of the GIL for large
# pieces; cryptography's Poly1305 holds it. Its GMAC lets go of it too, but is fed on the hub, right
# after the socket's copy, from the cache: from a worker thread (reading the batch again, beside the
# other core's work) a 1 GiB fallback's downtime went from 0.71-0.83 s to 0.85-0.96 s.
_IN_THREAD = {1: True, 2: False, 3: False}
_TAG_SIZES = {1: hashlib.sha256().digest_size, 2: 16, 3: 16}
_GMAC_NONCE = bytes(12)  # the key is one-time (see the module's docstring)
_CONTEXT = struct.Struct("<4sIBB")


def trailer_size(version: int) -> int:
    return len(TAGS[version]) + _TAG_SIZES[version]


def negotiate(offered: object) -> int:
    """s2: the version it checks with an s1 that offered ``offered`` (an older s1 offers nothing,
    and speaks 1)."""
    if isinstance(offered, int) and not isinstance(offered, bool) and offered >= 1:
        return min(offered, VERSION)
    return 1


class StateAuthError(CodecError):
    """A MIGRATE_DATA body whose tag is missing or does not match: rewritten on the way, or not
    from the source this migration's key belongs to."""


class KeyReuse(StateAuthError):
    """A second body for a (session, channel) whose MAC this migration's key handed out already."""


class StateMac:
    """The MAC of one channel's MIGRATE_DATA body, fed in pieces. ``in_thread``: whether large
    pieces are better fed from a worker thread (beside the packing, the socket) than on the hub.
    Made by MigrationKey.mac."""

    def __init__(self, version: int, secret: bytes, session_id: int, channel: tuple[int, int]) -> None:
        self.version = version
        self.trailer_size = trailer_size(version)
        self.in_thread = _IN_THREAD[version]
        if version == 1:
            self._mac: hmac.HMAC | Poly1305 | _Gmac = hmac.new(
                secret, _CONTEXT.pack(b"SWMC", session_id, channel[0], channel[1]), "sha256")
        else:
            one_time = hmac.digest(secret, _CONTEXT.pack(TAGS[version], session_id, channel[0], channel[1]), "sha256")
            self._mac = Poly1305(one_time) if version == 2 else _Gmac(one_time)

    def update(self, piece: Buffer) -> None:
        self._mac.update(piece)

    def trailer(self) -> bytes:
        """Once, after the last piece (a Poly1305 or a GMAC is finished by it)."""
        tag = self._mac.digest() if isinstance(self._mac, hmac.HMAC) else self._mac.finalize()
        return TAGS[self.version] + tag


class _Gmac:
    """AES-256-GMAC, streamed: an AES-GCM encryptor fed only associated data; its tag is the MAC."""

    def __init__(self, key: bytes) -> None:
        self._gcm = Cipher(algorithms.AES(key), modes.GCM(_GMAC_NONCE)).encryptor()

    def update(self, piece: Buffer) -> None:
        self._gcm.authenticate_additional_data(piece)

    def finalize(self) -> bytes:
        self._gcm.finalize()
        return self._gcm.tag


class MigrationKey:
    """One migration's secret, the version the two servers agreed on, and the (session, channel)
    pairs whose MAC it handed out: each at most once (see the module's docstring)."""

    def __init__(self, secret: bytes, version: int | None = None) -> None:
        if len(secret) != KEY_SIZE:
            raise ValueError(f"a state key is {KEY_SIZE} bytes, not {len(secret)}")
        self.secret = secret
        self.version = version if version in VERSIONS else None
        self._used: set[tuple[int, tuple[int, int]]] = set()
        self._ready: dict[tuple[int, tuple[int, int]], StateMac] = {}  # made by prepare, not handed out yet

    @classmethod
    def fresh(cls) -> MigrationKey:
        return cls(secrets.token_bytes(KEY_SIZE))

    def agree(self, answered: object) -> bool:
        """s1: s2 answered the announcement with ``answered`` as its version; whether MIGRATE_DATA
        gets a MAC (an older s2 answers none, and checks none). The version is settled once."""
        if self.version is None and type(answered) is int and answered in VERSIONS and answered <= VERSION:
            self.version = answered
        return self.version is not None

    @property
    def trailer_size(self) -> int:
        return trailer_size(self._agreed())

    @property
    def in_thread(self) -> bool:
        return _IN_THREAD[self._agreed()]

    def prepare(self, session_id: int, channel: tuple[int, int]) -> None:
        """Make the pair's MAC now, for ``mac`` to hand out later: a MAC's first setup after a
        while costs ~150 us (OpenSSL's context, cold caches), which a server spends before the
        downtime this way. Nothing for a pair whose MAC was made already."""
        context = _context(session_id, channel)
        if context not in self._used:
            self._ready[context] = self._new(session_id, channel)

    def mac(self, session_id: int, channel: tuple[int, int]) -> StateMac:
        """The MAC of the one body (session, channel) sends or receives under this key: the one
        ``prepare`` made, or a new one."""
        return self._ready.pop(_context(session_id, channel), None) or self._new(session_id, channel)

    def _new(self, session_id: int, channel: tuple[int, int]) -> StateMac:
        context = _context(session_id, channel)
        if context in self._used:
            raise KeyReuse(f"session {session_id:08x} channel {channel[0]}:{channel[1]} has had its MIGRATE_DATA "
                           "under this migration's key already: a second one is refused")
        version = self._agreed()
        self._used.add(context)
        return StateMac(version, self.secret, session_id, channel)

    def _agreed(self) -> int:
        if self.version is None:
            raise ValueError("no state_auth version was agreed for this key")
        return self.version


def _context(session_id: int, channel: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """A (session, channel) pair as a key counts it: a ChannelType and its plain int are one channel."""
    return session_id, (int(channel[0]), int(channel[1]))


def seal(key: MigrationKey, session_id: int, channel: tuple[int, int], body: Buffer) -> bytes:
    """The trailer for a body built whole."""
    mac = key.mac(session_id, channel)
    mac.update(body)
    return mac.trailer()


def unseal(key: MigrationKey, session_id: int, channel: tuple[int, int], data: Buffer) -> memoryview:
    """The body of ``data`` (a view, no copy) once its trailer is checked; StateAuthError if it
    has none, it does not match, or that channel's body was checked already."""
    return unsealed(key.mac(session_id, channel), data)


def unsealed(mac: StateMac, data: Buffer) -> memoryview:
    """As unseal, with the channel's MAC made already (ahead of the body, out of the downtime)."""
    mac.update(_split(data, mac)[0])
    return opened(mac, data)


def opened(mac: StateMac, data: Buffer) -> memoryview:
    """The body of ``data`` once its trailer matches ``mac``, which was fed that body already (as
    it arrived: s2 hashes a large one while it lands); StateAuthError if it does not."""
    body, trailer = _split(data, mac)
    if not hmac.compare_digest(mac.trailer(), trailer):
        raise StateAuthError("migrate data does not match its authentication tag: it was changed on the way")
    return body


def _split(data: Buffer, mac: StateMac) -> tuple[memoryview, bytes]:
    view = memoryview(data)
    view = view.cast("B") if view.format != "B" else view
    size, tag = mac.trailer_size, TAGS[mac.version]
    if len(view) < size or bytes(view[-size:-size + len(tag)]) != tag:
        raise StateAuthError("migrate data carries no authentication trailer")
    return view[:-size], bytes(view[-size:])
