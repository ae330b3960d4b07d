"""The differential information of a trained policy against its reference, measured by
sampling (the DID view of DPO, arXiv 2505.23761).

For P held-out prompts, K completions are sampled from the policy (seeded, at most
`max_new_tokens` tokens: the distribution is over those truncated sequences) and scored under
the policy and the reference. With log w = log pi - log pi_ref per sample:
    did/entropy      self-normalised importance estimate of H(q_{pi/pi_ref}), the DID entropy
                     (dpolab.theory.did.did_entropy_estimate, proposal = the policy);
    did/kl           E_pi[log pi - log pi_ref] = KL(pi || pi_ref), how far training moved;
    did/logratio_std the spread of log w within a prompt (a low-entropy DID concentrates
                     w on few sequences: large spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dpolab.theory.did import did_entropy_estimate


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


def did_metrics(model, examples: Sequence, *, policy_logps: Callable, ref_logps: Callable,
                k: int, max_new_tokens: int, eos_id: int, pad_id: int, seed: int,
                device) -> dict[str, float]:
    """Sample from the policy on the prompts of `examples`, score under policy and reference
    (callables: list of pair-like examples -> (B,) summed log-probs), and summarize."""
    lp, lr = [], []
    for i, ex in enumerate(examples):
        samples = sample_completions(model, ex.prompt_ids, k=k, max_new_tokens=max_new_tokens,
                                     eos_id=eos_id, pad_id=pad_id, seed=seed * 7919 + i,
                                     device=device)
        batch = [_Scored(ex.prompt_ids, s, s) for s in samples]
        with torch.no_grad():
            lp.append(policy_logps(batch).double().cpu())
            lr.append(ref_logps(batch).double().cpu())
    logp, logr = torch.stack(lp), torch.stack(lr)  # (P, K)
    log_w = logp - logr
    return {
        "did/entropy": float(did_entropy_estimate(logp, logr, sampled_from="policy").mean()),
        "did/kl": float(log_w.mean()),
        "did/logratio_std": float(log_w.std(dim=1).mean()) if k > 1 else 0.0,
        "did/prompts": float(len(examples)),
        "did/samples_per_prompt": float(k),
    }
