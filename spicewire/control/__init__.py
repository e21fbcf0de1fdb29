"""The operator's HTTP control API: its server (``server``) and a client for it (``client``)."""
