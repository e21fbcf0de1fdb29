"""The SPICE server: sessions and their channels (session.py), gevent networking (net.py), and
migration as source and destination (migration/). Its HTTP control API is spicewire.control."""

from spicewire.server.net import ServerConfig, SpiceServer

__all__ = ["ServerConfig", "SpiceServer"]
