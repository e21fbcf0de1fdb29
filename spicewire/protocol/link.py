"""Link stage (PROTOCOL.md section 1): the link structures and one sans-I/O machine per side.

A machine never touches a socket or a clock: the owner feeds it bytes (``receive_data``), pulls
events (``next_event``) and writes whatever ``data_to_send`` returns. When a link fails,
``next_event`` raises (RemoteProtocolError for a broken peer, LinkError for a refused ticket or an
error code from the server); ``data_to_send`` then still holds the error reply, if the protocol has
one, and the owner closes the connection after writing it.

Capabilities are kept as on the wire: tuples of u32 words (cap N = bit N % 32 of word N // 32).
"""

from __future__ import annotations

import hmac
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import ClassVar, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from spicewire.errors import LinkError, LinkTimeout, LocalProtocolError, RemoteProtocolError
from spicewire.protocol.caps import caps_to_words, has_cap
from spicewire.protocol.enums import (
    ENCRYPTED_TICKET_SIZE,
    LINK_HEADER_SIZE,
    LINK_MAGIC,
    LINK_MESS_SIZE,
    LINK_REPLY_SIZE,
    MAX_CAPS_WORDS,
    MAX_LINK_SIZE,
    MAX_PASSWORD_LENGTH,
    PUBLIC_KEY_SIZE,
    VERSION_MAJOR,
    VERSION_MINOR,
    AuthMechanism,
    CommonCap,
    LinkErr,
)

Caps = tuple[int, ...]
"""Capability words, u32 each, in wire order."""

_HEADER = struct.Struct("<4I")
_MESS = struct.Struct("<IBBIII")
_REPLY = struct.Struct(f"<I{PUBLIC_KEY_SIZE}sIII")
_U32 = struct.Struct("<I")
_MAGIC_BYTES = _U32.pack(LINK_MAGIC)

# The largest reply a server can build within the caps-count limits of 1.2.
_MAX_REPLY_SIZE = LINK_REPLY_SIZE + 4 * 2 * MAX_CAPS_WORDS

# RSA_PKCS1_OAEP_PADDING as spice-server and spice-gtk use it (1.6).
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)

KeyFactory = Callable[[], rsa.RSAPrivateKey]


SERVER_COMMON_CAPS: Caps = tuple(
    caps_to_words((CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.AUTH_SPICE, CommonCap.MINI_HEADER))
)
"""0x0B, what spice-server advertises without SASL."""
CLIENT_COMMON_CAPS: Caps = tuple(caps_to_words((CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER)))
"""0x09, what spice-gtk advertises without SASL (it never sets AUTH_SPICE)."""


def new_link_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-1024 key, e=65537: its SubjectPublicKeyInfo is exactly 162 bytes (1.4)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def _c_string(value: str | bytes) -> bytes:
    """The bytes C would see: everything before the first NUL."""
    data = value.encode() if isinstance(value, str) else bytes(value)
    return data.split(b"\0", 1)[0]


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, LinkErr.INVALID_DATA)


def _read_caps(
    body: bytes, offset: int, fixed: int, ncommon: int, nchannel: int
) -> tuple[Caps, Caps] | None:
    """The common and channel caps, or None when they do not fit between ``fixed`` and the end."""
    total = ncommon + nchannel
    if not total:
        return (), ()  # spice-server ignores caps_offset when there are no caps
    if offset < fixed or offset + 4 * total > len(body):
        return None
    words = struct.unpack_from(f"<{total}I", body, offset)
    return words[:ncommon], words[ncommon:]


def _pack_caps(common: Caps, channel: Caps) -> bytes:
    return struct.pack(f"<{len(common) + len(channel)}I", *common, *channel)


def _framed(body: bytes) -> bytes:
    return SpiceLinkHeader(size=len(body)).encode() + body


@dataclass(frozen=True, slots=True, kw_only=True)
class SpiceLinkHeader:
    """16 bytes in front of SpiceLinkMess and SpiceLinkReply (1.1); checks belong to each side."""

    magic: int = LINK_MAGIC
    major_version: int = VERSION_MAJOR
    minor_version: int = VERSION_MINOR
    size: int

    def encode(self) -> bytes:
        return _HEADER.pack(self.magic, self.major_version, self.minor_version, self.size)

    @classmethod
    def decode(cls, data: bytes) -> SpiceLinkHeader:
        if len(data) < LINK_HEADER_SIZE:
            raise _invalid(f"link header needs {LINK_HEADER_SIZE} bytes, got {len(data)}")
        magic, major, minor, size = _HEADER.unpack_from(data)
        return cls(magic=magic, major_version=major, minor_version=minor, size=size)


@dataclass(frozen=True, slots=True)
class SpiceLinkMess:
    """Client -> server link request (1.2); encoded with caps right after it (caps_offset 18)."""

    connection_id: int
    channel_type: int
    channel_id: int
    common_caps: Caps = ()
    channel_caps: Caps = ()

    def encode(self) -> bytes:
        fixed = _MESS.pack(
            self.connection_id, self.channel_type, self.channel_id,
            len(self.common_caps), len(self.channel_caps), LINK_MESS_SIZE,
        )
        return fixed + _pack_caps(self.common_caps, self.channel_caps)

    @classmethod
    def decode(cls, body: bytes) -> SpiceLinkMess:
        """Parse the header.size bytes after the header with spice-server's limits; a violation is
        a RemoteProtocolError whose link_error is INVALID_DATA."""
        if not LINK_MESS_SIZE <= len(body) <= MAX_LINK_SIZE:
            raise _invalid(f"link message size {len(body)} outside 18..4096")
        conn, ctype, cid, ncommon, nchannel, offset = _MESS.unpack_from(body)
        if ncommon > MAX_CAPS_WORDS or nchannel > MAX_CAPS_WORDS:
            raise _invalid(f"{ncommon}+{nchannel} caps words exceed {MAX_CAPS_WORDS}")
        caps = _read_caps(body, offset, LINK_MESS_SIZE, ncommon, nchannel)
        if caps is None:
            raise _invalid(f"caps at offset {offset} do not fit in {len(body)} bytes")
        return cls(conn, ctype, cid, *caps)


@dataclass(frozen=True, slots=True)
class SpiceLinkReply:
    """Server -> client answer (1.4). With a non-zero error it encodes as spice-server's error
    reply: every byte but the code zero, caps_offset included."""

    error: int = LinkErr.OK
    pub_key: bytes = bytes(PUBLIC_KEY_SIZE)
    common_caps: Caps = ()
    channel_caps: Caps = ()

    def encode(self) -> bytes:
        if len(self.pub_key) != PUBLIC_KEY_SIZE:
            raise LocalProtocolError(f"pub_key must be {PUBLIC_KEY_SIZE} bytes")
        offset = LINK_REPLY_SIZE if self.error == LinkErr.OK else 0
        counts = len(self.common_caps), len(self.channel_caps)
        caps = _pack_caps(self.common_caps, self.channel_caps)
        return _REPLY.pack(self.error, self.pub_key, *counts, offset) + caps

    @classmethod
    def decode(cls, body: bytes) -> SpiceLinkReply:
        if len(body) < LINK_REPLY_SIZE:
            raise RemoteProtocolError(f"link reply needs {LINK_REPLY_SIZE} bytes, got {len(body)}")
        error, pub_key, ncommon, nchannel, offset = _REPLY.unpack_from(body)
        if error != LinkErr.OK:
            return cls(error, pub_key)  # the rest of an error reply means nothing
        caps = _read_caps(body, offset, LINK_REPLY_SIZE, ncommon, nchannel)
        if caps is None:
            raise RemoteProtocolError(f"reply caps at offset {offset} do not fit in the reply")
        return cls(error, pub_key, *caps)


@dataclass(frozen=True, slots=True)
class LinkRequested:
    """The client asked for a channel. The owner checks the ids (1.8) and answers with
    ServerLink.accept, reject or close_without_reply."""

    connection_id: int
    channel_type: int
    channel_id: int
    common_caps: Caps
    channel_caps: Caps


@dataclass(frozen=True, slots=True)
class LinkEstablished:
    """Link result 0 was exchanged; framed messages (section 2) follow, starting with ``trailing``,
    the bytes that arrived after the handshake. The caps are the peer's."""

    connection_id: int
    channel_type: int
    channel_id: int
    common_caps: Caps
    channel_caps: Caps
    send_mini_header: bool
    expect_mini_header: bool
    trailing: bytes = b""


@dataclass(frozen=True, slots=True)
class LinkAuthenticated:
    """The ticket passed, on a link accepted with ``decide_after_ticket``. Only now does the owner
    look at the ids (as spice-server does), so a client without the password learns nothing about
    which sessions exist; it answers with ServerLink.establish or refuse. ``credential`` names what
    the ticket matched: "password", "open" (ticketing disabled) or the name given to allow_ticket."""

    connection_id: int
    channel_type: int
    channel_id: int
    credential: str


Event = LinkRequested | LinkAuthenticated | LinkEstablished


class LinkState(Enum):
    """What a link machine waits for next."""

    MAGIC = auto()  # server: the magic, checked before the rest of the header as spice-server does
    HEADER = auto()
    MESS = auto()  # server: SpiceLinkMess + caps
    VALIDATING = auto()  # server: the owner's answer to LinkRequested
    AUTHENTICATED = auto()  # server: the owner's verdict after a good ticket (LinkAuthenticated)
    AUTH_MECHANISM = auto()  # server
    TICKET = auto()  # server
    REPLY = auto()  # client: SpiceLinkReply + caps
    RESULT = auto()  # client: the u32 link result
    ESTABLISHED = auto()
    CLOSED = auto()


class _LinkMachine:
    """Buffers, event queue and the read loop; subclasses map each reading state to a handler
    that consumes exactly ``_need`` bytes."""

    # state -> handler(self, the ``_need`` bytes); each subclass lists the states it reads in.
    _HANDLERS: ClassVar[Mapping[LinkState, Callable[..., None]]] = {}

    def __init__(self, state: LinkState, need: int, deadline: float | None = None) -> None:
        self._state = state
        self._need = need
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._events: deque[Event] = deque()
        self._deadline = deadline

    def get_timer(self) -> float | None:
        """When handle_timer must run next, or None once the handshake is over (or has no deadline)."""
        return None if self._state in (LinkState.ESTABLISHED, LinkState.CLOSED) else self._deadline

    def handle_timer(self, now: float) -> None:
        """Fail the link, without a reply, if the handshake is not over by the deadline."""
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            self._close()
            raise LinkTimeout("link handshake timed out")

    @property
    def state(self) -> LinkState:
        return self._state

    def data_to_send(self) -> bytes:
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes (or the owner's answer) arrive."""
        while not self._events and self._state in self._HANDLERS and len(self._inbox) >= self._need:
            chunk = bytes(self._inbox[: self._need])
            del self._inbox[: self._need]
            self._HANDLERS[self._state](self, chunk)
        return self._events.popleft() if self._events else None

    def _receive(self, data: bytes) -> None:
        if self._state is LinkState.ESTABLISHED:
            raise LocalProtocolError("link established: later bytes belong to the channel")
        if self._state is not LinkState.CLOSED:  # a closed link only waits to be dropped
            self._inbox += data

    def _expect(self, state: LinkState, need: int = 0) -> None:
        self._state = state
        self._need = need

    def _close(self) -> None:
        self._state = LinkState.CLOSED
        self._inbox.clear()

    def _establish(
        self, mess: SpiceLinkMess, peer: tuple[Caps, Caps], *, send_mini: bool, expect_mini: bool
    ) -> None:
        trailing = bytes(self._inbox)
        self._inbox.clear()
        self._state = LinkState.ESTABLISHED
        self._events.append(LinkEstablished(
            mess.connection_id, mess.channel_type, mess.channel_id,
            *peer, send_mini, expect_mini, trailing,
        ))


class ServerLink(_LinkMachine):
    """Server side of one link attempt.

    ``password=None`` disables ticketing (spice_server_set_noauth); a str or bytes, even empty,
    enables it. ``password_expiry`` is compared with the ``now`` of the latest receive_data.
    ``key_factory`` may hand out pre-generated keys (RSA key generation costs milliseconds), but
    each key must serve one link only: that is what makes a recorded ticket useless elsewhere.
    """

    def __init__(
        self,
        now: float,
        *,
        password: str | bytes | None = None,
        password_expiry: float | None = None,
        key_factory: KeyFactory = new_link_key,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(LinkState.MAGIC, len(_MAGIC_BYTES), now + timeout)
        self._password = None if password is None else _c_string(password)
        self._password_expiry = password_expiry
        self._key_factory = key_factory
        self._tickets: list[tuple[bytes, str]] = []  # (ticket, credential name), besides the password
        self._decide_after_ticket = False
        self._now = now
        self._mess: SpiceLinkMess  # set once read; the states guarantee the order
        self._key: rsa.RSAPrivateKey

    def receive_data(self, data: bytes, now: float) -> None:
        self._now = now
        self._receive(data)

    def allow_migration_ticket(self, ticket: str | bytes) -> None:
        """Accept ``ticket`` besides the password, regardless of the password's expiry: for a
        client the source of a migration announced, the password it linked with there, so a
        password that expired here meanwhile does not strand it halfway. Before accept."""
        self.allow_ticket(ticket, "migration")

    def allow_ticket(self, ticket: str | bytes, credential: str) -> None:
        """Accept ``ticket`` besides the password, regardless of the password's expiry (a
        per-session ticket, a migration's); a match is reported as ``credential``. Before accept."""
        self._require_validating()
        secret = _c_string(ticket)
        if secret:  # an empty ticket would match a client that has no password at all
            self._tickets.append((secret, credential))

    def accept(self, channel_caps: Caps = (), *, decide_after_ticket: bool = False) -> None:
        """Send the LinkReply: a fresh key, SERVER_COMMON_CAPS and the channel instance's caps.
        With ``decide_after_ticket`` a good ticket gives LinkAuthenticated, and the link waits for
        establish or refuse; otherwise it is established at once."""
        self._require_validating()
        self._decide_after_ticket = decide_after_ticket
        self._key = self._key_factory()
        pub_key = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if len(pub_key) != PUBLIC_KEY_SIZE:
            raise LocalProtocolError("link keys must be RSA-1024 with e=65537 (162-byte DER)")
        reply = SpiceLinkReply(LinkErr.OK, pub_key, SERVER_COMMON_CAPS, tuple(channel_caps))
        self._outbox += _framed(reply.encode())
        # The mechanism word is expected on the client's bit, not ours (section 1 preamble).
        if has_cap(self._mess.common_caps, CommonCap.PROTOCOL_AUTH_SELECTION):
            self._expect(LinkState.AUTH_MECHANISM, _U32.size)
        else:
            self._expect(LinkState.TICKET, ENCRYPTED_TICKET_SIZE)

    def reject(self, error: LinkErr) -> None:
        """Send an error LinkReply (BAD_CONNECTION_ID, CHANNEL_NOT_AVAILABLE, NEED_SECURED...)."""
        self._require_validating()
        if error == LinkErr.OK:
            raise LocalProtocolError("reject needs a non-zero link error")
        self._outbox += _framed(SpiceLinkReply(error).encode())
        self._close()

    def establish(self) -> None:
        """The owner's yes after LinkAuthenticated: link result OK, then LinkEstablished."""
        self._require_state(LinkState.AUTHENTICATED)
        self._succeed()

    def refuse(self, error: LinkErr) -> None:
        """The owner's no after LinkAuthenticated: ``error`` as the link result (spice-server's
        reds_send_link_result), then nothing more."""
        self._require_state(LinkState.AUTHENTICATED)
        if error == LinkErr.OK:
            raise LocalProtocolError("refuse needs a non-zero link error")
        self._outbox += _U32.pack(error)
        self._close()

    def close_without_reply(self) -> None:
        """Drop the request silently, as spice-server does for an unknown non-main channel (1.4)."""
        self._require_validating()
        self._close()

    def _require_validating(self) -> None:
        self._require_state(LinkState.VALIDATING)

    def _require_state(self, state: LinkState) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"nothing to answer in state {self._state.name} (expected {state.name})")

    def _fail(self, message: str, code: LinkErr | None) -> NoReturn:
        if code is not None:
            self._outbox += _framed(SpiceLinkReply(code).encode())
        self._close()
        raise RemoteProtocolError(message, code)

    def _deny(self, message: str) -> NoReturn:
        self._outbox += _U32.pack(LinkErr.PERMISSION_DENIED)
        self._close()
        raise LinkError(LinkErr.PERMISSION_DENIED, message)

    def _on_magic(self, chunk: bytes) -> None:
        if chunk != _MAGIC_BYTES:
            self._fail(f"bad link magic {chunk.hex()}", LinkErr.INVALID_MAGIC)
        self._expect(LinkState.HEADER, LINK_HEADER_SIZE - len(_MAGIC_BYTES))

    def _on_header(self, chunk: bytes) -> None:
        header = SpiceLinkHeader.decode(_MAGIC_BYTES + chunk)
        if header.major_version != VERSION_MAJOR:
            # spice-server sends no reply to major 0.
            code = LinkErr.VERSION_MISMATCH if header.major_version else None
            self._fail(f"link major version {header.major_version}", code)
        if not LINK_MESS_SIZE <= header.size <= MAX_LINK_SIZE:
            self._fail(f"link size {header.size} outside 18..4096", LinkErr.INVALID_DATA)
        self._expect(LinkState.MESS, header.size)

    def _on_mess(self, chunk: bytes) -> None:
        try:
            mess = SpiceLinkMess.decode(chunk)
        except RemoteProtocolError as exc:
            self._fail(str(exc), LinkErr.INVALID_DATA)
        self._mess = mess
        self._expect(LinkState.VALIDATING)
        ids = mess.connection_id, mess.channel_type, mess.channel_id
        self._events.append(LinkRequested(*ids, mess.common_caps, mess.channel_caps))

    def _on_auth_mechanism(self, chunk: bytes) -> None:
        (mechanism,) = _U32.unpack(chunk)
        if mechanism != AuthMechanism.SPICE:
            # SASL is not implemented; spice-server answers a mechanism it cannot run this way.
            self._fail(f"auth mechanism {mechanism} not supported", LinkErr.INVALID_DATA)
        self._expect(LinkState.TICKET, ENCRYPTED_TICKET_SIZE)

    def _on_ticket(self, chunk: bytes) -> None:
        try:
            plaintext = self._key.decrypt(chunk, _OAEP)
        except ValueError:
            # Also with ticketing disabled: the client must prove it holds this link's key.
            self._deny("ticket does not decrypt with this link's key")
        ticket = _c_string(plaintext)
        # Every allowed ticket is compared, matched or not: the time taken says nothing of which.
        matches = [name for secret, name in self._tickets if hmac.compare_digest(ticket, secret)]
        credential = matches[0] if matches else "password" if self._password is not None else "open"
        if credential == "password":
            if not self._password:
                self._deny("ticketing is enabled but no password is set")
            if self._password_expiry is not None and self._now > self._password_expiry:
                self._deny("password expired")
            if not hmac.compare_digest(ticket, self._password):
                self._deny("invalid password")
        if self._decide_after_ticket:
            mess = self._mess
            self._expect(LinkState.AUTHENTICATED)
            self._events.append(LinkAuthenticated(mess.connection_id, mess.channel_type, mess.channel_id, credential))
            return
        self._succeed()

    def _succeed(self) -> None:
        self._outbox += _U32.pack(LinkErr.OK)
        mess = self._mess
        self._establish(
            mess, (mess.common_caps, mess.channel_caps),
            send_mini=has_cap(mess.common_caps, CommonCap.MINI_HEADER),
            expect_mini=has_cap(SERVER_COMMON_CAPS, CommonCap.MINI_HEADER),
        )

    _HANDLERS: ClassVar[Mapping[LinkState, Callable[..., None]]] = {
        LinkState.MAGIC: _on_magic,
        LinkState.HEADER: _on_header,
        LinkState.MESS: _on_mess,
        LinkState.AUTH_MECHANISM: _on_auth_mechanism,
        LinkState.TICKET: _on_ticket,
    }


class ClientLink(_LinkMachine):
    """Client side of one link attempt; the LinkMess is ready in data_to_send at once.

    ``password=None`` sends the single NUL spice-gtk sends without a password: a server with
    ticketing disabled still needs a well-formed OAEP block (1.6).
    """

    def __init__(
        self,
        connection_id: int,
        channel_type: int,
        channel_id: int,
        *,
        password: str | bytes | None = None,
        common_caps: Caps = CLIENT_COMMON_CAPS,
        channel_caps: Caps = (),
        now: float | None = None,
        timeout: float | None = None,
    ) -> None:
        """With ``now`` and ``timeout`` the handshake has a deadline (``get_timer``)."""
        deadline = now + timeout if now is not None and timeout is not None else None
        super().__init__(LinkState.HEADER, LINK_HEADER_SIZE, deadline)
        secret = password.encode() if isinstance(password, str) else bytes(password or b"")
        if b"\0" in secret:
            raise LocalProtocolError("a SPICE password cannot contain NUL")
        if len(secret) > MAX_PASSWORD_LENGTH:
            raise LocalProtocolError(f"password longer than {MAX_PASSWORD_LENGTH} bytes")
        self._ticket = secret + b"\0"
        ids = connection_id, channel_type, channel_id
        self._mess = SpiceLinkMess(*ids, tuple(common_caps), tuple(channel_caps))
        self._outbox += _framed(self._mess.encode())
        self._reply: SpiceLinkReply  # set once read

    def receive_data(self, data: bytes) -> None:
        self._receive(data)

    def _fail(self, message: str) -> NoReturn:
        self._close()
        raise RemoteProtocolError(message)

    def _on_header(self, chunk: bytes) -> None:
        header = SpiceLinkHeader.decode(chunk)
        if header.magic != LINK_MAGIC:
            self._fail(f"bad reply magic {chunk[:4].hex()}")
        if header.major_version != VERSION_MAJOR:
            self._fail(f"server major version {header.major_version}")
        if not LINK_REPLY_SIZE <= header.size <= _MAX_REPLY_SIZE:
            self._fail(f"reply size {header.size} outside {LINK_REPLY_SIZE}..{_MAX_REPLY_SIZE}")
        self._expect(LinkState.REPLY, header.size)

    def _on_reply(self, chunk: bytes) -> None:
        try:
            reply = SpiceLinkReply.decode(chunk)
        except RemoteProtocolError as exc:
            self._fail(str(exc))
        if reply.error != LinkErr.OK:
            self._close()
            raise LinkError(reply.error, "server refused the link")
        if not has_cap(reply.common_caps, CommonCap.AUTH_SPICE):
            self._fail("No compatible AUTH mechanism")
        try:
            key = serialization.load_der_public_key(reply.pub_key)
        except (ValueError, UnsupportedAlgorithm):
            self._fail("server public key is not a DER SubjectPublicKeyInfo")
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size != 8 * ENCRYPTED_TICKET_SIZE:
            self._fail("server public key is not RSA-1024")
        try:
            ticket = key.encrypt(self._ticket, _OAEP)
        except ValueError:  # a key that parses but cannot encrypt (an even modulus, say)
            self._fail("server public key cannot encrypt the ticket")
        # Mechanism word and ticket go back to back, without waiting (as spice-gtk does).
        if has_cap(reply.common_caps, CommonCap.PROTOCOL_AUTH_SELECTION):
            self._outbox += _U32.pack(AuthMechanism.SPICE)
        self._outbox += ticket
        self._reply = reply
        self._expect(LinkState.RESULT, _U32.size)

    def _on_result(self, chunk: bytes) -> None:
        (result,) = _U32.unpack(chunk)
        if result != LinkErr.OK:
            self._close()
            raise LinkError(result, "link result")
        reply = self._reply
        self._establish(
            self._mess, (reply.common_caps, reply.channel_caps),
            send_mini=has_cap(reply.common_caps, CommonCap.MINI_HEADER),
            expect_mini=has_cap(self._mess.common_caps, CommonCap.MINI_HEADER),
        )

    _HANDLERS: ClassVar[Mapping[LinkState, Callable[..., None]]] = {
        LinkState.HEADER: _on_header,
        LinkState.REPLY: _on_reply,
        LinkState.RESULT: _on_result,
    }
