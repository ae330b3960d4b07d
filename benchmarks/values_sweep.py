"""Wall-clock time of `dpolab reproduce values` (--quick and full) and where its figures are.

    python benchmarks/values_sweep.py [--out DIR] [--only quick|full]

Targets on 2 CPU cores: quick under 60 s, full under 10 minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dpolab.theory import values_report as VR

LIMITS_S = {"quick": 60.0, "full": 600.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/values_bench")
    parser.add_argument("--only", choices=sorted(LIMITS_S))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for name, cfg in (("quick", VR.QUICK), ("full", VR.FULL)):
        if args.only and name != args.only:
            continue
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        res = VR.run_and_write(cfg, out=out, seed=args.seed, target=0.05)
        wall = time.perf_counter() - start
        rows.append({"sweep": name, "wall_s": wall, "sweep_s": res["elapsed_s"],
                     "limit_s": LIMITS_S[name], "ok": wall < LIMITS_S[name],
                     "figures": ", ".join(str(p) for p in sorted(out.glob("*.png")))})
    VR.print_table(f"values sweep timing (torch threads: {torch.get_num_threads()})", rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
