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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from dpolab.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", vocab_size=512, seed=0)


@pytest.mark.parametrize("scope", ["full", "lora"])
def test_two_process_gloo_matches_one_process(scope, tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    env = {**os.environ, "DPOLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_dir), "--data", str(data), "train.max_steps=4",
              "train.lr=0.01", "train.progress=false", "data.max_length=48",
              "train.did_samples=0",
              "data.max_prompt_length=16", f"train.scope={scope}",
              "train.lora_targets=[q_proj, v_proj]"]
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
    wa = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
