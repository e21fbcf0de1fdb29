"""A SPICE client on gevent: a session (main channel) and its port channels."""

from spicewire.client.session import ClientSession, PortChannel, link_channel

__all__ = ["ClientSession", "PortChannel", "link_channel"]
