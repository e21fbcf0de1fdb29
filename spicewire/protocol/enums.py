"""Every number of PROTOCOL.md sections 1-3, defined once.

Server->client message types are ``Msg*``, client->server ``Msgc*``: the two spaces are independent.
The message header layouts and sizes live with the codec that parses them, in _codec_layout.py.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from spicewire.errors import LinkError

LINK_MAGIC = 0x51444552  # b"REDQ" read as a little-endian u32
VERSION_MAJOR = 2
VERSION_MINOR = 2
LINK_HEADER_SIZE = 16
LINK_MESS_SIZE = 18
LINK_REPLY_SIZE = 178
PUBLIC_KEY_SIZE = 162
ENCRYPTED_TICKET_SIZE = 128
MAX_PASSWORD_LENGTH = 60
MAX_LINK_SIZE = 4096
MAX_CAPS_WORDS = 1024
MIGRATION_PROTOCOL_VERSION = 1


class LinkErr(IntEnum):
    OK = 0
    ERROR = 1
    INVALID_MAGIC = 2
    INVALID_DATA = 3
    VERSION_MISMATCH = 4
    NEED_SECURED = 5
    NEED_UNSECURED = 6
    PERMISSION_DENIED = 7
    BAD_CONNECTION_ID = 8
    CHANNEL_NOT_AVAILABLE = 9


LinkError.names.update((err.value, err.name) for err in LinkErr)  # errors.py cannot import from here


class CommonCap(IntEnum):
    PROTOCOL_AUTH_SELECTION = 0
    AUTH_SPICE = 1
    AUTH_SASL = 2
    MINI_HEADER = 3


class MainCap(IntEnum):
    SEMI_SEAMLESS_MIGRATE = 0
    NAME_AND_UUID = 1
    AGENT_CONNECTED_TOKENS = 2
    SEAMLESS_MIGRATE = 3


class SpicevmcCap(IntEnum):
    DATA_COMPRESS_LZ4 = 0


class InputsCap(IntEnum):
    KEY_SCANCODE = 0


class AuthMechanism(IntEnum):
    """The auth-mechanism word is the common-cap bit number of the chosen mechanism."""

    SPICE = CommonCap.AUTH_SPICE
    SASL = CommonCap.AUTH_SASL


class ChannelType(IntEnum):
    MAIN = 1
    DISPLAY = 2
    INPUTS = 3
    CURSOR = 4
    PLAYBACK = 5
    RECORD = 6
    TUNNEL = 7
    SMARTCARD = 8
    USBREDIR = 9
    PORT = 10
    WEBDAV = 11


class Msg(IntEnum):
    """Common server->client messages (every channel)."""

    MIGRATE = 1
    MIGRATE_DATA = 2
    SET_ACK = 3
    PING = 4
    WAIT_FOR_CHANNELS = 5
    DISCONNECTING = 6
    NOTIFY = 7
    LIST = 8
    BASE_LAST = 100


class Msgc(IntEnum):
    """Common client->server messages (every channel)."""

    ACK_SYNC = 1
    ACK = 2
    PONG = 3
    MIGRATE_FLUSH_MARK = 4
    MIGRATE_DATA = 5
    DISCONNECTING = 6


class MsgMain(IntEnum):
    MIGRATE_BEGIN = 101
    MIGRATE_CANCEL = 102
    INIT = 103
    CHANNELS_LIST = 104
    MOUSE_MODE = 105
    MULTI_MEDIA_TIME = 106
    AGENT_CONNECTED = 107
    AGENT_DISCONNECTED = 108
    AGENT_DATA = 109
    AGENT_TOKEN = 110
    MIGRATE_SWITCH_HOST = 111
    MIGRATE_END = 112
    NAME = 113
    UUID = 114
    AGENT_CONNECTED_TOKENS = 115
    MIGRATE_BEGIN_SEAMLESS = 116
    MIGRATE_DST_SEAMLESS_ACK = 117
    MIGRATE_DST_SEAMLESS_NACK = 118


class MsgcMain(IntEnum):
    CLIENT_INFO = 101
    MIGRATE_CONNECTED = 102
    MIGRATE_CONNECT_ERROR = 103
    ATTACH_CHANNELS = 104
    MOUSE_MODE_REQUEST = 105
    AGENT_START = 106
    AGENT_DATA = 107
    AGENT_TOKEN = 108
    MIGRATE_END = 109
    MIGRATE_DST_DO_SEAMLESS = 110
    MIGRATE_CONNECTED_SEAMLESS = 111
    QUALITY_INDICATOR = 112


class MsgSpicevmc(IntEnum):
    """Server->client messages of usbredir, port and webdav channels (PORT_* on port/webdav only)."""

    DATA = 101
    COMPRESSED_DATA = 102
    PORT_INIT = 201
    PORT_EVENT = 202


class MsgcSpicevmc(IntEnum):
    DATA = 101
    COMPRESSED_DATA = 102
    PORT_EVENT = 201


class PortEvent(IntEnum):
    OPENED = 0
    CLOSED = 1
    BREAK = 2


class MouseMode(IntFlag):
    SERVER = 1
    CLIENT = 2


class NotifySeverity(IntEnum):
    INFO = 0
    WARN = 1
    ERROR = 2


class NotifyVisibility(IntEnum):
    LOW = 0
    MEDIUM = 1
    HIGH = 2


class DataCompression(IntEnum):
    NONE = 0
    LZ4 = 1


class MigrateFlags(IntFlag):
    NEED_FLUSH = 1
    NEED_DATA_TRANSFER = 2


MIGRATE_FLAGS_MASK = MigrateFlags.NEED_FLUSH | MigrateFlags.NEED_DATA_TRANSFER
