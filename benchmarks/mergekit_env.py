"""Ensure a private virtual environment with mergekit, used as a black-box reference tool.

mergekit (LGPL) is only installed and run as a subprocess; no code of it is imported or copied here.
The environment lives at ``.venv-mergekit/`` in the repository root (git-ignored). torch is installed
first, pinned to the local CPU build, because mergekit's bare ``torch`` requirement would otherwise pull
several GB of CUDA wheels.

Usage::

    python benchmarks/mergekit_env.py          # install if missing, print the mergekit-yaml path

    from mergekit_env import mergekit_yaml
    exe = mergekit_yaml()                      # same, from Python
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_DIR = REPO_ROOT / ".venv-mergekit"
MERGEKIT_VERSION = os.environ.get("MERGEKIT_VERSION", "0.1.5")
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
_STAMP = VENV_DIR / f".installed-mergekit-{MERGEKIT_VERSION}"


def _bin(name: str, venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / name


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def _works(exe: Path) -> bool:
    if not exe.exists():
        return False
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    return proc.returncode == 0


def ensure(venv: Path = VENV_DIR, python: str = sys.executable, quiet: bool = True) -> tuple[Path, float]:
    """Install mergekit into ``venv`` if needed. Returns (path of mergekit-yaml, install seconds).

    The install time is 0.0 when a working install was already present.
    """
    stamp = venv / _STAMP.name
    exe = _bin("mergekit-yaml", venv)
    if stamp.exists() and _works(exe):
        return exe, 0.0
    t0 = time.perf_counter()
    if not _bin("python", venv).exists():
        _run([python, "-m", "venv", str(venv)])
    pip = [str(_bin("python", venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        pip.append("-q")
    # torch first: pinned to the CPU build so that mergekit's dependency is already satisfied.
    _run([*pip, f"torch=={TORCH_VERSION}"])
    _run([*pip, f"mergekit=={MERGEKIT_VERSION}", f"torch=={TORCH_VERSION}"])
    if not _works(exe):
        raise RuntimeError(f"{exe} --help failed after installing mergekit=={MERGEKIT_VERSION}")
    elapsed = time.perf_counter() - t0
    stamp.write_text(f"mergekit=={MERGEKIT_VERSION} torch=={TORCH_VERSION} install_s={elapsed:.1f}\n")
    return exe, elapsed


def mergekit_yaml() -> Path:
    """Path of a working ``mergekit-yaml`` executable, installing mergekit first if needed."""
    return ensure()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=VENV_DIR, help="virtual environment folder")
    ap.add_argument("--verbose", action="store_true", help="show pip output")
    args = ap.parse_args()
    exe, elapsed = ensure(args.venv, quiet=not args.verbose)
    if elapsed:
        print(f"installed mergekit=={MERGEKIT_VERSION} in {elapsed:.1f} s", file=sys.stderr)
    else:
        print("mergekit already installed", file=sys.stderr)
    print(exe)


if __name__ == "__main__":
    main()
