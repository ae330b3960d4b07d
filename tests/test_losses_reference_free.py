"""SimPO, CPO and ORPO (no reference model) and the modifiers (f-divergences, WPO, LD-DPO):
hand-computed values, limiting cases, float64 gradchecks."""

import math

import pytest
import torch

from dpolab import losses as L

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
N = lambda *v: torch.tensor(v)  # noqa: E731
sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigma(-x)


def test_simpo_hand_values():
    """Equal per-token means (-4/2 = -8/4 = -2): -log s(0 - gamma) = log(1 + e^0.5) = 0.9740770.
    Means -2/2 = -1 and -8/4 = -2, beta 2, gamma 0.5: -log s(2 * 1 - 0.5) = log(1 + e^-1.5) = 0.2014133."""
    got = L.simpo_loss(T(-4.0), T(-8.0), beta=2.0, gamma=0.5, n_chosen=N(2), n_rejected=N(4))
    assert got.item() == pytest.approx(0.97407698, abs=1e-8)
    got = L.simpo_loss(T(-2.0), T(-8.0), beta=2.0, gamma=0.5, n_chosen=N(2), n_rejected=N(4))
    assert got.item() == pytest.approx(0.20141328, abs=1e-8)


def test_simpo_without_margin_is_sigmoid_norm_with_a_zero_reference():
    """gamma = 0 and log pi_ref = 0: SimPO is DPO on per-token means (sigmoid_norm)."""
    pc, pr, n = T(-3.0, -7.0), T(-5.0, -2.0), dict(n_chosen=N(3, 4), n_rejected=N(2, 5))
    z = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(L.simpo_loss(pc, pr, beta=0.8, gamma=0.0, **n),
                               L.sigmoid_norm_loss(pc, pr, z, z, beta=0.8, **n))


def test_cpo_hand_value_and_limit():
    """pc -2 over 2 tokens, pr -3, beta 0.5, alpha 1: -log s(0.5 * 1) + 1 * (2 / 2)
    = 0.4740770 + 1 = 1.4740770; alpha = 0 is DPO against a zero reference."""
    got = L.cpo_loss(T(-2.0), T(-3.0), beta=0.5, alpha=1.0, n_chosen=N(2))
    assert got.item() == pytest.approx(1.47407698, abs=1e-8)
    z = T(0.0)
    assert L.cpo_loss(T(-2.0), T(-3.0), beta=0.5, alpha=0.0, n_chosen=N(2)).item() == \
        pytest.approx(L.dpo_loss(T(-2.0), T(-3.0), z, z, beta=0.5).item(), abs=1e-15)


def test_orpo_hand_value():
    """Means lw = -2/2 = -1, ll = -4/2 = -2.
    log odds(-1) = -1 - log(1 - e^-1) = -1 + 0.4586751 = -0.5413249,
    log odds(-2) = -2 - log(1 - e^-2) = -2 + 0.1454135 = -1.8545865, ratio 1.3132617;
    loss = 1 + 0.1 * log(1 + e^-1.3132617) = 1 + 0.1 * 0.2381830 = 1.0238183."""
    ratio = L.orpo_log_odds_ratio(T(-2.0), T(-4.0), n_chosen=N(2), n_rejected=N(2))
    assert ratio.item() == pytest.approx(1.31326169, abs=1e-8)
    got = L.orpo_loss(T(-2.0), T(-4.0), lam=0.1, n_chosen=N(2), n_rejected=N(2))
    assert got.item() == pytest.approx(1.02381830, abs=1e-8)


def test_log1mexp_is_accurate_at_both_ends():
    """log(1 - e^x): at x = -1e-20 it is log(1e-20) = -46.0517019 (1 - exp(x) is 0 in float64);
    at x = -50 it is -e^-50 = -1.9287e-22 (log(1 - 1.9e-22) rounds to 0); in between it equals
    the naive formula; float32 gives the same at x = -1e-10."""
    got = L.log1mexp(T(-1e-20, -50.0, -0.3, -3.0))
    assert got[0].item() == pytest.approx(math.log(1e-20), rel=1e-12)
    assert got[1].item() == pytest.approx(-math.exp(-50.0), rel=1e-12)
    assert got[2].item() == pytest.approx(math.log(1 - math.exp(-0.3)), rel=1e-12)
    assert got[3].item() == pytest.approx(math.log(1 - math.exp(-3.0)), rel=1e-12)
    f32 = L.log1mexp(torch.tensor([-1e-10]))
    assert f32.item() == pytest.approx(math.log(1e-10), rel=1e-6)


def test_orpo_gradient_is_finite_for_near_certain_completions():
    """A per-token mean log-prob of -1e-9 (a nearly certain completion) keeps a finite loss
    and gradient: the odds are computed in log space."""
    pc = torch.tensor([-1e-9, -5.0], dtype=torch.float64, requires_grad=True)
    loss = L.orpo_loss(pc, T(-1.0, -1e-9), lam=0.1, n_chosen=N(1, 1), n_rejected=N(1, 1))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all()


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_gradcheck_reference_free(name):
    """Analytic gradients equal finite differences (float64)."""
    g = torch.Generator().manual_seed(2)
    x = [(-0.1 - 3 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    n = dict(n_chosen=N(1, 2, 3, 4), n_rejected=N(4, 1, 2, 2))
    fns = {
        "simpo": lambda a, b: L.simpo_loss(a, b, beta=2.0, gamma=0.5, **n),
        "cpo": lambda a, b: L.cpo_loss(a, b, beta=0.5, alpha=1.0, n_chosen=n["n_chosen"]),
        "orpo": lambda a, b: L.orpo_loss(a, b, lam=0.1, **n),
    }
    assert torch.autograd.gradcheck(fns[name], tuple(x))


# ---- modifiers ------------------------------------------------------------------------


def test_f_divergence_hand_values():
    """lr_w = 1, lr_l = -1, beta = 0.5.
    forward_kl: (1 - e^-1) - (1 - e^1) = 0.6321206 + 1.7182818 = 2.3504024 (= 2 sinh 1);
        -log s(0.5 * 2.3504024) = log(1 + e^-1.1752012) = 0.2690777.
    js: (ln2 + log s(1)) - (ln2 + log s(-1)) = 1 (log s(x) - log s(-x) = x); -log s(0.5) = 0.4740770.
    alpha 0.5: (e^-0.5 - 1)/(-0.5) - (e^0.5 - 1)/(-0.5) = 0.7869387 + 1.2974425 = 2.0843812
        (= 4 sinh 0.5); -log s(1.0421906) = 0.3020887.
    Every score is 0 at lr = 0."""
    base = T(-1.0), T(-3.0), T(-2.0), T(-2.0)
    want = {"forward_kl": (2.35040239, 0.26907772), "js_divergence": (1.0, 0.47407698),
            "alpha_divergence": (2.08438122, 0.30208873), "reverse_kl": (2.0, sp(-1.0))}
    for div, (margin, loss) in want.items():
        got_margin = L.f_divergence_margin(*base, divergence=div, alpha=0.5).item()
        assert got_margin == pytest.approx(margin, abs=1e-8)
        got_loss = L.sigmoid_loss(*base, beta=0.5, divergence=div, alpha=0.5).item()
        assert got_loss == pytest.approx(loss, abs=1e-8)
        assert L.f_divergence_score(T(0.0), divergence=div).item() == 0.0
    with pytest.raises(ValueError, match="valid: reverse_kl, forward_kl, js_divergence, alpha_divergence"):
        L.f_divergence_score(T(0.0), divergence="kl")


def test_alpha_divergence_limits():
    """alpha -> 1 is reverse KL (the log-ratio); alpha = 0 is forward KL (1 - 1/u)."""
    lr = T(-2.0, -0.3, 0.0, 0.7, 2.5)
    torch.testing.assert_close(L.f_divergence_score(lr, divergence="alpha_divergence", alpha=1 + 1e-9),
                               lr, rtol=0, atol=1e-8)
    torch.testing.assert_close(L.f_divergence_score(lr, divergence="alpha_divergence", alpha=1.0), lr)
    torch.testing.assert_close(L.f_divergence_score(lr, divergence="alpha_divergence", alpha=0.0),
                               L.f_divergence_score(lr, divergence="forward_kl"))


@pytest.mark.parametrize("div", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck_f_divergence(div):
    """Analytic gradients of the f-DPO loss equal finite differences (float64)."""
    g = torch.Generator().manual_seed(3)
    x = tuple((-3 * torch.rand(4, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(
        lambda *a: L.dpo_loss(*a, beta=0.6, label_smoothing=0.1, divergence=div, alpha=0.3), x)


def test_ld_sequence_logps_by_hand():
    """Chosen: 3 completion tokens (-1, -2, -3) after one prompt position; rejected: 5 tokens
    of -1. Shared length 3: chosen = -6 whatever alpha; rejected = -3 + alpha * (-2):
    alpha 0.5 -> -4, alpha 1 -> -5 (plain sums), alpha 0 -> -3 (shared prefix only)."""
    ct, cm = T(9.0, -1.0, -2.0, -3.0, 9.0, 9.0).unsqueeze(0), N(0, 1, 1, 1, 0, 0).unsqueeze(0)
    rt, rm = T(-1.0, -1.0, -1.0, -1.0, -1.0).unsqueeze(0), N(1, 1, 1, 1, 1).unsqueeze(0)
    for alpha, want_r in ((0.5, -4.0), (1.0, -5.0), (0.0, -3.0)):
        c, r = L.ld_sequence_logps(ct, cm, rt, rm, alpha=alpha)
        assert (c.item(), r.item()) == (-6.0, want_r)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.ld_sequence_logps(ct, cm, rt, rm, alpha=1.5)


def test_gradcheck_ld():
    """LD-DPO sums are linear in the token log-probs: gradcheck (float64)."""
    g = torch.Generator().manual_seed(4)
    ct = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    rt = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cm = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert torch.autograd.gradcheck(
        lambda a, b: L.ld_sequence_logps(a, cm, b, rm, alpha=0.3), (ct, rt))
