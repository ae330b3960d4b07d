"""Modifiers of the preference losses, as pure functions of what the forward computes.

Notation (per-token tensors (B, T), completion positions only counted where mask is 1):
    token_logps        log pi(y_t | x, y_<t) of the completion tokens
    mask               1 on completion tokens, 0 on prompt and padding
    logratio           log pi_theta(y|x) - log pi_ref(y|x), (B,)

f-divergence scores replace the log-ratio inside the margin (f-DPO); LD-DPO changes how
per-token log-probs are summed into one sequence log-prob.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_score(logratio: Tensor, *, divergence: str, alpha: float = 0.5) -> Tensor:
    """f'(u) at u = pi_theta / pi_ref = exp(logratio): the score that replaces the log-ratio
    in the DPO margin when the KL regulariser is swapped for another f-divergence
    (f-DPO, Wang et al. 2023, arXiv 2309.16240; TRL's f_divergence_type). Shape (B,).

        reverse_kl         log u                     (standard DPO)
        forward_kl         1 - 1/u  = -expm1(-logratio)
        js_divergence      log(2u / (1 + u)) = ln 2 + log sigma(logratio)
        alpha_divergence   (u^(alpha-1) - 1) / (alpha - 1) = expm1((alpha-1) logratio) / (alpha-1);
                           alpha -> 1 is log u (reverse KL)

    Every score is 0 at logratio = 0, so every f-variant of a margin loss has the DPO value at
    the reference. Unlike TRL, the alpha exponent is not clamped (TRL clamps it at 80): a clamp
    would zero the gradient without a word, whereas an overflow stops training visibly.
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return -torch.expm1(-logratio)  # expm1: exact near u = 1, where 1 - exp(-x) cancels
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit alpha -> 1 is log u
            return logratio
        return torch.expm1((alpha - 1.0) * logratio) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {divergence!r}; valid: {', '.join(F_DIVERGENCES)}")


def f_divergence_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                        ref_rejected: Tensor, *, divergence: str, alpha: float = 0.5) -> Tensor:
    """f'(u_w) - f'(u_l): the f-DPO margin, (B,); equals h for reverse_kl."""
    return (f_divergence_score(policy_chosen - ref_chosen, divergence=divergence, alpha=alpha)
            - f_divergence_score(policy_rejected - ref_rejected, divergence=divergence, alpha=alpha))


def ld_sequence_logps(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                      rejected_mask: Tensor, *, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's length-desensitised sequence log-probs (Liu et al. 2024, arXiv 2409.06411):

        log pi_LD(y) = sum_{t <= l_p} log pi(y_t) + alpha * sum_{t > l_p} log pi(y_t),
        l_p = min(|y_w|, |y_l|)   the length the two completions share,

    counting completion tokens in order (the mask's 1s, wherever they sit in the row).
    alpha = 1 gives the plain sums; alpha = 0 keeps only the shared-length prefix. Apply it to
    the policy's and to the reference's per-token log-probs alike. Inputs (B, T) each (the two
    T may differ); returns (chosen (B,), rejected (B,)).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_sequence_logps: alpha must lie in [0, 1], got {alpha}")
    shared = torch.minimum(chosen_mask.sum(dim=1), rejected_mask.sum(dim=1))  # (B,)

    def one(token_logps: Tensor, mask: Tensor) -> Tensor:
        mask = mask.to(token_logps.dtype)
        position = mask.cumsum(dim=1)  # 1, 2, ... on completion tokens
        head = mask * (position <= shared.unsqueeze(1)).to(token_logps.dtype)
        tail = mask - head
        return (token_logps * head).sum(dim=1) + alpha * (token_logps * tail).sum(dim=1)

    return one(chosen_token_logps, chosen_mask), one(rejected_token_logps, rejected_mask)


def ld_flat_logps(token_logps: Tensor, seg: Tensor, n_pairs: int, *,
                  alpha: float) -> tuple[Tensor, Tensor]:
    """:func:`ld_sequence_logps` on the flat layout the pair forwards give: token_logps (N,)
    the completion tokens of 2B sequences, seg (N,) each token's sequence (j < B: pair j's
    chosen completion, B + j its rejected one), tokens of one sequence in order. Returns
    (chosen (B,), rejected (B,)), differentiable in token_logps."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_flat_logps: alpha must lie in [0, 1], got {alpha}")
    n = 2 * n_pairs
    counts = torch.bincount(seg, minlength=n)  # (2B,) tokens per sequence
    shared = torch.minimum(counts[:n_pairs], counts[n_pairs:]).repeat(2)  # (2B,)
    order = torch.argsort(seg, stable=True)
    starts = counts.cumsum(0) - counts  # first flat slot of each sequence once sorted
    position = torch.empty_like(seg)
    position[order] = torch.arange(seg.numel(), device=seg.device) - starts[seg[order]] + 1
    weight = torch.where(position <= shared[seg], 1.0, alpha).to(token_logps.dtype)  # (N,)
    sums = token_logps.new_zeros(n).index_add(0, seg, token_logps * weight)
    return sums[:n_pairs], sums[n_pairs:]
