"""peft models: adapters inside the decoder's layers train (LoRA variants, IA3, LoHa); methods
dpolab's forward does not run (prompt learning) or whose training it does not do (AdaLoRA)
are refused when the model is given, in one line; an adapter folder on the command line is
refused with exit code 2."""

import json

import peft
import pytest
import torch

import dpolab
from dpolab.cli import main
from dpolab.errors import UserError
from dpolab.threads import single_thread

ROWS = [{"prompt": f"Question {i}: does the cat help?", "chosen": f"Yes, it helps {i} times.",
         "rejected": "No."} for i in range(6)]
SETTINGS = {"train.max_steps": 2, "train.lr": 1e-2, "train.did_samples": 0,
            "train.report": False, "train.progress": False, "train.eval_every": 0,
            "train.export_merged": False, "train.batch_size": 2}


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def peft_model(tiny_dir, cfg):
    from transformers import AutoModelForCausalLM

    cfg.task_type = "CAUSAL_LM"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), cfg)


def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


REFUSED = {
    "PROMPT_TUNING": lambda: peft.PromptTuningConfig(num_virtual_tokens=4),
    "PREFIX_TUNING": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4),
    "P_TUNING": lambda: peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "ADALORA": lambda: peft.AdaLoraConfig(target_modules=["q_proj"], r=2, total_step=10),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_untrainable_peft_method_is_refused_at_construction(kind, tiny_dir, tmp_path):
    """dpolab.Trainer(model=...) raises a one-line UserError naming the peft method, before
    anything trains (a prompt-learning model would otherwise die at the first backward: its
    virtual tokens never enter dpolab's forward)."""
    model = peft_model(tiny_dir, REFUSED[kind]())
    with pytest.raises(UserError) as err:
        dpolab.Trainer(model, ROWS, tokenizer=tokenizer(tiny_dir), out=str(tmp_path / "r"))
    message = str(err.value)
    assert f"a peft {kind} model is not trainable by dpolab" in message
    assert "\n" not in message and not (tmp_path / "r").exists()


TRAINED = {
    "dora": lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, use_dora=True),
    "rslora": lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2,
                                      use_rslora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(target_modules=["q_proj", "v_proj"], r=2),
}


@pytest.mark.parametrize("kind", sorted(TRAINED))
def test_adapter_variants_train(kind, tiny_dir, tmp_path, cache):
    """A peft model whose adapters live in the layers trains with dpolab.Trainer: the forward
    check finds dpolab's log-probs equal to the peft model's own, the step-0 check passes,
    and two steps move every adapter parameter (IA3's and LoHa's are named `x.default`, not
    `x.default.weight`) and nothing else."""
    model = peft_model(tiny_dir, TRAINED[kind]())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    run = dpolab.Trainer(model, ROWS, tokenizer=tokenizer(tiny_dir), out=str(tmp_path / "r"),
                         **SETTINGS).train()
    record = json.loads((run / "data.json").read_text())["pair_forward"]
    assert record["forward"] == "shared_prompt" and record["head_max_delta"] < 1e-5
    after = dict(model.named_parameters())
    moved = {n for n, p in before.items() if not torch.equal(p, after[n].detach())}
    assert adapters and moved == adapters


@pytest.mark.parametrize("kind", ["LORA", "PROMPT_TUNING"])
def test_adapter_folder_on_the_command_line_is_refused(kind, tiny_dir, tmp_path, cache,
                                                       capsys):
    """`dpolab train --model ADAPTER_FOLDER`: exit 2, one line naming the folder and the peft
    type (transformers would attach the adapter to its base, and dpolab would train neither
    it nor export it)."""
    cfg = (peft.LoraConfig(target_modules=["q_proj"], r=2) if kind == "LORA"
           else peft.PromptTuningConfig(num_virtual_tokens=4))
    folder = tmp_path / "adapter"
    peft_model(tiny_dir, cfg).save_pretrained(folder)
    tokenizer(tiny_dir).save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    capsys.readouterr()
    assert main(["train", "--model", str(folder), "--data", str(data),
                 "--out", str(tmp_path / "r")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1
    assert f"{folder}: a peft adapter folder ({kind}), not a model" in err[0]
