"""Per-pair statistics of a policy against its reference, and their summaries as metrics.

Notation (per pair, float64): logratio_chosen = log pi(y_w) - log pi_ref(y_w) (its change is
the chosen *displacement*), likewise rejected; h = logratio_chosen - logratio_rejected;
margin = beta * h (the reward margin). Accuracy counts a tie (|h| <= TIE) as half: before
training every implicit reward is exactly 0, and a strict `>` would start at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIE = 1e-6  # nats of |h| below which a pair is a tie (float32 sums of equal log-probs)


class LogRatios:
    """The log-ratios and margins of summed log-probs `policy_*`, `ref_*` and `beta`, whatever
    their shape ((N,) pairs, or (T, N) evaluations x pairs: dpolab.trajectory)."""

    policy_chosen: np.ndarray
    policy_rejected: np.ndarray
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray
    beta: float

    @property
    def logratio_chosen(self) -> np.ndarray:
        return self.policy_chosen - self.ref_chosen

    @property
    def logratio_rejected(self) -> np.ndarray:
        return self.policy_rejected - self.ref_rejected

    @property
    def h(self) -> np.ndarray:
        return self.logratio_chosen - self.logratio_rejected

    @property
    def margins(self) -> np.ndarray:
        return self.beta * self.h


@dataclass(frozen=True)
class PairStats(LogRatios):
    policy_chosen: np.ndarray  # (N,) summed log pi(y_w)
    policy_rejected: np.ndarray
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray
    n_chosen: np.ndarray  # (N,) completion tokens
    n_rejected: np.ndarray
    beta: float

    def subset(self, idx: np.ndarray) -> "PairStats":
        return PairStats(*(getattr(self, f)[idx] for f in (
            "policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected",
            "n_chosen", "n_rejected")), beta=self.beta)


def tie_half(x: np.ndarray) -> np.ndarray:
    """1 where x > TIE, 1/2 where |x| <= TIE, 0 otherwise."""
    return np.where(x > TIE, 1.0, np.where(np.abs(x) <= TIE, 0.5, 0.0))


def reward_sums(s: PairStats) -> dict[str, float]:
    """Sums over the pairs of TRL's per-pair metrics (`rewards/...`, `logps/...`); their means
    are these over N. The training steps sum them over micro-batches and ranks, evaluation
    divides at once: one definition, one tie rule, for both."""
    return {
        "rewards/chosen": float(np.sum(s.beta * s.logratio_chosen)),
        "rewards/rejected": float(np.sum(s.beta * s.logratio_rejected)),
        "rewards/margins": float(np.sum(s.margins)),
        "rewards/accuracies": float(np.sum(tie_half(s.h))),
        "logps/chosen": float(np.sum(s.policy_chosen)),
        "logps/rejected": float(np.sum(s.policy_rejected)),
    }


def summarize(s: PairStats) -> dict[str, float]:
    """TRL's metric names plus dpolab's distribution and displacement metrics."""
    n = len(s.h)
    if n == 0:
        return {}
    m = s.margins
    q10, q50, q90 = np.quantile(m, [0.1, 0.5, 0.9])
    return {
        **{k: v / n for k, v in reward_sums(s).items()},  # np.mean is the same sum over n
        "margins/p10": float(q10), "margins/p50": float(q50), "margins/p90": float(q90),
        "margins/negative_fraction": float(np.mean(s.h < -TIE)),
        "displacement/chosen": float(np.mean(s.logratio_chosen)),
        "displacement/rejected": float(np.mean(s.logratio_rejected)),
        "displacement/chosen_per_token": float(np.mean(s.logratio_chosen / np.maximum(s.n_chosen, 1))),
        "displacement/rejected_per_token": float(np.mean(s.logratio_rejected / np.maximum(s.n_rejected, 1))),
        "displacement/chosen_fell_fraction": float(np.mean(s.logratio_chosen < -TIE)),
        "preference/model": float(np.mean(tie_half(s.policy_chosen - s.policy_rejected))),
        "gradient_weight/mean": float(np.mean(1.0 / (1.0 + np.exp(np.clip(m, -50, 50))))),
    }


def group_summaries(s: PairStats, groups: np.ndarray, names: list[str],
                    extra_masks: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """`groups/<name>/{accuracy, margin, preference, n, displacement/chosen}` per group; `extra_masks` adds
    `groups/<name>/accuracy_<tag>` over a subset of pairs (e.g. tag 'no_cue')."""
    out: dict[str, float] = {}
    for gi, name in enumerate(names):
        idx = np.flatnonzero(groups == gi)
        if len(idx) == 0:
            continue
        sub = s.subset(idx)
        out[f"groups/{name}/accuracy"] = float(np.mean(tie_half(sub.h)))
        out[f"groups/{name}/margin"] = float(np.mean(sub.margins))
        out[f"groups/{name}/preference"] = float(np.mean(tie_half(sub.policy_chosen - sub.policy_rejected)))
        out[f"groups/{name}/n"] = float(len(idx))
        out[f"groups/{name}/displacement/chosen"] = float(np.mean(sub.logratio_chosen))
        for tag, mask in (extra_masks or {}).items():
            sel = idx[mask[idx]]
            if len(sel):
                out[f"groups/{name}/accuracy_{tag}"] = float(np.mean(tie_half(s.subset(sel).h)))
                out[f"groups/{name}/n_{tag}"] = float(len(sel))
    return out


def unflippable_threshold(beta: float) -> float | None:
    """log(3) / beta nats: the most a reference may prefer the rejected response for DPO to
    still flip the pair. DPO's reward margins end at most near log 3 (diverse-values paper,
    Theorem 4.2: r <= log 3 at the end of training), i.e. h <= log(3) / beta. None for
    beta <= 0 (no margin moves)."""
    return float(np.log(3.0) / beta) if beta > 0 else None


def unflippable(ref_chosen: np.ndarray, ref_rejected: np.ndarray, *, beta: float) -> np.ndarray:
    """Pairs the reference makes unflippable (bool (N,)).

    The policy's own log-likelihood margin is (ref_chosen - ref_rejected) + h, so a pair whose
    reference prefers the rejected response by more than :func:`unflippable_threshold` nats
    (log(3) / beta, a probability ratio above 3^(1/beta)) keeps the model preferring the
    rejected response however training goes.
    """
    threshold = unflippable_threshold(beta)
    if threshold is None:
        return np.zeros(len(ref_chosen), dtype=bool)
    return (np.asarray(ref_rejected) - np.asarray(ref_chosen)) > threshold


def growth_rate(steps: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of a metric against the step (e.g. the mean reward margin; the
    diverse-values paper predicts it falls as 1/K with the number of values K)."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    if len(steps) < 2 or np.ptp(steps) == 0:
        return float("nan")
    return float(np.polyfit(steps, values, 1)[0])


# Metrics that compare the policy with its reference; a reference-free run has none to give.
REFERENCE_METRICS = ("displacement/", "gradient_weight/", "unflippable/")


def reference_free_stats(policy_chosen: np.ndarray, policy_rejected: np.ndarray,
                         n_chosen: np.ndarray, n_rejected: np.ndarray, *, beta: float,
                         average: bool) -> PairStats:
    """The policy's own preference, in PairStats form, for a run without a reference.

    The implicit reward of SimPO, CPO and ORPO is beta * log pi(y|x) itself (per-token mean
    for SimPO and ORPO, the sum for CPO; TRL's CPO and ORPO trainers log these as rewards/...).
    With `average` the log-probs are per-token means; the reference is taken as 0, so
    rewards/* = beta * log pi(y), h = log pi(y_w) - log pi(y_l) and rewards/accuracies is the
    fraction of pairs the policy itself prefers (ties count 1/2). Metrics that measure the
    change from a reference (REFERENCE_METRICS) mean nothing here and are left out by callers.
    All inputs (N,); `logps/...` become the same (possibly averaged) log-probs.
    """
    nc, nr = np.maximum(n_chosen, 1), np.maximum(n_rejected, 1)
    pc = policy_chosen / nc if average else policy_chosen
    pr = policy_rejected / nr if average else policy_rejected
    zeros = np.zeros_like(pc)
    return PairStats(pc, pr, zeros, zeros.copy(), n_chosen, n_rejected, beta=beta)


def without_reference_metrics(row: dict[str, float]) -> dict[str, float]:
    """`row` less the keys (under any prefix) that compare with a reference."""
    return {k: v for k, v in row.items()
            if not any(m in k for m in REFERENCE_METRICS)}
