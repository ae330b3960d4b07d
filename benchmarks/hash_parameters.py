"""The reference store's weight key (dpolab.reference.hash_parameters): each tensor's bytes
read in place through a memoryview, against the copy each took with .tobytes() before.

A random float32 model of --params parameters in tensors of --tensor-params each (seeded),
hashed by both in their own child process so each peak RSS is its own:
    python benchmarks/hash_parameters.py [--params 500_000_000 --tensor-params 25_000_000]
Both must give the same key. Appends one JSON line to benchmarks/results/hash_parameters.jsonl
with the machine named.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "hash_parameters.jsonl"


def copying_hash(model) -> str:
    """The key as it was computed before: every tensor's bytes copied out with .tobytes()."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def run_one(way: str, a: argparse.Namespace) -> dict:
    """In the child: build the model, hash it once, report seconds and peak RSS."""
    import torch

    from dpolab.reference import hash_parameters

    g = torch.Generator().manual_seed(0)
    model = torch.nn.ParameterList(
        torch.nn.Parameter(torch.randn(a.tensor_params, generator=g), requires_grad=False)
        for _ in range(a.params // a.tensor_params))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    key = hash_parameters(model) if way == "memoryview" else copying_hash(model)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"way": way, "key": key, "seconds": seconds, "peak_rss_mib": peak / 1024,
            "extra_rss_mib": (peak - base) / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=500_000_000)
    p.add_argument("--tensor-params", type=int, default=25_000_000)
    p.add_argument("--child", choices=("copy", "memoryview"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a)))
        return 0
    rows = {}
    for way in ("copy", "memoryview"):
        out = subprocess.run([sys.executable, __file__, "--child", way, "--params", str(a.params),
                              "--tensor-params", str(a.tensor_params)],
                             capture_output=True, text=True, check=True)
        rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
        print(way, rows[way])
    if rows["copy"]["key"] != rows["memoryview"]["key"]:
        print("the two keys differ", file=sys.stderr)
        return 1
    row = {"benchmark": "hash_parameters",
           "machine": f"vm {platform.machine()} {os.cpu_count()} threads, CPU",
           "config": {"params": a.params, "tensor_params": a.tensor_params, "dtype": "float32"},
           **rows, "speed_ratio": rows["copy"]["seconds"] / rows["memoryview"]["seconds"],
           "date": datetime.date.today().isoformat()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"copy {rows['copy']['seconds']:.2f} s (+{rows['copy']['extra_rss_mib']:.0f} MiB), "
          f"memoryview {rows['memoryview']['seconds']:.2f} s "
          f"(+{rows['memoryview']['extra_rss_mib']:.0f} MiB), same key")
    return 0


if __name__ == "__main__":
    sys.exit(main())
