"""benchmarks/trl_conformance.py: its data and a quick run of its core on two losses."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "trl_conformance.py"


def _load():
    spec = importlib.util.spec_from_file_location("trl_conformance", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["trl_conformance"] = module
    spec.loader.exec_module(module)
    return module


conf = _load()


def test_pairs_have_the_lengths_each_case_needs():
    """`varied` completions differ in length (so per-token normalisation matters); in
    `equal_chosen` every chosen completion has the same token count (TRL's batch-token sft
    average equals dpolab's per-pair one); prompt + completion tokenizes as the two apart."""
    from dpolab.tiny import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=512)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    varied = conf.make_pairs(data="varied")
    assert len({len(enc(r["chosen"])) for r in varied}) > 1
    assert len({len(enc(r["rejected"])) for r in varied}) > 1
    equal = conf.make_pairs(data="equal_chosen")
    assert len({len(enc(r["chosen"])) for r in equal}) == 1
    for r in varied + equal:
        assert enc(r["prompt"] + r["chosen"]) == enc(r["prompt"]) + enc(r["chosen"])
        assert enc(r["prompt"] + r["rejected"]) == enc(r["prompt"]) + enc(r["rejected"])


@pytest.mark.parametrize("name, at_reference", [("sigmoid", math.log(2.0)),
                                                 ("ipo", 25.0)])  # (1 / (2 * 0.1))^2
def test_core_agrees_with_trl(name, at_reference, tmp_path, monkeypatch):
    """Two steps of TRL's DPOTrainer and of dpolab on the same token ids: step 1 is the
    loss's value at the reference in both, and after one AdamW update the losses still agree
    (float32; TRL's ipo is dpolab's ipo_norm)."""
    pytest.importorskip("trl")
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))  # run_case sets its own
    row = conf.run_case(name, tmp_path / "case", steps=2)
    assert row["same_token_ids"]
    assert "error" not in row
    assert row["step1"]["dpolab"] == pytest.approx(at_reference, abs=1e-6)
    assert row["step1"]["trl"] == pytest.approx(at_reference, abs=1e-5)
    assert row["last"]["dpolab"] != pytest.approx(at_reference, abs=1e-3)  # it trained
    assert row["last"]["abs_diff"] < 1e-4 * max(1.0, abs(row["last"]["trl"]))
