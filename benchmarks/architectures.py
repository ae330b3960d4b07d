"""Per architecture: the pair forward dpolab's check picks, and how far each forward's
log-probs are from the model's own per-sequence forward.

    .venv/bin/python benchmarks/architectures.py [ARCH ...] > benchmarks/results/architectures.txt

For every tiny random model of dpolab.tiny (every architecture of dpolab.tiny_archs plus the
four original families), float32 on the CPU: dpolab.forward_check.choose on 6 pairs of random
tokens (prompt 1-9, completions 1-12 tokens), then every forward of dpolab.policy.FORWARDS on
those pairs against `model(ids).logits` of each sequence alone (log-softmax, float32): the max
|delta log-prob| over all completion tokens, and how far the rejected log-probs move when only
the chosen tokens change. The chosen forward's delta is what training would see.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
import warnings

import torch

from dpolab import forward_check, moe, tiny, tiny_archs
from dpolab.models import body_and_head
from dpolab.policy import FORWARDS, make_forward
from dpolab.tokenize import PairExample


def pairs(seed: int = 0) -> list[PairExample]:
    g = torch.Generator().manual_seed(seed)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    shapes = [(5, 3, 4), (2, 6, 1), (7, 9, 2), (1, 1, 1), (9, 12, 11), (4, 7, 7)]
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x") for i, (p, c, r) in enumerate(shapes)]


def row(arch: str) -> list[str]:
    model = tiny.tiny_model(vocab_size=512, hidden_size=32 if arch in tiny_archs.ARCHITECTURES
                            else 64, arch=arch).eval()
    ex = pairs()
    t0 = time.perf_counter()
    try:
        choice = forward_check.choose("auto", model, ex, pad_id=2, device=torch.device("cpu"))
    except Exception as err:  # a refusal is a result too
        return [arch, type(model).__name__, "refused", f"{err}"[:60], "", "", "", ""]
    check_s = time.perf_counter() - t0
    body, head = body_and_head(model)
    ref = forward_check.own_logps(model, ex, torch.device("cpu"))
    cells, deltas = [], {}
    kw = dict(pad_id=2, chunk_size=64, device=torch.device("cpu"), autocast=False,
              dtype=torch.float32)
    with torch.no_grad():
        for name in FORWARDS:
            fwd = make_forward(name, body, head, **kw)
            try:
                a = fwd(ex)
                n_c = int(a.counts()[0].sum())
                b = fwd(forward_check.perturbed(ex, head.weight.shape[0])).tokens
                deltas[name] = float((a.tokens - ref).abs().max())
                cells.append(f"{deltas[name]:.1e}/{(a.tokens[n_c:] - b[n_c:]).abs().max():.0e}")
            except Exception as err:  # any failure is this layout's cell
                cells.append(f"error ({type(err).__name__})")
    router = moe.router_loss(model, None, scope="full")
    transform = (f"scale {head.scale:g}" if head.scale != 1 else "") + (
        f" softcap {head.softcap:g}" if head.softcap else "")
    return [arch, type(model).__name__, choice.name, f"{deltas[choice.name]:.1e}", *cells,
            transform.strip() or "-", f"{router.coef:g}" if router else "-",
            f"{check_s:.2f}"]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return f"{platform.machine()} CPU"


def main(argv: list[str]) -> None:
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    archs = argv or list(tiny.ARCHS) + list(tiny_archs.ARCHITECTURES)
    header = ["arch", "class", "forward", "max|d|", *[f"{n} d/moved" for n in FORWARDS],
              "head", "router coef", "check s"]
    rows = [row(a) for a in archs]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"# dpolab architecture table: {_cpu()}, {os.cpu_count()} cores, 1 torch thread; "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("# forward: what dpolab.forward_check picks (auto) on the 6 pairs; max|d|: that "
          "forward's max |log-prob - the model's own log-prob of each sequence alone| (float32)")
    print("# X d/moved: that forward's max |d|, and the max move of rejected log-probs when "
          "only the chosen tokens change")
    print("# head: the logit transform dpolab's head reproduces; router coef: the MoE "
          "load-balancing weight trained (dpolab.moe); check s: the check's wall time")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), flush=True)
    import importlib.util

    kernels = {k: importlib.util.find_spec(k) is not None
               for k in ("mamba_ssm", "causal_conv1d", "fla")}
    print(f"# fused kernels installed: {kernels}; state-space, convolution and linear-attention "
          "layers ran transformers' PyTorch fallbacks where False")


if __name__ == "__main__":
    main(sys.argv[1:])
