"""QEMU -> QEMU, seamless: the client's port data must not reach s2's device before s2 has loaded
the VM's device state.

s2's spice-server runs its char devices during the incoming migration (its ``vm_running`` starts
true, and QEMU stops it only for a VM it had started), so what the client sends s2 goes into s2's
serial port at once; a device state loaded after that overwrites the UART, and the byte it held is
lost. s1 sends its MIGRATE, after which the client writes to s2, when its migration completes;
without QEMU's return path it completes once the stream is written, whether or not s2 has read it.
``migrate_vm`` turns the return path on: s1 then completes once s2 has loaded the state and runs.

Here s2 loads late on purpose: the migration goes through a relay that passes s1's stream on only
once s1 waits for s2's answer (the return path at work) or s2 has put client bytes into its serial
port (the loss is then certain). Nothing depends on how fast anything runs.
"""

from __future__ import annotations

import os
import re
import subprocess

import gevent
import gevent.event
import gevent.queue
import pytest
from gevent import socket

from spicewire.client import ClientSession

from . import peers
from .peers.qemu import QEMU_BINARY, QemuSpice
from .test_client_migration import PORT_NAME, echo, migrate_vm, qemu_pair, wait_for

S1_WAITS = "migration_return_path_end_before"  # s1 has written the stream and waits for s2's SHUT
S2_WRITES = "spice_vmc_write"
S2_TOOK_CLIENT_BYTES = re.compile(rf"{S2_WRITES} spice wrote [1-9]")
MAX_LINES = 5000  # the writer's bound should neither of the events it waits for come


class HeldMigrationStream:
    """A TCP relay from s1's migration to s2's incoming port. It reads what s1 sends as it comes (s1
    is never held up writing) and passes it on only once ``release`` is set; s2's replies (the
    return path) go back to s1 at once."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.release = gevent.event.Event()
        self.reason: str | None = None
        self._socks: list[socket.socket] = [self.listener]
        self._greenlets = [gevent.spawn(self._run)]

    def release_for(self, reason: str) -> None:
        self.reason = reason
        self.release.set()

    def _run(self) -> None:
        src, _ = self.listener.accept()
        dst = socket.create_connection(("127.0.0.1", self.target_port))
        self._socks += [src, dst]
        chunks: gevent.queue.Queue[bytes] = gevent.queue.Queue()
        self._greenlets += [gevent.spawn(self._take, src, chunks), gevent.spawn(self._answer, dst, src)]
        self.release.wait()
        while data := chunks.get():
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _take(src: socket.socket, chunks: gevent.queue.Queue[bytes]) -> None:
        while data := src.recv(1 << 16):
            chunks.put(data)
        chunks.put(b"")

    @staticmethod
    def _answer(dst: socket.socket, src: socket.socket) -> None:
        while data := dst.recv(1 << 16):
            src.sendall(data)
        src.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        gevent.killall(self._greenlets)
        for sock in self._socks:
            sock.close()


def require_trace_events(*events: str) -> None:
    """The test reads QEMU's trace output: a build without these events cannot run it."""
    listed = subprocess.run([QEMU_BINARY, "-trace", "help"], capture_output=True, text=True, timeout=20).stdout
    missing = [event for event in events if event not in listed.split()]
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"{QEMU_BINARY} cannot trace {missing}")
    if missing:
        pytest.skip(f"{QEMU_BINARY} cannot trace {missing}")


def why_release(s1: QemuSpice, s2: QemuSpice) -> str | None:
    if S1_WAITS in s1.log():
        return "s1 waited for s2"
    if S2_TOOK_CLIENT_BYTES.search(s2.log()):
        return "s2 took client bytes before loading the VM"
    return None


@pytest.mark.peer
def test_client_data_reaches_s2_only_after_s2_loaded_the_device_state():
    peers.require("qemu")
    require_trace_events(S1_WAITS, S2_WRITES)
    s1, s2 = qemu_pair(True)
    s1.extra_args += ["-trace", S1_WAITS]
    s2.extra_args += ["-trace", S2_WRITES]
    with s1, s2, ClientSession("127.0.0.1", s1.spice_port) as session:
        port = session.open_port(PORT_NAME)
        assert echo(port, b"warm-up\n")
        stream = HeldMigrationStream(s2.incoming_port)
        written: list[bytes] = []

        def release_when_due() -> None:
            while (reason := why_release(s1, s2)) is None:
                gevent.sleep(0.01)  # QEMU only writes its log: it is read until one of them shows
            stream.release_for(reason)

        def write_all() -> None:
            # Until the stream has passed on and the client is on s2, so that lines are in flight
            # across the switch whenever it comes; then a few more.
            while len(written) < MAX_LINES and not (stream.release.is_set() and session.migrated.is_set()):
                written.append(b"line %05d\n" % len(written))
                port.write(written[-1])
                gevent.sleep(0.002)
            for _ in range(20):
                written.append(b"line %05d\n" % len(written))
                port.write(written[-1])

        watcher, writer = gevent.spawn(release_when_due), gevent.spawn(write_all)
        try:
            s1.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1", port=s2.spice_port)
            assert wait_for(session.migration_connected_event.is_set, 15)
            assert migrate_vm(s1, s2, via_port=stream.port) == "completed"
            report = session.wait_migrated(timeout=20)
            writer.get(timeout=20)
            expected = b"".join(written)
            got = port.read(len(expected), timeout=20)
        finally:
            watcher.kill()
            writer.kill()
            stream.close()
        assert report is not None and report["mode"] == "seamless", report
        assert got == expected, (stream.reason, len(got), len(expected))
        assert stream.reason == "s1 waited for s2"
