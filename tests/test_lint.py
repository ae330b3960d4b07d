"""The linter (ruff, rules in pyproject.toml: pyflakes, bugbear, checked `noqa` markers)
finds nothing in the library, the tests and the benchmarks."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str] | None:
    beside = Path(sys.executable).with_name("ruff")  # the venv's, from the dev extra
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_finds_nothing():
    """`ruff check dpolab tests benchmarks` passes; its findings are the failure message."""
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    r = subprocess.run([*ruff, "check", "--no-cache", "dpolab", "tests", "benchmarks"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
