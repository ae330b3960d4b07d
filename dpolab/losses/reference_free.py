"""Reference-free preference losses: no pi_ref anywhere, so no reference pass is needed.

Inputs are the policy's summed completion log-probs policy_chosen, policy_rejected (B,) and
the completion token counts n_chosen, n_rejected (B,) where a loss normalises by length;
every function returns (B,) losses. The NLL parts are per-token means,
-policy_chosen / |y_w|, as in the papers (and TRL's CPO and ORPO trainers, which average
over the batch's tokens instead of per example; equal when the lengths are equal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpolab.losses.core import per_token_mean

Tensor = torch.Tensor


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float, gamma: float,
               n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
    """-log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
    (SimPO, Meng et al. 2024, arXiv 2405.14734, Eq. 6).

    The implicit reward is the length-normalised log-likelihood itself, and gamma > 0 is a
    target reward margin. gamma is in reward units (TRL's CPOConfig.simpo_gamma; the SimPO
    code's gamma_beta_ratio is gamma / beta). The paper's beta is large (2 to 10).
    """
    z = beta * (per_token_mean(policy_chosen, n_chosen) - per_token_mean(policy_rejected, n_rejected))
    return -F.logsigmoid(z - gamma)


def cpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, *, beta: float, alpha: float,
             n_chosen: Tensor) -> Tensor:
    """-log sigma(beta log pi(y_w|x) - beta log pi(y_l|x)) + alpha * (-log pi(y_w|x) / |y_w|)
    (CPO, Xu et al. 2024, arXiv 2401.08417, Eq. 3 plus the NLL regulariser of its Eq. 4).

    DPO with the reference replaced by a uniform prior (so it cancels), plus behaviour
    cloning on the chosen response; alpha is TRL's cpo_alpha. The preference term uses the
    summed log-probs, as TRL's CPO does for its "sigmoid" loss.
    """
    pref = -F.logsigmoid(beta * (policy_chosen - policy_rejected))
    return pref + alpha * -per_token_mean(policy_chosen, n_chosen)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0, where 1 - exp(x) loses all its digits, and
    log1p(-exp(x)) far below, where exp(x) is tiny. -inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds_ratio(policy_chosen: Tensor, policy_rejected: Tensor, *, n_chosen: Tensor,
                        n_rejected: Tensor) -> Tensor:
    """log odds(y_w) - log odds(y_l), odds(y) = P(y|x) / (1 - P(y|x)), log P the per-token mean
    log-prob (ORPO, Eq. 4 and 5). Computed in log space: log odds = log P - log(1 - P) with
    log(1 - P) = log1mexp(log P), never 1 - exp(log P)."""
    lw = per_token_mean(policy_chosen, n_chosen)
    ll = per_token_mean(policy_rejected, n_rejected)
    return (lw - log1mexp(lw)) - (ll - log1mexp(ll))


def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, *, lam: float, n_chosen: Tensor,
              n_rejected: Tensor) -> Tensor:
    """-log P(y_w|x)/|y_w| + lam * (-log sigma(log odds(y_w) - log odds(y_l)))
    (ORPO, Hong et al. 2024, arXiv 2403.07691, Eq. 6 and 7; lam is TRL's ORPOConfig.beta).

    An SFT loss plus an odds-ratio penalty on the rejected response; the per-token mean
    log-probs must be < 0 (a completion the policy is not certain of), else the odds are inf.
    """
    ratio = orpo_log_odds_ratio(policy_chosen, policy_rejected, n_chosen=n_chosen,
                                n_rejected=n_rejected)
    return -per_token_mean(policy_chosen, n_chosen) - lam * F.logsigmoid(ratio)
