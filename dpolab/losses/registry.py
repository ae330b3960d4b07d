"""Named terms and weighted objectives: what the config's `loss.name` / `loss.weights` select.

Every term records, beside its function, three facts the rest of dpolab reads from here and
nowhere else:
  at_reference     its value when every log-ratio is zero (the policy equal to its reference,
                   i.e. step 0), as a function of the hyperparameters; None when it depends on
                   the policy's own log-probs (SFT and the reference-free losses)
  needs_reference  whether it reads pi_ref at all; a run whose terms all say no needs no
                   reference pass
  logps            how it reads the per-sequence log-probs (the one rule, :func:`logps_reduction`)

Hyperparameters come from :class:`dpolab.config.LossConfig` itself, so each default lives in
one place. The annotations name it without importing it: the config validates loss names
against this registry, and the import goes that way only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import torch

import dpolab.losses.core as core
import dpolab.losses.reference_free as rf
import dpolab.losses.variants as v

if TYPE_CHECKING:  # the config imports this registry at run time; annotations only here
    from dpolab.config import LossConfig

Tensor = torch.Tensor
LN2 = math.log(2.0)

# The one rule for summed vs averaged log-probs. A term's `logps` is
#   "setting"  sums over completion tokens, or per-token means when loss.average_logps=true
#              (the original DPO family: DPO, IPO, SLiC, ... are defined on sums; averaging
#              changes what beta means, so it is one recorded switch);
#   "mean"     per-token means always, because the loss is defined on them (TRL's
#              sigmoid_norm and ipo, SimPO, ORPO, the per-token SFT NLL); such a term gets the
#              sums and the token counts and normalises inside its own pure function;
#   "sum"      sums always (CPO's preference term).
LOGPS_CHOICES = ("setting", "mean", "sum")


def logps_reduction(logps: str, hyper: LossConfig) -> str:
    """"sum" or "mean": how a term declared `logps` reads log-probs under these settings."""
    if logps == "setting":
        return "mean" if hyper.average_logps else "sum"
    return logps


@dataclass(frozen=True)
class PairLogps:
    """What one batch gives the objective. Log-probs are *summed* over completion tokens;
    token counts let a term average them (see :func:`logps_reduction`). All tensors (B,)."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None  # None in a run whose terms need no reference
    ref_rejected: Tensor | None
    n_chosen: Tensor  # completion tokens of y_w
    n_rejected: Tensor  # completion tokens of y_l
    delta_chosen: Tensor | None = None  # AuxDPO auxiliary rewards, when trained
    delta_rejected: Tensor | None = None
    router_loss: Tensor | None = None  # () MoE routers' load-balancing loss (dpolab.moe), when trained
    token_sums: Tensor | None = None  # (B, 2, 3) per response, sums of the head's per-token statistics (dpolab.scoring; metrics only, no loss reads it)

    def view(self, reduction: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(policy_chosen, policy_rejected, ref_chosen, ref_rejected) as sums or per-token means."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this loss term needs the reference log-probs, and the batch has none")
        four = (self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected)
        if reduction == "sum":
            return four
        if reduction != "mean":
            raise ValueError(f"reduction must be sum or mean, got {reduction!r}")
        nc, nr = self.n_chosen, self.n_rejected
        return (core.per_token_mean(four[0], nc), core.per_token_mean(four[1], nr),
                core.per_token_mean(four[2], nc), core.per_token_mean(four[3], nr))


@dataclass(frozen=True)
class Term:
    """One named per-example loss term; calling it gives (B,) losses."""

    compute: Callable[[tuple[Tensor, ...], PairLogps, LossConfig], Tensor]  # (view, batch, hyper)
    at_reference: Callable[[LossConfig], float] | None  # value at zero log-ratios; None: policy-dependent
    needs_reference: bool = True  # reads pi_ref
    logps: str = "setting"  # one of LOGPS_CHOICES
    f_divergence: bool = False  # honours loss.f_divergence (else only reverse_kl is allowed)

    def __call__(self, p: PairLogps, h: LossConfig) -> Tensor:
        if not self.needs_reference:
            return self.compute((), p, h)
        # "mean" terms average inside their own pure functions (which take sums and counts),
        # so only "setting" terms are handed per-token means, and only under average_logps.
        reduction = logps_reduction(self.logps, h) if self.logps == "setting" else "sum"
        return self.compute(p.view(reduction), p, h)


def _pair(fn: Callable[..., Tensor], at_reference: Callable[[LossConfig], float], *,
          f_divergence: bool = False, **keys: str) -> Term:
    """A term from a pure pairwise loss fn(pc, pr, rc, rr, *, beta, ...); keys maps the loss's
    keyword names to LossConfig fields."""

    def compute(view, p, h):
        return fn(*view, beta=h.beta, **{k: getattr(h, f) for k, f in keys.items()})

    return Term(compute, at_reference, f_divergence=f_divergence)


def _counted(fn: Callable[..., Tensor], at_reference: Callable[[LossConfig], float]) -> Term:
    """A term from a pairwise loss that takes sums and token counts and averages itself."""

    def compute(view, p, h):
        return fn(*view, beta=h.beta, n_chosen=p.n_chosen, n_rejected=p.n_rejected)

    return Term(compute, at_reference, logps="mean")


def _auxdpo(view, p, h):
    if p.delta_chosen is None or p.delta_rejected is None:
        raise ValueError("the 'auxdpo' term needs the batch's auxiliary rewards (delta_chosen, "
                         "delta_rejected); the trainer supplies them when loss.name=auxdpo")
    return core.auxdpo_loss(*view, delta_chosen=p.delta_chosen, delta_rejected=p.delta_rejected,
                            beta=h.beta)


def _const(value: float) -> Callable[[LossConfig], float]:
    return lambda h: value


def _ipo_at_reference(h: LossConfig) -> float:
    return 0.25 / h.beta**2 if h.beta > 0 else math.inf  # (0 - 1/(2 beta))^2


def _exo_at_reference(h: LossConfig) -> float:
    eps = h.label_smoothing  # q = (1/2, 1/2): 2 * 1/2 * log(1/2) - 1/2 log(1 - eps) - 1/2 log eps
    return -LN2 - 0.5 * math.log(eps * (1.0 - eps)) if 0 < eps < 1 else math.inf


_GPO_AT_REFERENCE = {"logistic": LN2, "squared": 1.0, "hinge": 1.0}  # f(0)

LOSSES: dict[str, Term] = {
    # the original DPO family (dpolab.losses.core)
    "dpo": _pair(core.dpo_loss, _const(LN2), f_divergence=True, label_smoothing="label_smoothing",
                 divergence="f_divergence", alpha="f_alpha"),
    "robust": _pair(core.robust_dpo_loss, _const(LN2), label_smoothing="label_smoothing"),
    "ipo": _pair(core.ipo_loss, _ipo_at_reference),
    "slic": _pair(core.slic_loss, _const(1.0)),
    "dpop": _pair(core.dpop_loss, _const(LN2), lam="dpop_lambda"),
    "auxdpo": Term(_auxdpo, _const(LN2)),  # delta = 0 before the first update
    "gpo": Term(lambda view, p, h: core.gpo_loss(h.beta * core.logratio_margin(*view), f=h.gpo_f),
                lambda h: _GPO_AT_REFERENCE[h.gpo_f]),
    "sft": Term(lambda view, p, h: core.sft_loss(p.policy_chosen, p.n_chosen, average=True), None,
                needs_reference=False, logps="mean"),
    # TRL's loss types under TRL's names (dpolab.losses.variants); "robust" and "sft" are above
    "sigmoid": _pair(v.sigmoid_loss, _const(LN2), f_divergence=True,
                     divergence="f_divergence", alpha="f_alpha"),
    "hinge": _pair(v.hinge_loss, _const(1.0)),
    "ipo_norm": _counted(v.ipo_norm_loss, _ipo_at_reference),
    "sigmoid_norm": _counted(v.sigmoid_norm_loss, _const(LN2)),
    "exo_pair": _pair(v.exo_pair_loss, _exo_at_reference, label_smoothing="label_smoothing"),
    "nca_pair": _pair(v.nca_pair_loss, _const(2 * LN2)),
    "bco_pair": _pair(v.bco_pair_loss, _const(2 * LN2)),  # delta = 0: TRL 1.16's form
    "sppo_hard": _pair(v.sppo_hard_loss, lambda h: 0.5 / h.beta**2 if h.beta > 0 else math.inf),
    "aot": _pair(v.aot_loss, _const(LN2), label_smoothing="label_smoothing"),
    "aot_unpaired": _pair(v.aot_unpaired_loss, _const(LN2), label_smoothing="label_smoothing"),
    "apo_zero": _pair(v.apo_zero_loss, _const(1.0)),
    "apo_down": _pair(v.apo_down_loss, _const(1.0)),
    "discopop": _pair(v.discopop_loss, _const(0.5 * (LN2 + 1.0)), tau="discopop_tau"),
    # reference-free (dpolab.losses.reference_free)
    "simpo": Term(lambda view, p, h: rf.simpo_loss(
        p.policy_chosen, p.policy_rejected, beta=h.beta, gamma=h.simpo_gamma,
        n_chosen=p.n_chosen, n_rejected=p.n_rejected), None, needs_reference=False, logps="mean"),
    "cpo": Term(lambda view, p, h: rf.cpo_loss(
        p.policy_chosen, p.policy_rejected, beta=h.beta, alpha=h.cpo_alpha, n_chosen=p.n_chosen),
        None, needs_reference=False, logps="sum"),
    "orpo": Term(lambda view, p, h: rf.orpo_loss(
        p.policy_chosen, p.policy_rejected, lam=h.orpo_lambda, n_chosen=p.n_chosen,
        n_rejected=p.n_rejected), None, needs_reference=False, logps="mean"),
}


def get_loss(name: str) -> Term:
    """The named term; an unknown name raises and lists the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def check_hyper(names: Iterable[str], h: LossConfig) -> None:
    """Raise ValueError for hyperparameters the named terms cannot use. Unknown names are
    skipped here (:func:`get_loss` reports them); what a field allows whatever the terms
    (choices, bounds) is its config metadata, checked by dpolab.config.validate."""
    names = [n for n in names if n in LOSSES]
    if h.f_divergence != "reverse_kl":
        bad = [n for n in names if LOSSES[n].needs_reference and not LOSSES[n].f_divergence]
        if bad:
            ok = sorted(n for n, t in LOSSES.items() if t.f_divergence)
            raise ValueError(f"loss.f_divergence={h.f_divergence} applies to {', '.join(ok)} "
                             f"only, not to {', '.join(bad)}")
    if "exo_pair" in names and not 0.0 < h.label_smoothing < 1.0:
        raise ValueError("loss exo_pair needs 0 < loss.label_smoothing < 1 (EXO uses 1e-3)")
    if "robust" in names and not 0.0 <= h.label_smoothing < 0.5:
        raise ValueError("loss robust needs 0 <= loss.label_smoothing < 0.5")


class Objective:
    """A weighted sum of named per-example terms, e.g. {"dpo": 1.0, "sft": 0.1}.

    This is the preference + SFT objective of NeMo RL's DPO, L_pref + beta * L_SFT, which is
    the special case {"dpo": 1.0, "sft": beta}; here the SFT weight is its own number, and
    TRL's loss_type=[...] with loss_weights=[...] is the same data. Names are looked up once,
    here.
    """

    def __init__(self, weights: Mapping[str, float], hyper: LossConfig):
        if not weights:
            raise ValueError("an objective needs at least one named term")
        self.terms = {name: (get_loss(name), float(w)) for name, w in weights.items()}
        check_hyper(list(self.terms), hyper)
        self.hyper = hyper

    def __call__(self, p: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns (total per-example loss (B,), {name: unweighted per-example term (B,)})."""
        parts = {name: term(p, self.hyper) for name, (term, _) in self.terms.items()}
        total = sum(w * parts[name] for name, (_, w) in self.terms.items())
        return total, parts

    def at_reference(self) -> dict[str, float]:
        """{name: value of the unweighted term at zero log-ratios} for every term whose value
        there does not depend on the policy: what the step-0 check expects."""
        return {name: term.at_reference(self.hyper) for name, (term, _) in self.terms.items()
                if term.at_reference is not None}

    @property
    def needs_reference(self) -> bool:
        return any(term.needs_reference for term, _ in self.terms.values())

    @property
    def needs_delta(self) -> bool:
        return "auxdpo" in self.terms
