"""Evaluation as a TRL user reads it: the held-out loss, TRL's per-token metrics, named eval
sets, a user's compute_metrics, and `evaluate()` / `dpolab evaluate` on a finished run."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import dpolab
from dpolab.errors import UserError

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
FAST = {"train.batch_size": 4, "train.max_steps": 3, "train.lr": 0.05, "train.progress": False,
        "train.did_samples": 0, "train.report": False, "data.max_length": 48,
        "data.max_prompt_length": 16, "loss.weights": {"dpo": 1.0, "sft": 0.1},
        "data.group_weights": {"a": 2.0}}


def pairs(lo: int, hi: int) -> list[dict]:
    return [{"prompt": f"Say {WORDS[i % 8]} {i}:", "chosen": f" {WORDS[i % 8]} {WORDS[i % 8]}.",
             "rejected": f" {WORDS[(i * 3 + 1) % 8]} and again.", "group": "ab"[i % 2]}
            for i in range(lo, hi)]


SETS = {"first": pairs(12, 15), "second": pairs(15, 17)}


def n_pairs(p: dict) -> dict:
    """A user's metric: the pairs it saw and their mean squared margin."""
    return {"pairs_seen": float(len(p["margins"])),
            "margin_sq": float(np.mean(p["margins"] ** 2))}


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One 3-step run (dpo + 0.1 sft, group a weighted 2) from JSONL files with two named
    eval sets (config data.eval) and a compute_metrics; its own cache, kept for the module."""
    root = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    mp.setenv("DPOLAB_CACHE", str(root / "cache"))
    files = {}
    for name, rows in {"train": pairs(0, 12), **SETS}.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = dpolab.Trainer(str(tiny_dir), files.pop("train"), eval_dataset=files,
                             out=str(root / "run"), compute_metrics=n_pairs, **FAST)
    run = trainer.train()
    yield trainer, run
    mp.undo()


def lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def naive(tiny_dir, rows: list[dict]) -> dict[str, np.ndarray]:
    """Per pair from the model's own full (1, T, V) logits, no dpolab forward or head:
    summed completion log-probs, token counts, and per response the sums of the mean logit,
    the entropy and top-1 hits over its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.data import load_rows
    from dpolab.tokenize import tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    examples = tokenize_rows(load_rows(rows).rows, tok, max_length=48, max_prompt_length=16,
                             truncation="keep_end").examples
    out = {k: [] for k in ("logp", "n", "mean_logit", "entropy", "top1")}
    for ex in examples:
        for ids in (ex.chosen_ids, ex.rejected_ids):
            seq = torch.tensor([list(ex.prompt_ids) + list(ids)])
            with torch.no_grad():
                z = model(seq).logits[0, len(ex.prompt_ids) - 1:-1].double()  # (n, V)
            y = torch.tensor(list(ids))
            logp = torch.log_softmax(z, -1)
            out["logp"].append(float(logp.gather(1, y[:, None]).sum()))
            out["n"].append(len(ids))
            out["mean_logit"].append(float(z.mean(-1).sum()))
            out["entropy"].append(float(-(logp.exp() * logp).sum(-1).sum()))
            out["top1"].append(float((z.argmax(-1) == y).sum()))
    return {k: np.array(v).reshape(-1, 2) for k, v in out.items()}  # (N, chosen/rejected)


def test_token_stats_equal_naive_full_logits():
    """The chunked head's per-token mean logit, entropy and top-1 (chunks of 3 positions,
    a scaled and soft-capped head) equal torch's own on the full (N, V) logits within 1e-5,
    and asking for them leaves the log-probs and their gradient unchanged."""
    from dpolab.logps import Head, label_logps, label_logps_and_stats, naive_token_stats

    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, requires_grad=True)
    head = Head(torch.randn(50, 16, generator=g), torch.randn(50, generator=g), softcap=3.0,
                scale=0.7)
    y = torch.randint(0, 50, (10,), generator=g)
    lp, stats = label_logps_and_stats(h, head, y, chunk_size=3)
    want = naive_token_stats(h.detach(), head, y)
    assert stats.shape == (10, 3) and not stats.requires_grad
    assert torch.allclose(stats, want, atol=1e-5, rtol=0)
    z = torch.nn.functional.linear(h.detach(), head.weight, head.bias) * 0.7
    z = 3.0 * torch.tanh(z / 3.0)
    y[1] = int(z[1].argmax())  # one certain hit; the others as drawn
    lp, stats = label_logps_and_stats(h, head, y, chunk_size=3)
    assert stats[1, 2] == 1.0 and torch.equal(stats[:, 2], (z.argmax(-1) == y).float())
    (g1,) = torch.autograd.grad(lp.sum(), h)
    (g2,) = torch.autograd.grad(label_logps(h, head, y, chunk_size=3).sum(), h)
    assert torch.equal(g1, g2)


def test_step0_eval_loss_and_trl_metrics_by_hand(trained, tiny_dir):
    """At step 0 the policy is its reference, so per pair dpo = ln 2 and sft = -log pi(y_w)
    / |y_w| (per-token mean), and eval/loss = (1/N) sum_i w_i (ln 2 + 0.1 sft_i) with w = 2
    for group a, 1 for b, from the model's own full logits. logits/chosen = sum of the
    chosen tokens' mean logits / chosen tokens; entropy over both completions' tokens;
    mean_token_accuracy = chosen top-1 hits / chosen tokens. All within 1e-5."""
    _, run = trained
    first = lines(run)[0]
    held = SETS["first"] + SETS["second"]
    nv = naive(tiny_dir, held)
    w = np.array([2.0 if r["group"] == "a" else 1.0 for r in held])
    sft = -nv["logp"][:, 0] / nv["n"][:, 0]
    assert first["eval/loss"] == pytest.approx(float(np.mean(w * (math.log(2) + 0.1 * sft))),
                                               abs=1e-5)
    assert first["eval/loss/sft"] == pytest.approx(float(np.mean(sft)), abs=1e-5)
    n = nv["n"].sum(0)
    assert first["eval/logits/chosen"] == pytest.approx(nv["mean_logit"][:, 0].sum() / n[0], abs=1e-5)
    assert first["eval/logits/rejected"] == pytest.approx(nv["mean_logit"][:, 1].sum() / n[1],
                                                          abs=1e-5)
    assert first["eval/entropy"] == pytest.approx(nv["entropy"].sum() / n.sum(), abs=1e-5)
    assert first["eval/mean_token_accuracy"] == pytest.approx(nv["top1"][:, 0].sum() / n[0],
                                                              abs=1e-5)
    # a training row carries them too, and num_tokens counts two rows per pair, cumulatively
    steps = [r for r in lines(run) if "loss" in r and "step" in r]
    assert all(k in steps[0] for k in ("logits/chosen", "entropy", "mean_token_accuracy"))
    assert 0 < steps[0]["num_tokens"] < steps[1]["num_tokens"] < steps[2]["num_tokens"]


def test_named_eval_sets_each_get_their_own_metrics(trained):
    """eval/first/... and eval/second/... are each the metrics of that set alone: equal to
    evaluate() of that set as the one held-out set, with the same (final) weights; the
    compute_metrics callable saw 3 and 2 pairs there, 5 in the union, at every evaluation."""
    trainer, run = trained
    final = [r for r in lines(run) if "eval/loss" in r and "evaluate" not in r][-1]
    for name, rows in SETS.items():
        alone = trainer.evaluate(rows)
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "entropy", "logits/rejected", "margin_sq"):
            assert final[f"eval/{name}/{key}"] == pytest.approx(alone[f"eval/{key}"], abs=1e-9)
        assert final[f"eval/{name}/pairs_seen"] == len(rows)
    evals = [r for r in lines(run) if "eval/loss" in r and "evaluate" not in r]
    assert len(evals) >= 2 and all(r["eval/pairs_seen"] == 5 for r in evals)


def test_evaluate_base_model_equals_step0_evaluation(trained, tmp_path, monkeypatch):
    """evaluate(checkpoint=0) scores the base model against the run's reference: every
    eval/ number of the run's own step-0 evaluation, again, also from a copy of the run
    directory on a machine with a cold cache (the reference recomputed there); the line
    it appends is marked and is not part of the run's curve."""
    from dpolab.evaluate import evaluate_run
    from dpolab.rundir import load_run

    trainer, run = trained
    step0 = lines(run)[0]
    again = trainer.evaluate(checkpoint=0)
    keys = [k for k in step0 if k.startswith("eval/")]
    assert keys and all(again[k] == pytest.approx(step0[k], abs=1e-9) for k in keys)
    copy = tmp_path / "copied"
    shutil.copytree(run, copy)
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cold"))
    there = evaluate_run(copy, checkpoint=0)
    assert all(there[k] == pytest.approx(step0[k], abs=1e-6) for k in keys
               if "pairs_seen" not in k and "margin_sq" not in k)
    assert lines(copy)[-1]["evaluate"] == "held_out"
    assert all("evaluate" not in r for r in load_run(copy).evals)


def test_evaluate_cli_prints_the_runs_table(trained, capsys):
    """`dpolab evaluate RUN` prints the held-out table the run printed: accuracy before
    (the base model) and after (the last checkpoint) per group; a missing checkpoint is one
    line naming the steps kept (exit 2)."""
    from dpolab.cli import main
    from dpolab.report import held_out_table

    _, run = trained
    summary = json.loads((run / "summary.json").read_text())
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert held_out_table(summary["before"], summary["after"], run_dir=run) in out
    assert main(["evaluate", str(run), "--checkpoint", "2"]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint; kept: 3 (0: the base model)" in err


def test_compute_metrics_bad_return_is_one_line(tiny_dir, tmp_path, cache):
    """A compute_metrics that returns a non-number, or a name dpolab logs itself, stops the
    run with one UserError naming it."""
    for fn, said in ((lambda p: {"x": "many"}, "'x': 'many'"),
                     (lambda p: {"loss": 1.0}, "'loss', a name dpolab's own")):
        with pytest.raises(UserError, match=said):
            dpolab.Trainer(str(tiny_dir), pairs(0, 8), eval_dataset=pairs(8, 10),
                           out=str(tmp_path / f"run{len(said)}"), compute_metrics=fn,
                           **FAST).train()


def test_iterable_dataset_and_dataset_dict(tiny_dir, tmp_path, cache):
    """A finite datasets.IterableDataset (from a generator: no column names before it is
    read) trains and evaluates like the list it streams
    (same step-0 numbers); a DatasetDict as eval_dataset names its splits as eval sets; a
    reserved set name is refused in one line."""
    from datasets import Dataset, DatasetDict, IterableDataset

    def stream():
        yield from pairs(0, 12)

    it = IterableDataset.from_generator(stream)  # its columns unknown until read
    dd = DatasetDict({k: Dataset.from_list(v) for k, v in SETS.items()})
    fast = {**FAST, "train.max_steps": 1}
    a = dpolab.Trainer(str(tiny_dir), it, eval_dataset=dd, out=str(tmp_path / "a"), **fast).train()
    b = dpolab.Trainer(str(tiny_dir), pairs(0, 12), eval_dataset=SETS, out=str(tmp_path / "b"),
                       **fast).train()
    ra, rb = lines(a)[0], lines(b)[0]
    assert "eval/second/rewards/accuracies" in ra
    assert all(ra[k] == rb[k] for k in rb if k.startswith(("eval/", "train_eval/")))
    with pytest.raises(UserError, match="eval set name 'loss' is not usable"):
        dpolab.Trainer(str(tiny_dir), pairs(0, 12), eval_dataset={"loss": pairs(12, 14)},
                       out=str(tmp_path / "c"), **fast)


def test_explicit_reference_is_the_reference_computed_by_hand(tiny_dir, tmp_path, cache):
    """model.reference = another model (the tiny one with seeded noise on every weight): the
    step-0 evaluation's rewards and loss are those of the policy against that model's
    log-probs computed by hand from its full logits: margin_i = beta ((pc - rc) - (pr -
    rr)), loss_i = -log sigmoid(margin_i), within 1e-5; the policy at step 0 is not its
    reference. A reference whose tokenizer differs (another tiny tokenizer, same size) is
    one line before training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.tiny import save_tiny

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    other = tmp_path / "other"
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    held = pairs(12, 16)
    fast = {**FAST, "loss.weights": {"dpo": 1.0}, "train.max_steps": 1,
            "data.group_weights": {}}
    run = dpolab.Trainer(str(tiny_dir), pairs(0, 12), eval_dataset=held, ref_model=str(other),
                         out=str(tmp_path / "run"), **fast).train()
    first = lines(run)[0]
    pol, ref = naive(tiny_dir, held), naive(other, held)
    margin = 0.5 * ((pol["logp"][:, 0] - ref["logp"][:, 0]) - (pol["logp"][:, 1] - ref["logp"][:, 1]))
    assert first["eval/rewards/margins"] == pytest.approx(float(margin.mean()), abs=1e-5)
    assert first["eval/loss"] == pytest.approx(float(np.mean(np.logaddexp(0, -margin))), abs=1e-5)
    assert abs(first["eval/rewards/margins"]) > 1e-3  # not a policy at its own reference
    wide = save_tiny(tmp_path / "wide", vocab_size=512, seed=1)
    with pytest.raises(UserError, match="its tokenizer differs from the policy's"):
        dpolab.Trainer(str(tiny_dir), pairs(0, 12), eval_dataset=held, ref_model=str(wide),
                       out=str(tmp_path / "run2"), **fast).train()


def test_report_shows_heldout_loss_and_each_eval_set(trained):
    """The run's report has the held-out sets' table and figure, and the held-out loss is
    drawn with the training loss; the sets' keys are not repeated among "Other metrics"."""
    from dpolab.report import eval_set_rows, write_run_report
    from dpolab.report_figures import other_keys
    from dpolab.rundir import load_run

    _, run = trained
    page = write_run_report(run).read_text()
    loaded = load_run(run)
    assert loaded.eval_sets == ["first", "second"]
    rows = eval_set_rows(loaded)
    assert [r["set"] for r in rows] == ["first", "second"]
    assert rows[0]["loss before"] == lines(run)[0]["eval/first/loss"]
    assert "Held-out sets" in page and (run / "report" / "eval_sets.png").is_file()
    assert "held-out loss" not in other_keys(loaded) and "loss" not in other_keys(loaded)
    assert not [k for k in other_keys(loaded) if k.startswith(("first/", "second/"))]
    assert "pairs_seen" in other_keys(loaded)  # a compute_metrics number: a panel of its own
