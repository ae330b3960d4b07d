"""TRL's loss types under TRL's names: hand-computed values, limiting cases, float64 gradchecks."""

import math

import pytest
import torch

from dpolab import losses as L

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
LN2 = math.log(2.0)
sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: -log sigma(-x) = sp(x)
sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731

# lr_w = pc - rc = -1 - (-2) = 1,  lr_l = pr - rr = -3 - (-2) = -1,  h = 2.
# With beta = 0.5: r_w = 0.5, r_l = -0.5, beta h = 1.
BASE = T(-1.0), T(-3.0), T(-2.0), T(-2.0)


def test_sigmoid_is_dpo_and_hinge_is_slic():
    """sigmoid = -log sigma(beta h) = log(1 + e^-1) = 0.3132617 at beta h = 1 (DPO);
    hinge at beta = 0.25: max(0, 1 - 0.5) = 0.5 (SLiC); robust_loss is rDPO."""
    assert L.sigmoid_loss(*BASE, beta=0.5).item() == pytest.approx(0.31326169, abs=1e-8)
    assert L.hinge_loss(*BASE, beta=0.25).item() == pytest.approx(0.5, abs=1e-12)
    assert L.robust_loss is L.robust_dpo_loss


def test_exo_pair_hand_value():
    """eps = 0.1, beta h = 1: q = (sigma(1), sigma(-1)) = (0.7310586, 0.2689414);
    0.7310586 (-0.3132617 - log 0.9) + 0.2689414 (-1.3132617 - log 0.1)
    = 0.7310586 (-0.2079012) + 0.2689414 (0.9893234) = -0.1519877 + 0.2660699 = 0.1140821."""
    got = L.exo_pair_loss(*BASE, beta=0.5, label_smoothing=0.1).item()
    assert got == pytest.approx(0.11408211, abs=1e-8)


def test_exo_pair_limits():
    """EXO is KL(q || p_eps): zero exactly where q = p_eps, i.e. beta h = log((1-eps)/eps);
    at eps = 1/2 it is KL(q || uniform) = ln 2 - H(q), zero at h = 0; as eps -> 0 it grows like
    sigma(-beta h) log(1/eps), so loss / log(1/eps) -> sigma(-beta h)."""
    eps = 0.2
    h = T(math.log((1 - eps) / eps))
    z = torch.zeros(1, dtype=torch.float64)
    assert L.exo_pair_loss(h, z, z, z, beta=1.0, label_smoothing=eps).item() == pytest.approx(0, abs=1e-14)
    assert L.exo_pair_loss(z, z, z, z, beta=1.0, label_smoothing=0.5).item() == pytest.approx(0, abs=1e-14)
    hs = T(-2.0, 0.0, 3.0)
    zs = torch.zeros(3, dtype=torch.float64)
    for eps in (1e-100, 1e-300):
        ratio = L.exo_pair_loss(hs, zs, zs, zs, beta=1.0, label_smoothing=eps) / math.log(1 / eps)
        # the rest is q_w log q_w + q_l log q_l - q_w log(1 - eps), at most ln 2 in size
        torch.testing.assert_close(ratio, torch.sigmoid(-hs), rtol=0, atol=1.01 * LN2 / math.log(1 / eps))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        L.exo_pair_loss(*BASE, beta=0.5, label_smoothing=0.0)


def test_nca_and_bco_pair_hand_values():
    """r_w = 0.5, r_l = -0.5.
    nca: -log s(0.5) - 1/2 log s(-0.5) - 1/2 log s(0.5) = 0.4740770 + 0.4870385 + 0.2370385 = 1.1981540.
    bco (delta 0): -log s(0.5) - log s(0.5) = 2 * 0.4740770 = 0.9481540;
    bco (delta 0.5): -log s(0) - log s(-(-0.5 - 0.5)) = 0.6931472 + 0.3132617 = 1.0064089."""
    assert L.nca_pair_loss(*BASE, beta=0.5).item() == pytest.approx(1.19815397, abs=1e-8)
    assert L.bco_pair_loss(*BASE, beta=0.5).item() == pytest.approx(0.94815397, abs=1e-8)
    assert L.bco_pair_loss(*BASE, beta=0.5, delta=0.5).item() == pytest.approx(1.00640887, abs=1e-8)


def test_sppo_hard_hand_value_and_targets():
    """beta = 1: targets +-1/2: (1 - 0.5)^2 + (-1 + 0.5)^2 = 0.25 + 0.25 = 0.5; beta = 0.5:
    targets +-1 are met exactly, loss 0."""
    assert L.sppo_hard_loss(*BASE, beta=1.0).item() == pytest.approx(0.5, abs=1e-12)
    assert L.sppo_hard_loss(*BASE, beta=0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_apo_hand_values():
    """apo_zero: 1 - s(0.5) + s(-0.5) = 1 - 0.6224593 + 0.3775407 = 0.7550813;
    apo_down: s(0.5) + 1 - s(1) = 0.6224593 + 1 - 0.7310586 = 0.8914008."""
    assert L.apo_zero_loss(*BASE, beta=0.5).item() == pytest.approx(0.75508134, abs=1e-8)
    assert L.apo_down_loss(*BASE, beta=0.5).item() == pytest.approx(0.89140075, abs=1e-8)


def test_discopop_hand_value_and_limits():
    """tau = 1, z = beta h = 1: m = s(1) = 0.7310586;
    (1 - m)(-log s(1)) + m e^-1 = 0.2689414 * 0.3132617 + 0.7310586 * 0.3678794
    = 0.0842490 + 0.2689414 = 0.3531905.
    tau -> 0: logistic for z < 0, exp(-z) for z > 0; tau -> inf: the mean of the two."""
    assert L.discopop_loss(*BASE, beta=0.5, tau=1.0).item() == pytest.approx(0.35319046, abs=1e-8)
    z = T(-3.0, -0.5, 0.5, 3.0)
    zero = torch.zeros(4, dtype=torch.float64)
    logistic, expo = -torch.nn.functional.logsigmoid(z), torch.exp(-z)
    sharp = L.discopop_loss(z, zero, zero, zero, beta=1.0, tau=1e-4)
    torch.testing.assert_close(sharp, torch.where(z < 0, logistic, expo), rtol=0, atol=1e-12)
    flat = L.discopop_loss(z, zero, zero, zero, beta=1.0, tau=1e10)
    torch.testing.assert_close(flat, 0.5 * (logistic + expo), rtol=0, atol=1e-7)


def test_discopop_is_finite_far_below_zero():
    """z = -1000: m = s(-20000) is 0 and exp(1000) is inf in float32; computed in log space
    the blend is the logistic loss, 1000, with a finite gradient."""
    h = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    z = torch.zeros(2)
    loss = L.discopop_loss(h, z, z, z, beta=1.0)
    loss.sum().backward()
    assert loss[0].item() == pytest.approx(1000.0) and loss[1].item() == pytest.approx(0.0, abs=1e-30)
    assert torch.isfinite(h.grad).all()


def test_aot_hand_value():
    """Policy margins pc - pr = (0+2, -1+1) = (2, 0), reference margins rc - rr = (-1+1, -1+2)
    = (0, 1). Sorted: (0, 2) - (0, 1) = (0, 1); beta = 1: (ln 2, log(1 + e^-1)) =
    (0.6931472, 0.3132617), whereas pair by pair h = (2, -1)."""
    got = L.aot_loss(T(0.0, -1.0), T(-2.0, -1.0), T(-1.0, -1.0), T(-1.0, -2.0), beta=1.0)
    torch.testing.assert_close(got, T(LN2, sp(-1.0)), rtol=0, atol=1e-12)


def test_aot_unpaired_hand_value():
    """lr_w = pc - rc = (0+1, -1+1) = (1, 0), lr_l = pr - rr = (-2+1, -1+2) = (-1, 1).
    Sorted: (0, 1) - (-1, 1) = (1, 0); beta = 1: (0.3132617, 0.6931472)."""
    got = L.aot_unpaired_loss(T(0.0, -1.0), T(-2.0, -1.0), T(-1.0, -1.0), T(-1.0, -2.0), beta=1.0)
    torch.testing.assert_close(got, T(sp(-1.0), LN2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_aot_equals_dpo_on_a_sorted_batch(eps):
    """When the policy's and the reference's margins are already in the same order, sorting
    changes nothing and AOT is (c)DPO pair by pair; unpaired AOT likewise when lr_w and lr_l
    are in the same order."""
    g = torch.Generator().manual_seed(0)
    pm = torch.sort(torch.randn(6, generator=g, dtype=torch.float64))[0]  # policy margins, ascending
    rm = 0.5 * pm - 0.3  # an increasing map keeps the order
    assert torch.equal(torch.argsort(rm), torch.arange(6)) and not torch.allclose(pm, rm)
    pr, rr = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    pc, rc = pm + pr, rm + rr
    want = L.dpo_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=eps)
    torch.testing.assert_close(L.aot_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=eps), want)
    lw = torch.sort(torch.randn(6, generator=g, dtype=torch.float64))[0]
    ll = torch.sort(torch.randn(6, generator=g, dtype=torch.float64))[0]
    z = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(L.aot_unpaired_loss(lw, ll, z, z, beta=0.7, label_smoothing=eps),
                               L.dpo_loss(lw, ll, z, z, beta=0.7, label_smoothing=eps))


def test_norm_forms_average_per_token():
    """pc -4, pr -8, rc -6, rr -8 over |y_w| = 2, |y_l| = 4: lr_w / 2 = 1, lr_l / 4 = 0.
    sigmoid_norm, beta 0.5: -log s(0.5) = 0.4740770; ipo_norm, beta 0.25: (1 - 2)^2 = 1;
    both equal the plain losses on per-token means."""
    args = T(-4.0), T(-8.0), T(-6.0), T(-8.0)
    n = dict(n_chosen=torch.tensor([2]), n_rejected=torch.tensor([4]))
    assert L.sigmoid_norm_loss(*args, beta=0.5, **n).item() == pytest.approx(0.47407698, abs=1e-8)
    assert L.ipo_norm_loss(*args, beta=0.25, **n).item() == pytest.approx(1.0, abs=1e-12)
    means = T(-2.0), T(-2.0), T(-3.0), T(-2.0)
    assert L.ipo_norm_loss(*args, beta=0.3, **n).item() == pytest.approx(L.ipo_loss(*means, beta=0.3).item())


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "exo_pair", "nca_pair", "bco_pair",
                                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                                  "discopop", "sigmoid_norm", "ipo_norm"])
def test_gradcheck(name):
    """Analytic gradients equal finite differences (float64) for every TRL-named loss."""
    g = torch.Generator().manual_seed(1)
    x = [(-3 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    n = dict(n_chosen=torch.tensor([1, 2, 3, 4, 5]), n_rejected=torch.tensor([5, 1, 2, 2, 3]))
    fns = {
        "sigmoid": lambda *a: L.sigmoid_loss(*a, beta=0.7, divergence="js_divergence"),
        "hinge": lambda *a: L.hinge_loss(*a, beta=0.1),  # |beta h| < 1: off the kink
        "exo_pair": lambda *a: L.exo_pair_loss(*a, beta=0.7, label_smoothing=1e-3),
        "nca_pair": lambda *a: L.nca_pair_loss(*a, beta=0.7),
        "bco_pair": lambda *a: L.bco_pair_loss(*a, beta=0.7, delta=0.2),
        "sppo_hard": lambda *a: L.sppo_hard_loss(*a, beta=0.7),
        "aot": lambda *a: L.aot_loss(*a, beta=0.7, label_smoothing=0.1),
        "aot_unpaired": lambda *a: L.aot_unpaired_loss(*a, beta=0.7, label_smoothing=0.1),
        "apo_zero": lambda *a: L.apo_zero_loss(*a, beta=0.7),
        "apo_down": lambda *a: L.apo_down_loss(*a, beta=0.7),
        "discopop": lambda *a: L.discopop_loss(*a, beta=0.7, tau=0.5),
        "sigmoid_norm": lambda *a: L.sigmoid_norm_loss(*a, beta=0.7, **n),
        "ipo_norm": lambda *a: L.ipo_norm_loss(*a, beta=0.7, **n),
    }
    assert torch.autograd.gradcheck(fns[name], tuple(x))
