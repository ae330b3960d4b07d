"""The misspecified 3-response bandit (arXiv 2510.20413, Prop. 3) and AuxDPO's null space."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from dpolab.auxdpo import null_space_basis
from dpolab.errors import UserError
from dpolab.theory import bandit
from dpolab.theory.bandit import (DTYPE, METHODS, BanditSetting, auxdpo_profile,
                                  derivatives, is_degradation, is_reversal, policy,
                                  population_loss, ranking, rlhf_linearised_theta,
                                  rlhf_objective, score_matrix, solve, table)
from dpolab.theory.bandit_plots import cli_main

PAPER = BanditSetting()  # counts (1, 1, 10), beta = 1, lambda = 1
R_STAR = np.array([1.0, 2.0, 0.0])
S = np.array([1.0, -1.0, 0.0])


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------- null space


def test_null_space_basis_of_random_rank_deficient_matrix():
    """For A (P, n) of rank k: A Gamma = 0, Gamma^T Gamma = I, Gamma has n - k columns."""
    g = torch.Generator().manual_seed(0)
    for P, n, k in [(3, 7, 2), (5, 4, 4), (1, 3, 1), (6, 6, 3)]:
        A = (torch.randn(P, k, generator=g, dtype=DTYPE)
             @ torch.randn(k, n, generator=g, dtype=DTYPE))  # rank k
        gamma = null_space_basis(A)
        assert gamma.shape == (n, n - k)
        assert torch.allclose(A @ gamma, torch.zeros(P, n - k, dtype=DTYPE), atol=1e-12)
        assert torch.allclose(gamma.T @ gamma, torch.eye(n - k, dtype=DTYPE), atol=1e-12)


def test_null_space_rank_tolerance_and_zero_matrix():
    """A singular value below rtol * s_max counts as zero; an all-zero A has N(A) = R^n."""
    A = torch.diag(torch.tensor([1.0, 1e-9, 0.0], dtype=DTYPE))  # s = (1, 1e-9, 0)
    assert null_space_basis(A).shape == (3, 1)  # default rtol 3 * 2.2e-16 keeps 1e-9
    assert null_space_basis(A, rtol=1e-6).shape == (3, 2)  # 1e-9 < 1e-6 * 1: dropped
    assert torch.equal(null_space_basis(torch.zeros(2, 3, dtype=DTYPE)).abs(),
                       torch.eye(3, dtype=DTYPE))


def test_bandit_score_matrix_and_its_two_dimensional_null_space():
    """d/dtheta log pi_theta(a) = s_a - E_pi[s] = s_a at the uniform reference (sum s = 0),
    so A = [1, -1, 0] and N(A) = span([1, 1, 0], [0, 0, 1]) is 2-D."""
    A = score_matrix(PAPER)
    assert torch.allclose(A, torch.tensor([[1.0, -1.0, 0.0]], dtype=DTYPE), atol=1e-15)
    gamma = bandit.null_basis(PAPER)
    assert gamma.shape == (3, 2)
    assert torch.allclose(gamma[0], gamma[1], atol=1e-15)  # every null vector has a = b


# ---------------------------------------------------------------------------- objectives


def test_population_losses_at_the_reference_by_hand():
    """At theta = 0 every margin is 0: each half costs log 2 (DPO, DPOP: no penalty as
    h_w = 0) or (0 - 1/2)^2 = 1/4 (IPO), weights sum to n12 + n23 + n31 = 12."""
    assert float(population_loss("DPO", 0.0, PAPER)) == pytest.approx(12 * math.log(2))
    assert float(population_loss("DPOP", 0.0, PAPER)) == pytest.approx(12 * math.log(2))
    assert float(population_loss("IPO", 0.0, PAPER)) == pytest.approx(12 * 0.25)
    with pytest.raises(ValueError, match="valid"):
        population_loss("KTO", 0.0, PAPER)


def dpo_derivative_by_hand(theta: float, s: BanditSetting) -> float:
    """dL/dtheta = sum_ij n_ij beta m'_ij (sigma(beta m_ij) - p_ij) with the margins
    m12 = 2 theta, m23 = -theta, m31 = -theta (log-softmax differences of theta * s)."""
    slopes = {(0, 1): 2.0, (1, 2): -1.0, (2, 0): -1.0}
    total = 0.0
    for (i, j), n in zip(bandit.PAIRS, s.counts):
        p = sig(R_STAR[i] - R_STAR[j])
        total += n * s.beta * slopes[(i, j)] * (sig(s.beta * slopes[(i, j)] * theta) - p)
    return total


def test_dpo_optimum_solves_its_first_order_condition():
    """The DPO optimum zeroes the hand-written derivative and the loss is convex there."""
    for s in [PAPER, BanditSetting(counts=(2.0, 0.5, 3.0), beta=0.3)]:
        theta = solve("DPO", s).theta
        assert abs(dpo_derivative_by_hand(theta, s)) < 1e-10
        g, h = derivatives(lambda t, s=s: population_loss("DPO", t, s), theta)
        assert abs(g) < 1e-10 and h > 0


def test_dpop_with_lambda_zero_is_dpo():
    """lambda = 0 switches the DPOP penalty off: same optimum as DPO."""
    s = BanditSetting(dpop_lambda=0.0)
    assert solve("DPOP", s).theta == pytest.approx(solve("DPO", s).theta, abs=1e-12)


def test_dpop_kink_optimum_is_not_left_by_newton():
    """With lambda >= 2 DPOP's optimum sits at the kink theta = 0 (f' jumps, never 0). At
    n31 = 10^0.7 a Newton step across the kink once shrank |f'| while raising f."""
    for s in [BanditSetting(dpop_lambda=5.0), BanditSetting(counts=(1.0, 1.0, 10 ** 0.7))]:
        theta = solve("DPOP", s).theta
        assert abs(theta) < 1e-8
        f0 = float(population_loss("DPOP", theta, s))
        assert f0 < float(population_loss("DPOP", 1e-3, s))
        assert f0 < float(population_loss("DPOP", -1e-3, s))


@pytest.mark.parametrize("method", ["DPO", "IPO", "DPOP"])
def test_gradient_descent_reaches_the_scalar_solution(method):
    """Plain gradient descent (step 0.05, from theta0) converges to the solver's theta."""
    theta_star = solve(method, PAPER).theta
    t = torch.tensor(0.0, dtype=DTYPE, requires_grad=True)
    with bandit.single_thread():
        for _ in range(3000):
            (g,) = torch.autograd.grad(population_loss(method, t, PAPER), t)
            t = (t - 0.05 * g).detach().requires_grad_(True)
    assert float(t.detach()) == pytest.approx(theta_star, abs=1e-8)


def test_auxdpo_closed_form_null_space_and_gradient_descent():
    """AuxDPO is well specified: theta and delta in N(A) span every reward difference, so the
    optimum matches each label, 2 beta theta = r*1 - r*2 = -1 -> theta = -1/(2 beta); the
    learned reward is r* + const, A delta = 0, and joint gradient descent on (theta, c) and the
    nested min_theta min_c solve agree with it."""
    opt = solve("AuxDPO", PAPER)
    assert opt.theta == pytest.approx(-0.5, abs=1e-10)
    delta = torch.tensor(opt.delta, dtype=DTYPE)
    assert float((score_matrix(PAPER) @ delta).abs().max()) < 1e-12
    learned = np.log(policy(opt.theta, PAPER) * 3) + np.array(opt.delta)
    assert np.allclose(learned - R_STAR, (learned - R_STAR)[0], atol=1e-10)
    # The flat direction (constant shift [1,1,1] in N(A)) is left at 0: min-norm delta.
    assert sum(opt.delta) == pytest.approx(0.0, abs=1e-10)
    z = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    with bandit.single_thread():
        for _ in range(3000):
            (g,) = torch.autograd.grad(population_loss("AuxDPO", z[0], PAPER, z[1:]), z)
            z = (z - 0.05 * g).detach().requires_grad_(True)
        nested = minimize_scalar(lambda t: auxdpo_profile(t, PAPER)[0], bounds=(-3, 3),
                                 method="bounded", options={"xatol": 1e-10})
    assert float(z[0].detach()) == pytest.approx(-0.5, abs=1e-8)
    assert nested.x == pytest.approx(-0.5, abs=1e-6)  # f-only search: ~sqrt(eps) resolution


def test_rlhf_optimum_first_order_condition():
    """dJ/dtheta = Cov_pi(s, r* - beta log(pi/pi0)) (the score of pi_theta is s - E_pi[s]);
    it vanishes at the RLHF optimum, which beats a grid of thetas."""
    for beta in [0.5, 1.0, 3.0]:
        s = BanditSetting(beta=beta)
        theta = solve("RLHF", s).theta
        pi = policy(theta, s)
        f = R_STAR - beta * np.log(pi * 3)
        cov = pi @ (S * f) - (pi @ S) * (pi @ f)
        assert abs(cov) < 1e-10
        best = float(rlhf_objective(theta, s))
        assert all(best >= float(rlhf_objective(t, s)) for t in np.linspace(-5, 5, 101))


def test_rlhf_linearised_by_hand_equals_auxdpo():
    """F = sum_a pi0 s_a^2 = 2/3, A_rho r* = sum_a pi0 s_a r*_a = (1 - 2)/3 = -1/3, so
    theta* = (1/beta)(3/2)(-1/3) = -1/(2 beta): AuxDPO's theta, for every beta."""
    for beta in [0.2, 1.0, 4.0]:
        s = BanditSetting(beta=beta)
        assert rlhf_linearised_theta(s) == pytest.approx(-1 / (2 * beta), abs=1e-14)
        assert solve("AuxDPO", s).theta == pytest.approx(-1 / (2 * beta), abs=1e-9)


# ---------------------------------------------------------------------------- the paper's table


def test_paper_table_reproduced():
    """Base 1.0; DPO 0.895, IPO 0.969, DPOP 0.969 (reversal a1 > a3 > a2, degraded); AuxDPO
    1.199 (order a2 > a1 > a3, improved): the paper's numbers are ours truncated to 3 digits."""
    rows = {r["method"]: r for r in table(PAPER)}
    assert list(rows) == list(METHODS)
    e = math.exp
    aux = (e(-0.5) * 1 + e(0.5) * 2) / (e(-0.5) + e(0.5) + 1)  # softmax([-1/2, 1/2, 0]) . r*
    expected = {"base": 1.0, "DPO": 0.895628, "IPO": 0.969029, "DPOP": 0.969759, "AuxDPO": aux}
    for m, value in expected.items():
        assert rows[m]["expected_reward"] == pytest.approx(value, abs=1e-6)
    truncated = {m: math.floor(rows[m]["expected_reward"] * 1000) / 1000 for m in expected}
    assert truncated == {"base": 1.0, "DPO": 0.895, "IPO": 0.969, "DPOP": 0.969,
                         "AuxDPO": 1.199}
    for m in ["DPO", "IPO", "DPOP"]:
        assert rows[m]["reversal"] and rows[m]["degradation"]
        assert rows[m]["order"] == "a1 > a3 > a2"
    assert not rows["AuxDPO"]["reversal"] and not rows["AuxDPO"]["degradation"]
    assert rows["AuxDPO"]["order"] == "a2 > a1 > a3"
    # No policy of this family ranks a2 > a1 > a3: AuxDPO's *policy* order is a2 > a3 > a1.
    assert rows["AuxDPO"]["policy_order"] == "a2 > a3 > a1" and rows["AuxDPO"]["policy_reversal"]
    assert not rows["base"]["reversal"] and not rows["base"]["degradation"]


def test_dpo_outcome_flips_with_the_data_mix():
    """Prop. 3 (iii): few (3,1) pairs push DPO toward a2 (theta < 0, improvement), many toward
    a1 (theta > 0, degradation); AuxDPO's theta does not depend on the counts."""
    few, many = BanditSetting(counts=(1, 1, 0.1)), BanditSetting(counts=(1, 1, 100))
    assert solve("DPO", few).theta < 0 < solve("DPO", many).theta
    assert solve("AuxDPO", few).theta == pytest.approx(solve("AuxDPO", many).theta, abs=1e-9)


def test_flags_on_hand_built_policies():
    """reversal: some pair ranked strictly against r* = [1, 2, 0]; ties are not reversals.
    degradation: pi . r* < pi0 . r* = (1 + 2 + 0)/3 = 1."""
    pi0 = np.full(3, 1 / 3)
    assert is_reversal([0.5, 0.3, 0.2], R_STAR)  # a1 above a2
    assert is_reversal([0.2, 0.5, 0.3], R_STAR)  # a3 above a1
    assert not is_reversal([0.3, 0.5, 0.2], R_STAR)  # a2 > a1 > a3, as r*
    assert not is_reversal(pi0, R_STAR)
    assert is_degradation(np.array([0.5, 0.2, 0.3]), pi0, R_STAR)  # 0.5 + 0.4 = 0.9 < 1
    assert not is_degradation(np.array([0.3, 0.5, 0.2]), pi0, R_STAR)  # 0.3 + 1.0 = 1.3
    assert not is_degradation(pi0, pi0, R_STAR)
    assert ranking([0.2, 0.5, 0.3]) == "a2 > a3 > a1"
    assert ranking(pi0) == "a1 = a2 = a3"


# ---------------------------------------------------------------------------- command line


def test_cli_writes_results_json(tmp_path, capsys):
    """The command writes results.json of the documented shape, figures and report.html,
    and prints the table."""
    out = tmp_path / "run"
    assert cli_main(["--out", str(out), "--counts", "1,1,10", "--beta", "1",
                     "--dpop-lambda", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result) == {"setting", "table", "sweeps"}
    assert result["setting"]["counts"] == [1.0, 1.0, 10.0]
    assert [r["method"] for r in result["table"]] == list(METHODS)
    for r in result["table"]:
        assert {"method", "theta", "policy", "expected_reward", "reversal",
                "degradation"} <= set(r)
        assert isinstance(r["reversal"], bool) and isinstance(r["degradation"], bool)
        assert len(r["policy"]) == 3 and sum(r["policy"]) == pytest.approx(1.0)
    for axis in ["n31", "beta"]:
        sw = result["sweeps"][axis]
        assert set(sw["expected_reward"]) == set(METHODS)
        assert all(len(v) == len(sw["values"]) for v in sw["expected_reward"].values())
    for name in ["report.html", "geometry.png", "sweep_n31.png", "sweep_beta.png"]:
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "AuxDPO" in printed and "0.89563" in printed


@pytest.mark.parametrize("argv", [["--counts", "1,2"], ["--counts", "1,-1,2"],
                                  ["--counts", "a,b,c"], ["--counts", "0,0,0"],
                                  ["--beta", "0"], ["--beta", "-1"], ["--beta", "nan"],
                                  ["--dpop-lambda", "-1"], ["--real-steps", "5"]])
def test_cli_rejects_bad_flags(tmp_path, argv):
    """Bad values raise UserError (one line, exit 2 through dpolab.cli) and write nothing."""
    out = tmp_path / "run"
    with pytest.raises(UserError):
        cli_main(["--out", str(out), *argv])
    assert not out.exists()
