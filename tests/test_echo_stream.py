"""The echo stream the threaded-client migration test runs (test_client_threads.EchoStream) ends
cleanly however its writer and reader threads interleave with finish(). Here its port is in memory,
and the worst case is arranged with events: the writer is held just after its bytes came back, so the
reader has matched everything while the writer has not counted its next piece, and stop comes then.
Before the fix the reader began a read at that point, for a piece the stopped writer never sent: it
ran into its timeout while finish() waited, and the test failed with "the stream threads did not
end" after its last migration (reproduced here under load; the likely cause of the one CI failure)."""

from __future__ import annotations

import threading

from .test_client_threads import BOUND, EchoStream


class HeldEchoPort:
    """An echo port in memory. Its first write puts its bytes where read() finds them, then holds
    the writer until ``release`` is set. ``idle_reads`` counts reads begun while the writer is
    held with nothing left to read: reads that only a later write could answer."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.inbox = bytearray()
        self.writes = 0
        self.held = False
        self.release = threading.Event()
        self.idle_reads = 0
        self.reader_decisions = 0  # bumped by WatchedStream each time its reader asks what is owed
        self.closed = False

    def write(self, data: bytes) -> None:
        with self.cond:
            self.inbox += data
            self.writes += 1
            first = self.writes == 1
            self.held = first
            self.cond.notify_all()
        if first:
            assert self.release.wait(BOUND), "the test never released the writer"
            with self.cond:
                self.held = False

    def read(self, n: int | None = None, timeout: float | None = None) -> bytes:
        with self.cond:
            if self.held and not self.inbox:
                self.idle_reads += 1
                self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.inbox or self.closed, timeout), "no bytes came"
            got = bytes(self.inbox if n is None else self.inbox[:n])
            del self.inbox[: len(got)]
            return got

    def close(self) -> None:
        """End the stream: a read still waiting returns b""."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class OnePort:
    def __init__(self, port: HeldEchoPort) -> None:
        self.port = port

    def open_port(self, name: str) -> HeldEchoPort:
        return self.port


class WatchedStream(EchoStream):
    """EchoStream whose reader says, through the port, each time it waits to learn what is owed."""

    port: HeldEchoPort

    def _owed(self) -> bool:
        with self.port.cond:
            self.port.reader_decisions += 1
            self.port.cond.notify_all()
        return super()._owed()


def test_a_stop_right_after_everything_came_back_ends_the_reader_without_a_read():
    port = HeldEchoPort()
    stream = WatchedStream(OnePort(port))  # type: ignore[arg-type]
    writer, reader = stream.threads
    try:
        with port.cond:
            # The reader, done with the first piece while the writer is held: it either begins a
            # read nothing will answer (the bug) or waits to be owed bytes (its second decision;
            # the first came before the first piece).
            assert port.cond.wait_for(lambda: port.idle_reads or port.reader_decisions >= 2, BOUND)
        stream.stop.set()
        port.release.set()
        writer.join(BOUND)
        assert not writer.is_alive()
        assert port.idle_reads == 0, "the reader waits for bytes the stopped writer will never send"
        stream.finish()
    finally:
        port.close()  # a reader left waiting (the bug) ends, so no thread outlives the test
        reader.join(BOUND)
    assert port.writes == 1 and stream.totals["sent"] == stream.totals["checked"] > 0
