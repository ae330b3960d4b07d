"""Which engine for how many GPUs: communication per step and memory per GPU, on paper.

An estimate, not a measurement: it counts the bytes each engine moves per optimizer step for
a model's real parameter layout (read from its transformers config on the meta device, no
weights), divides by stated link bandwidths and compares with the step's compute. Every
assumption is a flag and is written into the results row.

    python benchmarks/scaling.py [--tokens-per-gpu 6144 --mfu 0.35 --intra-gbps 400 --inter-gbps 45]

The engines, as dpolab runs them under torchrun (train.distributed):
    ddp     every parameter replicated; gradients all-reduced in buckets during backward.
            Ring all-reduce of S bytes over N ranks: 2 (N-1)/N S per rank.
    fsdp2   every parameter sharded (fully_shard): each decoder layer one unit, the rest
            (embeddings, final norm, head) the root unit; each unit's parameters all-gathered
            for forward and again for backward, its gradients reduce-scattered: 3 (N-1)/N S.
Collective time = bytes per rank / bus bandwidth (the nccl-tests definition). On 2 nodes the
slowest link, the inter-node one, sets the bus bandwidth of a ring over all 16 ranks.
Memory per GPU counts weights, gradients and AdamW's two moments in float32 (16 bytes per
parameter, divided by N under fsdp2) plus, for fsdp2, what is gathered in flight: the root
unit (gathered through the whole pair forward and again through its backward) and two
layers, weights and their unsharded gradients before the reduce-scatter; activations are
left out (they depend on the tokens per GPU, not on the engine).
Appends one JSON line per (model, layout, engine) to benchmarks/results/scaling.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.jsonl"
GIB = 1024 ** 3


def qwen7b_shape_config():
    """Qwen2.5-7B's shape: hidden 3584, 28 layers, 28 query / 4 key-value heads, MLP 18944,
    vocab 152064, untied head: about 7.6B parameters."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False)


def layout(config) -> dict[str, int]:
    """Parameter counts: total, inside decoder layers (sharded by fsdp2), largest layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.models import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight counts once
    layers = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    return {"params": total, "layer_params": sum(layers), "largest_layer": max(layers)}


def estimate(shape: dict[str, int], *, engine: str, gpus: int, nodes: int, a) -> dict:
    n, P, L = gpus * nodes, shape["params"], shape["layer_params"]
    ring = (n - 1) / n
    grad_bytes = 4  # float32 gradients (fp32 master weights, bf16 autocast)
    gather_bytes = 4  # fsdp2 gathers the float32 parameters it shards
    busbw = (a.intra_gbps if nodes == 1 else a.inter_gbps) * 1e9
    if engine == "ddp":
        per_rank = 2 * ring * P * grad_bytes
        memory = 16 * P
    else:
        root = P - L  # embeddings, final norm, head: the root unit
        per_rank = 3 * ring * P * gather_bytes
        in_flight = root + 2 * shape["largest_layer"]
        memory = 16 * P / n + in_flight * (gather_bytes + grad_bytes)
    comm_s = per_rank / busbw if n > 1 else 0.0
    compute_s = 6 * P * a.tokens_per_gpu / (a.mfu * a.peak_tflops * 1e12)
    # Best case: communication hidden behind compute (bucketed all-reduce during backward,
    # prefetched all-gathers); worst case: none of it overlaps.
    best, worst = max(compute_s, comm_s), compute_s + comm_s
    return {"engine": engine, "gpus": n, "nodes": nodes,
            "comm_gib_per_rank": per_rank / GIB, "comm_s": comm_s, "compute_s": compute_s,
            "step_s_overlapped": best, "step_s_serial": worst,
            "efficiency_overlapped": compute_s / best, "efficiency_serial": compute_s / worst,
            "memory_gib_per_gpu_no_activations": memory / GIB,
            "fits_80gib_before_activations": memory / GIB < 78.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-gpu", type=int, default=8 * 768,
                   help="tokens processed per GPU per step (default: 8 pairs x 768, the qwen0.5b preset)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation")
    p.add_argument("--peak-tflops", type=float, default=800.0, help="dense bf16 peak per GPU (H100 SXM)")
    p.add_argument("--intra-gbps", type=float, default=400.0,
                   help="assumed NCCL bus bandwidth inside a node, GB/s (NVLink 4)")
    p.add_argument("--inter-gbps", type=float, default=45.0,
                   help="assumed NCCL bus bandwidth across nodes, GB/s per GPU (400 Gb/s NIC per GPU)")
    p.add_argument("--no-save", action="store_true", help="print only")
    a = p.parse_args(argv)
    from dpolab.tiny import qwen_shape_config

    models = {"qwen0.5b": qwen_shape_config(), "qwen7b": qwen7b_shape_config()}
    rows = []
    print(f"{'model':9s} {'layout':7s} {'engine':6s} {'GiB/rank':>9s} {'comm s':>8s} "
          f"{'compute s':>9s} {'eff. overlap':>12s} {'eff. serial':>11s} {'mem GiB/GPU':>11s} fits 80G")
    for name, config in models.items():
        shape = layout(config)
        for gpus, nodes in ((8, 1), (8, 2)):
            for engine in ("ddp", "fsdp2"):
                r = estimate(shape, engine=engine, gpus=gpus, nodes=nodes, a=a)
                r.update(model=name, **shape)
                rows.append(r)
                print(f"{name:9s} {f'{nodes}x{gpus}':7s} {engine:6s} {r['comm_gib_per_rank']:9.2f} "
                      f"{r['comm_s']:8.3f} {r['compute_s']:9.3f} {r['efficiency_overlapped']:12.2f} "
                      f"{r['efficiency_serial']:11.2f} {r['memory_gib_per_gpu_no_activations']:11.1f} "
                      f"{'yes' if r['fits_80gib_before_activations'] else 'no'}")
    if not a.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        assumptions = {k: v for k, v in vars(a).items() if k != "no_save"}
        with RESULTS.open("a") as f:
            for r in rows:
                f.write(json.dumps({"benchmark": "scaling", "kind": "estimate on paper",
                                    "assumptions": assumptions, **r,
                                    "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
