"""The DPO family of the original papers as pure functions of per-sequence log-probs.

Notation (all tensors (B,), one entry per preference pair):
    policy_chosen, policy_rejected   log pi_theta(y_w | x), log pi_theta(y_l | x)
    ref_chosen, ref_rejected         log pi_ref(y_w | x),   log pi_ref(y_l | x)
    logratio_chosen = policy_chosen - ref_chosen            (likewise rejected)
    h = logratio_chosen - logratio_rejected                 the log-ratio margin
    reward = beta * logratio                                the implicit reward (DPO Sec. 5)

Every loss returns per-example (unreduced) losses (B,); hyperparameters are keyword-only.
Whether the log-probs are sums or per-token means over the completion is decided in one place,
the registry (:mod:`dpolab.losses.registry`, ``Term.logps``), because it changes what beta means.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dpolab.losses.modifiers import f_divergence_margin

Tensor = torch.Tensor


def per_token_mean(logps: Tensor, n_tokens: Tensor) -> Tensor:
    """Summed completion log-probs (B,) divided by their token counts (B,), clamped to 1 so an
    empty completion gives 0: the one averaging every per-token-mean loss uses."""
    return logps / n_tokens.clamp_min(1).to(logps.dtype)


def logratio_margin(policy_chosen: Tensor, policy_rejected: Tensor,
                    ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), shape (B,)."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, *, beta: float, label_smoothing: float = 0.0,
             divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """-log sigma(beta h)   (Rafailov et al. 2023, Eq. 7).

    With eps = label_smoothing > 0 this is conservative DPO (cDPO, Mitchell 2023): the label
    is assumed flipped with probability eps,
        (1 - eps) * (-log sigma(beta h)) + eps * (-log sigma(-beta h)).
    With another divergence than reverse_kl, h is the f-DPO margin f'(u_w) - f'(u_l)
    (f-DPO, Wang et al. 2023; :func:`dpolab.losses.modifiers.f_divergence_score`).
    """
    _check_smoothing(label_smoothing, upper=1.0, name="dpo_loss")
    h = f_divergence_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                            divergence=divergence, alpha=alpha)
    z = beta * h
    # logsigmoid, never log(sigmoid(z)): sigmoid underflows to 0 for z < -100 in float32.
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (-F.logsigmoid(-z))
    return loss


def robust_dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                    ref_rejected: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """Unbiased loss under label noise eps (Chowdhury et al. 2024, rDPO Eq. 8):

        [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps),  0 <= eps < 1/2.

    Its expectation over the noisy label equals the clean DPO loss.
    """
    _check_smoothing(label_smoothing, upper=0.5, name="robust_dpo_loss")
    z = beta * logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, *, beta: float) -> Tensor:
    """(h - 1/(2 beta))^2   (Azar et al. 2023, Eq. 17; their tau is our beta).

    Minimised at h = 1/(2 beta): IPO regresses the margin to a target instead of pushing it
    to infinity. The registry's "ipo" feeds it sums (per-token means with loss.average_logps);
    "ipo_norm" always feeds per-token means, which is TRL's "ipo" (its authors' normalisation).
    """
    if beta <= 0:
        raise ValueError(f"ipo_loss: beta must be > 0 (target margin 1/(2 beta)), got {beta}")
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def slic_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
              ref_rejected: Tensor, *, beta: float) -> Tensor:
    """max(0, 1 - beta h)   (SLiC-HF hinge, Zhao et al. 2023, with the reference log-ratio)."""
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1.0 - beta * h)


def dpop_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
              ref_rejected: Tensor, *, beta: float, lam: float) -> Tensor:
    """-log sigma(beta (h - lam * max(0, ref_chosen - policy_chosen)))   (DPO-Positive, Pal et al. 2024).

    The penalty is active only while the chosen log-likelihood is below the reference one,
    which is DPO's likelihood-displacement failure. lam = 0 gives DPO exactly.
    """
    if lam < 0:
        raise ValueError(f"dpop_loss: lam must be >= 0, got {lam}")
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    penalty = torch.relu(ref_chosen - policy_chosen)
    return -F.logsigmoid(beta * (h - lam * penalty))


def sft_loss(policy_chosen: Tensor, n_chosen_tokens: Tensor, *, average: bool) -> Tensor:
    """Negative log-likelihood of the chosen completion: -log pi(y_w|x), or per token
    -log pi(y_w|x) / |y_w| when average. policy_chosen must be the *summed* log-prob.
    The registry's "sft" is the per-token form, per example; TRL's "sft" divides the batch's
    summed NLL by the batch's chosen tokens instead (equal when the lengths are equal)."""
    return -per_token_mean(policy_chosen, n_chosen_tokens) if average else -policy_chosen


def auxdpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                ref_rejected: Tensor, *, delta_chosen: Tensor, delta_rejected: Tensor,
                beta: float) -> Tensor:
    """-log sigma(beta (h + delta_c - delta_r))   (AuxDPO, arXiv 2510.20413 Sec. 4.2).

    delta_c, delta_r (B,) are per-response auxiliary rewards meant to live in the null space
    of A = d/dtheta log pi_theta0 (see :mod:`dpolab.auxdpo`); they widen the implicit
    reward manifold so the estimator is no longer misspecified. They are dropped after training.
    """
    h = logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * (h + delta_chosen - delta_rejected))


def amplitude_penalty(delta: Tensor) -> Tensor:
    """||delta||^2 over the batch's auxiliary rewards (AuxDPO's lambda_amp term), a scalar."""
    return delta.pow(2).sum()


# AuxDPO in two forms (arXiv 2510.20413 Sec. 4.2, and the authors' AuxDPOTrainer code):
#
#                 seed (dpolab's default)               authors
#   delta         a free parameter                      cap * tanh(raw), raw the parameter
#   margin        beta (h + delta_c - delta_r)          the same (inside beta)
#   amplitude     + lambda_amp ||delta_B||^2            - lambda_amp / 2 (mean_B delta_c^2
#                   (keeps delta small)                   + mean_B delta_r^2)  (keeps it from
#                                                         collapsing to 0; the cap bounds it)
#   null space    lambda_null ||A_B delta_B||^2         the same (their run: lambda_null 1e-4,
#                                                         lambda_amp 1, aux_lr 5e-3)
# The seed text writes the margin as "the DPO margin augmented by delta_c - delta_r"; with
# beta outside, delta is beta times dpolab's. The authors initialise raw ~ N(0, 1e-3); dpolab
# starts it at 0, so every term is ln 2 at step 0 (the trainer checks it).


def capped_aux_reward(raw: Tensor, *, cap: float) -> Tensor:
    """delta = cap * tanh(raw): the authors' bounded auxiliary rewards, |delta| < cap, same
    shape as raw. d delta / d raw = cap (1 - tanh^2 raw) = cap at raw = 0."""
    if not cap > 0:
        raise ValueError(f"capped_aux_reward: cap must be > 0, got {cap}")
    return cap * torch.tanh(raw)


def authors_amplitude_term(delta_chosen: Tensor, delta_rejected: Tensor) -> Tensor:
    """-(mean_B delta_c^2 + mean_B delta_r^2) / 2, a scalar: the authors' anti-collapse term
    (multiplied by lambda_amp, it *rewards* larger |delta|; the tanh cap keeps it finite).
    delta_chosen, delta_rejected (B,)."""
    return -0.5 * (delta_chosen.pow(2).mean() + delta_rejected.pow(2).mean())


def gpo_loss(margin: Tensor, *, f: str) -> Tensor:
    """Generalised preference optimisation: f(r) of the reward margin r = beta h
    (Tang et al. 2024; the form of the diverse-values paper, Sec. 4.3):

        logistic  -log sigma(r)    = DPO
        squared   (r - 1)^2        the IPO form of that paper (IPO's (h - 1/(2beta))^2 is
                                   beta^-2 (r - 1/2)^2: same minimiser family, other scale)
        hinge     max(0, 1 - r)    = SLiC
    """
    try:
        fn = _GPO[f]
    except KeyError:
        raise ValueError(f"gpo_loss: unknown f {f!r}; valid: {', '.join(sorted(_GPO))}") from None
    return fn(margin)


_GPO: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda r: -F.logsigmoid(r),
    "squared": lambda r: (r - 1.0) ** 2,
    "hinge": lambda r: torch.relu(1.0 - r),
}
GPO_FAMILY = tuple(_GPO)  # the f's gpo_loss accepts


def gpo_derivative(margin: Tensor, *, f: str) -> Tensor:
    """-f'(r): the weight each pair's gradient gets in margin dynamics (sigma(-r) for DPO)."""
    if f == "logistic":
        return torch.sigmoid(-margin)
    if f == "squared":
        return -2.0 * (margin - 1.0)
    if f == "hinge":
        return (margin < 1.0).to(margin.dtype)
    raise ValueError(f"gpo_derivative: unknown f {f!r}; valid: {', '.join(sorted(_GPO))}")


def _check_smoothing(eps: float, *, upper: float, name: str) -> None:
    if not 0.0 <= eps < upper:
        raise ValueError(f"{name}: label_smoothing must lie in [0, {upper}), got {eps}")
