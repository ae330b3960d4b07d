"""benchmarks/vs_trl.py: the data it writes, its ratios, and a smoke run of both systems.

The smoke run calls the child's runners in this process (one import of transformers instead of
one per child process) on the tiny preset shrunk to 2 pairs x 16 tokens and 2 steps.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


vs_trl = _load("vs_trl")
child = _load("_vs_trl_child")


@pytest.fixture(scope="module")
def tokenizer():
    from dpolab.tiny import tiny_tokenizer

    return tiny_tokenizer(vocab_size=512)


def test_pairs_fill_exact_lengths_and_tokenize_the_same_jointly(tokenizer):
    """Each prompt has exactly prompt_len tokens and each completion completion_len - 1 (the
    EOS makes completion_len), and tokenizing prompt + completion together (TRL) gives the
    prompt's tokens followed by the completion's (dpolab): no merge across the boundary."""
    rows = vs_trl.make_pairs(tokenizer, n=3, prompt_len=20, completion_len=12, seed=5)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for r in rows:
        p, c, j = enc(r["prompt"]), enc(r["chosen"]), enc(r["rejected"])
        assert (len(p), len(c), len(j)) == (20, 11, 11)
        assert enc(r["prompt"] + r["chosen"]) == p + c
        assert enc(r["prompt"] + r["rejected"]) == p + j
        assert r["chosen"] != r["rejected"]
    assert rows == vs_trl.make_pairs(tokenizer, n=3, prompt_len=20, completion_len=12, seed=5)


def test_ratios_are_dpolab_over_trl():
    """tokens/s 300 vs 100 -> x3; peak 400 vs 800 MiB -> x0.5; loss |0.69 - 0.70| = 0.01."""
    row = lambda tps, mib, loss: {"tokens_per_s": tps, "peak_mib": mib,  # noqa: E731
                                  "steps_peak_mib": mib / 2, "loss_step1": loss, "losses": [loss]}
    r = vs_trl.ratios({"dpolab": row(300.0, 400.0, 0.69), "trl-precompute": row(100.0, 800.0, 0.70)})
    assert r["trl-precompute"]["tokens_per_s"] == pytest.approx(3.0)
    assert r["trl-precompute"]["peak_mem"] == pytest.approx(0.5)
    assert r["trl-precompute"]["steps_peak_mem"] == pytest.approx(0.5)
    assert r["trl-precompute"]["loss_step1_abs_diff"] == pytest.approx(0.01)


def test_gpu_preset_fails_cleanly_without_cuda(capsys):
    """qwen0.5b on a machine without CUDA: exit code 2 and a one-line reason, nothing built."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert vs_trl.main(["--preset", "qwen0.5b", "--results", "/nonexistent/x.jsonl"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_tiny_smoke_both_systems_train_the_same_tokens_and_agree(tmp_path, tokenizer,
                                                                 monkeypatch):
    """dpolab and TRL (precomputed reference) see the same token ids; before the first update
    the policy is its reference, so both step-1 losses are ln 2 = 0.693147; one AdamW step later
    the losses still agree (same gradients, same optimizer) to 1e-5."""
    pytest.importorskip("trl")
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))  # fresh reference store
    from dpolab.tiny import save_tiny

    model = str(save_tiny(tmp_path / "model", vocab_size=512, hidden_size=32, layers=1, heads=2))
    kw = dict(prompt_len=8, completion_len=8)
    train = vs_trl.write_jsonl(vs_trl.make_pairs(tokenizer, n=2, seed=0, **kw), tmp_path / "t.jsonl")
    held = vs_trl.write_jsonl(vs_trl.make_pairs(tokenizer, n=2, seed=1, **kw), tmp_path / "e.jsonl")
    spec = dict(model=model, train=str(train), eval=str(held), batch=2, warmup=1, steps=1,
                lr=1e-3, beta=0.1, max_grad_norm=1.0, seed=0, cuda=False,
                trl_grad_checkpointing=False, **kw)
    outs = {}
    for system, runner, mode in (("dpolab", child.run_dpolab, "stored"),
                                 ("trl", child.run_trl, "precompute")):
        sampler = child.RssSampler()
        outs[system] = runner({**spec, "ref_mode": mode, "work": str(tmp_path / system)}, sampler)
        outs[system].update(sampler.stop())
    d, t = outs["dpolab"], outs["trl"]
    assert sorted(d["first_batch"]) == sorted(t["first_batch"])
    assert [tuple(map(len, ex)) for ex in d["first_batch"]] == [(8, 8, 8)] * 2
    assert d["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert t["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(d["losses"]) == len(t["losses"]) == 2
    assert d["losses"][1] < math.log(2) - 1e-4  # the update moved the margin
    assert d["losses"][1] == pytest.approx(t["losses"][1], abs=1e-5)
    for out in (d, t):
        assert len(out["step_seconds"]) == 1 and out["step_seconds"][0] > 0
        assert 0 < out["steps_peak_rss_mib"] <= out["peak_rss_mib"]
