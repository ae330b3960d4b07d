"""Differential information (arXiv 2505.23761): definitions, closed forms, estimators, CLI."""

import json
import math

import pytest
import torch

from dpolab.cli import main
from dpolab.errors import UserError
from dpolab.theory import did, did_report

D = torch.float64


def _log(*p):
    return torch.tensor(p, dtype=D).log()


def _random_pair(m, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.log_softmax(1.5 * torch.randn(m, generator=g, dtype=D), -1)
    target = torch.log_softmax(ref + torch.randn(m, generator=g, dtype=D), -1)
    return ref, target


def _population(ref, target, beta):
    l = did.optimal_rejected_logp(ref, target, beta=beta)
    return l, ref.exp()[:, None] * l.exp()[None, :], did.preference_prob(ref, l)


def test_did_hand_computed_and_normalised():
    """q_{pi/pi_ref} ∝ pi/pi_ref sums to 1 and is positive.
    pi = (1/2, 1/2), pi_ref = (1/4, 3/4): ratios 2 and 2/3, sum 8/3, q = (3/4, 1/4)."""
    q = did.did(_log(0.5, 0.5), _log(0.25, 0.75))
    assert torch.allclose(q, torch.tensor([0.75, 0.25], dtype=D), atol=1e-15)
    ref, target = _random_pair(50, seed=3)
    q = did.did(target, ref)
    assert (q > 0).all() and abs(float(q.sum()) - 1.0) < 1e-12
    # limiting case: the DID of a policy against itself carries no information (uniform)
    assert torch.allclose(did.did(ref, ref), torch.full((50,), 1 / 50, dtype=D))
    assert abs(float(did.did_entropy(ref, ref)) - math.log(50)) < 1e-12


def test_optimal_rejected_satisfies_power_law():
    """pi_l ∝ pi_ref^(1+beta)/pi*^beta makes log q_{pi_ref/pi_l} - beta log q_{pi*/pi_ref}
    constant; a uniform pi_l does not. Then the Eq. 1 labels equal sigma(beta (d(a) - d(b)))."""
    ref, target = _random_pair(20, seed=0)
    for beta in (0.1, 0.5, 2.0):
        l = did.optimal_rejected_logp(ref, target, beta=beta)
        assert did.power_law_gap(ref, l, target, beta=beta) < 1e-12
        d = target - ref
        expected = torch.sigmoid(beta * (d[:, None] - d[None, :]))
        assert torch.allclose(did.preference_prob(ref, l), expected, atol=1e-13)
    assert did.power_law_gap(ref, torch.full_like(ref, -math.log(20)), target, beta=0.5) > 0.5
    # hand case, beta = 1: pi_ref = (1/2, 1/2), pi* = (1/4, 3/4): pi_l ∝ (1/4)/(1/4), (1/4)/(3/4)
    # = (1, 1/3) -> (3/4, 1/4)
    l = did.optimal_rejected_logp(_log(0.5, 0.5), _log(0.25, 0.75), beta=1.0)
    assert torch.allclose(l.exp(), torch.tensor([0.75, 0.25], dtype=D), atol=1e-15)


def test_displacement_identity_hand_computed():
    """E_{pi_ref}[log pi* - log pi_ref] = -KL(pi_ref || pi*) <= 0, with pi_ref = (1/2, 1/2),
    pi* = (1/4, 3/4):  1/2 log(1/2) + 1/2 log(3/2) = 1/2 log(3/4) = -0.143841...;
    KL = 1/2 log 2 + 1/2 log(2/3) = 1/2 log(4/3). Zero when pi* = pi_ref."""
    ref, target = _log(0.5, 0.5), _log(0.25, 0.75)
    value = float(did.loglik_displacement(target, ref))
    assert value == pytest.approx(0.5 * math.log(0.75), abs=1e-15)
    assert value == pytest.approx(-0.14384103622589045, abs=1e-15)
    assert float(did.kl(ref, target)) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-15)
    assert float(did.loglik_displacement(ref, ref)) == 0.0


def test_winner_marginal_is_reference():
    """Under Eq. 1 labels the preferred response of a pair (a ~ pi_ref, b ~ pi_l) is itself
    distributed as pi_ref, for any pi_l (derivation in winner_logp)."""
    ref, target = _random_pair(12, seed=1)
    for l in (did.optimal_rejected_logp(ref, target, beta=0.3), target):
        assert torch.allclose(did.winner_logp(ref, l), ref, atol=1e-12)


@pytest.mark.parametrize("beta", [0.2, 1.0])
def test_dpo_population_optimum_is_target(beta):
    """DPO's log-ratio reward trained on population data (pairs pi_ref x pi_l, Eq. 1 labels)
    converges to pi* itself; its closed-form optimum has c = 0."""
    ref, target = _random_pair(8, seed=2)
    _, weight, label = _population(ref, target, beta)
    offset, scale = did.REWARD_FORMS["dpo (beta log pi/pi_ref)"](ref, torch.ones_like(ref))
    logp, grad_norm = did.train_tabular(offset=offset, scale=scale, logp_ref=ref,
                                        pair_weight=weight, label=label, beta=beta)
    assert float(did.js_divergence(logp, target)) < 1e-10 and grad_norm < 1e-6
    assert torch.allclose(did.closed_form_optimum(offset, scale, target - ref), target, atol=1e-12)


def test_reference_free_optimum_is_did():
    """The reference-free reward beta log pi on the same data converges to the DID
    q_{pi*/pi_ref}, not to pi* (limit: equal only when pi_ref is uniform)."""
    ref, target = _random_pair(8, seed=4)
    _, weight, label = _population(ref, target, 0.5)
    offset, scale = did.REWARD_FORMS["ref-free (beta log pi)"](ref, torch.ones_like(ref))
    logp, _ = did.train_tabular(offset=offset, scale=scale, logp_ref=ref, pair_weight=weight,
                                label=label, beta=0.5)
    q = did.did_logp(target, ref)
    assert float(did.js_divergence(logp, q)) < 1e-10
    assert float(did.js_divergence(logp, target)) > 1e-2


def test_tempered_closed_form():
    """Reward (beta/tau) log pi/pi_ref has optimum pi ∝ pi_ref^(1-tau) pi*^tau."""
    ref, target = _random_pair(6, seed=5)
    tau = did.TEMPER
    offset, scale = ref, torch.full_like(ref, tau)
    expected = torch.log_softmax((1 - tau) * ref + tau * target, -1)
    assert torch.allclose(did.closed_form_optimum(offset, scale, target - ref), expected, atol=1e-12)


@pytest.mark.parametrize("proposal", ["policy", "ref"])
def test_did_entropy_estimate_converges(proposal):
    """The self-normalised importance-weighted estimate approaches the exact H(q) with many
    samples (K = 200000, seeded), per prompt, for both proposals."""
    g = torch.Generator().manual_seed(7)
    pairs = [_random_pair(6, seed=s) for s in (10, 11)]                       # P = 2 prompts
    rows_p, rows_r = [], []
    for ref, target in pairs:
        sampler = target if proposal == "policy" else ref
        y = torch.multinomial(sampler.exp(), 200_000, replacement=True, generator=g)
        rows_p.append(target[y])
        rows_r.append(ref[y])
    est = did.did_entropy_estimate(torch.stack(rows_p), torch.stack(rows_r), sampled_from=proposal)
    exact = torch.stack([did.did_entropy(t, r) for r, t in pairs])
    assert est.shape == (2,)
    assert torch.allclose(est, exact, atol=0.02)
    with pytest.raises(ValueError, match="sampled_from"):
        did.did_entropy_estimate(torch.stack(rows_p), torch.stack(rows_r), sampled_from="target")


def test_log_margin_ordering_hand_built():
    """m(pi_l) <= m(pi_ref) <= m(pi*) per pair. Responses 0, 1, 2 with
    pi_l = (.2, .3, .5), pi_ref = (.4, .4, .2), pi* = (.6, .3, .1):
      pair (0, 1): m_l = log(2/3) < m_ref = 0 < m* = log 2              -> ordered
      pair (0, 2): m_l = log(.4) < m_ref = log 2 < m* = log 6           -> ordered
      pair (2, 1): m_l = log(5/3) > m_ref = log(1/2)                    -> not ordered
    fraction 2/3."""
    l, ref, target = _log(.2, .3, .5), _log(.4, .4, .2), _log(.6, .3, .1)
    w, r = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    ok, frac = did.log_margin_ordering(did.log_margin(l, w, r), did.log_margin(ref, w, r),
                                       did.log_margin(target, w, r))
    assert ok.tolist() == [True, True, False] and frac == pytest.approx(2 / 3)
    # under the power law every pair the target prefers is ordered
    ref, target = _random_pair(10, seed=6)
    l = did.optimal_rejected_logp(ref, target, beta=0.7)
    a, b = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    keep = (target - ref)[a.flatten()] >= (target - ref)[b.flatten()]
    w, r = a.flatten()[keep], b.flatten()[keep]
    _, frac = did.log_margin_ordering(did.log_margin(l, w, r), did.log_margin(ref, w, r),
                                      did.log_margin(target, w, r))
    assert frac == 1.0


def test_entropy_sweep_signs():
    """A DID spread over responses the reference finds unlikely smooths the policy (entropy
    rises); a DID independent of the reference sharpens it; the chosen log-likelihood falls in
    every row, by -KL(pi_ref || pi_theta)."""
    rows = did.entropy_sweep(responses=8, beta=0.5, seed=0, temperatures=[1.0, 3.0])
    novel = [r for r in rows if r["family"] == "novel"]
    indep = [r for r in rows if r["family"] == "independent"]
    assert all(r["policy_entropy_change"] > 0 for r in novel)
    assert all(r["policy_entropy_change"] < 0 for r in indep)
    assert all(r["chosen_loglik_change"] < 0 and r["js_to_target"] < 1e-8 for r in rows)


def test_cli_writes_results(tmp_path, capsys):
    """`dpolab reproduce did` writes results.json with the documented keys and report.html."""
    out = tmp_path / "did"
    assert main(["reproduce", "did", "--out", str(out), "--responses", "6", "--seed", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"setting", "js_table", "entropy_sweep", "closed_form_checks"}
    dpo = res["js_table"][0]
    assert dpo["parameterisation"].startswith("dpo") and dpo["js_to_target"] < 1e-8
    assert (out / "report.html").exists() and (out / "entropy_sweep.png").exists()
    assert "JS to pi*" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--beta", "0"], ["--responses", "1"], ["--seed", "-1"],
                                  ["--responses", "many"], ["--nope"]])
def test_cli_rejects_bad_flags(argv, tmp_path, capsys):
    """Bad values raise UserError (one line, exit 2 through the dpolab CLI)."""
    with pytest.raises(UserError):
        did_report.cli_main([*argv, "--out", str(tmp_path)])
    assert main(["reproduce", "did", *argv, "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
