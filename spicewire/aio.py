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

With ``display=True`` the session's display, inputs and cursor channels are there too:

    async with aio.connect("127.0.0.1", 5900, display=True) as session:
        frame = await session.display.primary()            # a numpy copy of the screen
        await session.inputs.mouse_position(10, 20)
        await session.display.wait(lambda d: d.updates > 3, timeout=5)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from typing import Any, Generic, Self, TypeVar, Unpack

import numpy as np

from spicewire.client.graphics import InputsChannel
from spicewire.client.session import TlsOptions
from spicewire.client.threaded import (
    Call,
    ThreadedChannel,
    ThreadedCursor,
    ThreadedDisplay,
    ThreadedInputs,
    ThreadedPort,
    ThreadedSession,
    start,
)
from spicewire.protocol.graphics import CursorShape
from spicewire.protocol.messages import MonitorHead

__all__ = ["AsyncCursor", "AsyncDisplay", "AsyncInputs", "AsyncPort", "AsyncSession", "connect"]

_T = TypeVar("_T")
_TC = TypeVar("_TC", bound=ThreadedChannel[Any])


async def _wait(call: Call[_T]) -> _T:
    return await asyncio.wrap_future(call)


async def _wait_or_abandon(session: ThreadedSession, call: Call[_T]) -> _T:
    """``call``'s result; a cancelled await tells the I/O thread to stop the call too."""
    try:
        return await _wait(call)
    except asyncio.CancelledError:
        session.abandon(call)
        raise


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


class _AsyncChannel(Generic[_TC]):
    """What the display, inputs and cursor share for coroutines: snapshots, and ``wait``."""

    def __init__(self, channel: _TC, session: ThreadedSession) -> None:
        self._channel = channel
        self._session = session

    @property
    def version(self) -> int:
        return self._channel.version

    @property
    def closed(self) -> bool:
        return self._channel.closed

    async def _call(self, call: Call[_T]) -> _T:
        return await _wait_or_abandon(self._session, call)

    async def wait(self, predicate: Callable[[Self], bool | Awaitable[bool]], timeout: float | None = None) -> bool:
        """Until ``predicate(self)`` (a function or a coroutine function) holds (True), or
        ``timeout`` passed or the channel closed (False). It runs in the event loop after each change."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            seen = self.version  # read before the check: a change during it ends the next wait at once
            held = predicate(self)
            if inspect.isawaitable(held):
                held = await held
            if held:
                return True
            left = None if deadline is None else deadline - loop.time()
            if (left is not None and left <= 0) or self.closed:
                return False
            await self._call(self._channel.submit_change(seen, left))


class AsyncDisplay(_AsyncChannel[ThreadedDisplay]):
    """The display channel for coroutines; ``await display.primary()`` is a copy of the screen."""

    async def primary(self) -> np.ndarray | None:
        return await self._call(self._channel.submit_primary())

    @property
    def updates(self) -> int:
        return self._channel.updates

    @property
    def surface_creates(self) -> int:
        return self._channel.surface_creates

    @property
    def resets(self) -> int:
        return self._channel.resets

    @property
    def marked(self) -> bool:
        return self._channel.marked

    @property
    def monitors(self) -> tuple[MonitorHead, ...]:
        return self._channel.monitors

    async def wait_for_update(self, timeout: float | None = None, after: int | None = None) -> bool:
        """Until a draw after the one counted ``after`` (default: now) is applied, or ``timeout``."""
        return await self._call(self._channel.submit_wait_for_update(timeout, after))


class AsyncInputs(_AsyncChannel[ThreadedInputs]):
    """The inputs channel for coroutines: each event goes in the order of the awaits; one whose
    await is cancelled is still sent."""

    @property
    def modifiers(self) -> int:
        return self._channel.modifiers

    @property
    def buttons(self) -> int:
        return self._channel.buttons

    @property
    def queued(self) -> int:
        return self._channel.queued

    async def key_down(self, scancode: int) -> None:
        await _wait(self._channel.submit(InputsChannel.key_down, scancode))

    async def key_up(self, scancode: int) -> None:
        await _wait(self._channel.submit(InputsChannel.key_up, scancode))

    async def key_press(self, scancode: int) -> None:
        await _wait(self._channel.submit(InputsChannel.key_press, scancode))

    async def set_modifiers(self, modifiers: int) -> None:
        await _wait(self._channel.submit(InputsChannel.set_modifiers, modifiers))

    async def mouse_motion(self, dx: int, dy: int, buttons: int | None = None) -> None:
        await _wait(self._channel.submit(InputsChannel.mouse_motion, dx, dy, buttons))

    async def mouse_position(self, x: int, y: int, buttons: int | None = None, display_id: int = 0) -> None:
        await _wait(self._channel.submit(InputsChannel.mouse_position, x, y, buttons, display_id))

    async def mouse_press(self, button: int) -> None:
        await _wait(self._channel.submit(InputsChannel.mouse_press, button))

    async def mouse_release(self, button: int) -> None:
        await _wait(self._channel.submit(InputsChannel.mouse_release, button))


class AsyncCursor(_AsyncChannel[ThreadedCursor]):
    """The cursor channel for coroutines (snapshots)."""

    @property
    def shape(self) -> CursorShape | None:
        return self._channel.shape

    @property
    def position(self) -> tuple[int, int]:
        return self._channel.position

    @property
    def visible(self) -> bool:
        return self._channel.visible


class AsyncSession:
    """A session for coroutines; made by ``connect``. ``migrations`` and ``session_id`` are
    snapshots read without a call."""

    def __init__(self, session: ThreadedSession) -> None:
        self._session = session
        self._ports: dict[int, AsyncPort] = {}
        self.display = None if session.display is None else AsyncDisplay(session.display, session)
        self.inputs = None if session.inputs is None else AsyncInputs(session.inputs, session)
        self.cursor = None if session.cursor is None else AsyncCursor(session.cursor, session)

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
        return await _wait_or_abandon(self._session, self._session.submit_wait_migrated(timeout))

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

    def __init__(
        self, host: str, port: int, password: str | None, timeout: float, tls: TlsOptions, display: bool
    ) -> None:
        self._args = (host, port, password, timeout, tls, display)
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


def connect(
    host: str, port: int, password: str | None = None, *, timeout: float = 10.0, display: bool = False,
    **tls: Unpack[TlsOptions],
) -> _Connecting:
    """``async with connect(...) as session`` or ``session = await connect(...)``; the TLS
    keywords are ClientSession's. With ``display``, ``session.display``, ``inputs`` and ``cursor``
    are the server's display, inputs and cursor channels (None for one it does not have)."""
    return _Connecting(host, port, password, timeout, tls, display)
