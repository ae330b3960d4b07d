"""One pass over a split's pairs at evaluation: what every evaluation metric is made of.

`score` runs the session's pair forward over a split without gradients, once, and keeps per
pair what the metrics need: the summed log-probs against the reference (`PairStats`), the
run's objective per pair (every term, as in training), and the sums of the head's per-token
reductions (`dpolab.logps.STAT_COLUMNS`) per completion. `heldout_metrics` turns a subset
of that (a named eval set, or all of the split) into the `eval/...` numbers TRL users read:

    loss                  sum_i w_i l_i / N: the objective on the pairs, each pair weighted by
                          its group's data.group_weights as in training (no MoE router loss:
                          routers do not train at evaluation; AuxDPO: delta = 0, held-out
                          pairs have no auxiliary reward)
    loss/<term>           each term's unweighted mean, as the training rows log it
    logits/chosen         mean over the chosen completions' tokens of the mean logit over the
                          vocabulary (TRL: a token-weighted mean); logits/rejected likewise
    entropy               token-weighted mean entropy of the policy over all completion tokens
    mean_token_accuracy   share of the chosen completions' tokens that are the argmax

Notation: N pairs; per pair, per response r in (chosen, rejected), `token_sums[i, r]` the
sums over its scored tokens of (mean logit, entropy, top-1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from dpolab.diagnostics import PairStats, reference_free_stats
from dpolab.losses import Objective


@dataclass(frozen=True)
class Scored:
    """Per-pair results of one pass over a split (all arrays' first axis: N pairs)."""

    stats: PairStats  # summed log-probs against the reference (the policy's own when none)
    loss: np.ndarray  # (N,) the objective per pair, before group weights
    terms: dict[str, np.ndarray]  # name -> (N,) unweighted term per pair
    token_sums: np.ndarray  # (N, 2, 3): chosen/rejected x STAT_COLUMNS summed over tokens
    weights: np.ndarray  # (N,) data.group_weights of each pair's group

    def subset(self, idx: np.ndarray) -> "Scored":
        return Scored(self.stats.subset(idx), self.loss[idx],
                      {k: v[idx] for k, v in self.terms.items()}, self.token_sums[idx],
                      self.weights[idx])


def score(session, split: str) -> Scored:
    """Every pair of `split` through the session's pair forward in train.eval_batch_size
    batches, no gradient: log-probs, objective and per-token statistics in one pass."""
    sp = session.splits[split]
    bs = session.cfg.train.eval_batch_size
    objective = Objective(session.cfg.loss.term_weights(), session.cfg.loss)
    sums, counts, losses, token_sums = [], [], [], []
    terms: dict[str, list] = {}
    with torch.no_grad():
        for s in range(0, len(sp.examples), bs):
            idx = list(range(s, min(s + bs, len(sp.examples))))
            flat = _forward(session, split, idx)
            pc, pr = flat.sums()
            nc, nr = flat.counts()
            sums.append(torch.stack([pc, pr], 1).double().cpu())
            counts.append(torch.stack([nc, nr], 1).cpu())
            pairs = session.logps_of(split, idx, flat)
            if objective.needs_delta:  # held-out pairs have no auxiliary reward: delta = 0
                zero = torch.zeros_like(pairs.policy_chosen)
                pairs = replace(pairs, delta_chosen=zero, delta_rejected=zero)
            per_example, parts = objective(pairs)
            losses.append(per_example.double().cpu())
            for k, v in parts.items():
                terms.setdefault(k, []).append(v.double().cpu())
            token_sums.append(per_response_sums(flat))
    pc, pr = torch.cat(sums).numpy().T
    nc, nr = torch.cat(counts).numpy().T
    beta = session.cfg.loss.beta
    if sp.ref is None:
        stats = reference_free_stats(pc, pr, nc, nr, beta=beta, average=session.reward_average)
    else:
        stats = PairStats(pc, pr, sp.ref_chosen.numpy(), sp.ref_rejected.numpy(), nc, nr,
                          beta=beta)
    return Scored(stats, torch.cat(losses).numpy(),
                  {k: torch.cat(v).numpy() for k, v in terms.items()},
                  torch.cat(token_sums).numpy(), sp.weights.double().numpy())


def _forward(session, split: str, idx: list[int]):
    """The session's pair forward over the pairs `idx` of `split`; reused from
    `session.unchanged_logps` while the policy is known not to have changed (a sweep's heads
    at theta0, dpolab.stacked_heads)."""
    memo, key = session.unchanged_logps, (split, idx[0], len(idx))
    if memo is not None and key in memo:
        return memo[key]
    flat = session.engine([session.splits[split].examples[i] for i in idx], split=split)
    if memo is not None:
        memo[key] = flat
    return flat


def per_response_sums(flat) -> torch.Tensor | None:
    """(B, 2, 3) float64: per pair, chosen then rejected, the sums over the completion's
    tokens of the head's STAT_COLUMNS (FlatLogps.stats, (N, 3) per token); None without."""
    if flat.stats is None:
        return None
    b = flat.n_pairs
    out = torch.zeros(2 * b, flat.stats.shape[1], dtype=torch.float64)
    out.index_add_(0, flat.seg.cpu(), flat.stats.detach().double().cpu())
    return torch.stack([out[:b], out[b:]], 1)


def token_metrics(token_sums: np.ndarray, n_chosen: np.ndarray,
                  n_rejected: np.ndarray) -> dict[str, float]:
    """TRL's `logits/chosen`, `logits/rejected`, `entropy`, `mean_token_accuracy` from
    per-response sums (N, 2, 3) and token counts (N,): token-weighted means over the pairs."""
    tc, tr = float(np.sum(n_chosen)), float(np.sum(n_rejected))
    chosen, rejected = token_sums[:, 0].sum(0), token_sums[:, 1].sum(0)  # (3,) each
    return {"logits/chosen": chosen[0] / max(tc, 1.0),
            "logits/rejected": rejected[0] / max(tr, 1.0),
            "entropy": (chosen[1] + rejected[1]) / max(tc + tr, 1.0),
            "mean_token_accuracy": chosen[2] / max(tc, 1.0)}


def heldout_metrics(scored: Scored) -> dict[str, float]:
    """The objective and TRL's per-token metrics of `scored`'s pairs (keys without prefix)."""
    n = max(len(scored.loss), 1)
    out = {"loss": float(np.sum(scored.weights * scored.loss) / n)}
    out.update({f"loss/{k}": float(np.mean(v)) for k, v in scored.terms.items()})
    out.update(token_metrics(scored.token_sums, scored.stats.n_chosen, scored.stats.n_rejected))
    return out


def split_metrics(scored: Scored, sp, sel: np.ndarray, groups: list[str],
                  own=None) -> dict[str, float]:
    """Every evaluation metric of the pairs `sel` of split `sp` (a session.Split), scored as
    `scored` (already the subset), keys without prefix: TRL's and dpolab's summaries, the
    objective and per-token metrics, unflippable pairs, per-group summaries and, with `own`
    (a user's `compute_metrics`), its numbers."""
    from dpolab.diagnostics import (group_summaries, summarize, unflippable,
                                    without_reference_metrics)

    stats, out = scored.stats, {}
    if sp.ref is None:  # the policy's own preference; nothing to compare with
        out.update(without_reference_metrics(summarize(stats)))
    else:
        out.update(summarize(stats))
        flags = unflippable(stats.ref_chosen, stats.ref_rejected, beta=stats.beta)
        out["unflippable/fraction"] = float(flags.mean())
        if flags.any():  # did training flip the model's own preference on them anyway?
            pref = stats.policy_chosen[flags] > stats.policy_rejected[flags]
            out["unflippable/flipped_fraction"] = float(pref.mean())
    out.update(heldout_metrics(scored))
    per_group = group_summaries(stats, sp.group_ids[sel], groups, {"no_cue": sp.no_cue[sel]})
    if sp.ref is None:  # no reference: no displacement per group either
        per_group = without_reference_metrics(per_group)
    out.update(per_group)
    if own is not None:
        mine = user_metrics(own, scored, sp.group_ids[sel], groups)
        taken = sorted(set(mine) & set(out))
        if taken:
            from dpolab.errors import UserError

            raise UserError(f"compute_metrics returned {taken[0]!r}, a name dpolab's own "
                            f"evaluation already logs; name it otherwise")
        out.update(mine)
    return out


def user_metrics(fn, scored: Scored, group_ids: np.ndarray, groups: list[str]
                 ) -> dict[str, float]:
    """`fn(pairs) -> {name: number}`, the `compute_metrics` of dpolab.Trainer, on per-pair
    arrays (N,): `policy_chosen`, `policy_rejected`, `ref_chosen`, `ref_rejected` (summed
    log-probs; the reference ones zero in a reference-free run), `margins` (beta * h), `loss`,
    `n_chosen`, `n_rejected` (completion tokens) and `groups` (each pair's group name, ""
    for none). A result that is not a mapping of names to finite numbers is a UserError."""
    import math

    from dpolab.errors import UserError

    s = scored.stats
    names = np.array([groups[g] if g >= 0 else "" for g in group_ids], dtype=object)
    pairs = {"policy_chosen": s.policy_chosen, "policy_rejected": s.policy_rejected,
             "ref_chosen": s.ref_chosen, "ref_rejected": s.ref_rejected,
             "margins": s.margins, "loss": scored.loss, "n_chosen": s.n_chosen,
             "n_rejected": s.n_rejected, "groups": names}
    got = fn({k: np.array(v, copy=True) for k, v in pairs.items()})
    if not isinstance(got, dict):
        raise UserError(f"compute_metrics returned {type(got).__name__}, expected a dict "
                        f"of metric names to numbers")
    out = {}
    for k, v in got.items():
        try:
            value = float(v)
        except (TypeError, ValueError):
            value = math.nan
        if not isinstance(k, str) or not k or not math.isfinite(value):
            raise UserError(f"compute_metrics returned {k!r}: {v!r}; expected a metric name "
                            f"and a finite number")
        out[k] = value
    return out
