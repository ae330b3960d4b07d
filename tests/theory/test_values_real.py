"""Tests for the real-model part of the diverse-values reproduction, on a tiny random model:
cached states, value subsets, last-layer DPO on the cached states, value-direction structure,
fits and the command-line checks."""

import numpy as np
import pytest
import torch

from dpolab.errors import UserError
from dpolab.data import PreferenceRow
from dpolab.logps import Head, label_logps
from dpolab.losses import dpo_loss
from dpolab.theory import values_real as R
from dpolab.theory.values import fit_line

WORDS = {"alpha": ("honest", "sneaky"), "beta": ("careful", "reckless"),
         "gamma": ("kind", "rude")}


def _row(group: str, i: int, good: str, bad: str) -> PreferenceRow:
    prompt = f"The cat {i} asks about {group} today."
    return PreferenceRow(prompt=[{"role": "user", "content": prompt}],
                         chosen=[{"role": "assistant", "content": f"A {good} reply {i}."}],
                         rejected=[{"role": "assistant", "content": f"A {bad} reply {i}."}],
                         group=group, source="mem", row=i)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to share between threads; with other processes
    on the cores, thread hand-offs cost more than the work. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """A tiny model folder and 3 groups x (6 train + 3 held-out) rows; the completions share
    the prefix "A " so the first difference is after a common prefix."""
    from dpolab.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny(root / "model", vocab_size=512)
    train = [_row(g, i, *w) for g, w in WORDS.items() for i in range(6)]
    held = [_row(g, 100 + i, *w) for g, w in WORDS.items() for i in range(3)]
    data = R.build_states(str(model_dir), train, held, max_length=64, max_prompt_length=48,
                          batch_tokens=64, store_dir=root / "store", progress=False)
    return model_dir, train, held, data, root


def test_divergence_is_the_common_prefix_length():
    """divergence = index of the first differing token; None when one is a prefix."""
    assert R.divergence([5, 6, 7], [5, 9, 7]) == 1
    assert R.divergence([1], [2]) == 0
    assert R.divergence([5, 6], [5, 6, 7]) is None


def test_length_batches_respect_the_token_budget():
    """Sorted by length; each batch's padded size (count x longest) stays within the budget,
    except a single sequence longer than it."""
    lengths = [5, 30, 10, 10, 100]
    batches = R._length_batches(lengths, batch_tokens=30)
    assert [i for b in batches for i in b] == [0, 2, 3, 1, 4]
    # [5, 10, 10]: 3 x 10 = 30 <= 30; adding 30 would give 4 x 30 > 30; 100 alone.
    assert batches == [[0, 2, 3], [1], [4]]


def test_states_equal_an_unpadded_forward_and_are_reused_from_the_store(tiny):
    """x is the final state at the first differing position, computed in a padded batch; it
    equals a lone forward of prompt + common prefix. prompt_last is the state at the prompt's
    last token. A second build with the same weights and token ids reads the store."""
    from dpolab.models import body_and_head, load_model, load_tokenizer
    from dpolab.tokenize import tokenize_rows

    model_dir, train, held, data, root = tiny
    tok = load_tokenizer(str(model_dir))
    ex = tokenize_rows(train, tok, max_length=64, max_prompt_length=48).examples[7]
    c = R.divergence(ex.chosen_ids, ex.rejected_ids)
    assert c >= 1  # "A " is shared
    body, _ = body_and_head(load_model(str(model_dir)))
    with torch.no_grad():
        h = body(torch.tensor([ex.prompt_ids + ex.chosen_ids[:c]]))[0]
    assert torch.allclose(data.train.x[7], h[-1], atol=1e-5)
    assert torch.allclose(data.train.prompt_last[7], h[len(ex.prompt_ids) - 1], atol=1e-5)
    assert data.train.chosen[7] == ex.chosen_ids[c] and data.train.rejected[7] == ex.rejected_ids[c]
    assert data.groups == ["alpha", "beta", "gamma"] and data.info["cache_hit"] is False
    again = R.build_states(str(model_dir), train, held, max_length=64, max_prompt_length=48,
                           store_dir=root / "store", progress=False)
    assert again.info["cache_hit"] is True
    assert torch.equal(again.held_out.x, data.held_out.x)


def test_select_pairs_is_seeded_with_k_distinct_values_and_q_each():
    """Same (seed, K, rep) -> same draw; K distinct values, exactly Q pairs of each, no
    repeats; Q above the smallest group is refused."""
    group = np.repeat(np.arange(5), [8, 9, 10, 8, 12])
    v1, i1 = R.select_pairs(group, 5, k=3, q=4, seed=0, rep=0)
    v2, i2 = R.select_pairs(group, 5, k=3, q=4, seed=0, rep=0)
    assert v1 == v2 and np.array_equal(i1, i2)
    assert len(set(v1)) == 3 and len(set(i1.tolist())) == 12
    assert [int((group[i1] == v).sum()) for v in v1] == [4, 4, 4]
    draws = {tuple(R.select_pairs(group, 5, k=3, q=4, seed=0, rep=r)[1]) for r in range(4)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="q=9"):
        R.select_pairs(group, 5, k=2, q=9, seed=0, rep=0)


def test_training_the_used_rows_equals_a_step_on_the_full_head(tiny):
    """One gradient step on the whole (V, D) head with full-softmax label_logps gives the same
    margins as train_head on the rows of the occurring tokens: the log-partition cancels."""
    data = tiny[3]
    tr, beta, lr = data.train, 0.1, 0.3
    w = data.w0.double().clone().requires_grad_(True)
    x = tr.x.double()
    ref_c = label_logps(x, Head(data.w0.double()), tr.chosen).detach()
    ref_r = label_logps(x, Head(data.w0.double()), tr.rejected).detach()
    loss = dpo_loss(label_logps(x, Head(w), tr.chosen), label_logps(x, Head(w), tr.rejected),
                    ref_c, ref_r, beta=beta).mean()
    (g,) = torch.autograd.grad(loss, w)
    w1 = w.detach() - lr * g
    full = beta * ((label_logps(x, Head(w1), tr.chosen) - ref_c)
                   - (label_logps(x, Head(w1), tr.rejected) - ref_r))
    run = R.train_head(tr, data.held_out, data.w0, beta=beta, lr=lr, steps=1)
    assert np.allclose(run.train_final, full.numpy(), rtol=1e-8, atol=1e-10)
    used = torch.unique(torch.cat([tr.chosen, tr.rejected]))
    others = torch.ones(w1.shape[0], dtype=torch.bool)
    others[used] = False
    assert torch.equal(w1[others], data.w0.double()[others])  # no other row moved


def test_head_training_lowers_the_loss_and_raises_margins(tiny):
    """From the reference (every margin 0, loss ln 2 = 0.6931, error 1/2 by the tie rule) GD
    lowers the mean DPO loss at every recorded step and makes the training margins positive."""
    data = tiny[3]
    run = R.train_head(data.train, data.held_out, data.w0, beta=0.1, lr=2.0, steps=40,
                       record_every=10)
    assert run.loss[0] == pytest.approx(np.log(2.0), abs=1e-12)
    assert run.train_margin[0] == 0.0 and run.held_margin[0] == 0.0
    assert list(run.steps) == [0, 10, 20, 30, 40]
    assert np.all(np.diff(run.loss) < 0)
    assert run.train_final.mean() > 0 and run.train_margin[-1] > run.train_margin[1] > 0
    assert R.heldout_error(run.train_final, data.train.group.numpy()) < 0.5
    still = R.train_head(data.train, data.held_out, data.w0, beta=0.1, lr=2.0, steps=0)
    assert R.heldout_error(still.held_final, data.held_out.group.numpy()) == 0.5


def test_heldout_error_counts_ties_half_and_weighs_values_equally():
    """margins [1, -1, 0 | 2], groups [0, 0, 0 | 1]: value 0 has (0 + 1 + 0.5) / 3 = 0.5,
    value 1 has 0, so the error is (0.5 + 0) / 2 = 0.25 (not 1.5 / 4 = 0.375 pooled)."""
    assert R.heldout_error(np.array([1.0, -1.0, 0.0, 2.0]), np.array([0, 0, 0, 1])) == 0.25


def test_growth_rate_and_line_fit_on_exact_linear_data():
    """margin = 0.02 step + 0.1 for step <= 10, flat after: the early slope is 0.02; the error
    line 0.05 K + 0.1 on K = 1..7 is fitted exactly with R^2 = 1."""
    steps = np.arange(0, 21)
    margins = np.where(steps <= 10, 0.02 * steps + 0.1, 0.3)
    assert R.growth_rate(steps, margins, early=10) == pytest.approx(0.02, abs=1e-12)
    k = np.arange(1, 8)
    fit = fit_line(k, 0.05 * k + 0.1)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["slope"] == pytest.approx(0.05) and fit["intercept"] == pytest.approx(0.1)


def test_value_structure_removes_a_shared_component():
    """mu_i = e_i + b, e_1..e_3 orthonormal, b = 2 e_4 orthogonal to them:
    before, cos = (e_i + b).(e_j + b) / |e_i + b|^2 = 4 / (1 + 4) = 0.8;
    after removing m = (e_1 + e_2 + e_3) / 3 + b, mu_i - m = e_i - (e_1 + e_2 + e_3) / 3 with
    dot -1/3 and squared norm 1 - 1/3 = 2/3, so cos = -1/2 = -1/(G - 1);
    shared fraction |m|^2 / mean |mu_i|^2 = (1/3 + 4) / 5 = 13/15.
    Each value has two samples +-0.1 e_5 around its mean, which the mean removes."""
    e = np.eye(5)
    mus = [e[i] + 2 * e[3] for i in range(3)]
    emb = np.stack([m + s * 0.1 * e[4] for m in mus for s in (1, -1)])
    group = np.repeat(np.arange(3), 2)
    st = R.value_structure(emb, group, 3)
    before, after = np.array(st["cos_before"]), np.array(st["cos_after"])
    off = ~np.eye(3, dtype=bool)
    assert np.allclose(before[off], 0.8) and np.allclose(np.diag(before), 1.0)
    assert np.allclose(after[off], -0.5) and st["orthogonal_reference_after"] == -0.5
    assert st["offdiag_mean_after"] == pytest.approx(-0.5)
    assert st["shared_norm_fraction"] == pytest.approx(13 / 15)


def test_k_sweep_runs_every_k_and_rep_and_fits(tiny):
    """K = 1..3 with 2 reps: 6 runs, each on K values with Q pairs each and only the held-out
    pairs of its values; per-K means and the error-vs-K fit are present."""
    data = tiny[3]
    cfg = R.RealConfig(q=4, reps=2, steps=6, lr=1.0, early=4, record_every=2)
    sw = R.run_k_sweep(data, cfg, progress=False)
    assert [(r["k"], r["rep"]) for r in sw["runs"]] == [(k, r) for k in (1, 2, 3) for r in (0, 1)]
    for r in sw["runs"]:
        assert len(r["values"]) == r["k"] and r["held_out_pairs"] == 3 * r["k"]
        assert r["loss_end"] < r["loss_start"]
    assert [r["k"] for r in sw["per_k"]] == [1, 2, 3]
    assert 0.0 <= sw["fits"]["held_error_vs_k_means"]["r2"] <= 1.0
    assert sw["curves"][2]["steps"] == [0, 2, 4, 6]


@pytest.mark.parametrize("argv, match", [
    (["--real-chat", "--real-q", "40"], "real-q"),
    (["--real-chat", "--real-seeds", "x"], "integers"),
    (["--real-chat", "--real-steps", "0"], "real-steps"),
])
def test_cli_rejects_bad_real_options(argv, match, tmp_path):
    """Bad --real-* values stop with a one-line UserError before any work is done."""
    from dpolab.theory.values_report import cli_main

    with pytest.raises(UserError, match=match):
        cli_main(argv + ["--out", str(tmp_path / "o")])


def test_results_tables_figures_and_report_section(tiny, tmp_path):
    """real_results on the tiny states gives JSON-serialisable results whose tables, figures
    and report section build; the settings record Q, reps, beta and lr."""
    import json

    from dpolab.theory import values_report as VR

    data = tiny[3]
    cfg = R.RealConfig(q=3, reps=1, steps=4, lr=1.0, early=2, record_every=2)
    res = json.loads(json.dumps(R.real_results(data, cfg, progress=False)))
    res["timings"]["total_s"] = 0.0
    assert res["setting"]["config"]["q"] == 3 and res["setting"]["config"]["beta"] == 0.1
    tabs = VR.real_tables(res)
    assert len(tabs["real model: K sweep (means over reps)"]) == 3
    figs = VR.make_real_figures(res, tmp_path)
    blocks = VR.real_report_blocks(res, tabs, figs)
    assert all(p.stat().st_size > 0 for p in figs.values())
    assert any("-0.500" in b for b in blocks)  # -1/(G-1) for G = 3 values
