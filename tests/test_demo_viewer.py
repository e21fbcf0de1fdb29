"""``spicewire demo --viewer``: remote-viewer on a paint session that migrates back and forth while
it is watched (under Xvfb here), and a clear refusal where there is nothing to show it on."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.peers import remote_viewer as rv


def test_the_viewer_demo_without_a_display_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run([sys.executable, "-m", "spicewire", "demo", "--viewer"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "needs remote-viewer (virt-viewer) and a display" in done.stderr


def test_the_viewer_demo_migrates_a_watched_session_back_and_forth(tmp_path):
    rv.require()
    with rv.Xvfb(tmp_path) as x:
        done = subprocess.run(
            [sys.executable, "-m", "spicewire", "demo", "--viewer", "--rounds", "3", "--interval", "1"],
            env={**os.environ, "DISPLAY": x.display}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if " -> " in line]
    assert [line.split(":")[0] for line in lines] == ["s1 -> s2", "s2 -> s1", "s1 -> s2"], done.stdout
    assert all("migrated" in line for line in lines), done.stdout
    assert "seamless" in lines[0] and "semi-seamless" in lines[1]
