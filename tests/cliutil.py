"""Running the `clusterfs` command as a user would: a subprocess of this
interpreter, importing clusterfs from this checkout (conftest.py sets
PYTHONPATH), its output captured as text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m clusterfs.cli ARGS`, or `python -c CODE ARGS` for a rigged
    interpreter (CODE reads its arguments from sys.argv[1:])."""
    argv = ["-c", code, *args] if code is not None else ["-m", "clusterfs.cli", *args]
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
