"""Turn a pytest-benchmark JSON report into the ratio table the README shows.

Usage: python benchmarks/report.py bench-report.json
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import date


def load(path: str) -> dict[str, dict]:
    with open(path) as f:
        report = json.load(f)
    return {b["name"]: b for b in report["benchmarks"]}, report.get("machine_info", {})


def median(benches, name):
    bench = benches.get(name)
    return None if bench is None else bench["stats"]["median"]


def rows(benches):
    """(what, figure, target, ok) per goal; a missing benchmark gives no row."""
    out = []

    def add(what, value, fmt, target=None, ok=None):
        out.append((what, fmt.format(value), target or "", "" if ok is None else ("yes" if ok else "NO")))

    scan = median(benches, "test_scan_compiled")
    if scan:
        items = benches["test_scan_compiled"]["extra_info"]["items"]
        rate = items / scan / 1e6
        add("scan, compiled: M headers/s", rate, "{:.0f}", ">= 150", rate >= 150)
        for name, label, target in [
            ("test_scan_struct_loop", "scan vs struct.Struct loop", 80),
            ("test_scan_pure_twin", "scan vs pure-Python twin", None),
        ]:
            other = median(benches, name)
            if other:
                ratio = other / scan
                add(label, ratio, "{:.0f}x", f">= {target}x" if target else None, ratio >= target if target else None)
        limit = median(benches, "test_scan_memory_read_limit")
        if limit:
            add("scan vs one numpy read of the same bytes", limit / scan, "{:.2f}x")
    header = median(benches, "test_parse_header_compiled")
    if header:
        per_call = header / benches["test_parse_header_compiled"]["extra_info"]["items"] * 1e9
        add("parse_header, compiled: ns per call", per_call, "{:.1f}")
        other = median(benches, "test_parse_header_struct_unpack_from")
        if other:
            ratio = other / header
            add("parse_header vs struct.Struct.unpack_from", ratio, "{:.2f}x", ">= 1.5x", ratio >= 1.5)
        twin = median(benches, "test_parse_header_pure_twin")
        if twin:
            add("parse_header vs pure-Python twin", twin / header, "{:.2f}x")
    pack = median(benches, "test_pack_chunks_compiled")
    if pack:
        nbytes = benches["test_pack_chunks_compiled"]["extra_info"]["nbytes"]
        add("pack_chunks 1 GiB, compiled: GB/s", nbytes / pack / 1e9, "{:.1f}")
        copy = median(benches, "test_pack_single_numpy_copy_limit")
        if copy:
            ratio = copy / pack
            add("pack_chunks vs one numpy copy of 1 GiB", ratio, "{:.2f}x", ">= 0.8x", ratio >= 0.8)
        for name, label in [
            ("test_pack_numpy_copy_per_chunk", "numpy copy per chunk vs one numpy copy"),
            ("test_pack_chunks_pure_twin", "pure-Python twin vs one numpy copy"),
        ]:
            other = median(benches, name)
            if other and copy:
                add(label, copy / other, "{:.2f}x")
    unpack = median(benches, "test_unpack_chunks_compiled")
    if unpack:
        add("unpack_chunks of 16,384 chunks, compiled: ms", unpack * 1e3, "{:.2f}")
        twin = median(benches, "test_unpack_chunks_pure_twin")
        if twin:
            add("unpack_chunks vs pure-Python twin", twin / unpack, "{:.1f}x")
    for case in ("identical", "changed"):
        damage = median(benches, f"test_damage_{case}_compiled")
        if not damage:
            continue
        label = "identical frames" if case == "identical" else "8 tiles changed"
        add(f"damage_tiles 1920x1080, {label}, compiled: ms", damage * 1e3, "{:.2f}")
        equal = median(benches, f"test_damage_{case}_array_equal")
        if equal:
            ratio = equal / damage
            add(f"damage tracking 1920x1080 vs numpy array_equal, {label}", ratio, "{:.2f}x", ">= 0.5x", ratio >= 0.5)
        twin = median(benches, f"test_damage_{case}_pure_twin")
        if twin:
            add(f"damage_tiles 1920x1080 vs pure-Python twin, {label}", twin / damage, "{:.1f}x")
    return out


def main(path: str) -> int:
    benches, machine = load(path)
    cpu = machine.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown CPU"
    print(f"\nspicewire benchmarks, {date.today()}, {cpu}, {machine.get('python_version', '')}, medians\n")
    print("| measure | figure | goal | met |")
    print("|---|---|---|---|")
    table = rows(benches)
    for what, figure, target, ok in table:
        print(f"| {what} | {figure} | {target} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench-report.json"))
