"""Real SPICE peers for interoperability tests: spice-gtk (client), QEMU spice-server, tshark.

Probes (cached, cheap after the first call)::

    have_spicegtk() -> bool    # /usr/bin/python3 can import SpiceClientGLib 2.0 + load the .so
    have_qemu() -> bool        # qemu-system-x86_64 exists and lists the spiceport chardev
    have_tshark() -> bool      # tshark exists and knows the "spice" dissector
    why_missing(peer) -> str   # reason text for a peer, "" if available
    require(peer)              # peer in {"spicegtk", "qemu", "tshark"}: pytest.skip with the reason,
                               # but pytest.fail when CI == "true" (CI must have every peer)

Import as ``from tests import peers`` (or ``from . import peers`` in tests/).
Modules: ``peers.spicegtk`` (run the driver), ``peers.qemu`` (QEMU + QMP), ``peers.tshark``
(capture/decode), ``peers.echo_bios`` (guest-less echo BIOS image), and the standalone driver
script ``peers/spicegtk_driver.py`` (runs under /usr/bin/python3, not the venv).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

SYSTEM_PYTHON = os.environ.get("SPICEWIRE_SYSTEM_PYTHON", "/usr/bin/python3")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spicegtk_driver.py")

_PROBE_SPICEGTK = (
    "import ctypes, gi; gi.require_version('SpiceClientGLib', '2.0');"
    "from gi.repository import SpiceClientGLib as S;"
    "ctypes.CDLL('libspice-client-glib-2.0.so.8').spice_port_channel_write_async;"
    "print(S.util_get_version_string())"
)


def _run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None


@functools.cache
def why_missing(peer: str) -> str:
    """Empty string if ``peer`` is usable here, else a human-readable reason."""
    if peer == "spicegtk":
        if not os.path.exists(SYSTEM_PYTHON):
            return f"{SYSTEM_PYTHON} not found (spice-gtk is driven through Debian's python3-gi)"
        r = _run([SYSTEM_PYTHON, "-c", _PROBE_SPICEGTK])
        if r is None or r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1] if r else "probe failed to run"
            return ("spice-gtk not usable from /usr/bin/python3 (need Debian packages python3-gi "
                    f"gir1.2-spiceclientglib-2.0): {err}")
        return ""
    if peer == "qemu":
        exe = shutil.which("qemu-system-x86_64")
        if exe is None:
            return "qemu-system-x86_64 not found (Debian package qemu-system-x86)"
        if shutil.which("timeout") is None:
            return "coreutils timeout not found (used to bound QEMU's lifetime)"
        # spiceport lives in a loadable module (chardev-spice.so) that `-chardev help` does not
        # list: start a machine-less QEMU with SPICE on a unix socket and quit it via QMP stdin.
        import tempfile
        with tempfile.TemporaryDirectory(prefix="sw-qprobe-") as d:
            try:
                r = subprocess.run(
                    ["timeout", "--signal=KILL", "15", exe, "-machine", "none", "-nodefaults",
                     "-no-user-config", "-display", "none", "-S",
                     "-spice", f"unix=on,addr={d}/s.sock,disable-ticketing=on",
                     "-chardev", "spiceport,id=p,name=probe", "-qmp", "stdio"],
                    input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                    capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"qemu-system-x86_64 SPICE probe failed: {exc}"
        if r.returncode != 0 or '"return"' not in r.stdout:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"qemu-system-x86_64 cannot run -spice with a spiceport chardev: {err}"
        return ""
    if peer == "tshark":
        exe = shutil.which("tshark")
        if exe is None:
            return "tshark not found (Debian package tshark)"
        r = _run([exe, "-G", "protocols"], timeout=60)
        if r is None or r.returncode != 0:
            return "tshark -G protocols failed"
        if not any(line.split("\t")[2:3] == ["spice"] for line in r.stdout.splitlines()):
            return "tshark has no SPICE dissector"
        r = _run([exe, "-D"])
        if r is None or r.returncode != 0 or ". lo" not in r.stdout:
            return ("tshark cannot capture on loopback 'lo' (needs root or CAP_NET_RAW/"
                    f"wireshark group): {r.stderr.strip() if r else 'probe failed'}")
        return ""
    raise ValueError(f"unknown peer {peer!r}")


def have_spicegtk() -> bool:
    return why_missing("spicegtk") == ""


def have_qemu() -> bool:
    return why_missing("qemu") == ""


def have_tshark() -> bool:
    return why_missing("tshark") == ""


def require(*peers: str) -> None:
    """Skip the calling test when a peer is missing; fail instead when CI == "true"."""
    import pytest

    for peer in peers:
        reason = why_missing(peer)
        if reason:
            if os.environ.get("CI") == "true":
                pytest.fail(f"peer {peer} required in CI: {reason}", pytrace=False)
            pytest.skip(f"peer {peer} unavailable: {reason}")
