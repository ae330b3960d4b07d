"""How often a run evaluates: about 8 held-out evaluations by default, the training pairs only
at the start and the end."""

import json

import dpolab
from dpolab.train import eval_interval


def test_eval_interval():
    """-1 spreads ~8 evaluations: ceil(63 / 8) = 8 steps apart for the embedded default's 63
    steps (evaluations after steps 8, 16, ..., 56 and the last, 63), every step for a run
    shorter than 8 steps; 0 and positive values are taken as given."""
    assert eval_interval(-1, 63) == 8
    assert eval_interval(-1, 64) == 8 and eval_interval(-1, 65) == 9
    assert eval_interval(-1, 6) == 1
    assert eval_interval(0, 63) == 0 and eval_interval(5, 63) == 5


def test_default_run_evaluates_held_out_pairs_along_the_way(tiny_dir, tmp_path, cache):
    """16 steps under the default: held-out evaluations at steps 0, 2, 4, ..., 16 (9 points);
    the training pairs are scored at steps 0 and 16 only."""
    pairs = [{"prompt": f"Say {w} {i}:", "chosen": f" {w}.", "rejected": f" not {w}."}
             for i, w in enumerate(["red", "blue", "green", "cat"] * 5)]
    run = dpolab.Trainer(str(tiny_dir), pairs, out=str(tmp_path / "run"), **{
        "train.batch_size": 2, "train.max_steps": 16, "train.progress": False,
        "train.did_samples": 0, "train.report": False}).train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/rewards/accuracies" in r] == list(range(0, 17, 2))
    assert [r["step"] for r in rows if "train_eval/rewards/accuracies" in r] == [0, 16]
