"""Tests for the diverse-values model: Lemma 4.1 dynamics, Theorem 4.2/4.3 arithmetic, CLI."""

import json
import math

import pytest
import torch

from dpolab.errors import UserError
from dpolab.theory import values as V
from dpolab.theory import values_report

BETA = 0.1


def _instance(k=2, q=4, d=5, v=0.02, shared=False, seed=0, n_seeds=1):
    st = V.ClusterSetting(k=k, q=q, d=d, l_b=0.3, v=v, shared_tokens=shared, beta=BETA)
    return st, V.make_instances(st, n_seeds=n_seeds, gen=V.make_generator(seed, 1))


def _gd(inst, *, n_steps, t_end, f="logistic", vocab=10):
    """Full-vocabulary gradient descent on W from a random reference W0 (V > U tokens)."""
    chosen, rejected = V.response_tokens(inst.groups, inst.signs,
                                         shared=inst.setting.shared_tokens)
    w0 = 0.5 * torch.randn(vocab, inst.x.shape[-1], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(3))
    return V.train_last_layer_gd(inst.x[0], chosen, rejected, w0, beta=BETA, tau=1.0,
                                 lr=t_end / n_steps, n_steps=n_steps, f=f,
                                 record_every=n_steps // 8)


@pytest.mark.parametrize("f", ["logistic", "squared"])
def test_lemma_4_1_ode_matches_gradient_descent_on_the_unembedding(f):
    """The RK4 solution of tau dr/dt = beta^2/N sum_i -f'(r_i) (dy_j.dy_i) x_i.x_j agrees with
    autograd gradient descent on W of softmax(W x); GD is forward Euler on that ODE, so the gap
    shrinks about 4x when the step shrinks 4x."""
    st, inst = _instance(v=0.05)
    t1 = V.tau_1(k=st.k, beta=BETA, tau=1.0)
    ode = V.margin_dynamics(inst.x, inst.dy, beta=BETA, tau=1.0, t_end=t1, n_steps=8, f=f)
    gaps = []
    for n in (48, 192):
        times, margins, _ = _gd(inst, n_steps=n, t_end=t1, f=f)
        assert torch.allclose(times, ode.times)
        gaps.append(float((margins - ode.margins[0]).abs().max()))
    assert gaps[1] < 3e-3 * float(ode.margins[0, -1].abs().max())
    assert 2.5 < gaps[0] / gaps[1] < 6.0


def test_gd_moves_only_the_response_token_rows_as_the_ode_weight_integral_predicts():
    """W(t) - W0 = beta/(tau N) sum_i c_i dy_i x_i^T, c_i = int_0^t sigma(-r_i): that on the
    response tokens and exactly 0 on every other row of the vocabulary."""
    st, inst = _instance()
    t1 = V.tau_1(k=st.k, beta=BETA, tau=1.0)
    _, _, w = _gd(inst, n_steps=192, t_end=t1, vocab=12)
    w0 = 0.5 * torch.randn(12, st.d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ode = V.margin_dynamics(inst.x, inst.dy, beta=BETA, tau=1.0, t_end=t1, n_steps=16)
    delta = V.unembedding_update(inst.x, inst.dy, ode.weight_integral[:, -1], beta=BETA, tau=1.0)
    # the log-partition's gradient cancels between y_w and y_l: only response rows move
    dw = w - w0
    assert torch.equal(dw[2 * st.k:], torch.zeros(12 - 2 * st.k, st.d, dtype=torch.float64))
    assert torch.allclose(dw[: 2 * st.k], delta[0], rtol=0, atol=5e-3 * float(delta.abs().max()))


def test_explicit_kernel_and_factored_matvec_agree():
    """Lemma 4.1 with the N x N matrix G_ji = (dy_j.dy_i) x_i.x_j equals the O(N U d) form."""
    _, inst = _instance(k=3, q=5, d=6, v=0.1, shared=True, n_seeds=3)
    kw = dict(beta=BETA, tau=1.0, t_end=200.0, n_steps=10)
    a = V.margin_dynamics(inst.x, inst.dy, explicit_kernel=True, **kw)
    b = V.margin_dynamics(inst.x, inst.dy, explicit_kernel=False, **kw)
    assert torch.allclose(a.margins, b.margins, rtol=1e-12, atol=1e-14)


def test_noise_free_margins_follow_the_closed_form():
    """With v = 0 and distinct tokens every pair of value k sees sum_i (dy_j.dy_i) x_i.x_j w
    = Q*2*(1 + l_b^2) w + Q*(-2)*(-1 + l_b^2) w = 4 Q w, so dr/dt = (beta^2/(tau 2KQ)) 4Q w
    = 2 beta^2 w/(K tau). DPO (w = 1/(1+e^r)): r + e^r - 1 = 2 beta^2 t/(K tau); at tau_1 the
    right side is 2 log3/5 = 0.4394449 and r = 0.208104 (0.208104 + 1.231341 - 1 = 0.439445).
    Squared: dr/dt = 4 beta^2 (1 - r)/(K tau), r(tau_1) = 1 - 3^(-4/5) = 1 - 0.415244 = 0.584756."""
    for k in (1, 3):
        st, inst = _instance(k=k, q=3, d=k + 1, v=0.0)
        t1 = V.tau_1(k=k, beta=BETA, tau=1.0)
        dpo = V.margin_dynamics(inst.x, inst.dy, beta=BETA, tau=1.0, t_end=t1, n_steps=32)
        assert torch.allclose(dpo.margins[0, -1], torch.full((2 * k * 3,), 0.208104,
                                                             dtype=torch.float64), atol=2e-6)
        sq = V.margin_dynamics(inst.x, inst.dy, beta=BETA, tau=1.0, t_end=t1, n_steps=32,
                               f="squared")
        assert torch.allclose(sq.margins[0, -1], torch.tensor(0.584756, dtype=torch.float64),
                              atol=2e-6)
        # the initial growth rate is beta^2/(K tau): proportional to 1/K
        h = float(dpo.times[1])
        assert float(dpo.margins[0, 1, 0]) / h == pytest.approx(BETA ** 2 / k, rel=2e-2)


def test_squared_gpo_margins_converge_to_one():
    """f(r) = (r - 1)^2 regresses the margins to 1: noise-free, 1 - r decays as
    exp(-4 beta^2 t/(K tau)) = exp(-4*20*log3/5) = 2.3e-8 at t = 20 tau_1; with noise the margins
    settle around 1 (least squares), while DPO's keep growing past log 3."""
    for v, tol_mean, tol_max in ((0.0, 1e-6, 1e-6), (0.05, 0.01, 0.2)):
        st, inst = _instance(k=2, q=16, d=3, v=v)
        t_long = 20 * V.tau_1(k=2, beta=BETA, tau=1.0)
        kw = dict(beta=BETA, tau=1.0, t_end=t_long, n_steps=400)
        sq = V.margin_dynamics(inst.x, inst.dy, f="squared", **kw)
        assert abs(float(sq.margins[0, -1].mean()) - 1) < tol_mean
        assert float((sq.margins[0, -1] - 1).abs().max()) < tol_max
        dpo = V.margin_dynamics(inst.x, inst.dy, **kw)
        assert float(dpo.margins[0, -1].min()) > math.log(3)


def test_generalization_bound_hand_computed():
    """2 K Q^2 e^(-Q/45): K=1, Q=45: 2*1*2025/e = 4050*0.3678794 = 1489.912;
    K=2, Q=900: 2*2*810000*e^-20 = 3.24e6 * 2.0611536e-9 = 6.678138e-3."""
    assert V.generalization_bound(1, 45) == pytest.approx(1489.912, rel=1e-6)
    assert V.generalization_bound(2, 900) == pytest.approx(6.678138e-3, rel=1e-6)


def test_min_q_solves_the_bound_and_q_minus_one_does_not():
    """K=1, target 0.05: Q=764 gives 2*764^2 e^(-764/45) = 0.049415 <= 0.05, Q=763 gives
    0.050394 > 0.05. A target above the bound at Q=1 (2 e^(-1/45) = 1.956) gives Q = 1."""
    assert V.min_q_for_bound(1, 0.05) == 764
    for k, target in ((1, 0.05), (8, 0.01), (16, 1e-3)):
        q = V.min_q_for_bound(k, target)
        assert V.generalization_bound(k, q) <= target < V.generalization_bound(k, q - 1)
    assert V.min_q_for_bound(1, 2.0) == 1
    with pytest.raises(ValueError):
        V.min_q_for_bound(1, 0.0)
    table = V.min_q_table([1, 4, 16, 64], target=0.05)
    assert [r["min_q"] for r in table["rows"]] == sorted(r["min_q"] for r in table["rows"])
    assert table["fit"]["r2"] > 0.99  # Q grows linearly in log K


def test_fit_line_recovers_an_exact_line():
    """y = 3x - 2 exactly: slope 3, intercept -2, R^2 = 1."""
    fit = V.fit_line([0, 1, 2, 5], [-2, 1, 4, 13])
    assert fit["slope"] == pytest.approx(3) and fit["intercept"] == pytest.approx(-2)
    assert fit["r2"] == pytest.approx(1.0)


def test_cluster_geometry():
    """c_i orthonormal, b orthogonal to every c_i with |b| = l_b, and cluster sample means
    within 5 standard errors (5 v / sqrt(Q) per coordinate) of ±c_i + b."""
    st = V.ClusterSetting(k=3, q=4000, d=6, l_b=0.4, v=0.2)
    inst = V.make_instances(st, n_seeds=2, gen=V.make_generator(5, 5))
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    assert torch.allclose(inst.c @ inst.c.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(inst.c @ inst.b[..., None], torch.zeros(2, 3, 1, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(inst.b.norm(dim=1), torch.tensor([0.4, 0.4], dtype=torch.float64))
    for i in range(3):
        for sign in (1.0, -1.0):
            mask = (inst.groups == i) & (inst.signs == sign)
            mean = inst.x[:, mask].mean(1)  # (S, d)
            expect = sign * inst.c[:, i] + inst.b
            assert float((mean - expect).abs().max()) < 5 * 0.2 / math.sqrt(4000)


def test_response_tokens_distinct_and_shared():
    """Distinct: value i's + cluster prefers token 2i over 2i+1, its - cluster the reverse;
    shared: Yes (0) over No (1) for every + cluster."""
    groups, signs = V.cluster_labels(2, 1)  # [0, 0, 1, 1], [+, -, +, -]
    ch, rj = V.response_tokens(groups, signs, shared=False)
    assert ch.tolist() == [0, 1, 2, 3] and rj.tolist() == [1, 0, 3, 2]
    ch, rj = V.response_tokens(groups, signs, shared=True)
    assert ch.tolist() == [0, 1, 0, 1] and rj.tolist() == [1, 0, 1, 0]


def test_same_seed_same_results_and_other_seed_differs():
    """Every draw comes from the generator built from the seed."""
    st = V.ClusterSetting(k=2, q=8, d=3, l_b=0.25, v=0.3, shared_tokens=True)
    a = V.run_cell(st, n_seeds=2, q_test=50, seed=1, n_steps=8)
    b = V.run_cell(st, n_seeds=2, q_test=50, seed=1, n_steps=8)
    c = V.run_cell(st, n_seeds=2, q_test=50, seed=2, n_steps=8)
    assert a == b and a != c


def test_theorem_4_2_holds_on_an_admissible_instance_and_the_check_can_fail():
    """Inside the hypotheses the margins stay in [s/8, 5s], s = beta^2 t/(K tau), and end in
    [log3/40, log3]; a trajectory that grows too fast is flagged."""
    st = V.ClusterSetting(k=4, q=16, d=8, l_b=0.3, v=1 / (32 * 4), beta=BETA)
    assert all(st.conditions().values())
    inst = V.make_instances(st, n_seeds=3, gen=V.make_generator(0, 9))
    traj = V.margin_dynamics(inst.x, inst.dy, beta=BETA, tau=1.0, n_steps=16,
                             t_end=V.tau_1(k=4, beta=BETA, tau=1.0))
    chk = V.check_theorem_4_2(traj, k=4, beta=BETA, tau=1.0)
    assert bool(chk["envelope"].all()) and bool(chk["final"].all())
    fast = V.Trajectory(traj.times, 6 * traj.margins, traj.weight_integral)
    assert not bool(V.check_theorem_4_2(fast, k=4, beta=BETA, tau=1.0)["envelope"].any())
    assert not V.ClusterSetting(k=4, q=16, d=8, l_b=0.3, v=0.01, shared_tokens=True,
                                ).conditions()["Z<=1/(4 l_b^2)"]


def test_cli_quick_writes_results_with_all_keys(tmp_path, capsys):
    """`dpolab reproduce values --quick` writes results.json with every section, the report,
    prints the tables, and Theorem 4.2 held on every sampled admissible instance."""
    from dpolab.cli import main

    assert main(["reproduce", "values", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("setting", "theorem_4_2", "theorem_4_3", "min_q_table", "q_vs_logk_fit",
                "growth_rates", "gpo"):
        assert key in res
    assert res["theorem_4_2"]["fraction_held"] == 1.0
    assert res["min_q_table"]["rows"][0] == {"k": 1, "min_q": 764}
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "Theorem 4.2" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--seed", "x"], ["--seed", "-1"], ["--target", "2"],
                                  ["--bogus"]])
def test_cli_rejects_bad_flags(argv, tmp_path):
    """Bad flag values raise UserError before any work starts; the CLI turns it into exit 2."""
    from dpolab.cli import main

    with pytest.raises(UserError):
        values_report.cli_main([*argv, "--out", str(tmp_path / "o")])
    assert main(["reproduce", "values", *argv, "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_per_group_mean_hand_computed():
    """Margins [1, 2, 3, 4] in groups [0, 0, 1, 1]: means (1+2)/2 = 1.5 and (3+4)/2 = 3.5;
    an empty group gives 0."""
    out = V.per_group_mean(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0, 0, 1, 1]), 3)
    assert out.tolist() == [[1.5, 3.5, 0.0]]
