"""Two processes (torchrun, gloo) on half the batch each train the same model as one
process on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import write_pairs


@pytest.mark.parametrize("scope,mode", [("full", "ddp"), ("lora", "ddp"), ("full", "fsdp2")])
def test_two_process_gloo_matches_one_process(scope, mode, tiny_dir, tmp_path):
    """Losses, gradient norms and the exported weights of 2 processes x 2 pairs equal those of
    1 process x 4 pairs (up to summation order), replicated (ddp) or sharded (fsdp2)."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    env = {**os.environ, "DPOLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_dir), "--data", str(data), "train.max_steps=4",
              "train.lr=0.01", "train.progress=false", "data.max_length=48",
              "train.did_samples=0", "train.report=false",
              "data.max_prompt_length=16", f"train.scope={scope}",
              "train.lora_targets=[q_proj, v_proj]", f"train.distributed={mode}"]
    one = subprocess.run([sys.executable, "-m", "dpolab", "train", *common,
                          "train.batch_size=4", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "dpolab", "train", *common,
                          "train.batch_size=2", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()  # noqa
                      if '"loss"' in x]
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Adam divides each update by the root of that element's squared-gradient average, so an
    # element whose gradient is near zero turns summation-order noise into a visible step: the
    # weights are compared to 1% of one lr-sized step, and must have moved by far more than that.
    wa = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    w0 = load_file(str(tiny_dir / "model.safetensors"))
    moved = 0.0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
        if k in w0:
            moved = max(moved, (wa[k].float() - w0[k].float()).abs().max().item())
    assert moved > 5e-3


def test_fsdp2_checkpoint_resume(tiny_dir, tmp_path):
    """FSDP2 checkpoints gather the sharded weights and optimizer state and re-shard them on
    resume: 2 steps, checkpoint, 2 more steps equals 4 uninterrupted steps (constant lr)."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    env = {**os.environ, "DPOLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dpolab", "train", *a], env=env, capture_output=True, text=True, timeout=300)
    common = ["--model", str(tiny_dir), "--data", str(data), "train.lr=0.01",
              "train.progress=false", "data.max_length=48", "data.max_prompt_length=16",
              "train.did_samples=0", "train.report=false", "train.scope=full",
              "train.distributed=fsdp2",
              "train.batch_size=2", "train.schedule=constant", "train.warmup_steps=0"]
    a = run(*common, "train.max_steps=4", "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    b = run(*common, "train.max_steps=2", "--out", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    cfg = tmp_path / "b" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 2", "max_steps: 4"))
    (tmp_path / "b" / "model").rename(tmp_path / "b" / "model-step2")
    r = run("--resume", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "model-step2" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)
