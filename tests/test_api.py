"""dpolab.Trainer: the Python API on objects users already have (a loaded model, an
in-memory datasets.Dataset or list of dicts), checked like the command line's inputs."""

import json
import re
from pathlib import Path

import pytest
import torch

import dpolab
from dpolab.errors import UserError

REPO = Path(__file__).resolve().parent.parent
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
FAST = {"train.batch_size": 4, "train.max_steps": 3, "train.lr": 0.01, "train.progress": False,
        "train.did_samples": 0, "train.report": False, "data.max_length": 48,
        "data.max_prompt_length": 16}


def pairs(n: int = 16) -> list[dict]:
    """Standard-format pairs; the chosen answer repeats the prompt's word."""
    return [{"prompt": f"Say {WORDS[i % 10]} {i}:", "chosen": f" {WORDS[i % 10]} {WORDS[i % 10]}.",
             "rejected": f" {WORDS[(i * 3 + 1) % 10]} and again.", "group": "ab"[i % 2]}
            for i in range(n)]


def test_trainer_on_objects_trains_in_memory(tiny_dir, tmp_path, cache):
    """A loaded model and a datasets.Dataset train without going through files: step 0 is at
    the reference (loss ln 2), the given model object is the one trained (its head moved),
    held-out rows come from eval_dataset, and config.yaml records the inputs as in-memory."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    head0 = model.get_output_embeddings().weight.detach().clone()
    run = dpolab.Trainer(model, Dataset.from_list(pairs(16)), eval_dataset=pairs(20)[16:],
                         out=str(tmp_path / "run"), **FAST).train()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert len(steps) == 3
    assert not torch.equal(model.get_output_embeddings().weight, head0)
    assert json.loads((run / "data.json").read_text())["held_out"]["pairs"] == 4
    config = (run / "config.yaml").read_text()
    assert "<in-memory LlamaForCausalLM from " in config and "<in-memory train_dataset>" in config


def test_full_scope_in_memory_probe_measures_against_the_starting_weights(tiny_dir, tmp_path,
                                                                          cache):
    """The full scope overwrites a model given in memory, so the end-of-run DID probe scores
    its samples against the kept starting weights, put back into the policy's place: the
    same DID numbers as the same run from the folder, whose reference is read from disk."""
    from transformers import AutoModelForCausalLM

    did = {**FAST, "train.scope": "full", "train.did_samples": 2, "train.did_prompts": 2,
           "train.did_max_new_tokens": 4}
    a = dpolab.Trainer(str(tiny_dir), pairs(12), out=str(tmp_path / "a"), **did).train()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    b = dpolab.Trainer(model, pairs(12), out=str(tmp_path / "b"), **did).train()
    after = [json.loads((r / "summary.json").read_text())["after"] for r in (a, b)]
    kl = [x["eval/did/kl"] for x in after]
    assert kl[0] != 0 and kl[1] == pytest.approx(kl[0], rel=1e-6, abs=1e-9)


def test_model_from_memory_finds_the_stored_reference(tiny_dir, tmp_path, cache):
    """The reference store keys on the weights' hash and the token ids: a run on the model
    loaded in memory reuses the reference a run on the same folder stored (no new file)."""
    from transformers import AutoModelForCausalLM

    dpolab.Trainer(str(tiny_dir), pairs(12), out=str(tmp_path / "a"), **FAST).train()
    stored = sorted((cache / "reference").iterdir())
    assert stored
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    dpolab.Trainer(model, pairs(12), out=str(tmp_path / "b"), **FAST).train()
    assert sorted((cache / "reference").iterdir()) == stored


def test_peft_model_trains_its_own_adapters(tiny_dir, tmp_path, cache):
    """A peft model trains its adapters (scope lora chosen for it), the base weights stay, and
    the DID probe at the end scores samples against the model as it started. (The adapter is
    exported unmerged: a merged export merges the given model's adapters in place.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = dpolab.Trainer(model, pairs(12), out=str(tmp_path / "run"),
                         **{**FAST, "train.did_samples": 2, "train.did_prompts": 1,
                            "train.did_max_new_tokens": 4, "train.export_merged": False}).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved)
    assert "scope: lora" in (run / "config.yaml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval/did/entropy"] > 0


def test_overrides_are_checked_like_the_command_line(tiny_dir):
    """Unknown keys and wrong types are UserErrors naming the key, as on the command line."""
    with pytest.raises(UserError, match=r"unknown key\(s\) bta; valid: .*beta"):
        dpolab.Trainer(str(tiny_dir), pairs(4), **{"loss.bta": 0.1})
    with pytest.raises(UserError, match="key must be one of"):
        dpolab.Trainer(str(tiny_dir), pairs(4), **{"beta": 0.1})
    with pytest.raises(UserError, match=r"train\.max_steps: expected int"):
        dpolab.Trainer(str(tiny_dir), pairs(4), **{"train.max_steps": "two"})
    with pytest.raises(UserError, match="unknown tracker 'tensorbored'"):
        dpolab.Trainer(str(tiny_dir), pairs(4), **{"train.report_to": ["tensorbored"]})


def test_config_object_and_yaml(tiny_dir, tmp_path):
    """config= takes a RunConfig or a YAML file; overrides apply on top of either."""
    from dpolab.config import RunConfig

    t = dpolab.Trainer(str(tiny_dir), pairs(4), config=RunConfig(), **{"loss.beta": 0.2})
    assert t.config.loss.beta == 0.2 and t.config.model.name == str(tiny_dir)
    (tmp_path / "c.yaml").write_text("loss: {name: ipo, beta: 0.3}\n")
    t = dpolab.Trainer(str(tiny_dir), pairs(4), config=tmp_path / "c.yaml", **{"loss.beta": 0.4})
    assert (t.config.loss.name, t.config.loss.beta) == ("ipo", 0.4)


def test_bad_rows_name_the_argument_and_row(tiny_dir):
    """Rows from memory are validated like a file's; the error names the argument and the
    1-based row."""
    bad = pairs(4)
    del bad[2]["chosen"]
    with pytest.raises(UserError, match=r"^train_dataset:3: field 'chosen' is missing$"):
        dpolab.Trainer(str(tiny_dir), bad)
    good, bad_eval = pairs(4), pairs(2)
    bad_eval[1]["rejected"] = ""
    with pytest.raises(UserError, match=r"^eval_dataset:2: field 'rejected' is empty$"):
        dpolab.Trainer(str(tiny_dir), good, eval_dataset=bad_eval)
    from dpolab.tiny import tiny_model

    with pytest.raises(UserError, match="pass tokenizer="):
        dpolab.Trainer(tiny_model(vocab_size=64), good)


def readme_example() -> str:
    """The first python block of README.md's "From Python" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tiny_dir, tmp_path, cache, monkeypatch, capsys):
    """The README's Python example runs as written, with only the model's name replaced by the
    tiny model's folder (the same code path: a name or a path goes to session.build)."""
    code = readme_example()
    assert len(code.strip().splitlines()) <= 15
    assert '"smollm2-135m-instruct"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"smollm2-135m-instruct"', repr(str(tiny_dir))), "README", "exec"),
         {"__name__": "readme"})
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / run / "summary.json").exists()
    assert json.loads((tmp_path / run / "summary.json").read_text())["steps"] == 2


def test_import_dpolab_stays_light():
    """`import dpolab` loads neither torch nor transformers; dpolab.Trainer loads on first use."""
    import subprocess
    import sys

    code = ("import sys, dpolab; heavy = {'torch', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy; dpolab.Trainer; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_model_dtype_comes_from_the_model():
    """A model given as an object keeps its dtype: bfloat16 is recorded as model.dtype, an
    explicit model.dtype that disagrees is an error, and float64 (not a model.dtype) is
    refused, naming the ones there are."""
    from dpolab.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=300)
    model = tiny_model(vocab_size=len(tok)).to(torch.bfloat16)
    assert dpolab.Trainer(model, pairs(4), tokenizer=tok).config.model.dtype == "bfloat16"
    with pytest.raises(UserError, match="model.dtype=float32, but the model given is bfloat16"):
        dpolab.Trainer(model, pairs(4), tokenizer=tok, **{"model.dtype": "float32"})
    with pytest.raises(UserError, match="torch.float64 are not supported; convert it with "
                       r"model.to\(torch.X\), X one of float32, bfloat16, float16"):
        dpolab.Trainer(model.to(torch.float64), pairs(4), tokenizer=tok)
