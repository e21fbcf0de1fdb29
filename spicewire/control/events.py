"""Following a server's event stream (``GET /events``, Server-Sent Events) from another program:
``spicewire events`` and tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from spicewire.control.client import connect_control, control_label
from spicewire.errors import MigrationError

# The server sends a comment every 15 s on a quiet stream (ControlLimits.keepalive): three missed
# in a row mean the server or the path to it is gone, not that nothing happens.
SILENCE = 45.0


def follow(host: str, port: int, token: str | None = None, connect_timeout: float = 10.0,
           *, unix: str | None = None, silence: float = SILENCE) -> Iterator[dict[str, Any]]:
    """Each event as the JSON object the server sent, as it comes; ends when the server closes the
    stream (it stops). OSError when it cannot be reached or falls silent, MigrationError for an
    answer other than 200 (a wrong token, say), each naming the address. ``silence``: seconds
    without a byte, keep-alives included, after which the server counts as gone."""
    address = control_label(host, port, unix)
    # HTTP/1.0: the answer comes unchunked and ends when the connection does.
    # A Unix socket has no host name; "localhost" is what HTTP clients send there.
    head = ["GET /events HTTP/1.0", f"Host: {'localhost' if unix else address}", "Accept: text/event-stream"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    sock = connect_control(host, port, unix, connect_timeout)
    with sock, sock.makefile("rb") as stream:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sock.settimeout(silence)
        status_line = stream.readline()
        headers = []
        while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
            headers.append(line)
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise MigrationError(f"GET /events: unreadable answer from {address}: {status_line[:80]!r}")
        if int(parts[1]) != 200:
            body = stream.read(64 << 10)
            try:
                message = json.loads(body).get("error")
            except (ValueError, AttributeError):
                message = body[:200].decode(errors="replace")
            raise MigrationError(f"GET /events on {address}: {int(parts[1])} {message}")
        data: list[bytes] = []
        for line in stream:
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
            elif not line and data:  # a blank line ends an event
                yield json.loads(b"\n".join(data))
                data = []
