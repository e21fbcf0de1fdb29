"""The asyncio client (spicewire.aio): the threaded client's I/O thread, awaited. The servers are
``spicewire serve`` subprocesses; each test is one ``asyncio.run`` bounded by ``asyncio.timeout``."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import pytest

from spicewire import aio
from spicewire.errors import ReadTimeout, SessionClosed

from .served import TOKEN, Served
from .serverkit import refused_port

ECHO = "org.test.echo"
BOUND = 30.0  # every wait in this file ends by then


def run(coro) -> None:
    async def bounded():
        async with asyncio.timeout(2 * BOUND):
            await coro

    asyncio.run(bounded())


def migrate(s1: Served, s2: Served) -> dict:
    return s1.request("POST", "/migrate", {
        "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control),
        "mode": "seamless", "timeout": 10, "to_token": TOKEN,
    }, timeout=BOUND)


@pytest.fixture
def no_thread_left():
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before


@pytest.fixture
def s1(serve, no_thread_left):
    return serve("--disable-ticketing")


def test_an_asyncio_program_keeps_its_echo_stream_through_seamless_migrations_back_and_forth(serve, no_thread_left):
    s1, s2 = serve("--disable-ticketing"), serve("--disable-ticketing")

    async def main():
        async with aio.connect(*s1.address) as session:
            port = await session.open_port(ECHO)
            sent = bytearray()  # written and not matched yet
            totals = {"sent": 0, "checked": 0}
            progress = asyncio.Condition()
            stop = asyncio.Event()

            writing = [True]  # until the writer ends: no piece is counted after that

            async def writer():
                rng = random.Random(11)
                block = os.urandom(1 << 16)
                try:
                    while not stop.is_set():
                        n = rng.randint(1, len(block))
                        start = rng.randint(0, len(block) - n)
                        async with progress:  # at most 4 MiB unmatched
                            await progress.wait_for(
                                lambda: stop.is_set() or totals["sent"] - totals["checked"] < 4 << 20)
                            sent.extend(block[start : start + n])
                            totals["sent"] += n
                            progress.notify_all()  # the reader waits for bytes owed
                        await port.write(block[start : start + n])
                finally:
                    async with progress:
                        writing[0] = False
                        progress.notify_all()

            async def owed() -> bool:
                """Until bytes are owed, or the writer ended with every byte back: a read begun with
                all matched would wait for a piece that a writer stopped a moment later never sends."""
                async with progress:
                    await progress.wait_for(lambda: totals["sent"] > totals["checked"] or not writing[0])
                    return totals["sent"] > totals["checked"]

            async def reader():
                while await owed():
                    got = await port.read()
                    assert got, "the echo stream ended"
                    assert got == bytes(sent[: len(got)]), f"stream differs at byte {totals['checked']}"
                    del sent[: len(got)]
                    totals["checked"] += len(got)
                    async with progress:
                        progress.notify_all()

            async def moved_on(before: int) -> None:
                async with progress:
                    await progress.wait_for(lambda: totals["checked"] > before + (256 << 10))

            tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
            here, there = s1, s2
            for _ in range(4):  # s1 -> s2 -> s1 -> s2 -> s1
                await moved_on(totals["checked"])
                report = await asyncio.to_thread(migrate, here, there)  # the loop runs the stream meanwhile
                assert report["migrated"] == 1, report
                assert await session.wait_migrated(BOUND) is not None
                assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
                here, there = there, here
            stop.set()
            async with progress:
                progress.notify_all()
            await asyncio.gather(*tasks)
            assert totals["checked"] == totals["sent"] > 1 << 20 and not sent
            assert [r["result"] for r in session.migrations] == ["completed"] * 4
            assert all(r["mode"] == "seamless" and not r["errors"] for r in session.migrations)
            assert await session.connected_to() == s1.address

    run(main())


def test_a_waiting_read_leaves_the_loop_free_and_a_cancelled_one_takes_nothing(s1):
    async def main():
        session = await aio.connect(*s1.address)
        try:
            port = await session.open_port(ECHO)
            waiting = asyncio.create_task(port.read(5))
            await port.write(b"hello")  # runs while the read waits: the loop is not blocked
            assert await waiting == b"hello"

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(port.read(5), 0.05)  # cancelled while it waits
            await port.write(b"world")
            assert await port.read(5, timeout=BOUND) == b"world"  # nothing went to the cancelled read
        finally:
            await session.close()

    run(main())


def test_read_timeout_end_of_stream_and_use_after_close(s1):
    async def main():
        async with aio.connect(*s1.address) as session:
            port = await session.open_port(ECHO)
            await port.write(b"abc")
            assert await port.read(3, timeout=BOUND) == b"abc"
            with pytest.raises(ReadTimeout) as err:
                await port.read(1, timeout=0.05)
            assert err.value.available == 0
            s1.stop()  # the server goes away: the stream ends, which is not a timeout
            assert [chunk async for chunk in port] == []
            assert await port.read(1, timeout=BOUND) == b""
            with pytest.raises(SessionClosed):
                await port.write(b"more")
        assert session.closed
        with pytest.raises(SessionClosed):
            await port.read(1, timeout=1)
        with pytest.raises(SessionClosed):
            await session.open_port(ECHO)
        await session.close()  # twice is fine

    run(main())


def test_close_ends_a_pending_read_with_session_closed(s1):
    async def main():
        session = await aio.connect(*s1.address)
        port = await session.open_port(ECHO)
        pending = asyncio.create_task(port.read(1))
        waiting = asyncio.create_task(session.wait_migrated())
        await asyncio.sleep(0)  # both tasks submit their calls
        await session.connected_to()  # submitted after them: once it is back, both calls are waiting
        assert not pending.done() and not waiting.done()
        await session.close()
        for task in (pending, waiting):
            with pytest.raises(SessionClosed):
                await task

    run(main())


def test_a_refused_connect_raises(no_thread_left):
    async def main(port: int):
        with pytest.raises(ConnectionRefusedError):
            async with aio.connect("127.0.0.1", port, timeout=5):
                raise AssertionError("connected to nobody")

    with refused_port() as port:
        run(main(port))
