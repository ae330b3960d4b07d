"""The differential information of a trained policy against its reference, measured by
sampling (the DID view of DPO, arXiv 2505.23761).

For P held-out prompts, K completions are sampled from the policy (seeded, at most
`max_new_tokens` tokens: the distribution is over those truncated sequences) and scored under
the policy and the reference. With log w = log pi - log pi_ref per sample:
    did/entropy      self-normalised importance estimate of H(q_{pi/pi_ref}), the DID entropy
                     (:func:`did_entropy_estimate`, proposal = the policy);
    did/kl           E_pi[log pi - log pi_ref] = KL(pi || pi_ref), how far training moved;
    did/logratio_std the spread of log w within a prompt (a low-entropy DID concentrates
                     w on few sequences: large spread);
    did/policy_entropy  E_pi[-log pi], the policy's sequence entropy (plain Monte Carlo);
    did/ref_entropy     E_ref[-log pi_ref] from the same samples, self-normalised with
                     weights pi_ref / pi (biased O(1/K), exact as K -> inf; close to plain
                     Monte Carlo while the policy stays near its reference);
    did/entropy_change  policy_entropy - ref_entropy (the DID view: learning high-entropy
                     differential information smooths the policy, low-entropy sharpens it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Scored:
    """A prompt with a sampled completion, shaped like a PairExample so the same forward
    scores it (chosen = rejected = the sample)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    group: str | None = None
    index: int = 0
    row: int = 0
    source: str = "<sample>"


def did_entropy_estimate(logp_policy: Tensor, logp_ref: Tensor, *, sampled_from: str) -> Tensor:
    """Self-normalised importance-sampling estimate of H(q_{pi/pi_ref}) per prompt.

    logp_policy, logp_ref (P, K): per-sequence log pi(y_k|x_p), log pi_ref(y_k|x_p) of K samples
    per prompt drawn from the proposal rho = pi ("policy") or rho = pi_ref ("ref"). Returns (P,).

    Derivation. With w = pi/pi_ref, Z = sum_y w(y) and q = w/Z,
        H(q) = -sum_y q(y) (log w(y) - log Z) = log Z - E_q[log w].
    Both terms are expectations under the proposal with weights v(y) = w(y)/rho(y):
        Z        = E_rho[v]                       ->  Z_hat = (1/K) sum_k v_k
        E_q[f]   = E_rho[v f] / E_rho[v]          ->  sum_k softmax(log v)_k f(y_k)
    so  H_hat = logmeanexp_k(log v_k) - sum_k softmax(log v)_k log w_k, with
        log v = -log pi_ref           (rho = pi:      w/pi = 1/pi_ref)
        log v = log pi - 2 log pi_ref (rho = pi_ref:  w/pi_ref = pi/pi_ref^2).
    Both terms are consistent as K -> inf (the log of the mean is biased low by O(1/K)); the
    weights are heavy-tailed for long sequences, so compare estimates at equal K only.
    """
    if logp_policy.shape != logp_ref.shape or logp_policy.dim() != 2:
        raise ValueError("did_entropy_estimate: logp_policy and logp_ref must both be (P, K), got "
                         f"{tuple(logp_policy.shape)} and {tuple(logp_ref.shape)}")
    log_w = logp_policy - logp_ref                                          # (P, K)
    proposals = {"policy": lambda: -logp_ref, "ref": lambda: log_w - logp_ref}
    if sampled_from not in proposals:
        raise ValueError(f"did_entropy_estimate: sampled_from must be one of "
                         f"{sorted(proposals)}, got {sampled_from!r}")
    log_v = proposals[sampled_from]()                                       # (P, K)
    k = log_v.shape[-1]
    log_z = torch.logsumexp(log_v, dim=-1) - math.log(k)                    # (P,)
    return log_z - (torch.softmax(log_v, dim=-1) * log_w).sum(-1)


def sample_completions(model, prompt_ids: list[int], *, k: int, max_new_tokens: int,
                       eos_id: int, pad_id: int, seed: int, device) -> list[list[int]]:
    """K samples (temperature 1, no top-k/top-p: the policy's own distribution) of one
    prompt; each ends at EOS (kept) or after max_new_tokens."""
    ids = torch.tensor([prompt_ids] * k, device=device)
    # generate draws from the global RNG: fork it so the draw depends on the seed alone.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=pad_id)
    samples = []
    for row in out[:, len(prompt_ids):].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        samples.append(row[:cut] or [eos_id])
    return samples


def score_samples(model, examples: Sequence, *, policy_logps: Callable, k: int,
                  max_new_tokens: int, eos_id: int, pad_id: int, seed: int,
                  device) -> tuple[list[list], Tensor]:
    """Sample K completions from the policy on the prompt of each of `examples` and score
    them under the policy (`policy_logps`: list of pair-like examples -> (B,) summed
    log-probs). Returns (the P batches of K scored samples, log pi (P, K) float64)."""
    batches, lp = [], []
    for i, ex in enumerate(examples):
        samples = sample_completions(model, ex.prompt_ids, k=k, max_new_tokens=max_new_tokens,
                                     eos_id=eos_id, pad_id=pad_id, seed=seed * 7919 + i,
                                     device=device)
        batches.append([_Scored(ex.prompt_ids, s, s) for s in samples])
        with torch.no_grad():
            lp.append(policy_logps(batches[-1]).double().cpu())
    return batches, torch.stack(lp)


def did_summary(logp: Tensor, logr: Tensor) -> dict[str, float]:
    """The DID metrics of K samples per prompt from the policy: logp, logr (P, K) their
    log-probs under the policy and the reference."""
    log_w = logp - logr
    p, k = logp.shape
    policy_h = float((-logp).mean())
    ref_h = float(-(torch.softmax(-log_w, dim=1) * logr).sum(1).mean())
    return {
        "did/entropy": float(did_entropy_estimate(logp, logr, sampled_from="policy").mean()),
        "did/kl": float(log_w.mean()),
        "did/logratio_std": float(log_w.std(dim=1).mean()) if k > 1 else 0.0,
        "did/policy_entropy": policy_h,
        "did/ref_entropy": ref_h,
        "did/entropy_change": policy_h - ref_h,
        "did/prompts": float(p),
        "did/samples_per_prompt": float(k),
    }
