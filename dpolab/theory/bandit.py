"""The 3-response bandit on which DPO is a misspecified estimator (arXiv 2510.20413, Prop. 3).

Setting. One prompt, responses a1, a2, a3, a 1-D policy family

    pi_theta = softmax(theta * s),  s = [1, -1, 0],  reference theta0 = 0 (uniform),

true reward r* = [1, 2, 0] (order a2 > a1 > a3) and soft Bradley-Terry labels
p_ij = sigma(r*_i - r*_j) on the pairs (1,2), (2,3), (3,1) with counts (n12, n23, n31).
The implicit reward is r_theta = beta * log(pi_theta / pi_theta0); its reward differences are
exactly linear, r_theta(i) - r_theta(j) = beta * theta * (s_i - s_j), so the implicit rewards
form the line span(s) modulo constants, which does not contain r*: the model is misspecified.

Population objectives. Every preference loss l(chosen, rejected) of :mod:`dpolab.losses` is
averaged over the labels, pair by pair,

    L(theta) = sum_ij n_ij [ p_ij l(i > j) + (1 - p_ij) l(j > i) ],

so in each half the response named first is the chosen one (this fixes where DPOP's penalty
max(0, -h_w) applies). DPO/IPO/AuxDPO margins are linear in theta, so those objectives are
convex; DPOP's is convex too (-log sigma is decreasing and its argument concave) but has kinks
where a chosen log-ratio crosses 0. AuxDPO adds delta = Gamma c, Gamma an orthonormal basis of
N(A), A = d/dtheta log pi_theta at theta0 = [1, -1, 0] (the softmax centering vanishes at the
uniform reference), and minimises over (theta, c).

Conventions that reproduce the paper's table (counts (1, 1, 10), beta = lambda = 1): IPO is
(h - 1/(2 beta))^2 on the log-ratio margin h, DPOP is -log sigma(beta (h - lambda max(0, -h_w))),
labels are soft. The paper's expected rewards are these values *truncated* to three decimals
(DPO 0.89563 -> 0.895, DPOP 0.96976 -> 0.969). "Reversal" is judged on the reward each method
learns (beta log pi/pi0, plus delta for AuxDPO): the 1-D family cannot rank a2 > a1 > a3 with
its policy (theta < 0 gives a2 > a3 > a1), so the paper's "AuxDPO: correct order" is the order of
r_theta + delta. The policy's own ranking is reported as ``policy_reversal``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from dpolab.auxdpo import null_space_basis
from dpolab.losses import auxdpo_loss, dpo_loss, dpop_loss, ipo_loss
from dpolab.threads import single_thread

Tensor = torch.Tensor
DTYPE = torch.float64
PAIRS = ((0, 1), (1, 2), (2, 0))  # (1,2), (2,3), (3,1) in the paper's 1-based names
METHODS = ("base", "DPO", "IPO", "DPOP", "AuxDPO", "RLHF", "RLHF-linearised")
PREFERENCE_METHODS = ("DPO", "IPO", "DPOP", "AuxDPO")


@dataclass(frozen=True)
class BanditSetting:
    """The bandit of Prop. 3; defaults are the paper's table."""

    counts: tuple[float, float, float] = (1.0, 1.0, 10.0)  # n12, n23, n31: pairs per label set
    beta: float = 1.0  # KL strength / implicit-reward scale
    dpop_lambda: float = 1.0  # DPOP's penalty weight lambda
    r_star: tuple[float, float, float] = (1.0, 2.0, 0.0)  # true reward r*(a1), r*(a2), r*(a3)
    features: tuple[float, float, float] = (1.0, -1.0, 0.0)  # s: logits = theta * s
    theta0: float = 0.0  # reference parameter (uniform policy)


def check_setting(setting: BanditSetting) -> None:
    """Raise ValueError naming the first bad field."""
    if len(setting.counts) != 3 or len(setting.r_star) != 3 or len(setting.features) != 3:
        raise ValueError("counts, r_star and features need exactly 3 entries (n12, n23, n31)")
    if any(not math.isfinite(n) or n < 0 for n in setting.counts) or sum(setting.counts) <= 0:
        raise ValueError(f"counts must be finite, >= 0 and not all 0, got {setting.counts}")
    if not (math.isfinite(setting.beta) and setting.beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {setting.beta}")
    if not (math.isfinite(setting.dpop_lambda) and setting.dpop_lambda >= 0):
        raise ValueError(f"dpop lambda must be a finite number >= 0, got {setting.dpop_lambda}")


# ----------------------------------------------------------------------------------------
# The policy family and its local geometry


def log_policy(theta: Tensor | float, setting: BanditSetting) -> Tensor:
    """log pi_theta = log_softmax(theta * s), shape (3,)."""
    theta = torch.as_tensor(theta, dtype=DTYPE)
    return torch.log_softmax(theta * torch.tensor(setting.features, dtype=DTYPE), dim=0)


def policy(theta: float, setting: BanditSetting) -> np.ndarray:
    """pi_theta as a numpy array (3,)."""
    return log_policy(theta, setting).exp().numpy()


def score_matrix(setting: BanditSetting) -> Tensor:
    """A (P=1, n=3): column a is d/dtheta log pi_theta(a) at theta0, = s - E_pi0[s]
    (= [1, -1, 0] at the uniform reference). Computed by autograd, not by hand."""
    jac = torch.autograd.functional.jacobian(
        lambda t: log_policy(t, setting), torch.tensor(setting.theta0, dtype=DTYPE))
    return jac.reshape(1, -1)


@lru_cache(maxsize=256)
def null_basis(setting: BanditSetting) -> Tensor:
    """Gamma (3, 2): orthonormal basis of N(A), where AuxDPO's delta lives (cached per
    setting: the solvers read it at every evaluation; do not modify the returned tensor)."""
    return null_space_basis(score_matrix(setting))


def rlhf_linearised_theta(setting: BanditSetting) -> float:
    """theta* = theta0 + (1/beta) F^+ A_rho r*   (Sec. 4.1), the natural-gradient step.

    A_rho = A diag(pi0) (so A_rho r* = grad_theta E_pi[r*] at theta0) and
    F = A diag(pi0) A^T is the Fisher information of the family at theta0.
    """
    A = score_matrix(setting)  # (1, 3)
    pi0 = log_policy(setting.theta0, setting).exp()  # (3,)
    a_rho = A * pi0  # (1, 3)
    fisher = a_rho @ A.T  # (1, 1)
    step = torch.linalg.pinv(fisher) @ a_rho @ torch.tensor(setting.r_star, dtype=DTYPE)
    return setting.theta0 + float(step[0]) / setting.beta


# ----------------------------------------------------------------------------------------
# Population objectives


@lru_cache(maxsize=256)
def _halves(setting: BanditSetting) -> tuple[Tensor, Tensor, Tensor]:
    """Both label halves of every pair: chosen (6,), rejected (6,) indices and weights (6,)
    n_ij p_ij for i > j and n_ij (1 - p_ij) for j > i."""
    chosen, rejected, weight = [], [], []
    for (i, j), n in zip(PAIRS, setting.counts):
        p = 1.0 / (1.0 + math.exp(-(setting.r_star[i] - setting.r_star[j])))
        chosen += [i, j]
        rejected += [j, i]
        weight += [n * p, n * (1.0 - p)]
    return torch.tensor(chosen), torch.tensor(rejected), torch.tensor(weight, dtype=DTYPE)


# name -> per-half loss(pc, pr, rc, rr, dc, dr, setting); delta is zero except for AuxDPO.
_LOSS: dict[str, Callable[..., Tensor]] = {
    "DPO": lambda pc, pr, rc, rr, dc, dr, s: dpo_loss(pc, pr, rc, rr, beta=s.beta),
    "IPO": lambda pc, pr, rc, rr, dc, dr, s: ipo_loss(pc, pr, rc, rr, beta=s.beta),
    "DPOP": lambda pc, pr, rc, rr, dc, dr, s: dpop_loss(pc, pr, rc, rr, beta=s.beta,
                                                        lam=s.dpop_lambda),
    "AuxDPO": lambda pc, pr, rc, rr, dc, dr, s: auxdpo_loss(
        pc, pr, rc, rr, delta_chosen=dc, delta_rejected=dr, beta=s.beta),
}


def population_loss(method: str, theta: Tensor | float, setting: BanditSetting,
                    c: Tensor | None = None) -> Tensor:
    """sum_ij n_ij [p_ij l(i > j) + (1 - p_ij) l(j > i)], a scalar, differentiable in theta
    and (AuxDPO) in the null-space coordinates c (2,), delta = Gamma c."""
    delta = None if c is None else null_basis(setting) @ c  # (3,)
    return pair_objective(method, log_policy(theta, setting),
                          log_policy(setting.theta0, setting), setting, delta)


def pair_objective(method: str, logp: Tensor, ref: Tensor, setting: BanditSetting,
                   delta: Tensor | None = None) -> Tensor:
    """The population objective of `method` for any policy family: logp, ref (3,) the
    log-probabilities of the three responses under the policy and the reference, delta (3,)
    AuxDPO's auxiliary rewards (None: zero); counts, labels and beta from `setting`."""
    try:
        loss = _LOSS[method]
    except KeyError:
        raise ValueError(f"unknown preference method {method!r}; valid: "
                         f"{', '.join(_LOSS)}") from None
    chosen, rejected, weight = _halves(setting)
    delta = torch.zeros(3, dtype=DTYPE) if delta is None else delta
    per_half = loss(logp[chosen], logp[rejected], ref[chosen], ref[rejected],
                    delta[chosen], delta[rejected], setting)  # (6,)
    return (weight * per_half).sum()


def rlhf_objective(theta: Tensor | float, setting: BanditSetting) -> Tensor:
    """J(theta) = E_pi_theta[r*] - beta KL(pi_theta || pi_theta0), a scalar."""
    logp = log_policy(theta, setting)
    ref = log_policy(setting.theta0, setting)
    pi = logp.exp()
    return pi @ torch.tensor(setting.r_star, dtype=DTYPE) - setting.beta * (pi @ (logp - ref))


# ----------------------------------------------------------------------------------------
# Solvers


def derivatives(fun: Callable[[Tensor], Tensor], theta: float) -> tuple[float, float]:
    """(f'(theta), f''(theta)) of a scalar torch function, by autograd in float64."""
    t = torch.tensor(theta, dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(fun(t), t, create_graph=True)
    (h,) = torch.autograd.grad(g, t)
    return float(g.detach()), float(h)


def minimise_scalar(fun: Callable[[Tensor], Tensor], *, scale: float,
                    tol: float = 1e-12) -> float:
    """argmin of a scalar function of theta, to ~1e-10 or better.

    Bounded Brent on [-T, T] (T = scale, quadrupled while the minimum sits on the edge), then
    Newton on f' for the digits Brent cannot see: near a smooth minimum f changes by
    (d theta)^2, so f alone resolves theta only to ~sqrt(eps) = 1e-8. A Newton step is kept only
    if it shrinks |f'| with f'' > 0 and does not raise f; at a kink (DPOP) f' never vanishes and
    Brent's answer, sharp there because f is V-shaped, stands.
    """
    half = scale
    for _ in range(12):
        res = minimize_scalar(lambda t: float(fun(torch.tensor(t, dtype=DTYPE))),
                              bounds=(-half, half), method="bounded",
                              options={"xatol": tol, "maxiter": 500})
        if abs(res.x) < 0.999 * half:
            break
        half *= 4.0
    else:
        raise RuntimeError(f"no minimum found within |theta| <= {half:g}")
    theta = float(res.x)
    g, h = derivatives(fun, theta)
    f = float(fun(torch.tensor(theta, dtype=DTYPE)))
    for _ in range(50):
        if h <= 0 or g == 0.0:
            break
        cand = theta - g / h
        g_new, h_new = derivatives(fun, cand)
        f_new = float(fun(torch.tensor(cand, dtype=DTYPE)))
        # Both tests: a step across a kink can shrink |f'| while f rises (f' jumps there).
        if abs(g_new) >= abs(g) or f_new > f + 4 * np.finfo(float).eps * abs(f):
            break
        f = f_new
        theta, g, h = cand, g_new, h_new
        if abs(g / h) < tol:
            theta -= g / h
            break
    return theta


def joint_newton(fun: Callable[[Tensor], Tensor], z: Tensor, *, tol: float = 1e-13,
                  max_iter: int = 100) -> Tensor:
    """Damped Newton with pseudo-inverse steps for a convex smooth f(z).

    The AuxDPO loss is flat along the null-space direction that shifts every reward by the
    same constant (delta = [1, 1, 1] is in N(A) and cancels in every margin), so the Hessian is
    singular. pinv steps from c = 0 stay orthogonal to that flat direction: the answer is the
    minimum-norm delta among the minimisers.
    """
    for _ in range(max_iter):
        zz = z.detach().requires_grad_(True)
        f = fun(zz)
        (g,) = torch.autograd.grad(f, zz)
        H = torch.autograd.functional.hessian(fun, z.detach())
        step = -(torch.linalg.pinv(H, rtol=1e-10) @ g)
        t = 1.0
        f0, slope = float(f.detach()), float(g @ step)
        while t > 1e-8 and float(fun(z + t * step)) > f0 + 1e-4 * t * slope:
            t *= 0.5  # backtracking (Armijo): full Newton steps overshoot far from the optimum
        z = (z + t * step).detach()
        if float(step.norm()) * t < tol:
            break
    return z


@dataclass(frozen=True)
class Optimum:
    """One method's solution: theta, and for AuxDPO the null-space coordinates and delta."""

    theta: float
    c: tuple[float, ...] = ()
    delta: tuple[float, ...] = (0.0, 0.0, 0.0)


def _scale(setting: BanditSetting) -> float:
    """Initial bracket half-width: optimal margins are O(max |r*_i - r*_j| + 1) / beta."""
    spread = max(setting.r_star) - min(setting.r_star)
    return 2.0 * (1.0 + spread) / setting.beta


def solve(method: str, setting: BanditSetting) -> Optimum:
    """The population optimum of one method (see METHODS)."""
    with single_thread():
        return _solve(method, setting)


def _solve(method: str, setting: BanditSetting) -> Optimum:
    if method == "base":
        return Optimum(theta=setting.theta0)
    if method == "RLHF":
        return Optimum(theta=minimise_scalar(lambda t: -rlhf_objective(t, setting),
                                             scale=_scale(setting)))
    if method == "RLHF-linearised":
        return Optimum(theta=rlhf_linearised_theta(setting))
    if method == "AuxDPO":
        k = null_basis(setting).shape[1]
        z = joint_newton(lambda z: population_loss("AuxDPO", z[0], setting, z[1:]),
                          torch.zeros(1 + k, dtype=DTYPE))
        c = z[1:]
        delta = null_basis(setting) @ c
        return Optimum(theta=float(z[0]), c=tuple(c.tolist()), delta=tuple(delta.tolist()))
    if method in _LOSS:
        return Optimum(theta=minimise_scalar(lambda t: population_loss(method, t, setting),
                                             scale=_scale(setting)))
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def auxdpo_profile(theta: float, setting: BanditSetting) -> tuple[float, Tensor]:
    """min_c L_AuxDPO(theta, c) and its minimiser c (the nested form of the AuxDPO solve)."""
    k = null_basis(setting).shape[1]
    th = torch.tensor(theta, dtype=DTYPE)
    with single_thread():
        c = joint_newton(lambda c: population_loss("AuxDPO", th, setting, c),
                          torch.zeros(k, dtype=DTYPE))
        return float(population_loss("AuxDPO", th, setting, c)), c


# ----------------------------------------------------------------------------------------
# What a solution means: order, reversal, degradation


def ranking(scores: np.ndarray | list[float], *, tol: float = 1e-9) -> str:
    """'a2 > a1 > a3' (best first), '=' between scores within tol."""
    order = sorted(range(len(scores)), key=lambda a: -scores[a])
    text = f"a{order[0] + 1}"
    for prev, a in zip(order, order[1:]):
        text += (" = " if abs(scores[prev] - scores[a]) <= tol else " > ") + f"a{a + 1}"
    return text


def is_reversal(scores: np.ndarray | list[float], r_star: np.ndarray | list[float], *,
                tol: float = 1e-9) -> bool:
    """True iff scores rank some pair strictly against r*: r*_i > r*_j but
    scores_i < scores_j - tol. Ties (e.g. the uniform reference) are not reversals."""
    n = len(r_star)
    return any(r_star[i] > r_star[j] and scores[i] < scores[j] - tol
               for i in range(n) for j in range(n))


def is_degradation(pi: np.ndarray, pi0: np.ndarray, r_star: np.ndarray, *,
                   tol: float = 1e-9) -> bool:
    """True iff E_pi[r*] < E_pi0[r*] - tol: the policy is worse than the reference."""
    return float(pi @ r_star) < float(pi0 @ r_star) - tol


def table_row(method: str, setting: BanditSetting) -> dict:
    """One method's row of results.json (the learned reward is beta log pi/pi0 + beta delta:
    auxdpo_loss puts delta inside the beta-scaled margin)."""
    opt = solve(method, setting)
    r_star = np.array(setting.r_star)
    pi, pi0 = policy(opt.theta, setting), policy(setting.theta0, setting)
    learned = setting.beta * (np.log(pi) - np.log(pi0) + np.array(opt.delta))
    row = {"method": method, "theta": opt.theta, "policy": pi.tolist(),
           "expected_reward": float(pi @ r_star),
           "reversal": is_reversal(learned, r_star),
           "degradation": is_degradation(pi, pi0, r_star),
           "policy_reversal": is_reversal(pi, r_star),
           "order": ranking(learned), "policy_order": ranking(pi),
           "reward": learned.tolist()}
    if method == "AuxDPO":
        row["delta"] = list(opt.delta)
    return row


def table(setting: BanditSetting) -> list[dict]:
    return [table_row(m, setting) for m in METHODS]


def sweep(setting: BanditSetting, *, over: str, values: list[float]) -> dict:
    """theta and E_pi[r*] of every method as one setting varies: over = 'n31' or 'beta'."""
    out = {"values": list(values), "theta": {m: [] for m in METHODS},
           "expected_reward": {m: [] for m in METHODS}}
    for v in values:
        if over == "n31":
            s = replace(setting, counts=(setting.counts[0], setting.counts[1], float(v)))
        elif over == "beta":
            s = replace(setting, beta=float(v))
        else:
            raise ValueError(f"sweep: unknown axis {over!r}; valid: n31, beta")
        for m in METHODS:
            theta = solve(m, s).theta
            out["theta"][m].append(theta)
            out["expected_reward"][m].append(float(policy(theta, s) @ np.array(s.r_star)))
    return out


# ----------------------------------------------------------------------------------------
# Command line


def format_table(rows: list[dict]) -> str:
    head = (f"{'method':<16}{'theta':>10}  {'policy (a1, a2, a3)':<26}{'E[r*]':>8}  "
            f"{'reversal':<9}{'degraded':<9}{'learned-reward order':<22}policy order")
    lines = [head, "-" * len(head)]
    for r in rows:
        pol = ", ".join(f"{p:.4f}" for p in r["policy"])
        lines.append(f"{r['method']:<16}{r['theta']:>10.6f}  {pol:<26}{r['expected_reward']:>8.5f}"
                     f"  {str(r['reversal']):<9}{str(r['degradation']):<9}{r['order']:<22}"
                     f"{r['policy_order']}")
    return "\n".join(lines)
