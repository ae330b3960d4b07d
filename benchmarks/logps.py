"""Chunked completion log-probs vs the naive (B, T, V) float32 logits path: speed and peak memory.

Each path runs forward + backward in its own child process so the peak RSS belongs to it alone.
    python benchmarks/logps.py [--batch 8 --seq 512 --vocab 49152 --hidden 576 --chunk 1024]
Appends one JSON line per run to benchmarks/results/logps.jsonl with the machine named.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "logps.jsonl"


def run_one(path: str, a: argparse.Namespace) -> dict:
    """Runs in the child: build inputs, time `repeats` forward+backward passes."""
    import torch

    from dpolab.logps import Head, completion_logps, naive_completion_logps

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.batch, a.seq, a.hidden, generator=g).requires_grad_()
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    mask = torch.zeros(a.batch, a.seq, dtype=torch.bool)
    mask[:, a.seq - int(a.seq * a.completion_fraction):] = True  # completion = the tail
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(a.repeats + 1):  # the first pass is warm-up
        t0 = time.perf_counter()
        if path == "chunked":
            out = completion_logps(hidden, Head(weight), labels, mask, chunk_size=a.chunk)
        else:
            out = naive_completion_logps(hidden, Head(weight), labels, mask)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
        hidden.grad = weight.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": path, "seconds": statistics.median(times[1:]),
            "peak_rss_mib": peak / 1024, "extra_rss_mib": (peak - base_rss) / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--completion-fraction", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a)))
        return 0
    rows = {}
    for path in ("naive", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", path, *sys.argv[1:]],
                             capture_output=True, text=True, check=True)
        rows[path] = json.loads(out.stdout.strip().splitlines()[-1])
        r = rows[path]
        print(f"{path:8s} {r['seconds']*1000:9.1f} ms/fwd+bwd   peak RSS {r['peak_rss_mib']:8.0f} MiB"
              f"   (+{r['extra_rss_mib']:.0f} MiB over inputs)")
    speed = rows["naive"]["seconds"] / rows["chunked"]["seconds"]
    mem = rows["chunked"]["extra_rss_mib"] / max(rows["naive"]["extra_rss_mib"], 1e-9)
    print(f"chunked vs naive: {speed:.2f}x speed, {mem:.3f}x extra memory")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"benchmark": "logps", "machine": f"{platform.node()} {platform.processor() or platform.machine()}"
            f" {a.threads} threads, CPU", "config": {k: v for k, v in vars(a).items() if k != "child"},
            "naive": rows["naive"], "chunked": rows["chunked"], "speed_ratio": speed,
            "extra_memory_ratio": mem, "date": time.strftime("%Y-%m-%d")}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
