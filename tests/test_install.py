"""Installing without a C compiler, or without Cython, still works: the pure-Python codec takes over.

Each case installs a copy of the source tree (the package files only, no built extension and no
`build/` directory, whose up-to-date objects would be reused instead of compiled) into a fresh
virtualenv that does not see the system's or this venv's packages. pip reads its usual index
configuration, so the build requirements and numpy come from the local wheel cache or PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WARNING = "WARNING: spicewire:"
CHECK = "from spicewire import codec; print(codec.BACKEND)"

pytestmark = pytest.mark.slow


def run(*argv: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, timeout=300,
    )
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout[-4000:]}"
    return done.stdout


@pytest.fixture
def source(tmp_path: Path) -> Path:
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        ROOT / "spicewire", tree / "spicewire",
        ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"),
    )
    return tree


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh venv with numpy (the codec's one dependency) and what setup.py imports, but no Cython."""
    home = tmp_path / "venv"
    run(sys.executable, "-m", "venv", home)
    python = home / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "setuptools>=77", "wheel", "numpy>=1.24")
    return python


def install(python: Path, source: Path, *options: str, cc: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPICEWIRE_PURE")}
    if cc is not None:
        env["CC"] = cc
    # -v: pip shows the build backend's output, where setup.py's warning goes. --no-deps: the codec
    # needs numpy only, and the server's dependencies would make this test slow for nothing.
    return run(python, "-m", "pip", "install", "-v", "--no-deps", *options, source, env=env)


def backend(python: Path, cwd: Path) -> str:
    # Run from outside the repository, so `spicewire` is the installed copy, not ./spicewire.
    return run(python, "-c", CHECK, cwd=cwd).strip()


def warnings_in(log: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if line.strip().startswith(WARNING)]


def test_no_c_compiler_installs_the_pure_codec(venv: Path, source: Path, tmp_path: Path) -> None:
    """The user's path: pip builds in isolation (it installs Cython there) and the compiler fails."""
    log = install(venv, source, cc="false")
    warnings = warnings_in(log)
    assert len(warnings) == 1 and "cannot build spicewire._codec" in warnings[0], log[-4000:]
    assert backend(venv, tmp_path) == "python"


def test_no_cython_installs_the_pure_codec(venv: Path, source: Path, tmp_path: Path) -> None:
    log = install(venv, source, "--no-build-isolation")
    warnings = warnings_in(log)
    assert len(warnings) == 1 and "Cython is not installed" in warnings[0], log[-4000:]
    assert backend(venv, tmp_path) == "python"
