"""Differential information: why DPO's log-ratio reward learns the target policy
(Won, Lee, Hwang, Seo, "Differential Information Distribution", arXiv 2505.23761).

Notation (categorical policies over M responses, every vector (M,), log space, float64):
    logp_ref      log pi_ref(y)        the reference policy; chosen responses y_w ~ pi_ref
    logp_target   log pi*(y)           the target policy the preferences should teach
    logp_l        log pi_l(y)          the policy rejected responses y_l are sampled from
    d(y) = log pi*(y) - log pi_ref(y)  the log-ratio DPO's reward is built from

The Differential Information Distribution (DID) of pi against pi_ref is the normalised
likelihood ratio (paper, Thm. 3.2)

    q_{pi/pi_ref}(y) = (pi(y)/pi_ref(y)) / sum_y' (pi(y')/pi_ref(y')),

the distribution over responses carrying the evidence X that turns pi_ref into pi by Bayes'
rule: pi(y) = pi_ref(y) P(X|y) / P(X) with P(X|y) proportional to q(y).

Preference data encodes differential information when y_w ~ pi_ref, y_l ~ pi_l and

    p(y_w > y_l) = sigma(log q_{pi_ref/pi_l}(y_w) - log q_{pi_ref/pi_l}(y_l))        (1)

(a Bradley-Terry model whose reward is log pi_ref/pi_l). If q_{pi_ref/pi_l} ∝ q_{pi*/pi_ref}^beta
(the power-law condition, Thm. 3.3), the normalisers cancel in the difference and

    p(y_w > y_l) = sigma(beta d(y_w) - beta d(y_l)),                                (2)

so the Bradley-Terry reward is beta log(pi*/pi_ref) + const and DPO's implicit reward
beta log(pi_theta/pi_ref) attains the population optimum exactly at pi_theta = pi*.
Solving the power-law condition for pi_l gives the optimal rejected-response sampler

    pi_ref/pi_l ∝ (pi*/pi_ref)^beta   =>   pi_l ∝ pi_ref^(1+beta) / pi*^beta.            (3)

The plotting, report and command line live in :mod:`dpolab.theory.did_report`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dpolab.did_probe import did_entropy_estimate  # beside the trainer's DID probe
from dpolab.losses import gpo_loss
from dpolab.threads import single_thread

Tensor = torch.Tensor
DTYPE = torch.float64


# ----------------------------------------------------------------------------- distributions
def did_logp(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """log q_{pi/pi_ref}(y) = (log pi - log pi_ref)(y) - logsumexp_y'(log pi - log pi_ref)(y').

    logp, logp_ref (..., M) log-probabilities; returns (..., M). Computed in log space so a
    ratio of two tiny probabilities never under- or overflows."""
    log_ratio = logp - logp_ref
    return log_ratio - torch.logsumexp(log_ratio, dim=-1, keepdim=True)


def did(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """q_{pi/pi_ref} as probabilities (..., M): positive where both policies are, sums to 1."""
    return did_logp(logp, logp_ref).exp()


def entropy(logp: Tensor) -> Tensor:
    """H(p) = -sum_y p(y) log p(y) in nats over the last axis; 0 log 0 = 0."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def did_entropy(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Exact H(q_{pi/pi_ref}) for categorical policies (..., M) -> (...)."""
    return entropy(did_logp(logp, logp_ref))


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_y p(y) (log p(y) - log q(y)) over the last axis; terms with p = 0 drop."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen-Shannon divergence 1/2 KL(p||m) + 1/2 KL(q||m), m = (p + q)/2, in nats (<= log 2)."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)


def loglik_displacement(logp_target: Tensor, logp_ref: Tensor) -> Tensor:
    """E_{y ~ pi_ref}[log pi*(y) - log pi_ref(y)] = -KL(pi_ref || pi*) <= 0.

    The expected change of the chosen log-likelihood when chosen responses come from pi_ref
    and training reaches pi* exactly: it is negative unless pi* = pi_ref, so a falling chosen
    log-likelihood is no sign of failed training."""
    return (logp_ref.exp() * (logp_target - logp_ref)).sum(-1)


# ----------------------------------------------------------------------------- preference data
def optimal_rejected_logp(logp_ref: Tensor, logp_target: Tensor, *, beta: float) -> Tensor:
    """log pi_l with pi_l ∝ pi_ref^(1+beta) / pi*^beta   (Eq. 3 above; the paper's closed form).

    Derivation: the power-law condition asks pi_ref/pi_l = C (pi*/pi_ref)^beta for a constant C,
    so pi_l = pi_ref (pi_ref/pi*)^beta / C and C is fixed by normalisation."""
    if beta <= 0:
        raise ValueError(f"optimal_rejected_logp: beta must be > 0, got {beta}")
    return torch.log_softmax((1.0 + beta) * logp_ref - beta * logp_target, dim=-1)


def power_law_gap(logp_ref: Tensor, logp_l: Tensor, logp_target: Tensor, *, beta: float) -> float:
    """max - min over y of log q_{pi_ref/pi_l}(y) - beta log q_{pi*/pi_ref}(y).

    The power-law condition q_{pi_ref/pi_l} ∝ q_{pi*/pi_ref}^beta holds iff this difference is
    a constant, i.e. iff the gap is 0."""
    u = did_logp(logp_ref, logp_l) - beta * did_logp(logp_target, logp_ref)
    return float(u.max() - u.min())


def preference_prob(logp_ref: Tensor, logp_l: Tensor) -> Tensor:
    """(M, M) matrix P[a, b] = p(y_w = a beats y_l = b) = sigma(log q(a) - log q(b)),
    q = q_{pi_ref/pi_l}  (Eq. 1). Row index: the pi_ref sample, column: the pi_l sample."""
    log_q = did_logp(logp_ref, logp_l)
    return torch.sigmoid(log_q[:, None] - log_q[None, :])


def winner_logp(logp_ref: Tensor, logp_l: Tensor) -> Tensor:
    """log of the law of the label-preferred response when a ~ pi_ref, b ~ pi_l, labels Eq. 1.

        P(winner = y) = sum_b pi_ref(y) pi_l(b) P[y, b] + sum_a pi_ref(a) pi_l(y) (1 - P[a, y]).
    Derivation that it equals pi_ref: with u = log pi_ref - log pi_l, P[a, b] = sigma(u(a) - u(b))
    = pi_ref(a) pi_l(b) / S(a, b) with S(a, b) = pi_ref(a) pi_l(b) + pi_ref(b) pi_l(a) symmetric,
    so pi_ref(a) pi_l(y) (1 - P[a, y]) = pi_ref(a) pi_l(y) pi_ref(y) pi_l(a) / S(a, y)
    = pi_ref(y) pi_l(a) (1 - P[y, a]); the two sums then add to pi_ref(y) sum_b pi_l(b) = pi_ref(y).
    Eq. 1 is the one labelling that keeps winners ~ pi_ref and losers ~ pi_l. Returns (M,)."""
    p = preference_prob(logp_ref, logp_l)                                     # (M, M)
    joint = logp_ref.exp()[:, None] * logp_l.exp()[None, :]                  # (M, M) [a, b]
    return ((joint * p).sum(1) + (joint * (1.0 - p)).sum(0)).log()


def log_margin(logp: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """m(pi) = log pi(y_w) - log pi(y_l) per pair; chosen, rejected (N,) response indices."""
    return logp[chosen] - logp[rejected]


def log_margin_ordering(margin_l: Tensor, margin_ref: Tensor,
                        margin_target: Tensor) -> tuple[Tensor, float]:
    """Per-pair check of m(pi_l) <= m(pi_ref) <= m(pi*) and the fraction of pairs satisfied.

    All inputs (N,) log-margins m = log pi(y_w) - log pi(y_l) of the preferred pair under the
    rejected-response sampler, the reference and the target. Under the power-law condition
    m(pi_ref) - m(pi_l) = beta (m(pi*) - m(pi_ref)) (take logs of Eq. 3 at y_w and y_l and
    subtract), so a pair the target prefers (m(pi*) > m(pi_ref)) is ordered on both sides:
    the ordering is the inductive bias the paper finds behind DPO data. Returns ((N,) bool, frac).
    """
    ok = (margin_l <= margin_ref) & (margin_ref <= margin_target)
    return ok, float(ok.double().mean()) if ok.numel() else float("nan")


# ----------------------------------------------------------------------------- reward forms
# Every reward form is r(y) = beta (log pi(y) - offset(y)) / scale(y); a form maps
# (logp_ref, lengths) -> (offset, scale), both (M,). Being affine in log pi per response,
# every form has the closed-form optimum of :func:`closed_form_optimum`.
RewardForm = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
TEMPER = 0.5  # the "tempered" form uses beta/TEMPER: a policy trained at another beta than the data's

REWARD_FORMS: dict[str, RewardForm] = {
    "dpo (beta log pi/pi_ref)": lambda ref, n: (ref, torch.ones_like(ref)),
    "ref-free (beta log pi)": lambda ref, n: (torch.zeros_like(ref), torch.ones_like(ref)),
    "length-norm (beta/|y| log pi/pi_ref)": lambda ref, n: (ref, n),
    "simpo-like (beta/|y| log pi)": lambda ref, n: (torch.zeros_like(ref), n),
    f"tempered (beta/{TEMPER} log pi/pi_ref)": lambda ref, n: (ref, torch.full_like(ref, TEMPER)),
}


def reward(logp: Tensor, offset: Tensor, scale: Tensor, *, beta: float) -> Tensor:
    """r(y) = beta (log pi(y) - offset(y)) / scale(y), (M,)."""
    return beta * (logp - offset) / scale


def closed_form_optimum(offset: Tensor, scale: Tensor, d: Tensor) -> Tensor:
    """log pi minimising the population loss for labels sigma(beta (d(a) - d(b))).

    With full coverage (pi_ref, pi_l > 0 everywhere) the logistic loss is minimised pairwise
    only when r(a) - r(b) = beta (d(a) - d(b)) for all a, b, i.e. r = beta (d + c):
        log pi(y) = offset(y) + scale(y) (d(y) + c),
    with c the unique root of logsumexp_y(...) = 0 (increasing in c as scale > 0).
    dpo: offset = log pi_ref, scale = 1  ->  pi = pi_ref e^d = pi*               (c = 0)
    ref-free: offset = 0, scale = 1       ->  pi ∝ pi*/pi_ref = q_{pi*/pi_ref}    (the DID)
    tempered: scale = tau                 ->  pi ∝ pi_ref^(1-tau) pi*^tau
    """
    lo, hi = -1.0, 1.0
    f = lambda c: float(torch.logsumexp(offset + scale * (d + c), dim=-1))  # noqa: E731
    while f(lo) > 0:
        lo *= 2.0
    while f(hi) < 0:
        hi *= 2.0
    for _ in range(200):  # bisection: f is monotone, 200 halvings reach float64 resolution
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return torch.log_softmax(offset + scale * (d + 0.5 * (lo + hi)), dim=-1)


# ----------------------------------------------------------------------------- training
def population_loss(r: Tensor, pair_weight: Tensor, label: Tensor) -> Tensor:
    """E_{a~pi_ref, b~pi_l} [ -P log sigma(r(a) - r(b)) - (1 - P) log sigma(r(b) - r(a)) ].

    r (M,) rewards; pair_weight (M, M) = pi_ref(a) pi_l(b); label (M, M) = P[a, b] of Eq. 1.
    The expected (population) Bradley-Terry loss: the limit of DPO on infinitely many pairs."""
    margin = r[:, None] - r[None, :]                                        # (M, M)
    per_pair = (label * gpo_loss(margin, f="logistic")
                + (1.0 - label) * gpo_loss(-margin, f="logistic"))
    return (pair_weight * per_pair).sum()


def train_tabular(*, offset: Tensor, scale: Tensor, logp_ref: Tensor, pair_weight: Tensor,
                  label: Tensor, beta: float, steps: int = 300, lr: float = 0.05) -> tuple[Tensor, float]:
    """Fit a full softmax-logit policy log pi = log_softmax(theta) by Adam from theta = log pi_ref,
    then polish with L-BFGS so "converged" means the gradient is at float64 round-off.
    Returns (log pi (M,), final gradient norm)."""
    with single_thread():
        return _fit(offset, scale, logp_ref, pair_weight, label, beta, steps, lr)


def _fit(offset: Tensor, scale: Tensor, logp_ref: Tensor, pair_weight: Tensor, label: Tensor,
         beta: float, steps: int, lr: float) -> tuple[Tensor, float]:
    theta = logp_ref.detach().clone().requires_grad_(True)
    loss_fn = lambda: population_loss(  # noqa: E731
        reward(torch.log_softmax(theta, -1), offset, scale, beta=beta), pair_weight, label)
    adam = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=steps)
    for _ in range(steps):
        adam.zero_grad()
        loss_fn().backward()
        adam.step()
        sched.step()
    lbfgs = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-13,
                              tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    lbfgs.step(closure)
    grad = torch.autograd.grad(loss_fn(), theta)[0]
    return torch.log_softmax(theta.detach(), -1), float(grad.norm())


# ----------------------------------------------------------------------------- experiments
def make_setting(*, responses: int, beta: float, seed: int, ref_scale: float = 1.5,
                 target_scale: float = 1.0) -> dict[str, Tensor]:
    """A random synthetic problem: pi_ref = softmax(ref_scale z), pi* = softmax(log pi_ref +
    target_scale e) with z, e ~ N(0, I_M); response lengths uniform on 1..10 (for the
    length-normalised rewards); pi_l from Eq. 3. All (M,), float64."""
    if responses < 2 or beta <= 0:
        raise ValueError(f"make_setting: need responses >= 2 and beta > 0, got {responses}, {beta}")
    g = torch.Generator().manual_seed(seed)
    logp_ref = torch.log_softmax(ref_scale * torch.randn(responses, generator=g, dtype=DTYPE), -1)
    logp_target = torch.log_softmax(
        logp_ref + target_scale * torch.randn(responses, generator=g, dtype=DTYPE), -1)
    lengths = torch.randint(1, 11, (responses,), generator=g).to(DTYPE)
    return {"logp_ref": logp_ref, "logp_target": logp_target, "lengths": lengths,
            "logp_l": optimal_rejected_logp(logp_ref, logp_target, beta=beta)}


def _train_on(s: dict[str, Tensor], form: RewardForm, *, beta: float) -> tuple[Tensor, float]:
    """Train one reward form on the population data of setting s (pairs pi_ref x pi_l, Eq. 1)."""
    offset, scale = form(s["logp_ref"], s["lengths"])
    pair_weight = s["logp_ref"].exp()[:, None] * s["logp_l"].exp()[None, :]  # (M, M)
    return train_tabular(offset=offset, scale=scale, logp_ref=s["logp_ref"], pair_weight=pair_weight,
                         label=preference_prob(s["logp_ref"], s["logp_l"]), beta=beta)


def js_table(s: dict[str, Tensor], *, beta: float) -> list[dict[str, float | str]]:
    """One row per reward form: JS of the trained policy to pi*, to the DID q_{pi*/pi_ref} and
    to the form's closed-form optimum (:func:`closed_form_optimum`), and the final gradient norm."""
    q = did_logp(s["logp_target"], s["logp_ref"])
    rows = []
    for name, form in REWARD_FORMS.items():
        logp, grad_norm = _train_on(s, form, beta=beta)
        optimum = closed_form_optimum(*form(s["logp_ref"], s["lengths"]),
                                      s["logp_target"] - s["logp_ref"])
        rows.append({"parameterisation": name,
                     "js_to_target": float(js_divergence(logp, s["logp_target"])),
                     "js_to_did": float(js_divergence(logp, q)),
                     "js_to_closed_form": float(js_divergence(logp, optimum)),
                     "grad_norm": grad_norm})
    return rows


def did_family(logp_ref: Tensor, noise: Tensor, *, temperature: float, family: str) -> Tensor:
    """log q_tau ∝ score / tau, a DID family whose entropy rises with the temperature tau.

    family "novel":       score = -log pi_ref + noise: the evidence favours responses the
                          reference finds unlikely (information the reference lacks)
    family "independent": score = noise, unrelated to pi_ref.
    The target is the Bayes update pi* ∝ pi_ref q_tau (the DID of pi* is q_tau by construction)."""
    scores = {"novel": lambda: noise - logp_ref, "independent": lambda: noise}
    if family not in scores:
        raise ValueError(f"did_family: unknown family {family!r}; valid: {sorted(scores)}")
    return torch.log_softmax(scores[family]() / temperature, -1)


def entropy_sweep(*, responses: int, beta: float, seed: int, temperatures: list[float],
                  families: tuple[str, ...] = ("novel", "independent")) -> list[dict[str, float | str]]:
    """Train DPO towards pi* ∝ pi_ref q_tau for each DID temperature and record
        did_entropy              H(q_tau)
        policy_entropy_change    H(pi_theta) - H(pi_ref)        (< 0 sharpens, > 0 smooths)
        chosen_loglik_change     E_{y_w ~ pi_ref}[log pi_theta(y_w) - log pi_ref(y_w)]
                                 = -KL(pi_ref || pi_theta) <= 0 whatever is learned.
    The label-preferred response has the same law pi_ref (:func:`winner_logp`), so this is
    also the expected change of the log-likelihood a trainer logs as `logps/chosen`.
    The target is reached exactly (js_to_target ~ 0) only while pi* stays away from one-hot:
    below tau ~ 0.3 its optimum needs logits of order 1/tau and a finite fit stops short."""
    base = make_setting(responses=responses, beta=beta, seed=seed)
    noise = torch.randn(responses, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    logp_ref, dpo = base["logp_ref"], REWARD_FORMS["dpo (beta log pi/pi_ref)"]
    rows = []
    for family in families:
        for tau in temperatures:
            log_q = did_family(logp_ref, noise, temperature=tau, family=family)
            logp_target = torch.log_softmax(logp_ref + log_q, -1)
            s = {**base, "logp_target": logp_target,
                 "logp_l": optimal_rejected_logp(logp_ref, logp_target, beta=beta)}
            logp, _ = _train_on(s, dpo, beta=beta)
            change = logp - logp_ref                                           # (M,)
            rows.append({"family": family, "temperature": tau,
                         "did_entropy": float(entropy(log_q)),
                         "policy_entropy_change": float(entropy(logp) - entropy(logp_ref)),
                         "chosen_loglik_change": float((logp_ref.exp() * change).sum()),
                         "js_to_target": float(js_divergence(logp, logp_target))})
    return rows


def closed_form_checks(s: dict[str, Tensor], *, beta: float, seed: int, pairs: int = 4000,
                       samples: int = 20000) -> dict[str, float]:
    """Numerical checks of the section's identities on setting s (all should read ~0 or 1):
    power-law gap of Eq. 3's pi_l (and of a uniform pi_l, which violates it), labels of Eq. 1
    vs Eq. 2, the displacement identity, log-margin ordering on sampled pairs, and the DID
    entropy estimator against the exact entropy."""
    g = torch.Generator().manual_seed(seed)
    ref, target, l = s["logp_ref"], s["logp_target"], s["logp_l"]
    uniform = torch.full_like(ref, -math.log(ref.numel()))
    d = target - ref
    labels_eq2 = torch.sigmoid(beta * (d[:, None] - d[None, :]))
    out = {"power_law_gap_optimal_pi_l": power_law_gap(ref, l, target, beta=beta),
           "power_law_gap_uniform_pi_l": power_law_gap(ref, uniform, target, beta=beta),
           "max_abs_label_eq1_minus_eq2": float((preference_prob(ref, l) - labels_eq2).abs().max()),
           "displacement": float(loglik_displacement(target, ref)),
           "minus_kl_ref_target": float(-kl(ref, target)),
           "max_abs_winner_logp_minus_logp_ref": float((winner_logp(ref, l) - ref).abs().max())}
    a = torch.multinomial(ref.exp(), pairs, replacement=True, generator=g)    # (N,) y ~ pi_ref
    for name, logp_l in (("optimal_pi_l", l), ("uniform_pi_l", uniform)):
        b = torch.multinomial(logp_l.exp(), pairs, replacement=True, generator=g)
        p = preference_prob(ref, logp_l)[a, b]
        for how, a_wins in (("majority", p >= 0.5),
                            ("sampled_labels", torch.rand(pairs, generator=g, dtype=DTYPE) < p)):
            w, r = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
            _, frac = log_margin_ordering(log_margin(logp_l, w, r), log_margin(ref, w, r),
                                          log_margin(target, w, r))
            out[f"log_margin_ordered_frac_{name}_{how}"] = frac
    out["did_entropy_exact"] = float(did_entropy(target, ref))
    for proposal, logp_prop in (("policy", target), ("ref", ref)):
        y = torch.multinomial(logp_prop.exp(), samples, replacement=True, generator=g)[None]  # (1, K)
        out[f"did_entropy_estimate_from_{proposal}"] = float(
            did_entropy_estimate(target[y], ref[y], sampled_from=proposal)[0])
    return out
