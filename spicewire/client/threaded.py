"""The client for any program: a ClientSession that lives in an I/O thread of its own.

gevent hubs are per thread, and a gevent socket may only be used by the hub that made it. So the
session, its sockets and its greenlets are all made in one thread that runs a hub of its own, and
every public call, from whatever thread, is marshalled into that hub: queued, the hub woken through
an ``async_`` watcher, run in a greenlet there, and its result or exception handed back through a
``concurrent.futures.Future``. The hub keeps running while the application sleeps, computes or
waits in asyncio, so the session answers a migration whenever it comes.

    from spicewire.client import connect

    with connect("127.0.0.1", 5900) as session:
        port = session.open_port("org.spicewire.echo")
        port.write(b"hello")
        port.read(5, timeout=5)            # ReadTimeout if 5 bytes do not arrive in time

    with connect("127.0.0.1", 5900, display=True) as session:
        session.display.wait(lambda d: d.marked, timeout=5)
        frame = session.display.primary    # a numpy copy of the screen, (height, width, 4) B G R x
        session.inputs.key_press(0x1E)     # "a", a PC XT set-1 scancode

Nothing here patches the standard library; gevent programs can use ClientSession directly.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Generic, Self, TypeVar, Unpack

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import numpy as np

from spicewire.client.channels import PortChannel
from spicewire.client.graphics import CursorChannel, DisplayChannel, InputsChannel, WatchedChannel
from spicewire.client.session import ClientSession, TlsOptions
from spicewire.errors import LocalProtocolError, SessionClosed
from spicewire.protocol.graphics import CursorShape
from spicewire.protocol.messages import MonitorHead

_T = TypeVar("_T")
_WC = TypeVar("_WC", bound=WatchedChannel)
START_WAIT = 10.0  # a new thread that has not started its hub by then will not
STOP_WAIT = 10.0  # close() lets the session's own close (sockets, readers) take this long at most


class Call(Future[_T]):
    """A call running in the I/O thread; ``greenlet`` is the one running it, once it started."""

    greenlet: gevent.Greenlet | None = None


class IOThread:
    """A thread running a gevent hub of its own, and a thread-safe way into it."""

    def __init__(self, name: str) -> None:
        self._calls: collections.deque[tuple[Call[Any], Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._lock = threading.RLock()  # submit against stop: no call is queued after the hub went away
        self._open = False
        self._running: gevent.pool.Group | None = None
        self._started: set[Call[Any]] = set()  # handed to a greenlet and not settled yet
        self._stop: gevent.event.Event | None = None
        self._wake: Any = None  # the hub loop's async_ watcher
        self._last: Callable[[], object] | None = None  # stop()'s last call, the session's close
        self._ready = threading.Event()
        self.finished: Future[None] = Future()  # done once the hub is gone and the thread ends
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        if not self._ready.wait(START_WAIT):
            raise SessionClosed(f"the client's I/O thread did not start within {START_WAIT:g} s")

    def _run(self) -> None:
        hub = gevent.get_hub()  # a new hub: this thread has none yet
        self._running = gevent.pool.Group()
        self._stop = gevent.event.Event()
        self._wake = hub.loop.async_()
        self._wake.start(self._drain)  # a started watcher keeps the loop alive while the thread waits
        self._open = True
        self._ready.set()
        try:
            self._stop.wait()
            # Calls first, so that a read waiting in another thread ends with SessionClosed rather
            # than with the end of the stream that closing the session would show it.
            self._running.kill(block=True, timeout=STOP_WAIT)
            if self._last is not None:
                self._last()
        finally:
            for call in list(self._started):  # killed before it started, or still stuck
                self._settle(call, exc=SessionClosed("the client was closed during the call"))
            with self._lock:
                self._open = False
            self._wake.stop()
            self._wake.close()
            self._fail_queued()
            hub.destroy(destroy_loop=True)
            self.finished.set_result(None)

    @property
    def in_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, fn: Callable[..., _T], *args: Any) -> Call[_T]:
        """Run ``fn(*args)`` in a greenlet of the I/O thread; its outcome comes back in the Call."""
        call: Call[_T] = Call()
        with self._lock:
            if not self._open:
                raise SessionClosed("the client is closed")
            self._calls.append((call, fn, args))
            self._wake.send()
        return call

    def try_submit(self, fn: Callable[..., _T], *args: Any) -> Call[_T] | None:
        """submit, or None once the thread is stopping (for clean-ups that closing makes moot)."""
        with self._lock:
            return self.submit(fn, *args) if self._open else None

    def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in the I/O thread, waited for. Every call it is given is bounded by the
        session's own timeouts, and close() from any thread ends it."""
        return self.submit(fn, *args).result()

    def _drain(self) -> None:
        # In the hub's greenlet, which must not block: every call gets a greenlet of its own.
        assert self._running is not None  # made before the watcher that calls this started
        while self._calls:
            call, fn, args = self._calls.popleft()
            if call is _STOP:
                assert self._stop is not None
                self._last = fn
                self._stop.set()
            elif call.set_running_or_notify_cancel():
                self._started.add(call)
                call.greenlet = self._running.spawn(self._run_call, call, fn, args)

    def _run_call(self, call: Call[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            result = fn(*args)
        except gevent.GreenletExit:  # stop() or a caller that gave up: the call ends here
            self._settle(call, exc=SessionClosed("the client was closed during the call"))
        except BaseException as err:  # handed to the calling thread, which raises it
            self._settle(call, exc=err)
        else:
            self._settle(call, result=result)

    def _settle(self, call: Call[Any], result: Any = None, exc: BaseException | None = None) -> None:
        """Give ``call`` its outcome unless it has one (only this thread settles calls)."""
        self._started.discard(call)
        if call.done():
            return
        if exc is not None:
            call.set_exception(exc)
        else:
            call.set_result(result)

    def abandon(self, call: Call[Any]) -> None:
        """In the I/O thread: end ``call``, whose caller stopped waiting, without an outcome it needs."""
        if call.greenlet is not None:
            call.greenlet.kill(block=False)
        self._settle(call, exc=SessionClosed("the caller stopped waiting"))

    def _fail_queued(self) -> None:
        while self._calls:
            call, _, _ = self._calls.popleft()
            if call is not _STOP and call.set_running_or_notify_cancel():
                call.set_exception(SessionClosed("the client was closed before the call ran"))

    def stop(self, last: Callable[[], object] | None = None) -> Future[None]:
        """Run ``last`` in the hub (the session's close), end every call still running with
        SessionClosed, and end the thread. Returns ``finished``; idempotent, from any thread."""
        with self._lock:
            if self._open:
                self._open = False  # nothing is queued after the stop
                self._calls.append((_STOP, last or _nothing, ()))
                self._wake.send()
        return self.finished

    def join(self, last: Callable[[], object] | None = None) -> None:
        """stop(last) and wait until the thread has ended (not from the I/O thread itself)."""
        if self.in_thread:
            raise LocalProtocolError("the client cannot be closed from its own I/O thread")
        self.stop(last).result()
        self.thread.join()


_STOP: Call[Any] = Call()  # queued by stop(): what follows it in the queue is refused


def _nothing() -> None:
    return None


class ThreadedPort:
    """A port channel usable from any thread. ``read`` is strict: it returns exactly ``n`` bytes,
    fewer only at the end of the stream (``b""`` once nothing is left), and raises ReadTimeout,
    consuming nothing, when ``timeout`` passes first. Iterating yields what arrives until the end."""

    def __init__(self, io: IOThread, port: PortChannel) -> None:
        self._io = io
        self._port = port
        self._write_lock = gevent.lock.Semaphore()  # made (by _open_port) and used in the hub only

    @property
    def name(self) -> str | None:
        return self._port.name

    @property
    def channel_id(self) -> int:
        return self._port.key[1]

    @property
    def closed(self) -> bool:
        """The server closed the channel (or the session was closed)."""
        return self._port.closed.is_set()

    @property
    def unread(self) -> int:
        """Bytes received and not read yet (a snapshot)."""
        return self._port.unread

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` (whole, in order with this port's other writes from any thread); returns
        once it is framed and handed to the socket, or held by a running migration."""
        self.submit_write(data).result()

    def submit_write(self, data: bytes | bytearray | memoryview) -> Call[None]:
        """The write as a Call (spicewire.aio). ``data`` is copied first: the caller may reuse it."""
        return self._io.submit(self._write, bytes(data))

    def read(self, n: int | None = None, timeout: float | None = None) -> bytes:
        """Exactly ``n`` bytes, or with None everything buffered once a byte arrived. See the class."""
        return self.submit_read(n, timeout).result()

    def submit_read(self, n: int | None, timeout: float | None) -> Call[bytes]:
        """The read as a Call, for callers that wait their own way (spicewire.aio). ``give_back``
        undoes it if the caller stops waiting."""
        return self._io.submit(self._port.receive, n, timeout)

    def give_back(self, call: Call[bytes]) -> None:
        """The caller stopped waiting for ``call``: a read still waiting ends without taking
        anything, and bytes it took already go back in front of the buffer."""
        if not call.cancel():
            self._io.try_submit(self._give_back, call)  # once closing, every read ends anyway

    def _give_back(self, call: Call[bytes]) -> None:
        if call.done():
            if call.exception() is None:
                self._port.put_back(call.result())
        else:
            self._io.abandon(call)  # still waiting (a read takes its bytes as it returns): nothing taken

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read():
            yield data

    def _write(self, data: bytes) -> None:
        with self._write_lock:  # two threads' writes must not interleave their 64 KiB pieces
            if self._port.closed.is_set():
                raise SessionClosed(f"port {self._port.name!r} is closed: {self._port.error or 'by the server'}")
            try:
                self._port.write(data)
            except OSError as err:
                raise SessionClosed(f"port {self._port.name!r}: {err}") from err


class ThreadedChannel(Generic[_WC]):
    """What the threaded display, inputs and cursor share: snapshots read without a call, and
    ``wait(predicate)``, whose predicate runs in the calling thread after each change."""

    def __init__(self, io: IOThread, channel: _WC) -> None:
        self._io = io
        self._channel = channel

    @property
    def version(self) -> int:
        """Bumped by every change the server makes to the channel's state."""
        return self._channel.version

    @property
    def closed(self) -> bool:
        return self._channel.closed.is_set()

    def submit_change(self, seen: int, timeout: float | None) -> Call[bool]:
        """A change after ``version`` ``seen`` (True), or ``timeout`` or the end of the channel (False)."""
        return self._io.submit(self._channel.wait, lambda ch: ch.version != seen, timeout)

    def wait(self, predicate: Callable[[Self], bool], timeout: float | None = None) -> bool:
        """Until ``predicate(self)`` holds (True), or ``timeout`` passed or the channel closed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self.version  # read before the check: a change during it ends the next wait at once
            if predicate(self):
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or self.closed:
                return False
            self.submit_change(seen, left).result()


class ThreadedDisplay(ThreadedChannel[DisplayChannel]):
    """The display channel from any thread. ``primary`` is a copy, made in the I/O thread between
    two draws; the counters are snapshots."""

    @property
    def primary(self) -> np.ndarray | None:
        return self.submit_primary().result()

    def submit_primary(self) -> Call[np.ndarray | None]:
        return self._io.submit(self._copy_primary)

    def _copy_primary(self) -> np.ndarray | None:
        primary = self._channel.primary
        return None if primary is None else primary.copy()

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

    def wait_for_update(self, timeout: float | None = None, after: int | None = None) -> bool:
        """Until a draw after the one counted ``after`` (default: now) is applied, or ``timeout``."""
        return self.submit_wait_for_update(timeout, after).result()

    def submit_wait_for_update(self, timeout: float | None, after: int | None) -> Call[bool]:
        return self._io.submit(self._channel.wait_for_update, timeout, self.updates if after is None else after)


class ThreadedInputs(ThreadedChannel[InputsChannel]):
    """The inputs channel from any thread: each event is queued to the I/O thread in the order of
    the calls and returns once it is sent or waits for MOUSE_MOTION_ACK (see InputsChannel)."""

    @property
    def modifiers(self) -> int:
        return self._channel.modifiers

    @property
    def buttons(self) -> int:
        return self._channel.buttons

    @property
    def queued(self) -> int:
        return self._channel.queued

    @property
    def motion_count(self) -> int:
        return self._channel.motion_count

    @property
    def motion_acks(self) -> int:
        return self._channel.motion_acks

    def submit(self, action: Callable[..., None], *args: Any) -> Call[None]:
        """``action`` (an InputsChannel method, such as ``InputsChannel.key_down``) in the I/O thread."""
        return self._io.submit(action, self._channel, *args)

    def key_down(self, scancode: int) -> None:
        self.submit(InputsChannel.key_down, scancode).result()

    def key_up(self, scancode: int) -> None:
        self.submit(InputsChannel.key_up, scancode).result()

    def key_press(self, scancode: int) -> None:
        self.submit(InputsChannel.key_press, scancode).result()

    def set_modifiers(self, modifiers: int) -> None:
        self.submit(InputsChannel.set_modifiers, modifiers).result()

    def mouse_motion(self, dx: int, dy: int, buttons: int | None = None) -> None:
        self.submit(InputsChannel.mouse_motion, dx, dy, buttons).result()

    def mouse_position(self, x: int, y: int, buttons: int | None = None, display_id: int = 0) -> None:
        self.submit(InputsChannel.mouse_position, x, y, buttons, display_id).result()

    def mouse_press(self, button: int) -> None:
        self.submit(InputsChannel.mouse_press, button).result()

    def mouse_release(self, button: int) -> None:
        self.submit(InputsChannel.mouse_release, button).result()


class ThreadedCursor(ThreadedChannel[CursorChannel]):
    """The cursor channel from any thread (snapshots)."""

    @property
    def shape(self) -> CursorShape | None:
        return self._channel.shape

    @property
    def position(self) -> tuple[int, int]:
        return self._channel.position

    @property
    def visible(self) -> bool:
        return self._channel.visible


class ThreadedSession:
    """A ClientSession in an I/O thread of its own; made by ``connect``. Every method may be
    called from any thread; the session follows migrations whatever the calling threads do.
    ``migrations``, ``session_id`` and ``migrating`` are snapshots read without a call."""

    def __init__(self, io: IOThread, session: ClientSession) -> None:
        self._io = io
        self._session = session
        self._ports: dict[int, ThreadedPort] = {}
        self._open_lock: gevent.lock.Semaphore | None = None  # made in the hub, used only there
        self._closed = False
        # connect(display=True): the channels the server had, linked before the session was handed out
        self.display = None if session.display is None else ThreadedDisplay(io, session.display)
        self.inputs = None if session.inputs is None else ThreadedInputs(io, session.inputs)
        self.cursor = None if session.cursor is None else ThreadedCursor(io, session.cursor)

    @property
    def session_id(self) -> int:
        return self._session.session_id

    @property
    def migrations(self) -> list[dict[str, Any]]:
        """One report per migration the session followed (a copy)."""
        return list(self._session.migrations)

    @property
    def migrating(self) -> bool:
        return self._session.migrating

    @property
    def connected_to(self) -> tuple[str, int]:
        """(host, port) of the server the session's channels are connected to."""
        return self.submit_connected_to().result()

    def submit_connected_to(self) -> Call[tuple[str, int]]:
        return self._io.submit(lambda: self._session.connected_to)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def gevent_session(self) -> ClientSession:
        """The ClientSession itself, for code that runs in the I/O thread only."""
        return self._session

    def open_port(self, name: str | None = None, channel_id: int | None = None) -> ThreadedPort:
        """The port channel named ``name`` (or with ``channel_id``), linked on first use."""
        return self.submit_open_port(name, channel_id).result()

    def submit_open_port(self, name: str | None = None, channel_id: int | None = None) -> Call[ThreadedPort]:
        self._check_open()
        return self._io.submit(self._open_port, name, channel_id)

    def _open_port(self, name: str | None, channel_id: int | None) -> ThreadedPort:
        if self._open_lock is None:
            self._open_lock = gevent.lock.Semaphore()
        with self._open_lock:  # two threads opening one port must not link it twice
            port = self._session.open_port(name, channel_id)
        # One ThreadedPort per PortChannel, whichever thread opened it (made here, in one thread).
        known = self._ports.get(port.key[1])
        if known is None or known._port is not port:
            known = self._ports[port.key[1]] = ThreadedPort(self._io, port)
        return known

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The report of the migration that completed, or None if none did within ``timeout``."""
        return self.submit_wait_migrated(timeout).result()  # submit checks the session is open

    def submit_wait_migrated(self, timeout: float | None) -> Call[dict[str, Any] | None]:
        self._check_open()
        return self._io.submit(self._session.wait_migrated, timeout)

    def abandon(self, call: Call[Any]) -> None:
        """The caller stopped waiting for ``call`` (not a read: see ThreadedPort.give_back)."""
        if not call.cancel():
            self._io.try_submit(self._io.abandon, call)  # once closing, every call ends anyway

    def close(self) -> None:
        """Close the session and end its I/O thread; calls waiting in other threads raise
        SessionClosed. Idempotent, from any thread."""
        self._closed = True
        self._io.join(self._session.close)

    def submit_close(self) -> Future[None]:
        """close() without waiting: done once the I/O thread has finished (then ``join_thread``)."""
        self._closed = True
        return self._io.stop(self._session.close)

    def join_thread(self) -> None:
        """Wait for the I/O thread to end after ``submit_close`` has completed."""
        self._io.thread.join()

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed("the session was closed")

    def __enter__(self) -> ThreadedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(
    host: str, port: int, password: str | None, timeout: float, tls: TlsOptions, display: bool = False
) -> tuple[IOThread, Call[ClientSession]]:
    """An I/O thread and the session being connected in it (for connect and spicewire.aio)."""
    io = IOThread(f"spicewire-client {host}:{port or tls.get('tls_port', 0)}")
    return io, io.submit(_connect, host, port, password, timeout, tls, display)


def _connect(
    host: str, port: int, password: str | None, timeout: float, tls: TlsOptions, display: bool
) -> ClientSession:
    return ClientSession(host, port, password, timeout=timeout, display=display, **tls).connect()


def connect(
    host: str, port: int, password: str | None = None, *, timeout: float = 10.0, display: bool = False,
    **tls: Unpack[TlsOptions],
) -> ThreadedSession:
    """Connect a session whose I/O runs in a thread of its own: for threaded and plain programs.
    The TLS keywords (``tls_port``, ``ca_file``, ``host_subject``, ``secure_channels``) are
    ClientSession's. With ``display``, ``session.display``, ``inputs`` and ``cursor`` are the
    server's display, inputs and cursor channels (None for one it does not have)."""
    io, call = start(host, port, password, timeout, tls, display)
    try:
        session = call.result()
    except BaseException:
        io.join()
        raise
    return ThreadedSession(io, session)
