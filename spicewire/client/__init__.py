"""A SPICE client: a session (main channel), its port channels and, with ``display=True``, its
display, inputs and cursor channels, following migrations.

``connect`` gives a session whose I/O runs in a thread of its own, for any program (threads,
time.sleep, a plain script); ``spicewire.aio`` is the same for asyncio. ``ClientSession`` is the
gevent-native session underneath, for gevent programs: it runs in the caller's hub.
"""

from spicewire.client.channels import MainChannel, PortChannel, link_channel
from spicewire.client.graphics import CursorChannel, DisplayChannel, InputsChannel
from spicewire.client.session import MAIN_CAPS, ClientSession
from spicewire.client.threaded import (
    ThreadedCursor,
    ThreadedDisplay,
    ThreadedInputs,
    ThreadedPort,
    ThreadedSession,
    connect,
)

__all__ = [
    "MAIN_CAPS", "ClientSession", "CursorChannel", "DisplayChannel", "InputsChannel", "MainChannel", "PortChannel",
    "ThreadedCursor", "ThreadedDisplay", "ThreadedInputs", "ThreadedPort", "ThreadedSession", "connect",
    "link_channel",
]
