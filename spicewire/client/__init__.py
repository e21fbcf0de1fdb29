"""A SPICE client: a session (main channel) and its port channels, following migrations.

``connect`` gives a session whose I/O runs in a thread of its own, for any program (threads,
time.sleep, a plain script); ``spicewire.aio`` is the same for asyncio. ``ClientSession`` is the
gevent-native session underneath, for gevent programs: it runs in the caller's hub.
"""

from spicewire.client.channels import MainChannel, PortChannel
from spicewire.client.session import MAIN_CAPS, ClientSession, link_channel
from spicewire.client.threaded import ThreadedPort, ThreadedSession, connect

__all__ = [
    "MAIN_CAPS", "ClientSession", "MainChannel", "PortChannel", "ThreadedPort", "ThreadedSession", "connect",
    "link_channel",
]
