"""`dpolab bench NAME [args]`: run `benchmarks/NAME.py` of the source checkout.

Benchmarks are scripts beside the package, not part of it (they compare dpolab with other
systems and write results files); this command finds and runs them with the same Python.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dpolab.errors import UserError

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def cli_main(argv: list[str]) -> int:
    names = available()
    if not BENCH_DIR.is_dir():
        raise UserError(f"{BENCH_DIR}: no benchmarks folder; benchmarks run from a source "
                        "checkout (pip install -e .)")
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: dpolab bench {{{','.join(names)}}} [options]")
        return 0
    if argv[0] not in names:
        raise UserError(f"unknown benchmark {argv[0]!r}; valid: {', '.join(names)}")
    return subprocess.call([sys.executable, str(BENCH_DIR / f"{argv[0]}.py"), *argv[1:]])
