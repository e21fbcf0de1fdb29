"""remote-viewer (virt-viewer's SPICE client, what SPICE users run) under Xvfb, seen through
screenshots.

    from tests.peers import remote_viewer as rv
    rv.require()                                  # skip without remote-viewer, Xvfb or Pillow's XCB
                                                  # grab; fail instead when CI == "true"
    with rv.Xvfb(log_dir) as x, rv.RemoteViewer(port, x.display, log_dir):
        shot = x.screenshot()                     # (H, W, 3) uint8 RGB of the whole X screen
        where = rv.locate(shot, framebuffer)      # (x, y, share of equal pixels) of the picture

No window manager runs: remote-viewer's window sits at the top left with its own (client-side)
title bar, and shows the SPICE picture unscaled below it while it fits the screen (Xvfb's is
1280x1024).  Both processes run under coreutils ``timeout`` so they end on their own even if a
test leaks them; ``stop()`` kills each one's process group (its own session, made at start).
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import subprocess
import time

import numpy as np

SCREEN = (1280, 1024)


@functools.cache
def why_missing() -> str:
    """Empty when remote-viewer can be run and screenshot here, else the reason."""
    for exe, package in (("remote-viewer", "virt-viewer"), ("Xvfb", "xvfb"), ("timeout", "coreutils")):
        if shutil.which(exe) is None:
            return f"{exe} not found (Debian package {package})"
    from PIL import features

    if not features.check("xcb"):
        return "Pillow was built without XCB: ImageGrab cannot read an X screen"
    return ""


def require() -> None:
    """Skip the calling test when remote-viewer is unusable; fail instead when CI == "true"."""
    import pytest

    reason = why_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"remote-viewer required in CI: {reason}", pytrace=False)
        pytest.skip(f"remote-viewer unavailable: {reason}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # timeout and the program under it
    proc.wait(timeout=10)


class Xvfb:
    """A virtual X server on the first free display number (Xvfb picks it: ``-displayfd``)."""

    def __init__(self, log_dir, lifetime: float = 300.0, start_timeout: float = 15.0) -> None:
        read, write = os.pipe()
        try:
            with open(log_dir / "xvfb.log", "wb") as log:
                self.proc = subprocess.Popen(
                    ["timeout", "--signal=KILL", str(int(lifetime)), "Xvfb", "-displayfd", str(write),
                     "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp", "-noreset"],
                    pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            os.close(write)
            write = -1
            number = b""
            deadline = time.monotonic() + start_timeout
            while not number.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read], [], [], left)[0]:
                    raise RuntimeError(f"Xvfb named no display within {start_timeout} s")
                chunk = os.read(read, 64)
                if not chunk:
                    raise RuntimeError(f"Xvfb exited: {(log_dir / 'xvfb.log').read_text(errors='replace')}")
                number += chunk
        except BaseException:
            if hasattr(self, "proc"):
                _stop(self.proc)
            raise
        finally:
            os.close(read)
            if write >= 0:
                os.close(write)
        self.display = f":{int(number)}"

    def screenshot(self) -> np.ndarray:
        from PIL import ImageGrab

        return np.asarray(ImageGrab.grab(xdisplay=self.display).convert("RGB"))

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RemoteViewer:
    """``remote-viewer spice://HOST:PORT`` on an X display; its output goes to remote-viewer.log."""

    def __init__(self, port: int, display: str, log_dir, host: str = "127.0.0.1", lifetime: float = 300.0) -> None:
        env = dict(os.environ, DISPLAY=display, GDK_BACKEND="x11", NO_AT_BRIDGE="1", GSETTINGS_BACKEND="memory",
                   GIO_USE_VFS="local")
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "WAYLAND_DISPLAY"):
            env.pop(key, None)
        self.log_path = log_dir / "remote-viewer.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["timeout", "--signal=KILL", str(int(lifetime)), "remote-viewer", f"spice://{host}:{port}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        _stop(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def rgb_of(framebuffer: np.ndarray) -> np.ndarray:
    """A B, G, R, X framebuffer as an RGB image array."""
    return np.ascontiguousarray(framebuffer[:, :, 2::-1])


def locate(shot: np.ndarray, picture: np.ndarray, max_x: int = 64, max_y: int = 200,
           rows: np.ndarray | None = None) -> tuple[int, int, float]:
    """Where ``picture`` (RGB, h x w x 3) appears in ``shot`` with its top left within ``max_x`` x
    ``max_y``: ``(x, y, share)``, share being the fraction of equal pixels there (compared on the
    ``rows`` given, a boolean mask over the picture's rows, or all). The search compares every
    eighth row and column and stops at a perfect match; the share returned is over every pixel."""
    h, w = picture.shape[:2]
    use = np.ones(h, dtype=bool) if rows is None else rows
    sample = picture[::8, ::8][use[::8]]
    best = (0, 0, -1.0)
    for y in range(min(max_y, shot.shape[0] - h) + 1):
        for x in range(min(max_x, shot.shape[1] - w) + 1):
            part = shot[y:y + h:8, x:x + w:8][use[::8]]
            share = float((part == sample).all(axis=2).mean())
            if share > best[2]:
                best = (x, y, share)
        if best[2] == 1.0:
            break
    x, y, _ = best
    full = (shot[y:y + h, x:x + w][use] == picture[use]).all(axis=2).mean()
    return x, y, float(full)
