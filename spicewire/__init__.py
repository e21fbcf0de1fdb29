"""spicewire: the SPICE wire protocol in Python, with semi-seamless and seamless migration."""

__version__ = "0.1.0"
