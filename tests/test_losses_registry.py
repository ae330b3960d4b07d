"""The registry of named terms: the facts it records (value at the reference, whether a
reference is needed, how log-probs are read) hold for the terms themselves, and the loss
config selects and checks them."""

import math

import pytest
import torch

from dpolab import losses as L
from dpolab.config import LossConfig, apply_overrides, build_config
from dpolab.errors import UserError

LN2 = math.log(2.0)
REFERENCE_FREE = {"sft", "simpo", "cpo", "orpo"}


def _batch(seed=0, b=6, *, at_reference=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: -1.0 - 20 * torch.rand(b, generator=g, dtype=dtype)  # noqa: E731
    pc, pr = draw(), draw()
    rc, rr = (pc.clone(), pr.clone()) if at_reference else (draw(), draw())
    n = lambda: torch.randint(1, 30, (b,), generator=g)  # noqa: E731
    z = torch.zeros(b, dtype=dtype)
    return L.PairLogps(pc, pr, rc, rr, n(), n(), z, z)


HYPER = dict(beta=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_value_at_reference_is_the_terms_value(name):
    """With the policy equal to its reference (every log-ratio 0) each term's value is the
    one the registry records; only SFT and the reference-free losses record none (their value
    depends on the policy's own log-probs)."""
    term = L.get_loss(name)
    if term.at_reference is None:
        assert name in REFERENCE_FREE
        return
    variants = [LossConfig(**HYPER)]
    if name == "gpo":
        variants = [LossConfig(**HYPER, gpo_f=f) for f in L.GPO_FAMILY]
    if term.f_divergence:
        variants += [LossConfig(**HYPER, f_divergence=d) for d in L.F_DIVERGENCES]
    for h in variants:
        got = term(_batch(at_reference=True), h)
        torch.testing.assert_close(got, torch.full_like(got, term.at_reference(h)), rtol=1e-12, atol=1e-12)


def test_values_at_reference_by_hand():
    """beta = 0.5, eps = 0.1: the logistic family ln 2; nca/bco -2 log s(0) = 2 ln 2;
    ipo (0 - 1/(2*0.5))^2 = 1; sppo 2 * 1^2 = 2; apo 1 - 1/2 + 1/2 = 1; hinge/slic 1;
    discopop (1/2) ln 2 + (1/2) e^0 = 0.8465736; exo -ln 2 - (1/2) log(0.1 * 0.9) = 0.5108256."""
    h = LossConfig(beta=0.5, label_smoothing=0.1)
    want = {"dpo": LN2, "sigmoid": LN2, "robust": LN2, "dpop": LN2, "auxdpo": LN2, "aot": LN2,
            "aot_unpaired": LN2, "sigmoid_norm": LN2, "gpo": LN2, "nca_pair": 2 * LN2,
            "bco_pair": 2 * LN2, "ipo": 1.0, "ipo_norm": 1.0, "sppo_hard": 2.0, "apo_zero": 1.0,
            "apo_down": 1.0, "hinge": 1.0, "slic": 1.0, "discopop": 0.84657359,
            "exo_pair": 0.51082562}
    got = {n: t.at_reference(h) for n, t in L.LOSSES.items() if t.at_reference is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n], abs=1e-8), n
    obj = L.Objective({"dpo": 1.0, "ipo": 0.5, "sft": 0.1}, h)
    assert obj.at_reference() == {"dpo": LN2, "ipo": 1.0}


def test_reference_free_terms_run_without_a_reference():
    """Exactly sft, simpo, cpo and orpo need no reference: an objective of them runs on a
    batch without reference log-probs and says it needs none; any other term asks for it."""
    assert {n for n, t in L.LOSSES.items() if not t.needs_reference} == REFERENCE_FREE
    full = _batch()
    p = L.PairLogps(full.policy_chosen, full.policy_rejected, None, None, full.n_chosen, full.n_rejected)
    obj = L.Objective({"simpo": 1.0, "cpo": 0.5, "orpo": 0.5, "sft": 0.1}, LossConfig())
    assert not obj.needs_reference and L.Objective({"dpo": 1.0}, LossConfig()).needs_reference
    total, parts = obj(p)
    assert torch.isfinite(total).all() and parts.keys() == {"simpo", "cpo", "orpo", "sft"}
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        L.Objective({"dpo": 1.0}, LossConfig())(p)


def test_one_rule_for_summed_and_averaged_logps():
    """Terms marked "setting" read sums, or per-token means under average_logps; "mean"
    terms read means whatever the setting: sigmoid under average_logps is sigmoid_norm, ipo
    under average_logps is ipo_norm, and neither norm term moves with the setting."""
    p = _batch(1)
    summed, averaged = LossConfig(beta=0.3), LossConfig(beta=0.3, average_logps=True)
    assert [L.LOSSES[n].logps for n in ("sigmoid", "sigmoid_norm", "sft", "cpo")] == \
        ["setting", "mean", "mean", "sum"]
    assert L.logps_reduction("setting", summed) == "sum" and L.logps_reduction("setting", averaged) == "mean"
    for plain, norm in (("sigmoid", "sigmoid_norm"), ("ipo", "ipo_norm")):
        torch.testing.assert_close(L.get_loss(plain)(p, averaged), L.get_loss(norm)(p, summed))
        torch.testing.assert_close(L.get_loss(norm)(p, averaged), L.get_loss(norm)(p, summed))
        assert not torch.allclose(L.get_loss(plain)(p, summed), L.get_loss(norm)(p, summed))
    means = p.view("mean")
    torch.testing.assert_close(means[0], p.policy_chosen / p.n_chosen.to(torch.float64))


def test_terms_equal_their_pure_functions():
    """Registry terms pass the config's fields: gpo's logistic/hinge are dpo/slic, exo_pair
    reads label_smoothing, discopop reads discopop_tau, simpo reads simpo_gamma."""
    p = _batch(2)
    four = p.view("sum")
    h = LossConfig(beta=0.3, label_smoothing=0.05, discopop_tau=0.2, simpo_gamma=0.7)
    torch.testing.assert_close(L.get_loss("gpo")(p, h), L.dpo_loss(*four, beta=0.3))
    torch.testing.assert_close(L.get_loss("gpo")(p, LossConfig(beta=0.3, gpo_f="hinge")),
                               L.slic_loss(*four, beta=0.3))
    torch.testing.assert_close(L.get_loss("exo_pair")(p, h),
                               L.exo_pair_loss(*four, beta=0.3, label_smoothing=0.05))
    torch.testing.assert_close(L.get_loss("discopop")(p, h), L.discopop_loss(*four, beta=0.3, tau=0.2))
    torch.testing.assert_close(L.get_loss("simpo")(p, h), L.simpo_loss(
        p.policy_chosen, p.policy_rejected, beta=0.3, gamma=0.7, n_chosen=p.n_chosen,
        n_rejected=p.n_rejected))
    torch.testing.assert_close(L.get_loss("sigmoid")(p, LossConfig(beta=0.3, f_divergence="js_divergence")),
                               L.sigmoid_loss(*four, beta=0.3, divergence="js_divergence"))


def test_config_selects_trl_names_and_combinations():
    """loss.name takes TRL's names; loss.weights combines them as TRL's loss_type=[...] with
    loss_weights=[...] (MPO: sigmoid 0.8, bco_pair 0.2, sft 1.0)."""
    cfg = build_config(apply_overrides({}, ["loss.name=apo_zero"]))
    assert cfg.loss.term_weights() == {"apo_zero": 1.0}
    raw = apply_overrides({}, ["loss.weights.sigmoid=0.8", "loss.weights.bco_pair=0.2",
                               "loss.weights.sft=1.0"])
    cfg = build_config(raw)
    obj = L.Objective(cfg.loss.term_weights(), cfg.loss)
    p = _batch(4)
    total, parts = obj(p)
    torch.testing.assert_close(total, 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + parts["sft"])
    cfg = build_config(apply_overrides({}, ["loss.name=gpo", "loss.gpo_f=squared"]))
    h = L.logratio_margin(*p.view("sum")) * cfg.loss.beta
    torch.testing.assert_close(L.Objective(cfg.loss.term_weights(), cfg.loss)(p)[0], (h - 1) ** 2)


@pytest.mark.parametrize("overrides, msg", [
    (["loss.name=exo"], "unknown loss 'exo'; valid: aot, aot_unpaired"),
    (["loss.name=exo_pair"], "loss exo_pair needs 0 < loss.label_smoothing < 1"),
    (["loss.name=robust", "loss.label_smoothing=0.5"], "robust needs 0 <= loss.label_smoothing < 0.5"),
    (["loss.name=ipo", "loss.f_divergence=forward_kl"],
     "f_divergence=forward_kl applies to dpo, sigmoid only, not to ipo"),
    (["loss.f_divergence=kl"], "loss.f_divergence must be one of reverse_kl, forward_kl"),
    (["loss.name=gpo", "loss.gpo_f=cubic"], "loss.gpo_f must be one of logistic, squared, hinge"),
    (["loss.ld_alpha=2"], "loss.ld_alpha = 2.0 is out of range: it must be a finite number >= 0 and <= 1"),
    (["loss.name=discopop", "loss.discopop_tau=0"], "loss.discopop_tau = 0.0 is out of range: it must be a finite number > 0"),
])
def test_bad_loss_settings_are_clear_errors(overrides, msg):
    """A loss setting the named terms cannot use is a UserError naming the field."""
    with pytest.raises(UserError, match=msg):
        build_config(apply_overrides({}, overrides))


def test_one_beta_default():
    """The terms read LossConfig itself, so beta's default (and every other hyperparameter's)
    is written once: no class of dpolab.losses carries a beta of its own."""
    import dataclasses

    assert not [c for c in vars(L).values() if dataclasses.is_dataclass(c)
                and "beta" in {f.name for f in dataclasses.fields(c)}]
    assert L.Objective({"dpo": 1.0}, LossConfig()).hyper.beta == build_config({}).loss.beta


def test_step0_check_reads_the_registry():
    """The trainer's step-0 check compares each term with its registry value: an IPO term at
    the reference passes with 1/(4 beta^2), and a batch off the reference fails by name."""
    from dpolab.train import check_step0

    h = LossConfig(beta=0.5)
    obj = L.Objective({"ipo": 1.0, "nca_pair": 1.0}, h)
    p = _batch(5, at_reference=True)
    check_step0(p, obj(p)[1], obj.at_reference())
    bad = dict(obj(p)[1], ipo=torch.full((6,), 1.5, dtype=torch.float64))
    with pytest.raises(UserError, match="the ipo loss is 1.500000, expected 1.000000"):
        check_step0(p, bad, obj.at_reference())


@pytest.mark.parametrize("name", sorted(set(L.LOSSES) - {"orpo"}))
def test_extreme_margins_are_finite_in_float32(name):
    """Log-ratios up to +-1e4 give finite float32 losses and gradients for every term (orpo
    is left out: its log-probs are per-token means that must stay below 0, where it is
    covered by its own test)."""
    h = torch.tensor([-1e4, -1e3, -1.0, 0.0, 1.0, 1e3, 1e4], requires_grad=True)
    z = torch.zeros(7)
    n = torch.ones(7, dtype=torch.long)
    p = L.PairLogps(h, z - 1.0, z, z - 1.0, n, n, z, z)
    loss = L.get_loss(name)(p, LossConfig(beta=1.0, label_smoothing=0.1, dpop_lambda=1.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
