"""Seamless-migration downtime of an idle session (main + one port) followed by spice-gtk:
`spicewire serve` against QEMU's spice-server, the same spice-gtk (the tests' driver) in both runs.

spicewire: two `spicewire serve` processes; ``POST /migrate`` back and forth, ROUNDS times.
QEMU: a chain of QEMUs (isa-serial spiceport, echo BIOS, seamless-migration=on), each migration
to a fresh one started with ``-incoming``: ``client_migrate_info``, a pause for the client to link
to s2, then QMP ``migrate``.

Figures, each a median over the rounds (seconds):

- ``client_switch_s`` (both): on spice-gtk's clock, from the first SPICE_MSG_MIGRATE it handles
  to "all channel migrated" (every channel switched to s2); taken from spice-gtk's debug lines
  (the driver's ``--trace-spice``).
- ``post_connect_to_switched_s`` (both): from the moment s1 may start moving the session until
  every channel is on s2.  spicewire: the client's CONNECTED_SEAMLESS reply ("migrate connect
  reply", spice-gtk's clock); s1 then stops the devices, moves their state, sends MIGRATE.  QEMU:
  the QMP ``migrate`` command (wall clock, aligned with the driver's ``t0_wall``); QEMU then moves
  the VM (16 MiB of RAM) and spice-server sends MIGRATE at its end.
- ``report_downtime_s`` (spicewire): the ``downtime_s`` of the POST /migrate report (s1 sends
  MIGRATE -> s2 has restored every channel).
- ``vm_downtime_s`` (QEMU): ``query-migrate``'s ``downtime`` (the VM's stop time).
- ``completed_event_after_s`` (QEMU): QMP SPICE_MIGRATE_COMPLETED on s1 after ``migrate``
  (spice-server emits it when the client has left s1, or after its 10 s wait).

spice-gtk 0.42 keeps its old main connection to s1 after a seamless migration until s2 sends
something on main (tests/test_spicegtk_migration.py docstring). spicewire's s2 sends
MULTI_MEDIA_TIME once it has restored the session, as spice-server does, so s1 is free at once;
``--servers N`` > 2 rotates through N servers all the same.

    .venv/bin/python benchmarks/bench_spicegtk_downtime.py [--rounds 10] [--servers 2] [--skip-qemu]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests import peers
from tests.peers import echo_bios
from tests.peers.qemu import QemuSpice, SpicePort, free_port
from tests.peers.spicegtk import start_driver
from tests.served import TOKEN, Served

PORT_NAME = "org.spicewire.echo"
LINGER = 12.0  # s1's 10 s wait for the client to leave, plus a margin


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 6) if values else None


def checked_rounds(rep: dict, rounds: int) -> list[dict]:
    """The driver's per-migration figures, once its report says all ROUNDS went through."""
    if not rep.get("ok"):
        raise RuntimeError(f"driver: {rep.get('error')}")
    client = client_rounds(rep)
    if len(client) != rounds:
        raise RuntimeError(f"the driver saw {len(client)} migrations, not {rounds}")
    return client


def client_rounds(rep: dict) -> list[dict]:
    """Per migration, from the driver's trace: wall-clock times of begin, connect reply, first
    MIGRATE handled, all channels switched."""
    t0 = rep["t0_wall"]
    rounds: list[dict] = []
    for event in rep["events"]:
        if event["what"] != "spice-log":
            continue
        text, wall = event["text"], t0 + event["t"]
        if "migration message: migrate-begin" in text:
            rounds.append({"begin": wall})
        elif not rounds:
            continue
        elif "migrate connect reply" in text:
            rounds[-1]["connected"] = wall
        elif "spice_channel_handle_migrate" in text:
            rounds[-1].setdefault("first_migrate", wall)
        elif "all channel migrated, success" in text:
            rounds[-1]["switched"] = wall
    for r in rounds:
        if "first_migrate" in r and "switched" in r:
            r["client_switch_s"] = r["switched"] - r["first_migrate"]
    return rounds


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sessions(served) -> list:
    return served.get("/sessions")["sessions"]


def all_ports_connected(served) -> bool:
    found = sessions(served)
    return bool(found) and all(p["connected"] for p in found[0]["ports"])


def holds_no_session(served) -> bool:
    return not sessions(served)


def qemu_migration_over(vm: QemuSpice, status: dict) -> bool:
    """Polls query-migrate into ``status``; true once the migration has ended either way."""
    status.update(vm.qmp_command("query-migrate"))
    return status.get("status") in ("completed", "failed", "cancelled")


def bench_spicewire(rounds: int, nservers: int, tmp: pathlib.Path) -> dict:
    args = ("--disable-ticketing", "--port-channel", f"{PORT_NAME}=echo")
    dirs = [tmp / f"s{i}" for i in range(nservers)]
    for d in dirs:
        d.mkdir()
    servers = [Served(d, *args) for d in dirs]
    reports = []
    try:
        driver = start_driver(servers[0].address[1], no_port=True, hold=600, timeout=20, trace_spice=True)
        with driver:
            if not wait_for(lambda: all_ports_connected(servers[0]), 20):
                raise RuntimeError("spice-gtk did not link to s1")
            time.sleep(0.5)
            for n in range(rounds):
                src, dst = servers[n % nservers], servers[(n + 1) % nservers]
                if not wait_for(functools.partial(holds_no_session, dst), LINGER):
                    raise RuntimeError("the destination still holds the session")
                body = {"to": f"127.0.0.1:{dst.address[1]}", "to_control": f"127.0.0.1:{dst.control[1]}",
                        "mode": "seamless", "timeout": 10, "to_token": TOKEN}
                sent = time.time()
                report = src.request("POST", "/migrate", body, timeout=40)
                report["posted_wall"] = sent
                reports.append(report)
                if report["migrated"] != 1:
                    raise RuntimeError(f"migration {n} failed: {report}")
                time.sleep(0.3)
            driver.terminate()
            rep = driver.report()
    finally:
        for served in servers:
            served.stop()
    client = checked_rounds(rep, rounds)
    entries = [r["sessions"][0] for r in reports]
    return {
        "spice_gtk": rep.get("spice_gtk_version"),
        "rounds": rounds,
        "servers": nservers,
        "report_downtime_s": median(e["downtime_s"] for e in entries),
        "report_pre_migration_s": median(e["pre_migration_s"] for e in entries),
        "report_total_s": median(e["total_s"] for e in entries),
        "client_switch_s": median(c.get("client_switch_s") for c in client),
        "post_connect_to_switched_s": median(c["switched"] - c["connected"] for c in client),
        "post_to_switched_s": median(c["switched"] - r["posted_wall"] for c, r in zip(client, reports, strict=True)),
        "report_downtime_s_all": [e["downtime_s"] for e in entries],
    }


def bench_qemu(rounds: int) -> dict:
    bios = echo_bios.build()
    opts = "seamless-migration=on"
    ports = [SpicePort(PORT_NAME, "isa")]
    lifetime = 60 + rounds * 20
    current = QemuSpice(ports=ports, bios=bios, spice_opts=opts, lifetime=lifetime).start()
    figures = []
    driver = None
    try:
        driver = start_driver(current.spice_port, no_port=True, hold=600, timeout=20, trace_spice=True)
        time.sleep(2.0)  # link every channel
        for n in range(rounds):
            incoming = free_port()
            nxt = QemuSpice(ports=ports, bios=bios, spice_opts=opts, lifetime=lifetime,
                            extra_args=["-incoming", f"tcp:127.0.0.1:{incoming}"]).start()
            current.qmp_command("client_migrate_info", protocol="spice", hostname="127.0.0.1",
                                port=nxt.spice_port)
            time.sleep(1.0)  # pre-migration: spice-gtk links every channel to s2
            migrate_wall = time.time()
            current.qmp_command("migrate", uri=f"tcp:127.0.0.1:{incoming}")
            status: dict = {}
            wait_for(functools.partial(qemu_migration_over, current, status), 30)
            if status.get("status") != "completed":
                raise RuntimeError(f"QEMU migration {n}: {status}")
            # The first two rounds wait for SPICE_MIGRATE_COMPLETED (up to spice-server's 10 s).
            completed = None
            deadline = time.monotonic() + (LINGER if n < 2 else 0.5)
            while completed is None and time.monotonic() < deadline:
                for event in current.qmp.poll_events(wait=0.1):
                    if event.get("event") == "SPICE_MIGRATE_COMPLETED":
                        ts = event["timestamp"]
                        completed = ts["seconds"] + ts["microseconds"] / 1e6
            figures.append({"migrate_wall": migrate_wall, "vm_downtime_s": status.get("downtime", 0) / 1000,
                            "completed_event_after_s": None if completed is None else completed - migrate_wall})
            time.sleep(0.3)
            current.stop()
            current.cleanup()
            current = nxt
        driver.terminate()
        rep = driver.report()
    finally:
        if driver is not None:
            driver.kill()
        current.stop()
        current.cleanup()
    client = checked_rounds(rep, rounds)
    return {
        "rounds": rounds,
        "client_switch_s": median(c.get("client_switch_s") for c in client),
        "post_connect_to_switched_s": median(
            c["switched"] - f["migrate_wall"] for c, f in zip(client, figures, strict=True)
        ),
        "vm_downtime_s": median(f["vm_downtime_s"] for f in figures),
        "completed_event_after_s_first_rounds": [f["completed_event_after_s"] for f in figures[:2]],
        "client_switch_s_all": [round(c.get("client_switch_s", -1), 6) for c in client],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--servers", type=int, default=2, help="spicewire servers the session rotates through")
    p.add_argument("--skip-qemu", action="store_true")
    args = p.parse_args()
    if not peers.have_spicegtk():
        print(json.dumps({"error": peers.why_missing("spicegtk")}))
        return 2
    out = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="sw-bench-") as tmp:
        out["spicewire"] = bench_spicewire(args.rounds, args.servers, pathlib.Path(tmp))
    if args.skip_qemu:
        out["qemu"] = None
    elif not peers.have_qemu():
        out["qemu"] = {"error": peers.why_missing("qemu")}
    else:
        out["qemu"] = bench_qemu(args.rounds)
    out["medians"] = {
        "spicewire_report_downtime_s": out["spicewire"]["report_downtime_s"],
        "spicewire_client_switch_s": out["spicewire"]["client_switch_s"],
        "spicewire_post_connect_to_switched_s": out["spicewire"]["post_connect_to_switched_s"],
        "qemu_client_switch_s": (out["qemu"] or {}).get("client_switch_s"),
        "qemu_post_connect_to_switched_s": (out["qemu"] or {}).get("post_connect_to_switched_s"),
        "qemu_vm_downtime_s": (out["qemu"] or {}).get("vm_downtime_s"),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
