"""The SPICE server: sessions and their channels (session.py), gevent networking (net.py), the
HTTP control plane (control.py)."""

from spicewire.server.net import SpiceServer, ServerConfig

__all__ = ["SpiceServer", "ServerConfig"]
