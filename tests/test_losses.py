"""The DPO family: hand-computed values, limiting cases, gradients, extreme margins."""

import math

import pytest
import torch

from dpolab import losses as L
from dpolab.config import LossConfig

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def pair(pc, pr, rc, rr):
    return T(pc), T(pr), T(rc), T(rr)


# h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 1 - (-1) = 2;  beta = 0.5 -> beta h = 1
BASE = pair(-1.0, -3.0, -2.0, -2.0)
SP1 = math.log1p(math.exp(-1.0))  # -log sigma(1)  = log(1 + e^-1) = 0.31326169
SM1 = math.log1p(math.exp(1.0))  # -log sigma(-1) = log(1 + e^1)  = 1.31326169


def test_dpo_hand_value():
    """-log sigma(beta h) at beta h = 1 is log(1 + e^-1) = log(1.3678794) = 0.3132617, and its
    gradient w.r.t. the policy's chosen log-prob is -beta sigma(-beta h)
    = -0.5 / (1 + e^1) = -0.5 * 0.2689414 = -0.1344707 (+0.1344707 for the rejected one)."""
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in BASE)
    loss = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(0.31326169, abs=1e-8)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.13447071, abs=1e-8)
    assert pr.grad.item() == pytest.approx(0.13447071, abs=1e-8)


def test_cdpo_hand_value():
    """cDPO, eps = 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262 = 0.4132617."""
    got = L.dpo_loss(*BASE, beta=0.5, label_smoothing=0.1).item()
    assert got == pytest.approx(0.9 * SP1 + 0.1 * SM1, abs=1e-12)
    assert got == pytest.approx(0.41326169, abs=1e-8)


def test_robust_hand_value():
    """rDPO, eps = 0.1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1506094 / 0.8 = 0.1882617."""
    got = L.robust_dpo_loss(*BASE, beta=0.5, label_smoothing=0.1).item()
    assert got == pytest.approx((0.9 * SP1 - 0.1 * SM1) / 0.8, abs=1e-12)
    assert got == pytest.approx(0.18826169, abs=1e-8)


def test_robust_is_unbiased_under_label_noise():
    """E over a label flipped with prob eps of the robust loss equals the clean DPO loss."""
    eps, args = 0.2, BASE
    flipped = (args[1], args[0], args[3], args[2])
    expected = (1 - eps) * L.robust_dpo_loss(*args, beta=0.5, label_smoothing=eps) + \
        eps * L.robust_dpo_loss(*flipped, beta=0.5, label_smoothing=eps)
    assert expected.item() == pytest.approx(L.dpo_loss(*args, beta=0.5).item(), abs=1e-12)


def test_ipo_hand_value_and_minimum():
    """IPO, beta = 0.5: target 1/(2 * 0.5) = 1, h = 2 -> (2 - 1)^2 = 1; minimum 0 at h = 1/(2 beta)."""
    assert L.ipo_loss(*BASE, beta=0.5).item() == pytest.approx(1.0, abs=1e-12)
    beta = 0.2
    hs = torch.linspace(0, 5, 501, dtype=torch.float64)
    z = torch.zeros_like(hs)
    loss = L.ipo_loss(hs, z, z, z, beta=beta)
    assert hs[loss.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-9)
    assert loss.min().item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="beta must be > 0"):
        L.ipo_loss(*BASE, beta=0.0)


def test_slic_hand_values():
    """SLiC: beta = 0.5, h = 2 -> max(0, 1 - 1) = 0; beta = 0.25 -> max(0, 1 - 0.5) = 0.5."""
    assert L.slic_loss(*BASE, beta=0.5).item() == 0.0
    assert L.slic_loss(*BASE, beta=0.25).item() == pytest.approx(0.5, abs=1e-12)


def test_dpop_hand_value():
    """DPOP: pc=-3, pr=-6, rc=rr=-2 -> h = (-1) - (-4) = 3, penalty max(0, -2 + 3) = 1;
    lam = 1, beta = 0.5: -log sigma(0.5 * (3 - 1)) = -log sigma(1) = 0.3132617.
    Without the penalty it would be -log sigma(1.5) = 0.2014133."""
    args = pair(-3.0, -6.0, -2.0, -2.0)
    assert L.dpop_loss(*args, beta=0.5, lam=1.0).item() == pytest.approx(SP1, abs=1e-12)
    assert L.dpo_loss(*args, beta=0.5).item() == pytest.approx(0.20141328, abs=1e-8)


def test_limits_equal_dpo():
    """dpop(lam=0) == dpo, dpo(eps=0) == robust(eps=0) == dpo, gpo logistic == dpo,
    auxdpo(delta=0) == dpo, on random inputs."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(64, generator=g, dtype=torch.float64) * 5 for _ in range(4)]
    dpo = L.dpo_loss(*args, beta=0.3)
    torch.testing.assert_close(L.dpop_loss(*args, beta=0.3, lam=0.0), dpo)
    torch.testing.assert_close(L.dpo_loss(*args, beta=0.3, label_smoothing=0.0), dpo)
    torch.testing.assert_close(L.robust_dpo_loss(*args, beta=0.3, label_smoothing=0.0), dpo)
    margin = 0.3 * L.logratio_margin(*args)
    torch.testing.assert_close(L.gpo_loss(margin, f="logistic"), dpo)
    torch.testing.assert_close(L.gpo_loss(margin, f="hinge"), L.slic_loss(*args, beta=0.3))
    zero = torch.zeros(64, dtype=torch.float64)
    torch.testing.assert_close(
        L.auxdpo_loss(*args, delta_chosen=zero, delta_rejected=zero, beta=0.3), dpo)


def test_beta_zero_gives_ln2():
    """With beta = 0 every implicit reward is 0 and DPO's loss is -log(1/2) = ln 2 = 0.693147."""
    assert L.dpo_loss(*BASE, beta=0.0).item() == pytest.approx(0.693147, abs=1e-6)
    assert L.dpo_loss(*BASE, beta=0.0).item() == pytest.approx(math.log(2), abs=1e-15)


def test_auxdpo_shifts_margin():
    """AuxDPO with delta_c - delta_r = -2 and h = 2 at beta = 0.5 gives -log sigma(0) = ln 2."""
    got = L.auxdpo_loss(*BASE, delta_chosen=T(-1.0), delta_rejected=T(1.0), beta=0.5)
    assert got.item() == pytest.approx(math.log(2), abs=1e-12)


def test_amplitude_penalty():
    """||(2, -1)||^2 = 4 + 1 = 5."""
    assert L.amplitude_penalty(T(2.0, -1.0)).item() == pytest.approx(5.0)


def test_sft_sum_and_mean():
    """SFT: summed log-prob -6 over 3 tokens -> NLL 6 summed, 2 per token."""
    assert L.sft_loss(T(-6.0), torch.tensor([3]), average=False).item() == 6.0
    assert L.sft_loss(T(-6.0), torch.tensor([3]), average=True).item() == 2.0


def test_squared_gpo_and_derivatives():
    """GPO squared (r - 1)^2 at r = 3 is 4 and -f'(3) = -4; hinge weight is 1 below r = 1, 0 above;
    the logistic weight is sigma(-r)."""
    r = T(3.0, 0.5)
    assert L.gpo_loss(r, f="squared").tolist() == [4.0, 0.25]
    assert L.gpo_derivative(r, f="squared").tolist() == [-4.0, 1.0]
    assert L.gpo_derivative(r, f="hinge").tolist() == [0.0, 1.0]
    torch.testing.assert_close(L.gpo_derivative(r, f="logistic"), torch.sigmoid(-r))
    with pytest.raises(ValueError, match="valid: hinge, logistic, squared"):
        L.gpo_loss(r, f="cubic")


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust", "ipo", "slic", "dpop", "auxdpo"])
def test_gradcheck(name):
    """float64 gradcheck of every loss w.r.t. all log-prob inputs (and deltas for AuxDPO).
    Inputs avoid SLiC's and DPOP's kinks."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(6)]
    fns = {
        "dpo": lambda a, b, c, d, e, f: L.dpo_loss(a, b, c, d, beta=0.7),
        "cdpo": lambda a, b, c, d, e, f: L.dpo_loss(a, b, c, d, beta=0.7, label_smoothing=0.2),
        "robust": lambda a, b, c, d, e, f: L.robust_dpo_loss(a, b, c, d, beta=0.7,
                                                             label_smoothing=0.2),
        "ipo": lambda a, b, c, d, e, f: L.ipo_loss(a, b, c, d, beta=0.7),
        "slic": lambda a, b, c, d, e, f: L.slic_loss(a, b, c, d, beta=0.05),
        "dpop": lambda a, b, c, d, e, f: L.dpop_loss(a, b, c, d, beta=0.7, lam=2.0),
        "auxdpo": lambda a, b, c, d, e, f: L.auxdpo_loss(a, b, c, d, delta_chosen=e,
                                                         delta_rejected=f, beta=0.7),
    }
    assert torch.autograd.gradcheck(fns[name], tuple(x))


@pytest.mark.parametrize("name", ["dpo", "robust", "ipo", "slic", "dpop", "sft"])
def test_extreme_margins_are_finite(name):
    """|beta h| up to 1e4 gives finite losses and gradients in float32 (logsigmoid, not log(sigmoid))."""
    h = torch.tensor([-1e4, -1e3, 0.0, 1e3, 1e4], requires_grad=True)
    z = torch.zeros(5)
    p = L.PairLogps(h, z, z, z, torch.ones(5), torch.ones(5))
    fn = L.get_loss(name)
    loss = fn(p, LossConfig(beta=1.0, label_smoothing=0.1, dpop_lambda=1.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    if name == "dpo":  # -log sigma(-1e4) = 1e4 (exactly, up to float32 rounding)
        assert loss[0].item() == pytest.approx(1e4 * 0.9 + 0.1 * 0.0, rel=1e-6)


def test_registry_unknown_name_lists_valid():
    """An unknown name raises and lists every valid name, sorted."""
    with pytest.raises(ValueError) as err:
        L.get_loss("dop")
    assert str(err.value) == f"unknown loss 'dop'; valid: {', '.join(sorted(L.LOSSES))}"
    assert "auxdpo, bco_pair, cpo, discopop, dpo, dpop" in str(err.value)


def test_objective_weighted_sum_and_average():
    """{"dpo": 1, "sft": 0.1}: total = dpo + 0.1 * sft per example; average_logps divides the
    preference inputs by the token counts (h = 2/2 - (-4/4) ... checked against dpo_loss)."""
    pc, pr, rc, rr = T(-4.0), T(-8.0), T(-6.0), T(-8.0)
    nc, nr = torch.tensor([2]), torch.tensor([4])
    p = L.PairLogps(pc, pr, rc, rr, nc, nr)
    obj = L.Objective({"dpo": 1.0, "sft": 0.1}, LossConfig(beta=0.5))
    total, parts = obj(p)
    assert parts["sft"].item() == 2.0  # 4 nats over 2 tokens
    assert total.item() == pytest.approx(L.dpo_loss(pc, pr, rc, rr, beta=0.5).item() + 0.2)
    obj_avg = L.Objective({"dpo": 1.0}, LossConfig(beta=0.5, average_logps=True))
    # means: pc -2, pr -2, rc -3, rr -2 -> h = 1 - 0 = 1 -> -log sigma(0.5)
    assert obj_avg(p)[0].item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    assert not obj.needs_delta and L.Objective({"auxdpo": 1}, LossConfig()).needs_delta
    with pytest.raises(ValueError, match="needs the batch's auxiliary rewards"):
        L.Objective({"auxdpo": 1.0}, LossConfig())(p)


def test_smoothing_range_checked():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        L.robust_dpo_loss(*BASE, beta=0.1, label_smoothing=0.5)
