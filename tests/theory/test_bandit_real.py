"""The real-model misspecification experiment (dpolab.theory.bandit_real): the imbalanced split,
the runner on a tiny random model, and the --real flags of `dpolab reproduce misspecification`."""

import argparse
import json
from dataclasses import replace

import pytest
import torch

from dpolab.errors import UserError
from dpolab.data import PreferenceRow
from dpolab.theory.bandit_plots import cli_main
from dpolab.theory.bandit_real import (RealSetting, add_real_arguments, delta_summary,
                                       format_real_table, imbalanced_split,
                                       real_setting_from_args, run_experiment, run_overrides)

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def make_rows(group: str, n: int, *, duplicates: int = 0) -> list[PreferenceRow]:
    """n distinct standard-format pairs of one group (the chosen reply repeats the prompt's
    word), then `duplicates` exact copies of the first pairs from another source row."""
    rows = []
    for i in range(n):
        w, other = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append(PreferenceRow(prompt=f"{group} says {w} {i}:", chosen=f" {w} {w}.",
                                  rejected=f" {other} and {other} again.", group=group,
                                  source="test", row=i + 1))
    rows += [replace(r, row=n + k + 1) for k, r in enumerate(rows[:duplicates])]
    return rows


def _text(r: PreferenceRow) -> tuple:
    return (r.prompt, r.chosen, r.rejected)


def test_imbalanced_split_counts_disjoint_and_seeded():
    """Each group gets exactly its training count and eval_per_group held-out pairs; no pair
    text is on both sides, not even through duplicate rows; groups not asked for are left out;
    the split is a pure function of the seed."""
    rows = make_rows("a", 30, duplicates=10) + make_rows("b", 12, duplicates=5) + make_rows("c", 9)
    train, held = imbalanced_split(rows, counts={"a": 20, "b": 2}, eval_per_group=4, seed=0)
    assert [sum(r.group == g for r in train) for g in "abc"] == [20, 2, 0]
    assert [sum(r.group == g for r in held) for g in "abc"] == [4, 4, 0]
    train_text, held_text = {_text(r) for r in train}, {_text(r) for r in held}
    assert len(train_text) == 22 and len(held_text) == 8  # no duplicate within a side either
    assert not train_text & held_text
    again = imbalanced_split(rows, counts={"a": 20, "b": 2}, eval_per_group=4, seed=0)
    assert [_text(r) for r in again[0]] == [_text(r) for r in train]
    other = imbalanced_split(rows, counts={"a": 20, "b": 2}, eval_per_group=4, seed=1)
    assert [_text(r) for r in other[1]] != [_text(r) for r in held]


def test_imbalanced_split_prefix_property_and_too_few():
    """A smaller count takes a prefix of the same order (held-out unchanged); asking for more
    distinct pairs than a group has (12 distinct b pairs: 4 + 9 = 13 > 12) is a ValueError
    that names the group."""
    rows = make_rows("a", 30) + make_rows("b", 12, duplicates=5)
    big = imbalanced_split(rows, counts={"a": 20, "b": 8}, eval_per_group=4, seed=3)
    small = imbalanced_split(rows, counts={"a": 10, "b": 8}, eval_per_group=4, seed=3)
    assert [_text(r) for r in small[1]] == [_text(r) for r in big[1]]
    a_big = [_text(r) for r in big[0] if r.group == "a"]
    assert [_text(r) for r in small[0] if r.group == "a"] == a_big[:10]
    with pytest.raises(ValueError, match="group 'b' has 12 distinct pairs"):
        imbalanced_split(rows, counts={"a": 2, "b": 9}, eval_per_group=4, seed=0)


def test_run_overrides_share_everything_but_the_loss():
    """DPO and AuxDPO runs of one scope differ only in loss.name; the two scopes use their own
    lr and only LoRA gets rank and targets."""
    s = RealSetting()
    for scope in ("last_layer", "lora"):
        dpo = run_overrides(s, loss="dpo", scope=scope)
        aux = run_overrides(s, loss="auxdpo", scope=scope)
        assert [x for x in dpo if x not in aux] == ["loss.name=dpo"]
        assert [x for x in aux if x not in dpo] == ["loss.name=auxdpo"]
    assert "train.lr=0.0001" in run_overrides(s, loss="dpo", scope="last_layer")
    lora = run_overrides(s, loss="dpo", scope="lora")
    assert "train.lr=0.001" in lora and "train.lora_r=2" in lora
    assert "train.lora_targets=[q_proj, v_proj]" in lora
    assert not any(x.startswith("train.lora") for x in run_overrides(s, loss="dpo",
                                                                      scope="last_layer"))


def test_delta_summary_by_hand():
    """delta = [c1, c2, r1, r2] = [1, 3, 0, 1], beta 0.5: beta (c - r) = [0.5, 1.0];
    rms = sqrt((1 + 9 + 0 + 1) / 4) = sqrt(2.75); per group the mean of its pairs."""
    d = torch.tensor([1.0, 3.0, 0.0, 1.0], dtype=torch.float64)
    out = delta_summary(d, ["a", "b"], beta=0.5)
    assert out["rms"] == pytest.approx(2.75 ** 0.5)
    assert out["by_group"] == pytest.approx({"a": 0.5, "b": 1.0})
    assert delta_summary(d, ["a"], beta=0.5)["by_group"] == {}  # groups do not match delta


def test_runner_on_tiny_model_last_layer(tiny_dir, tmp_path, monkeypatch):
    """Two groups (a dominant 5:1), last_layer scope, DPO and AuxDPO for 3 steps: both runs
    report per-group held-out metrics before and after; before training every implicit
    margin is 0, so accuracy is exactly 0.5 (ties half) and margin 0; the policy preference
    before is the reference's, the same in both runs; accuracies lie in [0, 1]; the heavy
    run outputs are removed; AuxDPO reports its deltas and the rank of A over its 24 training
    responses; the results are JSON-serialisable."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    rows = make_rows("a", 20) + make_rows("b", 8)
    s = RealSetting(model=str(tiny_dir), groups=("a", "b"), counts=(10, 2), eval_per_group=3,
                    steps=3, batch_size=4, scopes=("last_layer",), max_length=48)
    logs = []
    real = run_experiment(s, tmp_path / "real", rows=rows, log=logs.append)
    assert real["train_pairs"] == {"a": 10, "b": 2}
    assert real["held_out_pairs"] == {"a": 3, "b": 3}
    assert [(r["scope"], r["loss"]) for r in real["runs"]] == [("last_layer", "DPO"),
                                                                ("last_layer", "AuxDPO")]
    assert len(logs) == 2
    for run in real["runs"]:
        for g in "ab":
            assert run["before"][g]["accuracy"] == 0.5
            assert run["before"][g]["margin"] == pytest.approx(0.0, abs=1e-6)
            assert 0.0 <= run["after"][g]["accuracy"] <= 1.0
            assert run["before"][g]["preference"] == real["runs"][0]["before"][g]["preference"]
        gap = run["after"]["a"]["accuracy"] - run["after"]["b"]["accuracy"]
        assert run["accuracy_gap"] == pytest.approx(gap)
        assert not (tmp_path / "real" / f"last_layer-{run['loss'].lower()}" / "model").exists()
    dpo, aux = real["runs"]
    assert dpo["delta"] is None and set(aux["delta"]["by_group"]) == {"a", "b"}
    assert aux["delta"]["rms"] > 0  # the auxiliary rewards were trained
    assert dpo["null_space"] is None and aux["null_space"]["responses"] == 2 * 12
    assert aux["null_space"]["rank"] + aux["null_space"]["null_dim"] == 24
    json.dumps(real)
    table = format_real_table(real)
    assert "a (dominant)" in table and "AuxDPO" in table
    assert f"rank {aux['null_space']['rank']} of 24 responses" in table


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_real_arguments(parser)
    return real_setting_from_args(parser.parse_args(argv))


def test_real_flags_parse():
    """No --real: None. --real alone: the defaults. --real-groups without counts keeps the
    dominant count and gives every other group the minority count."""
    assert _parse([]) is None
    assert _parse(["--real"]) == RealSetting()
    s = _parse(["--real", "--real-groups", "factual,bias,refusal,overrefusal",
                "--real-steps", "5", "--real-scopes", "lora", "--real-eval", "4"])
    assert s.groups == ("factual", "bias", "refusal", "overrefusal")
    assert s.counts == (30, 3, 3, 3)
    assert (s.steps, s.scopes, s.eval_per_group) == (5, ("lora",), 4)
    assert _parse(["--real", "--real-counts", "20,2,2"]).counts == (20, 2, 2)


@pytest.mark.parametrize("argv, message", [
    (["--real", "--real-steps", "0"], "steps must be >= 1"),
    (["--real", "--real-steps", "abc"], "invalid int value"),
    (["--real", "--real-groups", "factual"], "at least 2 distinct groups"),
    (["--real", "--real-groups", "factual,nonsense"], "unknown group"),
    (["--real", "--real-counts", "10,1"], "one count per group"),
    (["--real", "--real-counts", "10,x,1"], "expected integers"),
    (["--real", "--real-counts", "10,0,1"], "counts must be >= 1"),
    (["--real", "--real-scopes", "full"], "unknown"),
    (["--real", "--real-eval", "0"], "eval_per_group must be >= 1"),
    (["--real-steps", "5"], "only apply with --real"),
])
def test_cli_rejects_bad_real_flags(tmp_path, argv, message):
    """Bad --real values are one-line UserErrors raised before anything is computed or
    written (the output folder is not even created)."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        cli_main(["--out", str(out), *argv])
    assert not out.exists()
