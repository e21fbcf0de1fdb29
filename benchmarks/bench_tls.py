"""TLS against plain, measured in one run (issue 10's speed and memory goals).

1. Port echo through `spicewire serve` with our client, over TLS and in plain, writing 64 KiB and
   1 MiB messages: throughput ratio TLS / plain (goal >= 0.5x).
2. A seamless migration of MIB MiB in flight (a paused sink on s1) between two TLS-only servers
   (a Proxmox-style MIGRATE_BEGIN: port 0, TLS port, certificate subject) against the same
   migration between two plain servers, pre-copy off on all four (``serve --no-precopy``): the
   backlog goes through the client in MIGRATE_DATA, which over TLS it decrypts and encrypts again.
   In-flight bytes / downtime, TLS / plain (goal >= 0.5x); and the client's peak memory beyond
   idle during the TLS one (goal <= 64 MiB).
3. The same two migrations with pre-copy on (the default): the backlog goes s1 -> s2 before the
   switch, over HTTPS between the TLS-only servers (``--control-tls``). The downtime is then a
   few milliseconds whatever the backlog, so the rate compared is in-flight bytes / (pre-copy
   time + downtime): what it takes to move the backlog, TLS / plain.
4. The physical limit beside them, in this process: the CPU seconds per GiB Python's ssl spends
   encrypting (s1's side) and decrypting (s2's side) through memory BIOs, as TlsSocket does, and
   the suite's AEAD inside that alone, 16 KiB records: in the libcrypto ssl is linked with
   (``openssl speed``) and in ``cryptography``'s, which may be a faster OpenSSL. On 2 cores where
   both servers are busy, TLS's extra CPU per GiB against the plain pre-copy's seconds per GiB
   bounds the ratio of (3).

Servers are `spicewire serve` processes; the client of (2) is a process of its own (its memory is
read from /proc). Prints a JSON report and a table.

    python benchmarks/bench_tls.py [--echo-mib 128] [--mib 1024] [--rounds 3] [--parts echo,relay,precopy,limit]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import cast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import gevent
from bench_migration import RoleClient, cpu_seconds, load_average, memory, wait_until
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spicewire.client import ClientSession
from spicewire.client.tls import ClientTls
from spicewire.control.client import ControlClient, control_tls_context
from spicewire.demo import free_port, serving
from spicewire.server.tls import load_server_tls
from spicewire.tlssocket import WRITE_CHUNK
from tests.tlsca import SUBJECT, SUBJECT_TEXT, TestCA

ECHO, SINK = "org.spicewire.echo", "org.spicewire.sink"
CHUNK = 1 << 20
PEER_TOKEN = "bench-peer-token"  # what s1 presents on s2's /migration/*


class Server:
    """A ``spicewire serve`` with an echo and a sink port: plain, TLS-only, or both listeners. A
    TLS-only one serves its control API over HTTPS too, so a migration's s1 -> s2 path is TLS."""

    def __init__(self, x509_dir: str | None, plain: bool = True, buffer_mib: int = 8, precopy: bool = True) -> None:
        self.port = free_port() if plain else 0
        self.tls_port = free_port() if x509_dir else 0
        self.control_port = free_port()
        self.control_tls = x509_dir is not None and not plain
        argv = [sys.executable, "-m", "spicewire", "serve", "--disable-ticketing", "--log-level", "WARNING",
                "--port-channel", f"{ECHO}=echo", "--port-channel", f"{SINK}=sink",
                "--port-buffer-mib", str(buffer_mib), "--control", f"127.0.0.1:{self.control_port}",
                "--peer-token", PEER_TOKEN]
        if plain:
            argv += ["--listen", f"127.0.0.1:{self.port}"]
        if x509_dir:
            argv += ["--tls-port", f"127.0.0.1:{self.tls_port}", "--x509-dir", x509_dir]
        if self.control_tls:
            argv += ["--control-tls"]
        if not precopy:
            argv += ["--no-precopy"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self.control = ControlClient("127.0.0.1", self.control_port, timeout=600,
                                     tls=control_tls_context(x509_dir) if self.control_tls else None)
        if not serving(self.proc, self.control):
            raise SystemExit("a server did not start")
        # A full key pool: its RSA keys are not being made during a measure (of either mode).
        # Best effort: a pool slower than that only adds noise to both modes.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            keys = self.control.get_json("/status")["link_keys"]
            if keys["ready"] >= keys["pool"]:
                return
            time.sleep(0.05)

    def migrate_to(self, other: Server) -> dict:
        return self.control.post_json("/migrate", {
            "to": f"127.0.0.1:{other.port}", "to_tls_port": other.tls_port,
            "to_cert_subject": SUBJECT_TEXT if other.tls_port else None,
            "to_control": f"{'https://' if other.control_tls else ''}127.0.0.1:{other.control_port}",
            "mode": "seamless", "timeout": 300,
            "to_peer_token": PEER_TOKEN,
        })

    def sinks(self) -> dict[str, dict]:
        return {s["session_id"]: next(p for p in s["ports"] if p["name"] == SINK)
                for s in self.control.get_json("/sessions")["sessions"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def session_to(server: Server, tls: bool, ca_file: str) -> ClientSession:
    if tls:
        return ClientSession("127.0.0.1", 0, tls_port=server.tls_port, ca_file=ca_file, host_subject=SUBJECT_TEXT)
    return ClientSession("127.0.0.1", server.port)


# --- 1. echo ------------------------------------------------------------------------------------


def echo_seconds(server: Server, tls: bool, ca_file: str, message: int, total: int) -> float:
    """Seconds to write ``total`` bytes in ``message``-byte writes and read them all back."""
    block = os.urandom(message)
    with session_to(server, tls, ca_file) as session:
        port = session.open_port(ECHO)

        def write() -> None:
            for _ in range(total // message):
                port.write(block)

        start = time.perf_counter()
        writer = gevent.spawn(write)
        got = 0
        while got < total:
            got += len(port.receive(None, timeout=60))
        writer.get()
        return time.perf_counter() - start


def bench_echo(ca_file: str, x509_dir: str, mib: int, rounds: int) -> dict:
    server = Server(x509_dir)
    total = mib << 20
    results = {}
    try:
        for message in (64 << 10, 1 << 20):
            rates: dict[str, list[float]] = {"plain": [], "tls": []}
            for _ in range(rounds):  # interleaved: a busy moment hits both alike
                for mode in rates:
                    rates[mode].append(total / echo_seconds(server, mode == "tls", ca_file, message, total))
            plain, tls = statistics.median(rates["plain"]), statistics.median(rates["tls"])
            results[f"{message >> 10}KiB"] = {"plain_bytes_per_s": plain, "tls_bytes_per_s": tls,
                                              "tls_vs_plain": tls / plain, "rates": rates}
    finally:
        server.stop()
    return {"bytes_per_round": total, "rounds": rounds, "messages": results}


# --- 2. migration -------------------------------------------------------------------------------


def role_client(port: int, tls_port: int, ca_file: str, mib: int) -> None:
    """One session writing MIB MiB into its sink, then following migrations until stdin closes;
    answers 'write', 'rss' and 'reset' on stdin."""
    session = ClientSession("127.0.0.1", port, tls_port=tls_port, ca_file=ca_file or None,
                            host_subject=SUBJECT_TEXT if tls_port else None).connect()
    sink = session.open_port(SINK)
    print(json.dumps({"session_id": f"{session.session_id:08x}", **memory(os.getpid())}), flush=True)
    block = os.urandom(CHUNK)
    for line in iter(lambda: gevent.os.tp_read(0, 4096).decode(), ""):
        for command in line.split():
            if command == "write":
                digest = hashlib.sha256()
                for _ in range(mib):
                    sink.write(block)
                    digest.update(block)
                print(json.dumps({"sha256": digest.hexdigest()}), flush=True)
            elif command == "rss":
                print(json.dumps(memory(os.getpid())), flush=True)
            elif command == "reset":
                with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
                    f.write("5")  # VmHWM back to the current RSS
                print(json.dumps({"reset": True}), flush=True)
    session.close()


class Client(RoleClient):
    def __init__(self, server: Server, ca_file: str, mib: int) -> None:
        super().__init__(__file__, ["--port", str(server.port), "--tls-port", str(server.tls_port),
                                    "--ca-file", ca_file, "--mib", str(mib)], stop_timeout=60)


def migrate_once(tls: bool, precopy: bool, x509_dirs: tuple[str, str], ca_file: str, mib: int) -> dict:
    """MIB MiB in a paused sink on s1, migrated seamlessly to s2; checked intact on s2."""
    size = mib << 20
    s1, s2 = (Server(d if tls else None, plain=not tls, buffer_mib=mib + 64, precopy=precopy) for d in x509_dirs)
    client = Client(s1, ca_file, mib)
    try:
        sid = client.hello["session_id"]
        idle = client.hello["rss"]
        s1.control.post_json(f"/sessions/{sid}/ports/{SINK}/pause", {})
        digest = client.ask("write")["sha256"]
        wait_until(lambda: s1.sinks()[sid]["to_device_bytes"] == size, 300)
        client.ask("reset")
        pids = {"s1": s1.proc.pid, "s2": s2.proc.pid, "client": client.proc.pid}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        load = load_average()
        report = s1.migrate_to(s2)
        cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
        (entry,) = report["sessions"]
        peak = client.ask("rss")["peak"]
        assert entry["migrated"] and entry["in_flight_bytes_moved"] >= size, entry
        s2.control.post_json(f"/sessions/{sid}/ports/{SINK}/resume", {})
        wait_until(lambda: s2.sinks()[sid]["device"]["bytes_in"] == size, 300)
        intact = s2.sinks()[sid]["device"]["sha256"] == digest
    finally:
        client.stop()
        s1.stop()
        s2.stop()
    # Without pre-copy the backlog moves during the downtime; with it, mostly before.
    moving = entry["downtime_s"] + report["precopy_s"]
    return {"downtime_s": entry["downtime_s"], "precopy_s": report["precopy_s"],
            "precopied_bytes": report["precopied_bytes"], "bytes_per_s": size / moving, "intact": intact,
            "client_peak_beyond_idle": peak - idle, "cpu_s": cpu, "load_before": load}


def bench_migration(x509_dirs: tuple[str, str], ca_file: str, mib: int, rounds: int, precopy: bool) -> dict:
    runs: dict[str, list[dict]] = {"plain": [], "tls": []}
    for _ in range(rounds):
        for mode in runs:
            runs[mode].append(migrate_once(mode == "tls", precopy, x509_dirs, ca_file, mib))
    plain = statistics.median(r["bytes_per_s"] for r in runs["plain"])
    tls = statistics.median(r["bytes_per_s"] for r in runs["tls"])
    return {
        "precopy": precopy, "in_flight_bytes": mib << 20, "rounds": rounds,
        "plain_bytes_per_s": plain, "tls_bytes_per_s": tls,
        "tls_vs_plain": tls / plain, "intact": all(r["intact"] for rs in runs.values() for r in rs),
        "client_peak_beyond_idle_tls": max(r["client_peak_beyond_idle"] for r in runs["tls"]),
        "client_peak_beyond_idle_plain": max(r["client_peak_beyond_idle"] for r in runs["plain"]),
        "runs": runs,
    }


# --- 4. the limit ---------------------------------------------------------------------------------


def record_layer(x509_dir: str, ca_file: str, mib: int) -> dict:
    """CPU seconds per GiB of this process for ``mib`` MiB: SSLObject encrypting WRITE_CHUNK at a
    time into a memory BIO and the BIO read (what s1's TlsSocket does), feeding those records to
    the peer's BIO and decrypting them into a buffer (s2's), and the bare AES-GCM of the same
    bytes in 16 KiB records. CPU time, not wall time: other jobs on the machine count less."""
    client_bios, server_bios = (ssl.MemoryBIO(), ssl.MemoryBIO()), (ssl.MemoryBIO(), ssl.MemoryBIO())
    client = ClientTls(ca_file, SUBJECT_TEXT)._context.wrap_bio(*client_bios, server_hostname="127.0.0.1")
    server = load_server_tls(x509_dir).context.wrap_bio(*server_bios, server_side=True)
    while not (handshake_step(client, client_bios[1], server_bios[0]) & handshake_step(server, server_bios[1],
                                                                                      client_bios[0])):
        pass
    data = memoryview(os.urandom(WRITE_CHUNK))
    into = memoryview(bytearray(WRITE_CHUNK))
    rounds = (mib << 20) // WRITE_CHUNK
    encrypt = decrypt = 0.0
    for _ in range(rounds):
        started = time.process_time()
        client.write(data)
        records = client_bios[1].read()
        encrypted = time.process_time()
        server_bios[0].write(records)
        got = 0
        while got < WRITE_CHUNK:
            got += cast(int, server.read(WRITE_CHUNK - got, into[got:]))  # with a buffer: the count
        decrypt += time.process_time() - encrypted
        encrypt += encrypted - started
    cipher = client.cipher()
    assert cipher is not None and bytes(into) == bytes(data)
    aead = AESGCM(os.urandom(cipher[2] // 8))
    nonce = os.urandom(12)
    started = time.process_time()
    for _ in range(rounds):
        for start in range(0, WRITE_CHUNK, 16 << 10):
            aead.encrypt(nonce, data[start : start + (16 << 10)], None)
    aes = time.process_time() - started
    per_gib = (1 << 30) / (rounds * WRITE_CHUNK)
    return {"cipher": cipher[0], "encrypt_s_per_gib": encrypt * per_gib, "decrypt_s_per_gib": decrypt * per_gib,
            "aes_gcm_s_per_gib": aes * per_gib, "ssl_library_aead_s_per_gib": ssl_library_aead(cipher[0])}


# The AEAD each TLS 1.3 suite encrypts its records with, by `openssl speed -evp` name.
_SUITE_AEADS = {"TLS_AES_256_GCM_SHA384": "aes-256-gcm", "TLS_AES_128_GCM_SHA256": "aes-128-gcm",
                "TLS_CHACHA20_POLY1305_SHA256": "chacha20-poly1305"}


def ssl_library_aead(suite: str) -> float | None:
    """Seconds per GiB of the suite's AEAD in 16 KiB records, in the libcrypto Python's ssl is
    linked with (`openssl speed`, when that command's library is the same version), or None. It
    need not be the one ``cryptography`` bundles: Debian 12's OpenSSL 3.0 has no VAES code for
    AES-GCM, and ran it at half the bundled 4.0's rate on this machine's AMD EPYC."""
    name = _SUITE_AEADS.get(suite)
    if name is None or shutil.which("openssl") is None:
        return None
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()
    if version[:2] != ssl.OPENSSL_VERSION.split()[:2]:
        return None
    out = subprocess.run(["openssl", "speed", "-elapsed", "-seconds", "2", "-bytes", "16384", "-evp", name],
                         capture_output=True, text=True).stdout.strip().splitlines()
    try:
        rate = float(out[-1].split()[-1].rstrip("k")) * 1000
    except (IndexError, ValueError):
        return None
    return (1 << 30) / rate


def handshake_step(tls: ssl.SSLObject, outgoing: ssl.MemoryBIO, peer_incoming: ssl.MemoryBIO) -> bool:
    """One step of a handshake between two SSLObjects; True once this side is done."""
    try:
        tls.do_handshake()
        done = True
    except ssl.SSLWantReadError:
        done = False
    if outgoing.pending:
        peer_incoming.write(outgoing.read())
    return done


def table(results: dict) -> list[tuple[str, str, str, bool | str]]:
    """(measure, figure, goal, met) for each measure that ran."""
    rows: list[tuple[str, str, str, bool | str]] = []
    for size, e in results.get("echo", {}).get("messages", {}).items():
        rows.append((f"port echo, {size} messages: TLS vs plain",
                     (f"{e['tls_vs_plain']:.2f}x ({e['tls_bytes_per_s'] / 1e6:.0f} vs "
                      f"{e['plain_bytes_per_s'] / 1e6:.0f} MB/s)"),
                     ">= 0.5x", e["tls_vs_plain"] >= 0.5))
    titles = {"migration": "through the client (pre-copy off): bytes / downtime",
              "precopy_migration": "with pre-copy (s1 -> s2 over HTTPS for TLS): bytes / (pre-copy + downtime)"}
    for key, title in titles.items():
        if key not in results:
            continue
        mig = results[key]
        rows.append((f"seamless migration of {mig['in_flight_bytes'] >> 20} MiB in flight {title}, TLS-only vs plain",
                     (f"{mig['tls_vs_plain']:.2f}x ({mig['tls_bytes_per_s'] / 1e9:.2f} vs "
                      f"{mig['plain_bytes_per_s'] / 1e9:.2f} GB/s)"), ">= 0.5x", mig["tls_vs_plain"] >= 0.5))
        first = {mode: mig["runs"][mode][0] for mode in ("tls", "plain")}
        cpu = {mode: " / ".join(f"{r['cpu_s'][name]:.1f}" for name in ("s1", "s2", "client"))
               for mode, r in first.items()}
        rows.append(("CPU seconds during that migration, s1 / s2 / client (first round)",
                     (f"TLS {cpu['tls']}, plain {cpu['plain']} (load before: TLS {first['tls']['load_before']}, "
                      f"plain {first['plain']['load_before']})"), "", ""))
        rows.append(("client peak beyond idle during that TLS migration: MiB",
                     f"{mig['client_peak_beyond_idle_tls'] / 2**20:.1f}", "<= 64",
                     mig["client_peak_beyond_idle_tls"] <= 64 << 20))
        rows.append(("everything arrived intact", str(mig["intact"]), "", mig["intact"]))
    if "limit" in results:
        lim = results["limit"]
        title = (f"the limit: CPU s per GiB through Python's ssl ({lim['cipher']}), encrypt / decrypt; "
                 f"the AEAD alone in ssl's libcrypto ({ssl.OPENSSL_VERSION.split()[1]}) and in cryptography's")
        in_ssl = lim.get("ssl_library_aead_s_per_gib")
        figure = (f"{lim['encrypt_s_per_gib']:.2f} / {lim['decrypt_s_per_gib']:.2f} s; "
                  f"{'n/a' if in_ssl is None else f'{in_ssl:.2f}'} s and {lim['aes_gcm_s_per_gib']:.2f} s")
        rows.append((title, figure, "", ""))
        if "precopy_migration" in results:
            plain_s = (1 << 30) / results["precopy_migration"]["plain_bytes_per_s"]
            extra = lim["encrypt_s_per_gib"] + lim["decrypt_s_per_gib"]
            title = "the limit against the plain pre-copy: its s per GiB, and TLS's extra CPU s per GiB (both servers)"
            rows.append((title, f"{plain_s:.2f} s, +{extra:.2f} CPU s", "", ""))
            # Even with the extra CPU spread evenly over both cores, and nothing else slowed by it.
            bound = plain_s / (plain_s + extra / (os.cpu_count() or 1))
            title = "  the best TLS / plain ratio those allow, the extra CPU spread over every core"
            rows.append((title, f"{bound:.2f}x", "", ""))
        if "migration" in results:
            # Through the client the bytes are encrypted and decrypted twice: s1 -> client -> s2.
            plain_s = (1 << 30) / results["migration"]["plain_bytes_per_s"]
            extra = 2 * (lim["encrypt_s_per_gib"] + lim["decrypt_s_per_gib"])
            bound = plain_s / (plain_s + extra / (os.cpu_count() or 1))
            title = ("the same through the client (s1, client and s2 encrypt or decrypt): the plain migration's s "
                     "per GiB, TLS's extra CPU s, the best ratio")
            rows.append((title, f"{plain_s:.2f} s, +{extra:.2f} CPU s, {bound:.2f}x", "", ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--ca-file", default="")
    parser.add_argument("--echo-mib", type=int, default=128, help="bytes echoed per round and message size")
    parser.add_argument("--mib", type=int, default=1024, help="in flight during the migrations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--migration-rounds", type=int, default=1)
    parser.add_argument("--parts", type=lambda text: set(text.split(",")),
                        default={"echo", "relay", "precopy", "limit"},
                        help="which measures, comma-separated: echo, relay, precopy, limit (default: all)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    if args.role == "client":
        role_client(args.port, args.tls_port, args.ca_file, args.mib)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        ca = TestCA()
        ca_file = str(ca.write_cert(pathlib.Path(tmp) / "ca.pem"))
        s1_dir, s2_dir = (str(ca.x509_dir(pathlib.Path(tmp) / name, SUBJECT)) for name in ("s1", "s2"))
        dirs = (s1_dir, s2_dir)
        results: dict = {"machine": f"{os.cpu_count()} cores", "load_at_start": load_average()}
        if "echo" in args.parts:
            results["echo"] = bench_echo(ca_file, dirs[0], args.echo_mib, args.rounds)
        if "relay" in args.parts:
            results["migration"] = bench_migration(dirs, ca_file, args.mib, args.migration_rounds, False)
        if "precopy" in args.parts:
            results["precopy_migration"] = bench_migration(dirs, ca_file, args.mib, args.migration_rounds, True)
        if "limit" in args.parts:
            results["limit"] = record_layer(dirs[0], ca_file, args.mib)
    results["load_at_end"] = load_average()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(f"\nload average: {results['load_at_start']} at the start, {results['load_at_end']} at the end")
    print("\n| measure | figure | goal | met |\n|---|---|---|---|")
    for what, figure, goal, ok in table(results):
        print(f"| {what} | {figure} | {goal} | {'' if ok == '' else ('yes' if ok else 'NO')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
