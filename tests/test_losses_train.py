"""Every registry term trains on a tiny model, and its first logged value is the value the
registry records at the reference (the policy before its first update is its reference)."""

import json
import math

import pytest

from dpolab import config as C
from dpolab import losses as L
from dpolab.cli import main

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
# hyperparameters every term accepts (exo_pair needs eps > 0, robust eps < 1/2)
HYPER = ["loss.beta=0.5", "loss.label_smoothing=0.1"]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    from dpolab.tiny import save_tiny

    root = tmp_path_factory.mktemp("losses_train")
    rows = [{"prompt": f"Say {w} {i}:", "chosen": f" {w} {w}.",
             "rejected": f" {WORDS[(i * 3 + 1) % 8]} and more."} for i, w in enumerate(WORDS * 2)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny(root / "model", vocab_size=512, seed=0), data


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_every_term_trains_and_starts_at_its_reference_value(name, run_inputs, tmp_path, monkeypatch):
    """Two steps of `dpolab train ... loss.name=<name>` on a tiny model: the first step's
    term equals the registry's value at zero log-ratios (ln 2 for DPO, 1/(4 beta^2) = 1 for
    IPO, ...) and every logged loss is finite; reference-free terms have no such value and
    just train."""
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    model, data = run_inputs
    overrides = ["train.batch_size=4", "train.max_steps=2", "train.lr=0.01",
                 "train.warmup_steps=0", "train.progress=false", "train.eval_batch_size=8",
                 "data.max_length=32", "data.max_prompt_length=12", "train.did_samples=0",
                 "train.report=false", "train.save_every=0", f"loss.name={name}", *HYPER]
    run = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--out", str(run),
                 *overrides]) == 0  # the command line, as a user types it
    cfg = C.build_config(C.apply_overrides({}, overrides))
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if f"loss/{name}" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    expected = L.get_loss(name).at_reference
    if expected is not None:
        assert steps[0][f"loss/{name}"] == pytest.approx(expected(cfg.loss), abs=1e-4)
