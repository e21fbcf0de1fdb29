"""Link keys made ahead of the links that use them.

Every link gets a fresh RSA-1024 key, as spice-server does (the client encrypts its ticket with it).
Making one costs ~9 ms of CPU, so a burst of links (a migration of 500 sessions links 1,000 channels
on the destination) would otherwise queue behind key generation. The pool keeps up to ``size`` keys
made in background threads, refills once links stop taking them, and hands each key out once.

The background keys are generated in child processes (ChildKeys): cryptography held the GIL while
it generated an RSA key, so a thread generating one stopped every greenlet of the server for those
~9 ms, and for much longer at the lowest priority, where the kernel often preempts it holding the
lock. The thread now only waits on a pipe (without the GIL) and loads the key it gets (~10 us).
cryptography 50 lets go of the GIL while it generates (two threads make keys side by side, and a
third thread's ticks never waited over 0.7 ms), so with it a key made on demand in a thread stops
nothing either; the children still keep the background's work at the lowest priority, whichever
version is installed (pyproject allows 41 and later).
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable

import gevent
import gevent.monkey
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from gevent.event import AsyncResult, Event
from gevent.threadpool import ThreadPool

from spicewire.protocol.link import new_link_key

log = logging.getLogger(__name__)

KeyFactory = Callable[[], rsa.RSAPrivateKey]

# The native thread id, also under monkey-patching.
_native_id: Callable[[], int] = gevent.monkey.get_original("threading", "get_native_id")

# Background refills run at the lowest CPU priority: a refill right after a burst of links would
# otherwise compete with the latency-sensitive steps that follow it (a migration's switch).
BACKGROUND_NICE = 19


# A key maker's loop: one request byte in, one length-prefixed DER key out, until stdin closes.
_CHILD = """
import os, struct, sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
while os.read(0, 1):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        os.write(1, struct.pack("<I", len(der)) + der)
    except BrokenPipeError:  # the server went away while this key was being made
        break
"""
_SIZE = struct.Struct("<I")
_native_lock = gevent.monkey.get_original("_thread", "allocate_lock")
# The originals: gevent's spawn would watch the child from the hub's loop, which a worker thread
# lacks, and its close waits for the loop's next turn, which a hub blocked in waitpid never takes.
_posix_spawn = gevent.monkey.get_original("os", "posix_spawn")
_close = gevent.monkey.get_original("os", "close")
_waitpid = gevent.monkey.get_original("os", "waitpid")  # blocking: the child exits within ms of its EOF


def warm(key: rsa.RSAPrivateKey) -> None:
    """Does one private operation with ``key``. OpenSSL sets up a key's Montgomery contexts and
    blinding on its first one (~100 us of its ~200, holding the GIL), so a pooled key warmed while
    the server is quiet decrypts its link's ticket in half the time, in the burst that takes it.
    KeyPool warms its background keys on the hub as they arrive: a worker thread at the lowest
    priority could be preempted holding the GIL."""
    key.sign(b"", padding.PKCS1v15(), hashes.SHA1())


class _KeyMaker:
    """One child process making keys on request; used by one thread at a time."""

    def __init__(self) -> None:
        requests_in, self._requests = os.pipe()
        self._keys, keys_out = os.pipe()
        try:
            # Spawned from the asking thread, the child inherits its priority (background: lowest).
            self.pid = _posix_spawn(sys.executable, [sys.executable, "-c", _CHILD], os.environ,
                                      file_actions=[(os.POSIX_SPAWN_DUP2, requests_in, 0),
                                                    (os.POSIX_SPAWN_DUP2, keys_out, 1)])
        except BaseException:
            _close(self._requests)
            _close(self._keys)
            raise
        finally:
            _close(requests_in)
            _close(keys_out)

    def make(self) -> rsa.RSAPrivateKey:
        os.write(self._requests, b"k")
        (size,) = _SIZE.unpack(self._read(_SIZE.size))
        # Our own child made it: the validity check (as costly as making the key) can be skipped.
        key = serialization.load_der_private_key(self._read(size), None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"the key maker sent a {type(key).__name__}, not an RSA key")
        return key

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            piece = os.read(self._keys, size - len(data))
            if not piece:
                raise OSError(f"the key maker (pid {self.pid}) exited")
            data += piece
        return data

    def close(self) -> None:
        """Ends the child: it sees its stdin end between two keys and exits at once."""
        _close(self._requests)
        _close(self._keys)
        try:
            _waitpid(self.pid, 0)
        except ChildProcessError as err:  # someone's waitpid(-1) reaped it first
            log.debug("key maker %d already reaped: %s", self.pid, err)


class ChildKeys:
    """A key factory whose keys are generated in child processes, one per thread asking at once;
    the children live until close()."""

    def __init__(self) -> None:
        self._idle: list[_KeyMaker] = []
        self._lock = _native_lock()  # taken by worker threads, never across a wait
        self._closed = False

    def __call__(self) -> rsa.RSAPrivateKey:
        with self._lock:
            maker = self._idle.pop() if self._idle else None
        if maker is None:
            maker = _KeyMaker()
        try:
            key = maker.make()
        except BaseException:
            maker.close()
            raise
        with self._lock:
            keep = not self._closed
            if keep:
                self._idle.append(maker)
        if not keep:
            maker.close()
        return key

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._closed = self._idle, [], True
        for maker in idle:
            maker.close()


class KeyPool:
    """Up to ``size`` keys ready, made by ``threads`` background threads; ``size`` 0 makes every key
    on demand. Call start() to begin filling and stop() to end.

    Refilling waits until no link has taken a key for ``refill_delay`` seconds: links come in bursts
    (a session's channels, a migration's pre-connect of hundreds of sessions), and keys made during
    one take CPU from exactly the links and switches it is made of, even at the lowest priority
    (500 sessions migrated in 2.6 s instead of 3.1 s). 0 refills at once.

    ``factory`` makes every key, in the background and on demand; without one, background keys
    come from child processes (ChildKeys) and a key on demand is made in a thread (new_link_key)."""

    def __init__(self, size: int, threads: int = 1, factory: KeyFactory | None = None,
                 refill_delay: float = 0.5) -> None:
        if type(size) is not int or size < 0:
            raise ValueError(f"a key pool's size must be a whole number >= 0, not {size!r}")
        if type(threads) is not int or threads < 1:
            raise ValueError(f"a key pool needs at least one thread, not {threads!r}")
        if not 0 <= refill_delay < float("inf"):  # NaN fails this too
            raise ValueError(f"a key pool's refill delay must be a finite number of seconds >= 0, not {refill_delay!r}")
        self.size = size
        self.threads = threads
        self.refill_delay = refill_delay
        self.made_on_demand = 0  # keys a link had to wait for: the pool was empty
        self._factory = factory or new_link_key
        self._given_factory = factory is not None
        self._background: KeyFactory = self._factory  # child processes while running, unless given one
        self._keys: deque[rsa.RSAPrivateKey] = deque()
        self._pending = 0  # keys being made in the background
        self._running = False
        self._workers: ThreadPool | None = None
        self._full = Event()
        self._last_pop = 0.0  # time.monotonic() of the last key taken
        self._quiet: gevent.Greenlet[[], None] | None = None  # waits out a burst before refilling

    @property
    def ready(self) -> int:
        return len(self._keys)

    @property
    def pending(self) -> int:
        """Keys being made in the background right now."""
        return self._pending

    def start(self) -> None:
        if self.size and self._workers is None:
            self._workers = ThreadPool(self.threads)
            if not self._given_factory:
                self._background = ChildKeys()
        self._running = True
        self._refill()

    def stop(self) -> None:
        """Drops the keys; a key still being made is discarded when it arrives."""
        self._running = False
        self._keys.clear()
        self._full.clear()
        if self._quiet is not None:
            self._quiet.kill(block=False)
            self._quiet = None
        if self._workers is not None:
            self._workers.kill()
            self._workers = None
        if isinstance(self._background, ChildKeys):
            self._background.close()
        self._background = self._factory

    def wait_full(self, timeout: float | None = None) -> bool:
        """Waits until ``size`` keys are ready (for a caller about to expect a burst of links)."""
        return self._full.wait(timeout)

    def pop(self) -> rsa.RSAPrivateKey:
        self._last_pop = time.monotonic()
        self._full.clear()
        self._refill_when_quiet()
        if self._keys:
            return self._keys.popleft()
        self.made_on_demand += 1
        # In a thread of the hub's pool, at normal priority: this link waits for it, the hub does not.
        return gevent.get_hub().threadpool.apply(self._factory)

    def _refill_when_quiet(self) -> None:
        if not self.refill_delay:
            self._refill()
        elif self._quiet is None and self._running:
            self._quiet = gevent.spawn_later(self.refill_delay, self._after_quiet)

    def _after_quiet(self) -> None:
        self._quiet = None
        left = self._last_pop + self.refill_delay - time.monotonic()
        if left > 0:  # a link took a key meanwhile: the burst goes on
            self._quiet = gevent.spawn_later(left, self._after_quiet)
        else:
            self._refill()

    def _refill(self) -> None:
        # At most one key per thread in flight, so stop() leaves no queue of work behind.
        while (self._running and self._workers is not None and self._pending < self.threads
               and len(self._keys) + self._pending < self.size):
            self._pending += 1
            self._workers.spawn(self._make_in_background, self._background).rawlink(self._arrived)
        if len(self._keys) >= self.size:
            self._full.set()

    @staticmethod
    def _make_in_background(factory: KeyFactory) -> rsa.RSAPrivateKey:
        if sys.platform == "linux":  # where a thread (and a child it spawns) has its own priority
            os.setpriority(os.PRIO_PROCESS, _native_id(), BACKGROUND_NICE)
        return factory()

    def _arrived(self, result: AsyncResult[rsa.RSAPrivateKey]) -> None:
        self._pending -= 1
        key = result.value if result.successful() else None
        if key is None:
            # Not retried here, which could spin: the next link's pop() tries again.
            log.warning("making a link key in the background failed: %s", result.exception)
        elif self._running:
            if not self._given_factory:  # a given factory's keys are its own affair (tests' fakes)
                warm(key)
            self._keys.append(key)
            self._refill()
