"""CHES: how alike a pair's two responses look to the reference model, before training.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization" (ICLR 2025), Definition 2 and their `ches/ches.py`. Notation, per pair:
h_{x,y<k} (D,) is the last layer's hidden state (the head's input, after the final norm: the
`hidden_states[-1]` of a Hugging Face model) at the position that predicts token k of
response y, i.e. the last prompt token for k = 1; the response's sum is
    S(y) = sum_{k=1}^{|y|} h_{x,y<k}                  (|y| states; the state after the
                                                       response's last token predicts nothing)
    CHES(x, y+, y-)    = <S(y+), S(y-)> - ||S(y+)||^2
    LN-CHES(x, y+, y-) = <S(y+), S(y-)> / (|y+| |y-|) - ||S(y+)||^2 / |y+|^2
The paper's Theorem 2 and its experiments: the higher a pair's CHES, the more DPO tends to
lower the chosen response's likelihood (displacement); LN-CHES is the variant they filter
data with (Section 6). Their `ches.py` sums exactly these |y| states; their per-example script
also adds the state after the last token, which is not the definition: we follow ches.py.

dpolab's pair forwards already return these states for the scored completion tokens
(`forward.hidden`), and under `last_layer` the cached body states are the same ones. In a
multi-turn completion only the scored tokens' states (the assistant's) enter S(y), the same
tokens whose log-probs make the displacement it predicts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor
# (examples) -> (h (N, D), labels (N,), seg (N,), n_tokens): a pair forward's `hidden`
States = Callable[[Sequence], tuple]


def ches(chosen_sum: Tensor, rejected_sum: Tensor, n_chosen: Tensor, n_rejected: Tensor
         ) -> tuple[Tensor, Tensor]:
    """(CHES (B,), LN-CHES (B,)) from the summed hidden states S(y+), S(y-) (B, D) and the
    response lengths |y+|, |y-| (B,) (see the module doc). Computed in float64."""
    cs, rs = chosen_sum.double(), rejected_sum.double()
    nc, nr = n_chosen.double(), n_rejected.double()
    cross = (cs * rs).sum(-1)   # (B,) <S(y+), S(y-)>
    own = (cs * cs).sum(-1)     # (B,) ||S(y+)||^2
    return cross - own, cross / (nc * nr) - own / nc ** 2


def response_sums(h: Tensor, seg: Tensor, n_seq: int) -> tuple[Tensor, Tensor]:
    """Per-sequence sums (n_seq, D) float64 of states h (N, D) whose sequence ids are seg (N,),
    and each sequence's count of states (n_seq,)."""
    sums = torch.zeros(n_seq, h.shape[-1], dtype=torch.float64, device=h.device)
    sums.index_add_(0, seg.to(h.device), h.double())
    return sums, torch.bincount(seg, minlength=n_seq).to(h.device)


def pair_ches(states: States, examples: Sequence, *, batch_size: int,
              map_batches: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CHES and LN-CHES (N,) float64 of every pair of `examples`, from `states` (a pair
    forward's `hidden` at the reference weights, or the cached body states, :func:`cached`).
    map_batches(fn, n) -> [fn(0), ...] (dpolab.distributed.Distributed.map_batches: under
    torchrun each rank a share); in order without it."""
    batches = [list(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]

    def run(i: int) -> tuple[Tensor, Tensor]:
        b = len(batches[i])
        h, _, seg, _ = states(batches[i])
        sums, counts = response_sums(h, seg, 2 * b)  # chosen sequences 0..b-1, rejected b..2b-1
        c, ln = ches(sums[:b], sums[b:], counts[:b], counts[b:])
        return c.cpu(), ln.cpu()

    with torch.no_grad():
        done = (map_batches(run, len(batches)) if map_batches is not None
                else [run(i) for i in range(len(batches))])
    if not done:
        return np.zeros(0), np.zeros(0)
    return (torch.cat([c for c, _ in done]).numpy(), torch.cat([ln for _, ln in done]).numpy())


def cached(head_states, split: str) -> States:
    """`States` read from the last_layer scope's cached body states (CachedHeadForward) of
    `split`: no body pass."""
    def states(batch: Sequence):
        hs, ys = head_states.responses(batch, split=split)
        seg = torch.cat([torch.full((h.shape[0],), j, dtype=torch.long) for j, h in enumerate(hs)])
        return torch.cat(hs), torch.cat(ys), seg, 0
    return states


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN with fewer than 3 pairs or a constant
    input."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def report(wheres: Sequence[str], groups: Sequence[str | None], scores: np.ndarray,
           ln_scores: np.ndarray, *, top: int = 20) -> dict:
    """CHES and LN-CHES over all pairs and per group (quantiles), and the `top` pairs of
    highest CHES: those the paper expects DPO to displace most (`dpolab inspect`)."""
    def q(v: np.ndarray) -> dict[str, float]:
        if not len(v):
            return {"n": 0}
        lo, med, hi = np.quantile(v, [0.1, 0.5, 0.9])
        return {"n": len(v), "p10": float(lo), "median": float(med), "p90": float(hi),
                "mean": float(np.mean(v))}
    names = np.array([g if g is not None else "(no group)" for g in groups], dtype=object)
    order = np.argsort(-np.asarray(scores), kind="stable")[:top]
    return {"ches": q(scores), "ln_ches": q(ln_scores),
            "groups": {g: {"ches": q(scores[names == g]), "ln_ches": q(ln_scores[names == g])}
                       for g in sorted(set(names.tolist()))},
            "highest": [{"where": wheres[i], "group": names[i], "ches": float(scores[i]),
                         "ln_ches": float(ln_scores[i])} for i in order]}


def at_reference(scope, examples: Sequence, split: str, *, batch_size: int, dist
                 ) -> tuple[np.ndarray, np.ndarray]:
    """CHES and LN-CHES (N,) of a run's pairs at theta0, before the first update: from the
    cached body states where the scope keeps them (`scope.head_states`: no body pass), else
    one no-grad pass of the scope's forward (`hidden`), as long as one evaluation of the
    split. Not cached: under torchrun the ranks would have to agree on who holds the file.
    Collective under torchrun: every rank computes a share (Distributed.map_batches)."""
    states = (cached(scope.head_states, split) if scope.head_states is not None
              else scope.forward.hidden)
    return pair_ches(states, examples, batch_size=batch_size, map_batches=dist.map_batches)
