"""The rest of TRL's DPO loss types, under TRL's names, as pure per-example functions.

Same notation as :mod:`dpolab.losses.core`: inputs are (B,) sequence log-probs
(policy_chosen, policy_rejected, ref_chosen, ref_rejected), lr_w = policy_chosen - ref_chosen,
lr_l = policy_rejected - ref_rejected, h = lr_w - lr_l; every function returns (B,) losses.
TRL's "sigmoid" is :func:`sigmoid_loss` (= ``dpo_loss`` plus the f-divergence choice), its
"robust" is ``robust_dpo_loss``, its "sft" is ``sft_loss``; the others live here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpolab.losses.core import (_check_smoothing, dpo_loss, ipo_loss, logratio_margin, per_token_mean,
                                robust_dpo_loss, slic_loss)

Tensor = torch.Tensor

robust_loss = robust_dpo_loss  # TRL's "robust": rDPO (Chowdhury et al. 2024)
hinge_loss = slic_loss  # TRL's "hinge": max(0, 1 - beta h), SLiC-HF (Zhao et al. 2023)


def sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                 ref_rejected: Tensor, *, beta: float, divergence: str = "reverse_kl",
                 alpha: float = 0.5) -> Tensor:
    """-log sigma(beta (f'(u_w) - f'(u_l))), u = pi_theta / pi_ref   (TRL's "sigmoid").

    With divergence="reverse_kl" (f' = log) this is DPO, Rafailov et al. 2023, Eq. 7; the
    other f-divergences are f-DPO (Wang et al. 2023, arXiv 2309.16240), see
    :func:`dpolab.losses.modifiers.f_divergence_score`; alpha is the alpha-divergence's.
    It is :func:`dpo_loss` without label smoothing, which TRL's "sigmoid" ignores.
    """
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta,
                    divergence=divergence, alpha=alpha)


def sigmoid_norm_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                      ref_rejected: Tensor, *, beta: float, n_chosen: Tensor,
                      n_rejected: Tensor) -> Tensor:
    """-log sigma(beta (lr_w / |y_w| - lr_l / |y_l|))   (TRL's "sigmoid_norm").

    DPO on per-token mean log-ratios, whatever loss.average_logps says; n_chosen, n_rejected
    (B,) are the completion token counts (clamped to 1).
    """
    h = (per_token_mean(policy_chosen - ref_chosen, n_chosen)
         - per_token_mean(policy_rejected - ref_rejected, n_rejected))
    return -F.logsigmoid(beta * h)


def ipo_norm_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float, n_chosen: Tensor,
                  n_rejected: Tensor) -> Tensor:
    """(lr_w / |y_w| - lr_l / |y_l| - 1/(2 beta))^2   (TRL's "ipo"; Azar et al. 2023, Eq. 17).

    TRL divides IPO's log-ratios by the completion length (the IPO authors' normalisation,
    not written in the paper); dpolab's "ipo" uses sums unless loss.average_logps, so the same
    beta means something else there. This is TRL's form, for comparisons.
    """
    return ipo_loss(per_token_mean(policy_chosen, n_chosen), per_token_mean(policy_rejected, n_rejected),
                    per_token_mean(ref_chosen, n_chosen), per_token_mean(ref_rejected, n_rejected),
                    beta=beta)


def exo_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """KL(q || p_eps) over {y_w, y_l}   (EXO, Ji et al. 2024, arXiv 2402.00856, Eq. 16, K = 2):

        q = (sigma(beta h), sigma(-beta h)),   p_eps = (1 - eps, eps),
        loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps).

    EXO minimises the reverse KL to the smoothed label where DPO minimises the forward one.
    Zero at beta h = log((1 - eps) / eps); needs 0 < eps < 1 (the paper uses 1e-3). Value at
    h = 0: -ln 2 - (1/2) log(eps (1 - eps)).
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair_loss: label_smoothing must lie in (0, 1) (EXO uses 1e-3), "
                         f"got {label_smoothing}")
    z = beta * logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    eps = label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float) -> Tensor:
    """-log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l),  r = beta * lr
    (NCA, Chen et al. 2024, arXiv 2402.05369, pairwise form; TRL's "nca_pair").

    Each response's own reward is classified against the reference, so the chosen reward is
    pushed up in absolute terms, not only relative to the rejected one. 2 ln 2 at the reference.
    """
    rw = beta * (policy_chosen - ref_chosen)
    rl = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def bco_pair_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float, delta: float | Tensor = 0.0) -> Tensor:
    """-log sigma(r_w - delta) - log sigma(-(r_l - delta)),  r = beta * lr
    (BCO, Jung et al. 2024, arXiv 2404.04656, applied to both responses of a pair).

    Chosen responses are one class, rejected ones the other. delta is the paper's reward
    shift: a running mean of past rewards beta * lr (chosen and rejected, detached). That mean
    is state, so it stays outside: whoever calls this keeps it and passes it in (a scalar or a
    (B,) tensor). The registry's "bco_pair" passes delta = 0, which is TRL 1.16's "bco_pair"
    (it dropped the running mean); 2 ln 2 at the reference then.
    """
    rw = beta * (policy_chosen - ref_chosen)
    rl = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))


def sppo_hard_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                   ref_rejected: Tensor, *, beta: float) -> Tensor:
    """(lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2
    (SPPO, Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with the hard win probability P = 1
    for y_w and 0 for y_l).

    Each log-ratio regresses to +-1/(2 beta) on its own; 1/(2 beta^2) at the reference.
    """
    if beta <= 0:
        raise ValueError(f"sppo_hard_loss: beta must be > 0 (targets +-1/(2 beta)), got {beta}")
    target = 0.5 / beta
    return (policy_chosen - ref_chosen - target) ** 2 + (policy_rejected - ref_rejected + target) ** 2


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """(1 - eps)(-log sigma(z)) + eps(-log sigma(-z)): cDPO's smoothing of the logistic loss."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def aot_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Alignment via optimal transport, paired (AOT, Melnyk et al. 2024, arXiv 2406.05882):

        d_(i) = sort_i(policy_chosen - policy_rejected) - sort_i(ref_chosen - ref_rejected),
        loss_i = (1 - eps)(-log sigma(beta d_(i))) + eps(-log sigma(-beta d_(i))).

    Sorting within the batch makes the policy's distribution of margins dominate the
    reference's (first-order stochastic dominance, a 1-D optimal transport). The output is
    still (B,), but entry i belongs to the i-th order statistic, not to pair i; on a batch
    whose two margin vectors are already in the same order it is DPO (with cDPO smoothing).
    """
    _check_smoothing(label_smoothing, upper=1.0, name="aot_loss")
    pol, _ = torch.sort(policy_chosen - policy_rejected, dim=0)
    ref, _ = torch.sort(ref_chosen - ref_rejected, dim=0)
    return _smoothed_logistic(beta * (pol - ref), label_smoothing)


def aot_unpaired_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                      ref_rejected: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024): d_(i) = sort_i(lr_w) - sort_i(lr_l), then the
    smoothed logistic loss of :func:`aot_loss`. The chosen log-ratios' distribution is made
    to dominate the rejected ones', with no pairing between them. (B,), by order statistic.
    """
    _check_smoothing(label_smoothing, upper=1.0, name="aot_unpaired_loss")
    lw, _ = torch.sort(policy_chosen - ref_chosen, dim=0)
    ll, _ = torch.sort(policy_rejected - ref_rejected, dim=0)
    return _smoothed_logistic(beta * (lw - ll), label_smoothing)


def apo_zero_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float) -> Tensor:
    """(1 - sigma(r_w)) + sigma(r_l),  r = beta * lr   (APO-zero, D'Oosterlinck et al. 2024,
    arXiv 2408.06266, Eq. 7). For chosen answers better than the model's
    own: raise the chosen likelihood, lower the rejected one. 1 at the reference."""
    return (1.0 - torch.sigmoid(beta * (policy_chosen - ref_chosen))
            + torch.sigmoid(beta * (policy_rejected - ref_rejected)))


def apo_down_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float) -> Tensor:
    """sigma(r_w) + (1 - sigma(beta h)),  r_w = beta * lr_w   (APO-down, D'Oosterlinck et al.
    2024, Eq. 8). For chosen answers worse than the model's own: lower both likelihoods, the
    rejected one more. 1 at the reference."""
    lw = policy_chosen - ref_chosen
    return torch.sigmoid(beta * lw) + 1.0 - torch.sigmoid(beta * (lw - (policy_rejected - ref_rejected)))


def discopop_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, beta: float, tau: float = 0.05) -> Tensor:
    """Log-ratio modulated loss (DiscoPOP, Lu et al. 2024, arXiv 2406.08414, Eq. 5):

        z = beta h,  m = sigma(z / tau),
        loss = (1 - m)(-log sigma(z)) + m exp(-z).

    A blend of the logistic (DPO) and the exponential loss, switched by the sign of the
    margin at temperature tau (the paper's 0.05). Limits: tau -> 0 gives the logistic loss for
    z < 0 and exp(-z) for z > 0; tau -> inf gives their mean. (ln 2 + 1)/2 at the reference.
    """
    if tau <= 0:
        raise ValueError(f"discopop_loss: tau must be > 0, got {tau}")
    z = beta * logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    # m * exp(-z) as exp(log m - z): for z << 0, m underflows to 0 while exp(-z) overflows,
    # and 0 * inf is nan; in log space the product is just a small number.
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
