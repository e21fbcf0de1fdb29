"""The client for asyncio programs: the threaded client (spicewire.client.threaded) awaited.

The session lives in its I/O thread, on a gevent hub of its own, exactly as with
``spicewire.client.connect``; each coroutine here submits a call to that thread and awaits its
``concurrent.futures.Future`` through ``asyncio.wrap_future``. The event loop never blocks on
the network, and the session follows migrations whatever the loop is doing.

    from spicewire import aio

    async with aio.connect("127.0.0.1", 5900) as session:
        port = await session.open_port("org.spicewire.echo")
        await port.write(b"hello")
        await port.read(5, timeout=5)     # ReadTimeout if 5 bytes do not arrive in time
        async for data in port: ...        # what arrives, until the stream ends

Cancelling a ``read`` (``asyncio.wait_for``, ``task.cancel()``) loses no data: a read still
waiting ends without taking anything, and bytes it had taken go back in front of the buffer (with
one reader per port, their order stays).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator
from typing import Any, TypeVar

from spicewire.client.threaded import Call, ThreadedPort, ThreadedSession, start

__all__ = ["AsyncPort", "AsyncSession", "connect"]

_T = TypeVar("_T")


async def _wait(call: Call[_T]) -> _T:
    return await asyncio.wrap_future(call)


class AsyncPort:
    """A port channel for coroutines: the same contract as ThreadedPort, awaited."""

    def __init__(self, port: ThreadedPort) -> None:
        self._port = port

    @property
    def name(self) -> str | None:
        return self._port.name

    @property
    def closed(self) -> bool:
        return self._port.closed

    @property
    def unread(self) -> int:
        return self._port.unread

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; done once it is handed to the socket or held by a running migration."""
        await _wait(self._port.submit_write(data))

    async def read(self, n: int | None = None, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes (with None: everything buffered once a byte arrived); fewer, down to
        ``b""``, only at the end of the stream. ReadTimeout, consuming nothing, if ``timeout``
        passes first."""
        call = self._port.submit_read(n, timeout)
        try:
            return await _wait(call)
        except asyncio.CancelledError:
            self._port.give_back(call)
            raise

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while data := await self.read():
            yield data


class AsyncSession:
    """A session for coroutines; made by ``connect``. ``migrations`` and ``session_id`` are
    snapshots read without a call."""

    def __init__(self, session: ThreadedSession) -> None:
        self._session = session
        self._ports: dict[int, AsyncPort] = {}

    @property
    def session_id(self) -> int:
        return self._session.session_id

    @property
    def migrations(self) -> list[dict[str, Any]]:
        return self._session.migrations

    @property
    def closed(self) -> bool:
        return self._session.closed

    async def connected_to(self) -> tuple[str, int]:
        """(host, port) of the server the session's channels are connected to."""
        return await _wait(self._session.submit_connected_to())

    async def open_port(self, name: str | None = None, channel_id: int | None = None) -> AsyncPort:
        """The port channel named ``name`` (or with ``channel_id``), linked on first use."""
        port = await _wait(self._session.submit_open_port(name, channel_id))
        known = self._ports.get(port.channel_id)
        if known is None or known._port is not port:
            known = self._ports[port.channel_id] = AsyncPort(port)
        return known

    async def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The report of the migration that completed, or None if none did within ``timeout``."""
        call = self._session.submit_wait_migrated(timeout)
        try:
            return await _wait(call)
        except asyncio.CancelledError:
            self._session.abandon(call)
            raise

    async def close(self) -> None:
        """Close the session and end its I/O thread, without blocking the event loop on it."""
        await asyncio.wrap_future(self._session.submit_close())
        self._session.join_thread()  # the thread has finished its work: this returns at once

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Connecting:
    """What ``connect`` returns: awaited, or used in ``async with``."""

    def __init__(self, host: str, port: int, password: str | None, timeout: float) -> None:
        self._args = (host, port, password, timeout)
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def _open(self) -> AsyncSession:
        io, call = start(*self._args)
        try:
            session = await _wait(call)
        except BaseException:
            await asyncio.wrap_future(io.stop())
            io.thread.join()
            raise
        return AsyncSession(ThreadedSession(io, session))

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


def connect(host: str, port: int, password: str | None = None, *, timeout: float = 10.0) -> _Connecting:
    """``async with connect(...) as session`` or ``session = await connect(...)``."""
    return _Connecting(host, port, password, timeout)
