"""Pre-copy of queued port bytes (issue 13), each figure beside its reference, in one run.

1. Downtime with SIZE MiB in flight (a paused sink on s1) while the client keeps writing through
   pre-migration, against the downtime of an idle session (bench_migration's) in the same run.
   Everything the client wrote reaches the sink on s2, checked by SHA-256.
2. The same, with the sink resumed on s1 once the pre-copy's first round reached s2: the device
   consumes what s2 already holds, and s2 trims it by offset. All intact.
3. The pre-copy's rate (bytes pre-copied / the time the rounds took) against a direct socket copy
   s1 -> s2 of the same number of bytes from and into whole regions (two processes), each copy run
   right after its migration and the ratio taken per pair (the median of those): on a machine
   others share, load that comes and goes then weighs on both sides of a ratio alike.
4. With pre-copy off (``serve --no-precopy`` on both), the migration's rate (in-flight bytes /
   downtime) against bench_migration's whole-region relay s1 -> client -> s2.

    python benchmarks/bench_precopy.py [--mib 1024] [--rounds 10] [--rate-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_migration as bm

from spicewire.demo import SINK
from spicewire.server.migration.precopy import DIGESTS

CHUNK = 1 << 20
TRICKLE = 64 << 10  # what the client writes every TRICKLE_EVERY seconds while it migrates
TRICKLE_EVERY = 0.01


def role_client(port: int) -> None:
    """One session writing into its sink. Commands on stdin: ``write N`` (N bytes, then answers),
    ``trickle`` (keeps writing TRICKLE bytes every TRICKLE_EVERY s), ``stop`` (answers the count and
    the SHA-256 of everything written)."""
    import gevent

    from spicewire.client import ClientSession

    session = ClientSession("127.0.0.1", port).connect()
    sink = session.open_port(SINK)
    digest, written = hashlib.sha256(), [0]
    block = os.urandom(CHUNK)
    print(json.dumps({"ready": f"{session.session_id:08x}"}), flush=True)

    def write(n: int) -> None:
        piece = memoryview(block)[:n]
        sink.write(piece)
        digest.update(piece)
        written[0] += n

    trickle: gevent.Greenlet | None = None

    def trickling() -> None:
        while True:
            write(TRICKLE)
            gevent.sleep(TRICKLE_EVERY)

    for line in iter(lambda: gevent.os.tp_read(0, 4096).decode(), ""):
        for command in line.strip().split("\n"):
            word, _, arg = command.partition(" ")
            if word == "write":
                for start in range(0, int(arg), CHUNK):
                    write(min(CHUNK, int(arg) - start))
                print(json.dumps({"written": written[0]}), flush=True)
            elif word == "trickle":
                trickle = gevent.spawn(trickling)
                print(json.dumps({"trickling": True}), flush=True)
            elif word == "stop":
                if trickle is not None:
                    trickle.kill()
                print(json.dumps({"written": written[0], "sha256": digest.hexdigest()}), flush=True)
    session.close()


class Client(bm.RoleClient):
    def __init__(self, port: int) -> None:
        super().__init__(__file__, ["--port", str(port)])


def direct_copy(nbytes: int, cpu: list[float] | None = None) -> float:
    """Bytes per second of a plain socket copy s1 -> s2 from and into NBYTES regions (two processes,
    bench_migration's sender and receiver roles); the CPU seconds both spent go into ``cpu``."""
    p_recv = bm.free_port()
    receiver = bm.spawn("--role", "receiver", "--listen", str(p_recv), "--bytes", str(nbytes), "--whole")
    receiver.stdout.readline()
    sender = bm.spawn("--role", "sender", "--port", str(p_recv), "--bytes", str(nbytes), "--whole")
    result = json.loads(receiver.stdout.readline())
    spent = result["cpu_s"] + json.loads(sender.stdout.readline())["cpu_s"]
    for proc in (sender, receiver):
        proc.wait(timeout=60)
    assert result["received"] == nbytes, result
    if cpu is not None:
        cpu.append(spent)
    return nbytes / result["seconds"]


def digest_rate(nbytes: int) -> float:
    """Bytes per second of one pass of the pre-copy's digest (the first precopy.DIGESTS names, the
    one s1 picks with a current s2): s1 hashes what it sends and s2 what it receives, CPU the
    direct copy does not spend."""
    return bm.pass_rate(next(iter(DIGESTS.values()))().update, nbytes)


def resume_once_precopied(server: bm.Served, sid: str, done: threading.Event) -> None:
    """The device resumes during pre-migration, once the pre-copy's first round reached s2 (s1's
    session then shows bytes moved): it consumes what s2 already holds, and what comes after. Asked
    every 10 ms: s1 answers the control API during a round too, and a question every millisecond
    took 40% of its hub through a first round of 1 GiB."""
    while not done.is_set():
        migration = server.control.get_json(f"/sessions/{sid}").get("migration")
        if migration and migration["moved"]:
            server.control.post_json(f"/sessions/{sid}/ports/{SINK}/resume", {})
            return
        time.sleep(0.01)


def big_migration(mib: int, precopy: bool, resume_during: bool) -> dict:
    """SIZE MiB paused in the sink on s1, the client writing on through the migration. With the sink
    resumed during it, a bystander also asks both servers for GET /status every 20 ms (not in the
    paused runs, whose pre-copy rate is the figure: each answer costs the server's hub)."""
    size = mib << 20
    extra = () if precopy else ("--no-precopy",)
    s1, s2 = bm.Served(mib + 256, extra), bm.Served(mib + 256, extra)
    client = Client(s1.port)
    done = threading.Event()
    try:
        sid = client.hello["ready"]
        s1.control.post_json(f"/sessions/{sid}/ports/{SINK}/pause", {})
        client.ask(f"write {size}")
        bm.wait_until(lambda: s1.sinks()[sid]["to_device_bytes"] == size, 300)
        bm.settle([s1.proc.pid, s2.proc.pid, client.proc.pid])
        client.ask("trickle")
        resumer = threading.Thread(target=resume_once_precopied, args=(s1, sid, done)) if resume_during else None
        if resumer is not None:
            resumer.start()
        answers: list[float] = []
        answers2: list[float] = []
        probers = [threading.Thread(target=probe_status, args=(s1, done, answers)),
                   threading.Thread(target=probe_status, args=(s2, done, answers2))] if resume_during else []
        for prober in probers:
            prober.start()
        report = s1.migrate_to(s2)
        done.set()
        for prober in probers:
            prober.join()
        if resumer is not None:
            resumer.join()
        written = client.ask("stop")
        entry = report["sessions"][0]
        assert entry["migrated"], report
        s2.control.post_json(f"/sessions/{sid}/ports/{SINK}/resume", {})
        bm.wait_until(lambda: s2.sinks()[sid]["device"]["bytes_in"] >= written["written"], 300)
        sink = s2.sinks()[sid]["device"]
        intact = sink["bytes_in"] == written["written"] and sink["sha256"] == written["sha256"]
    finally:
        done.set()
        client.stop()
        s1.stop()
        s2.stop()
    return {"in_flight_bytes": size, "downtime_s": entry["downtime_s"], "precopied_bytes": report["precopied_bytes"],
            "precopy_s": report["precopy_s"], "prepare_s": report.get("prepare_s", 0.0),
            "moved_bytes": entry["in_flight_bytes_moved"],
            "written_bytes": written["written"], "intact": intact,
            "status_slowest_s": max(answers, default=float("nan")),
            "s2_status_slowest_s": max(answers2, default=float("nan"))}


def probe_status(server: bm.Served, done: threading.Event, answers: list[float]) -> None:
    """A bystander on a server through the migration: GET /status every 20 ms, each answer's time."""
    while not done.is_set():
        started = time.perf_counter()
        server.control.get_json("/status")
        answers.append(time.perf_counter() - started)
        time.sleep(0.02)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10, help="idle migrations for the idle downtime")
    parser.add_argument("--repeat", type=int, default=3, help="big migrations per mode (medians)")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--rate-only", action="store_true", help="only the pre-copy rate against the direct copy")
    args = parser.parse_args()
    if args.role == "client":
        role_client(args.port)
        return 0
    size = args.mib << 20
    load_before = bm.load_average()
    paused, copies, copy_cpu = [], [], []
    for _ in range(args.repeat):  # in pairs: see the module's docstring
        paused.append(big_migration(args.mib, True, False))
        copies.append(direct_copy(size, copy_cpu))
    digest_speed = digest_rate(size)
    bound = bm.cpu_bound_ratio(size / statistics.median(copies), statistics.median(copy_cpu), 2 * size / digest_speed)
    rates = [run["precopied_bytes"] / run["precopy_s"] for run in paused]
    precopy_rate, copy = statistics.median(rates), statistics.median(copies)
    ratio = statistics.median(rate / copied for rate, copied in zip(rates, copies, strict=True))
    rate_rows = [
        ("pre-copy rate, GB/s (each run)", f"{precopy_rate / 1e9:.2f} ({', '.join(f'{r / 1e9:.2f}' for r in rates)})",
         "", ""),
        ("direct socket copy s1 -> s2 of whole regions, GB/s (each run)",
         f"{copy / 1e9:.2f} ({', '.join(f'{c / 1e9:.2f}' for c in copies)})", "", ""),
        ("  pre-copy vs direct copy, median of the pairs", f"{ratio:.2f}x", ">= 0.8x", ratio >= 0.8),
        ("  the copy's CPU per GiB (both processes); one digest pass (s1's, s2's) per GiB",
         f"{statistics.median(copy_cpu) * (1 << 30) / size:.2f} s; {(1 << 30) / digest_speed:.2f} s", "", ""),
        (f"  the best ratio those allow, spread over {os.cpu_count()} cores", f"{bound:.2f}x", "", ""),
        ("between the rounds, s2 faulting in the tails' memory (not in the rate): s (each run)",
         ", ".join(f"{run['prepare_s']:.3f}" for run in paused), "", ""),
        ("bytes left to MIGRATE_DATA (moved - pre-copied): KiB (each run)",
         ", ".join(f"{(run['moved_bytes'] - run['precopied_bytes']) >> 10}" for run in paused), "", ""),
    ]
    results = {"machine": f"{os.cpu_count()} cores", "paused_runs": paused, "direct_copy_bytes_per_s": copies,
               "direct_copy_cpu_s": copy_cpu, "digest_bytes_per_s": digest_speed, "cpu_bound_ratio": bound}
    if args.rate_only:
        intact = all(run["intact"] for run in paused)
        report(results, args.json, [*rate_rows, ("everything the client wrote reached s2's sink (SHA-256), every run",
                                                 "yes" if intact else "NO", "yes", intact), load_row(load_before)])
        return 0
    idle = bm.bench_idle_downtime(args.rounds)
    resumed = [big_migration(args.mib, True, True) for _ in range(args.repeat)]
    whole = [big_migration(args.mib, False, False) for _ in range(args.repeat)]
    relays = [bm.relay_baseline(size, whole=True) for _ in range(args.repeat)]
    results.update(idle=idle, resumed_runs=resumed, no_precopy_runs=whole, whole_relay_bytes_per_s=relays)
    idle_s = idle["median_downtime_s"]
    down_paused, down_resumed = median_of(paused, "downtime_s"), median_of(resumed, "downtime_s")
    relay = statistics.median(relays)
    whole_rate = size / median_of(whole, "downtime_s")
    all_intact = all(run["intact"] for run in (*paused, *resumed, *whole))
    rows = [
        ("idle session downtime, median ms", f"{idle_s * 1e3:.2f}", "", ""),
        (f"{args.mib} MiB in flight, sink paused, client writing: downtime, median ms", f"{down_paused * 1e3:.2f}",
         "", ""),
        ("  vs idle", f"{down_paused / idle_s:.2f}x", "<= 2x", down_paused <= 2 * idle_s),
        ("the same, sink resumed during pre-migration: downtime, median ms", f"{down_resumed * 1e3:.2f}", "", ""),
        ("  vs idle", f"{down_resumed / idle_s:.2f}x", "<= 2x", down_resumed <= 2 * idle_s),
        ("  a bystander on s1 meanwhile: its slowest GET /status (one every 20 ms), ms (each run)",
         ", ".join(f"{run['status_slowest_s'] * 1e3:.1f}" for run in resumed), "", ""),
        ("  the same on s2", ", ".join(f"{run['s2_status_slowest_s'] * 1e3:.1f}" for run in resumed), "", ""),
        ("  bytes left to MIGRATE_DATA: KiB (each run)",
         ", ".join(f"{(run['moved_bytes'] - run['precopied_bytes']) >> 10}" for run in resumed), "", ""),
        *rate_rows,
        ("pre-copy off: migration rate (in flight / downtime), GB/s", f"{whole_rate / 1e9:.2f}", "", ""),
        ("whole-region relay s1 -> client -> s2, GB/s", f"{relay / 1e9:.2f}", "", ""),
        ("  pre-copy off vs relay", f"{whole_rate / relay:.2f}x", ">= 0.9x", whole_rate / relay >= 0.9),
        ("everything the client wrote reached s2's sink (SHA-256), every run", "yes" if all_intact else "NO",
         "yes", all_intact),
        load_row(load_before),
    ]
    report(results, args.json, rows)
    return 0


def load_row(before: str) -> tuple[str, str, str, str]:
    """Other work on the machine moves every figure: its load beside them."""
    return ("load average (1, 5, 15 min) before -> after", f"{before} -> {bm.load_average()}", "", "")


def report(results: dict, path: str | None, rows: list[tuple]) -> None:
    text = json.dumps(results, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text)
    print("\n| measure | figure | goal | met |\n|---|---|---|---|")
    for what, figure, goal, ok in rows:
        print(f"| {what} | {figure} | {goal} | {'' if ok == '' else ('yes' if ok else 'NO')} |")


if __name__ == "__main__":
    sys.exit(main())
