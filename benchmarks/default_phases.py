"""Where the embedded default run's wall time goes: `dpolab train` with timers on its phases.

    python benchmarks/default_phases.py --out DIR [section.key=value ...]

Runs the README's main job (the embedded default, or with the overrides given) in this process
and times, by wrapping them, the calls that make up a run: the session's assembly
(`session.build`: model, data, forward check, reference store, cached body states), each
evaluation (`Session.evaluate`: both splits at the start and the end, held-out in between), the
export with the DID probe (`Session.export_and_probe`) and inside it each prompt's sampling,
the checkpoints, the summary and the report. Training steps are the rest. The cache
($DPOLAB_CACHE) is used as it is: say in the notes whether it was warm.

Appends one JSON line to benchmarks/results/default_phases.jsonl: the machine, the load
average before and after, the total, and per phase the number of calls and their seconds.
The timers observe; they change nothing the run computes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "default_phases.jsonl"


def timed(owner, name: str, label: str, log: list) -> None:
    """Replace owner.name by a wrapper that appends (label, seconds) to `log` per call."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        t0 = time.monotonic()
        try:
            return inner(*args, **kwargs)
        finally:
            log.append((label, time.monotonic() - t0))

    setattr(owner, name, wrapper)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the run directory (must not exist)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for dpolab train")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dpolab.train
    from dpolab import checkpoint, did_probe, rundir, session
    from dpolab.cli import main as dpolab_main

    log: list[tuple[str, float]] = []
    timed(session, "build", "assembly (session.build)", log)
    timed(session.Session, "evaluate", "evaluations", log)
    timed(session.Session, "export_and_probe", "export + DID probe", log)
    timed(did_probe, "sample_completions", "  of which DID sampling", log)
    timed(session.Session, "export", "  of which export", log)
    timed(checkpoint, "save", "checkpoints", log)
    timed(rundir, "write_summary", "summary", log)
    timed(dpolab.train, "write_run_report", "report", log)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    rc = dpolab_main(["train", "--out", str(a.out), *a.overrides])
    total = time.monotonic() - t0
    if rc != 0:  # the run said why on stderr; a failed run times nothing worth keeping
        return rc
    phases: dict[str, list] = {}
    for label, seconds in log:
        entry = phases.setdefault(label, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    top = sum(s for label, (_, s) in phases.items() if not label.startswith("  "))
    phases["training steps and the rest"] = [None, total - top]
    print(f"\n{'phase':<32}{'calls':>6}{'seconds':>10}{'share':>8}")
    for label, (n, s) in phases.items():
        print(f"{label:<32}{'' if n is None else n:>6}{s:>10.1f}{s / total:>8.0%}")
    print(f"{'total':<32}{'':>6}{total:>10.1f}")
    row = {"benchmark": "default_phases", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                       "python": platform.python_version()},
           "overrides": a.overrides, "cache": os.environ.get("DPOLAB_CACHE", "~/.cache/dpolab"),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "exit": rc,
           "total_s": total, "phases": {k: {"calls": n, "seconds": s}
                                        for k, (n, s) in phases.items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
