"""The bandit on a real model's geometry: the one-parameter families against the model's own
forward with the moved weights, the exact AuxDPO null space, the solvers against the toy
bandit's table, and the held-out AuxDPO comparison's statistics."""

import json
import math

import numpy as np
import pytest
import torch

from dpolab.theory import auxdpo_heldout as AH
from dpolab.theory import bandit as B
from dpolab.theory import bandit_geometry as BG

DTYPE = torch.float64


@pytest.fixture(scope="module")
def states(tiny_dir):
    return BG.reply_states(str(tiny_dir))


def _model_logp(tiny_dir, st, edit) -> torch.Tensor:
    """The three replies' summed log-probs by the model's own forward after `edit(model)`."""
    from dpolab.models import load_model, load_tokenizer
    from dpolab.tokenize import tokenize_rows

    model = load_model(str(tiny_dir)).double()
    with torch.no_grad():
        edit(model)
        tok = tokenize_rows(BG.reply_rows(), load_tokenizer(str(tiny_dir)), max_length=512,
                            max_prompt_length=256).examples
        out = []
        for ids in (tok[0].rejected_ids, tok[0].chosen_ids, tok[1].rejected_ids):
            seq = torch.tensor([tok[0].prompt_ids + list(ids)])
            logp = torch.log_softmax(model(seq).logits[0], -1)
            p = len(tok[0].prompt_ids)
            out.append(sum(logp[p - 1 + i, t] for i, t in enumerate(ids)))
    return torch.stack(out)


def test_families_equal_the_model_with_moved_weights(tiny_dir, states):
    """theta = 0.7 along a head direction M equals the model with head W0 + 0.7 M; along a
    rank-1 LoRA direction it equals the model whose last down-projection gained 0.7 b a^T
    (the final RMSNorm recomputed in closed form); both to 1e-6 in float64."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(states.w0.shape, generator=g, dtype=DTYPE) * 0.05
    a = torch.randn(states.phi.shape[1], generator=g, dtype=DTYPE) * 0.3
    b = torch.randn(states.x.shape[1], generator=g, dtype=DTYPE) * 0.3
    theta = torch.tensor(0.7, dtype=DTYPE)

    def head(model):
        w = model.get_output_embeddings().weight
        model.get_output_embeddings().weight = torch.nn.Parameter(w + theta * m)

    def lora(model):
        down = model.model.layers[-1].mlp.down_proj
        down.weight += theta * torch.outer(b, a)

    got_head = BG.Family.head(states, m).sequence_logp(theta)
    got_lora = BG.Family.lora(states, a, b).sequence_logp(theta)
    torch.testing.assert_close(got_head, _model_logp(tiny_dir, states, head), rtol=0, atol=1e-6)
    torch.testing.assert_close(got_lora, _model_logp(tiny_dir, states, lora), rtol=0, atol=1e-6)
    assert (got_lora - states.logp_model.double()).abs().max() > 1e-3  # theta moved them


def test_exact_auxdpo_null_space_is_pi0_weighted(states):
    """Gamma spans N(A diag(pi0)) for the 1 x 3 gradient A of a normalised direction: two
    orthonormal columns with A diag(pi0) Gamma = 0, |A| = 1 after normalisation; and for a
    non-uniform pi0 it differs from N(A)."""
    from dpolab.auxdpo import null_space_basis

    fam = BG.directions(states, "head", 1, seed=3)[0]
    A = fam.gradient()
    assert A.norm().item() == pytest.approx(1.0, abs=1e-9)
    pi0 = fam.logp(0.0).exp()
    gamma = BG.rho_null_basis(fam)
    assert gamma.shape == (3, 2)
    torch.testing.assert_close(gamma.T @ gamma, torch.eye(2, dtype=DTYPE), atol=1e-12, rtol=0)
    assert (A * pi0 @ gamma).abs().max().item() < 1e-12
    plain = null_space_basis(A)
    assert (A * pi0 @ plain).abs().max().item() > 1e-6 or pi0.std() < 1e-9


def _toy_family(setting: B.BanditSetting) -> BG.Family:
    """The paper's softmax(theta [1, -1, 0]) written as a Family: one token per reply, V = 3,
    logits 0 + theta s at every position."""
    s = torch.tensor(setting.features, dtype=DTYPE)
    return BG.Family(torch.zeros(3, 3, dtype=DTYPE), s.repeat(3, 1), torch.arange(3),
                     torch.arange(3))


@pytest.mark.parametrize("counts", [(1.0, 1.0, 10.0), (10.0, 1.0, 1.0)])
def test_family_solver_reproduces_the_toy_bandit(counts):
    """On the toy's own policy class the real-bandit solver gives the toy's optima: DPO's
    E[r*] 0.8956 < 1 under (1, 1, 10) (the paper's 0.895), AuxDPO's 1.199, RLHF's theta;
    with a uniform pi0 the pi0 weighting leaves N(A) as it was."""
    setting = B.BanditSetting(counts=counts)
    fam = _toy_family(setting)
    rows = {r["method"]: r for r in BG.direction_rows(fam, setting)}
    for method in ("DPO", "IPO", "DPOP", "AuxDPO", "RLHF"):
        toy = B.solve(method, setting).theta
        assert rows[method]["theta"] == pytest.approx(toy, abs=1e-7), method
    aux = rows["AuxDPO"]
    assert aux["solver"] == "root" and aux["exact_fit_residual"] < 1e-10
    reward = np.log(np.array(aux["policy"]) / (1 / 3)) + np.array(aux["delta"])  # beta = 1
    assert np.ptp(reward - np.array(setting.r_star)) < 1e-9  # fits r* up to a constant
    toy_delta = np.array(B.solve("AuxDPO", setting).delta)
    assert np.ptp(np.array(aux["delta"]) - toy_delta) < 1e-6
    if counts == (1.0, 1.0, 10.0):
        assert rows["DPO"]["expected_reward"] == pytest.approx(0.89563, abs=1e-5)
        assert rows["DPO"]["lowers"] and not rows["AuxDPO"]["lowers"]
        assert rows["AuxDPO"]["expected_reward"] == pytest.approx(1.199, abs=1e-3)
    assert not rows["RLHF"]["lowers"]


def test_fractions_and_verdict():
    """fractions counts, per family and counts, the directions whose optimum lowers E[r*];
    the verdict needs DPO >= 0.3 and AuxDPO = RLHF = 0 on the head family under (1, 1, 10)."""
    def run(family, d, lowers):
        return {"family": family, "direction": d, "counts": [1.0, 1.0, 10.0],
                "rows": [{"method": m, "lowers": lowers.get(m, False)} for m in BG.METHODS]}
    runs = [run("head", 0, {"DPO": True}), run("head", 1, {}), run("head", 2, {"DPO": True}),
            run("lora", 0, {"AuxDPO": True})]
    f = BG.fractions(runs, "head", [1.0, 1.0, 10.0])
    assert f["DPO"] == pytest.approx(2 / 3) and f["AuxDPO"] == 0.0
    res = {"fractions": [{"family": "head", "counts": [1.0, 1.0, 10.0], **f}]}
    assert BG.verdict(res)["reproduced"]
    res["fractions"][0]["RLHF"] = 0.05
    assert not BG.verdict(res)["reproduced"]


def test_sign_test_hand_values():
    """10 positive of 10: p = 2 / 2^10 = 0.001953; 8 of 10: 2 (1 + 10 + 45) / 1024 =
    0.109375; ties are dropped; all ties give 1."""
    assert AH.sign_test([0.1] * 10) == pytest.approx(2 / 1024)
    assert AH.sign_test([0.1] * 8 + [-0.1] * 2) == pytest.approx(2 * 56 / 1024)
    assert AH.sign_test([0.1] * 8 + [-0.1] * 2 + [0.0] * 3) == pytest.approx(2 * 56 / 1024)
    assert AH.sign_test([0.0, 0.0]) == 1.0


def test_response_gradients_are_the_two_row_log_prob_gradients():
    """A's column of each response equals autograd's gradient of log softmax(W x)[y] w.r.t.
    the rows (Yes, No) of a full head W, at W0 (V = 5, D = 3)."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 3, generator=g, dtype=DTYPE)
    x = torch.randn(4, 3, generator=g, dtype=DTYPE)
    s = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DTYPE)
    yes, no = 1, 3
    logp0 = torch.log_softmax(x @ W.T, 1)[:, [yes, no]]
    A = AH.response_gradients(x, s, logp0)
    cols = []
    for chosen in (True, False):
        for i in range(4):
            rows = W[[yes, no]].clone().requires_grad_(True)
            full = W.index_put((torch.tensor([yes, no]),), rows)
            y = (yes if s[i] > 0 else no) if chosen else (no if s[i] > 0 else yes)
            (grad,) = torch.autograd.grad(torch.log_softmax(full @ x[i], 0)[y], rows)
            cols.append(grad.reshape(-1))
    torch.testing.assert_close(A, torch.stack(cols, 1), atol=1e-12, rtol=0)


def test_heldout_methods_on_synthetic_states():
    """Every method trains on synthetic decodable states; with 2n <= 2D responses AuxDPO's
    exact null space is {0} and it equals DPO exactly; the authors' form moves delta (its
    amplitude term pushes |delta| up) and stays within the cap (tanh reaches it in float64); the comparisons and count
    sensitivity are JSON-ready."""
    from tests.theory.test_values_persona import _synthetic_states

    from dpolab.theory import values_persona as VP

    st = _synthetic_states(3, 0, d=16)
    st = VP.PersonaStates(st.x, st.yes, st.group, st.held, st.groups, st.w0, st.info,
                          torch.full((st.x.shape[0], 2), math.log(0.25)))
    cfg = VP.PersonaConfig(steps=30)
    s = AH.HeldoutSetting(seeds=2, dominant=12, minority=2)
    res = AH.run(st, list(st.groups), {"adam": {"lr": 0.03}, "gd": {"lr": 1.0}}, cfg, s,
                 log=lambda *_: None)
    json.dumps(res)
    assert len(res["runs"]) == 2 * 2 * 2 * len(AH.methods(s))
    by = {(r["seed"], r["direction"], r["optimizer"], r["method"]): r for r in res["runs"]}
    for key, r in by.items():
        if key[3] == "AuxDPO exact":
            assert r["null_dim"] == 0
            assert r["accuracy"] == by[key[:3] + ("DPO",)]["accuracy"]
        if key[3].startswith("AuxDPO authors"):
            assert 0 < r["delta_abs_max"] <= s.cap
    assert {c["method"] for c in res["comparisons"]} == set(AH.methods(s)[1:])
    assert all(c["pairs"] == 4 for c in res["comparisons"])
    assert len(res["count_sensitivity"]) == 2 * len(AH.methods(s))
    assert AH.verdict(res)["summary"]


def test_cli_quick_real_bandit_writes_both_experiments(persona_tiny_dir, tmp_path, cache):
    """`dpolab reproduce misspecification --real-bandit --quick --model TINY` writes the toy
    table, the real-geometry fractions for both families and all three count settings, the
    held-out comparison (or why it was skipped), the figures and the report."""
    from dpolab.theory.bandit_plots import cli_main

    out = tmp_path / "out"
    assert cli_main(["--out", str(out), "--real-bandit", "--quick", "--model",
                     str(persona_tiny_dir)]) == 0
    res = json.loads((out / "results.json").read_text())
    rb = res["real_bandit"]
    assert len(rb["bandit"]["fractions"]) == 2 * 3
    assert len(rb["bandit"]["runs"]) == 2 * 3 * 2
    assert "verdict" in rb["bandit"] and "verdict" in rb["heldout"]
    assert (out / "real_bandit_fractions.png").stat().st_size > 0
    assert "Real model: the bandit on" in (out / "report.html").read_text()


def test_cli_refuses_bad_directions(tmp_path):
    """--directions 0 is a one-line error before anything is written."""
    from dpolab.errors import UserError
    from dpolab.theory.bandit_plots import cli_main

    with pytest.raises(UserError, match="--directions"):
        cli_main(["--out", str(tmp_path / "o"), "--real-bandit", "--directions", "0"])
    assert not (tmp_path / "o").exists()
