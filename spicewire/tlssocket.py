"""TLS on a gevent socket through memory BIOs: the server's and the client's TLS connections.

gevent's SSLSocket hands the socket to OpenSSL, which reads each record with two system calls
(its header, then its body) and writes each record with one; every 16 KiB of payload also goes
through several layers of Python wrappers. Here OpenSSL only encrypts and decrypts, between
memory buffers (``ssl.SSLObject`` over two ``ssl.MemoryBIO``), and this class moves the bytes:
one ``recv`` brings up to RAW_READ bytes of records, which are then decrypted in a tight loop
straight into the caller's buffer; one ``sendall`` of a large buffer becomes one write of all its
records. On loopback this at least halves the time a TLS byte costs beyond its crypto.

The socket is a gevent socket (subclass): timeouts, ``fileno``, ``close`` and a TCP-level
``shutdown`` behave as on the plain socket it replaces. Renegotiation is refused by the contexts
(OP_NO_RENEGOTIATION), so a write never has to wait for a read. Nor does a read wait for a write:
what OpenSSL has to send while reading (an alert, the refusal of a renegotiation) goes out as far
as the socket takes it at once, and the rest goes with the next write or once the socket takes it.
A server reads every connection into one shared buffer, valid only until its greenlet yields: a
read that waited for a full socket would let another connection's read overwrite its bytes.

``send_buffers`` writes a list of buffers, unjoined, on a TLS socket or a plain one (there, up to
SEND_VECTOR of them per sendmsg): the control client's streamed bodies (through ``send_batches``,
which shares the hub while it sends) and the server's gathered MIGRATE_DATA go out through it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import gevent
import gevent.lock
from gevent import socket

from spicewire.turns import BulkTurns

RAW_READ = 256 << 10  # ciphertext taken from the kernel per system call: 16 full records
WRITE_CHUNK = 256 << 10  # plaintext encrypted per write: bounds the ciphertext held at once
SEND_VECTOR = 512  # buffers per sendmsg, under the system's IOV_MAX (1024 on Linux)

_scratch = threading.local()


def _raw_buffer() -> memoryview:
    """This thread's RAW_READ buffer. One is enough for all the connections a thread serves:
    what a read brings is copied into the connection's BIO before the greenlet can yield."""
    view: memoryview | None = getattr(_scratch, "view", None)
    if view is None:
        view = _scratch.view = memoryview(bytearray(RAW_READ))
    return view


class TlsSocket(socket.socket):
    """A connected TCP socket speaking TLS (made from a plain one, which it takes over)."""

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
    ) -> None:
        timeout = sock.gettimeout()
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.settimeout(timeout)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        # Ciphertext leaves in the order it was made: whoever holds this writes it all out.
        self._sending = gevent.lock.RLock()
        # Ciphertext taken out of the outgoing BIO that the socket has not taken yet: it goes
        # before anything still in the BIO.
        self._unsent = memoryview(b"")
        # Sends what a read left unsent once the socket takes it (when no write came first).
        self._sender: gevent.Greenlet[[], None] | None = None
        # A bad record after good ones: the good bytes are returned first, then this is raised.
        self._failed: ssl.SSLError | None = None
        # A socket nobody handshook yet (an HTTPS server's: inside its request deadline) runs the
        # handshake at its first read or write.
        self._established = False

    # --- the handshake -----------------------------------------------------------------------

    def do_handshake(self) -> None:
        """Run the handshake (within the socket's timeout per read or write). A failure sends
        OpenSSL's alert to the peer, if it still listens, and raises the SSLError."""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self._fill()
            except ssl.SSLError:
                self._send_ready()
                raise
        self._send_pending()  # the last flight (and a server's session tickets)
        self._established = True

    # --- reading -----------------------------------------------------------------------------

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt into ``buffer`` whatever whole records have arrived (waiting for one if none
        has), up to ``nbytes``; 0 at the end of the stream (close_notify or a plain EOF, as
        SSLSocket's suppress_ragged_eofs has it)."""
        if flags:
            raise ValueError("recv_into() on a TLS socket takes no flags")
        if not self._established:
            self.do_handshake()
        view = memoryview(buffer).cast("B")
        want = nbytes or len(view)
        got = 0
        # With a buffer, SSLObject.read returns the count (the stubs say int | bytes).
        read = cast("Callable[[int, memoryview], int]", self._tls.read)
        while want:
            if self._failed is not None:
                err, self._failed = self._failed, None
                raise err
            try:
                while got < want:
                    got += read(want - got, view[got:])
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return got
            except ssl.SSLError as err:
                if not got:
                    self._send_ready()
                    raise
                self._failed = err
            if got:
                break
            if self._outgoing.pending:  # an answer the peer may wait for before it sends more
                self._send_ready()
            self._fill()
        if self._outgoing.pending:  # an alert for the record that failed after these bytes
            self._send_ready()
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        return bytes(memoryview(buf)[:n])

    def _fill(self) -> None:
        """One read of ciphertext into the incoming BIO (EOF marks it ended)."""
        raw = _raw_buffer()
        n = super().recv_into(raw)
        if n:
            self._incoming.write(raw[:n])
        else:
            self._incoming.write_eof()

    # --- writing -----------------------------------------------------------------------------

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags:
            raise ValueError("sendall() on a TLS socket takes no flags")
        self.send_buffers((data,))

    def send_buffers(self, buffers: Iterable[Any]) -> int:
        """Write ``buffers`` in order, as one ``sendall`` of them joined would, without joining
        them: their records go out WRITE_CHUNK at a time (a pre-copy's thousands of 64 KiB views
        cost one system call per 256 KiB, not one each). Returns the bytes written."""
        if not self._established:
            self.do_handshake()
        made = 0  # plaintext encrypted since the last send
        total = 0
        with self._sending:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                total += len(view)
                for start in range(0, len(view), WRITE_CHUNK):
                    piece = view[start : start + WRITE_CHUNK]
                    if made + len(piece) > WRITE_CHUNK:
                        self._send_pending()
                        made = 0
                    self._tls.write(piece)
                    made += len(piece)
            if made:
                self._send_pending()
        return total

    def send(self, data: Any, flags: int = 0) -> int:
        view = memoryview(data).cast("B")[:WRITE_CHUNK]
        self.sendall(view, flags)
        return len(view)

    def _send_pending(self) -> None:
        """Write out the ciphertext made so far, waiting for the socket as long as it must."""
        with self._sending:
            while self._next_records():
                # The plain socket's send (gevent's sendall would call ours, which encrypts). The
                # remainder is kept as it goes: a send that times out leaves the stream whole.
                self._unsent = self._unsent[socket.socket.send(self, self._unsent) :]

    def _send_ready(self) -> None:
        """Send what of the ciphertext made so far the socket takes now, never waiting (a
        reader's bytes sit in a buffer others may reuse once it yields). The rest goes with the
        next write, or when the socket takes it; while another greenlet writes, that one sends
        it after its own. A failed handshake's alert, too, goes this way: the peer may be
        gone, or not reading."""
        if not self._sending.acquire(blocking=False):
            return
        try:
            while self._next_records():
                try:
                    sent = socket.socket.send(self, self._unsent, 0, 0.0)  # type: ignore[call-arg]  # gevent's: 0 never waits
                except BlockingIOError:
                    break  # full: the rest goes later
                except OSError:
                    return  # broken: the next read or write says so (a read keeps what it decrypted)
                self._unsent = self._unsent[sent:]
        finally:
            self._sending.release()
        if self._unsent and self._sender is None:
            self._sender = gevent.spawn(self._send_later)

    def _send_later(self) -> None:
        try:
            self._send_pending()
        except OSError:
            return  # the connection broke (or closed): its next read or write says so
        finally:
            self._sender = None

    def _next_records(self) -> bool:
        """Whether there is ciphertext to send, in ``_unsent``: the BIO's once that is empty."""
        if not self._unsent and self._outgoing.pending:
            self._unsent = memoryview(self._outgoing.read())
        return bool(self._unsent)

    # --- what SSLSocket tells about the connection --------------------------------------------

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()


def send_buffers(sock: socket.socket, buffers: Sequence[Any]) -> int:
    """Write ``buffers`` in order and return the bytes written: many per sendmsg on a plain socket
    (a pre-copy's queue is thousands of 64 KiB views; one send each cost more than the copy);
    through TLS, their records WRITE_CHUNK per send."""
    if isinstance(sock, TlsSocket):
        return sock.send_buffers(buffers)
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    total = sum(view.nbytes for view in views)
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first:first + SEND_VECTOR])
        while first < len(views) and sent >= views[first].nbytes:  # the buffers that went whole
            sent -= views[first].nbytes
            first += 1
        if sent:  # and what went of the next one
            views[first] = views[first][sent:]
    return total


def send_batches(sock: socket.socket, batches: Iterable[Sequence[Any]]) -> int:
    """``send_buffers`` of each batch in turn, the process's other greenlets given a turn every
    BULK_TURN bytes (spicewire/turns.py): a pre-copy round of a GiB goes out this way. Returns
    the bytes written."""
    turns = BulkTurns()
    total = 0
    for batch in batches:
        sent = send_buffers(sock, batch)
        total += sent
        turns.share(sent)
    return total
