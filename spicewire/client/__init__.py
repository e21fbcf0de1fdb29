"""A SPICE client on gevent: a session (main channel) and its port channels, following migrations."""

from spicewire.client.channels import MainChannel, PortChannel
from spicewire.client.session import MAIN_CAPS, ClientSession, link_channel

__all__ = ["MAIN_CAPS", "ClientSession", "MainChannel", "PortChannel", "link_channel"]
