"""dpolab against TRL's DPOTrainer, loss by loss, on identical token ids.

    python benchmarks/trl_conformance.py [--names sigmoid,ipo] [--steps 3] [--results PATH]

For every `loss_type` TRL 1.16's DPOConfig accepts (and a few of its modifiers), both systems
train the same tiny random model (dpolab.tiny, float32, CPU) for `--steps` steps on the same
pairs and record the training loss at step 1 and at the last step. Same everything else: full
fine-tuning, the whole training set (4 pairs) as one batch (so every step of both systems sees
the same pairs, whatever order each draws them in), AdamW (lr 1e-3, betas (0.9, 0.999), eps
1e-8, no weight decay), constant schedule, no warmup, no gradient clipping, dropout off, the
reference the policy's initial weights (TRL: an explicit in-memory ref_model).

Step 1 is at the reference point, so it checks each loss's value there; the later steps check
that the gradients (and thus the updates) agree too. Each row also says whether TRL's token
ids (its processed dataset) equal dpolab's, pair by pair.

Where TRL defines a name differently from dpolab's default, the row uses the dpolab name or
setting that equals TRL's definition and says so in `note` (TRL's ipo is dpolab's ipo_norm).
TRL's sft averages over all chosen tokens of the batch and dpolab's per pair, equal when every
chosen completion has the same length: the sft rows run on such a data set (`data: equal_chosen`);
the others on completions of varying lengths (`data: varied`).

Appends one JSON line per case to benchmarks/results/trl_conformance.jsonl (with the machine,
torch and TRL versions) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "trl_conformance.jsonl"
LR, BETA, N_PAIRS = 1e-3, 0.1, 4


@dataclass(frozen=True)
class Case:
    """One row: TRL's DPOConfig arguments and the dpolab overrides that define the same loss."""

    trl: dict  # DPOConfig keyword arguments beyond the shared ones (loss_type, ...)
    dpolab: tuple[str, ...]  # `section.key=value` overrides
    note: str = ""
    data: str = "varied"  # varied | equal_chosen (every chosen completion the same length)


def _same(name: str, **trl) -> Case:
    return Case({"loss_type": [name], **trl}, (f"loss.name={name}",))


CASES: dict[str, Case] = {
    "sigmoid": _same("sigmoid"),
    "hinge": _same("hinge"),
    "ipo": Case({"loss_type": ["ipo"]}, ("loss.name=ipo_norm",),
                "TRL's ipo divides each log-ratio by the completion length: dpolab's ipo_norm "
                "(dpolab's ipo is the paper's form on sums)"),
    "exo_pair": Case({"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
                     ("loss.name=exo_pair", "loss.label_smoothing=0.001"), "eps = 1e-3 (EXO's)"),
    "nca_pair": _same("nca_pair"),
    "robust": Case({"loss_type": ["robust"], "label_smoothing": 0.1},
                   ("loss.name=robust", "loss.label_smoothing=0.1"), "eps = 0.1"),
    "bco_pair": _same("bco_pair"),
    "sppo_hard": _same("sppo_hard"),
    "aot": _same("aot"),
    "aot_unpaired": _same("aot_unpaired"),
    "apo_zero": _same("apo_zero"),
    "apo_down": _same("apo_down"),
    "discopop": Case({"loss_type": ["discopop"], "discopop_tau": 0.05},
                     ("loss.name=discopop", "loss.discopop_tau=0.05"), "tau = 0.05"),
    "sft": Case({"loss_type": ["sft"]}, ("loss.name=sft",),
                "TRL averages over the batch's chosen tokens, dpolab per pair: equal chosen "
                "lengths make them the same", data="equal_chosen"),
    "sigmoid_norm": _same("sigmoid_norm"),
    "sft (varied lengths)": Case({"loss_type": ["sft"]}, ("loss.name=sft",),
                                 "differs by design: chosen lengths vary, and TRL averages over "
                                 "the batch's tokens, dpolab per pair (sft row: equal lengths)"),
    # TRL's modifiers and combinations
    "sigmoid+sft": Case({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
                        ("loss.weights={sigmoid: 1.0, sft: 0.5}",),
                        "weighted terms; equal chosen lengths (sft)", data="equal_chosen"),
    "sigmoid ld_alpha=0.5": Case({"loss_type": ["sigmoid"], "ld_alpha": 0.5},
                                 ("loss.name=sigmoid", "loss.ld_alpha=0.5"), "LD-DPO"),
    "sigmoid js_divergence": Case({"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
                                  ("loss.name=sigmoid", "loss.f_divergence=js_divergence"),
                                  "f-DPO"),
}

_WORDS = ("the cat dog bird river house answer question model letter story field light door "
          "apple garden teacher friend reply summary morning quiet honest green long short "
          "first better small old young open red simple clear kind helps reads writes finds").split()


def make_pairs(*, data: str, seed: int = 0) -> list[dict]:
    """N_PAIRS standard-format rows. Completions start with a space, so with the byte-level
    tiny tokenizer prompt + completion tokenizes to the prompt's tokens then the completion's
    (TRL tokenizes them together, dpolab apart). `varied`: chosen 3..8 words, rejected 2..9;
    `equal_chosen`: every chosen completion 5 words of one token each ("a", as below)."""
    rng = random.Random(seed)
    words = lambda k: "".join(" " + rng.choice(_WORDS) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(N_PAIRS):
        prompt = f"Question {i}:{words(4)}?"
        if data == "equal_chosen":
            chosen = " a" * 5
        else:
            chosen = words(3 + (2 * i) % 6)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": words(2 + (3 * i + 1) % 8)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------- systems
def run_dpolab(case: Case, model: str, train: Path, held: Path, work: Path, steps: int) -> dict:
    from dpolab import rundir, splits
    from dpolab.config import apply_overrides, build_config
    from dpolab.models import load_tokenizer
    from dpolab.tokenize import tokenize_rows
    from dpolab.train import train as dpolab_train

    overrides = [
        f"model.name={model}", "model.dtype=float32", f"data.path={train}",
        f"data.eval_path={held}", "data.max_length=128", "data.max_prompt_length=64",
        f"loss.beta={BETA}", "train.scope=full", "train.schedule=constant",
        "train.warmup_steps=0", f"train.lr={LR}", "train.weight_decay=0.0",
        "train.max_grad_norm=0", f"train.max_steps={steps}", f"train.batch_size={N_PAIRS}",
        "train.grad_accum=1", "train.seed=0", "train.did_samples=0", "train.eval_every=0",
        "train.save_every=0", "train.progress=false", "train.report=false",
        "train.device=cpu", f"out={work / 'dpolab_run'}", *case.dpolab]
    cfg = build_config(apply_overrides({}, overrides))
    run_dir = dpolab_train(cfg)
    losses = [r["loss"] for r in rundir.read_metrics(run_dir / "metrics.jsonl") if "lr" in r]
    rows, _ = splits.load_split_rows(cfg)
    tok = tokenize_rows(rows, load_tokenizer(model), max_length=cfg.data.max_length,
                        max_prompt_length=cfg.data.max_prompt_length,
                        truncation=cfg.data.truncation)
    ids = sorted([e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in tok.examples)
    return {"losses": losses, "ids": ids}


def run_trl(case: Case, model: str, train: Path, work: Path, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    load = lambda: AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)  # noqa: E731
    rows = [json.loads(line) for line in train.read_text().splitlines() if line]
    args = DPOConfig(
        output_dir=str(work / "trl_run"), per_device_train_batch_size=N_PAIRS,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, max_steps=steps, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=0, data_seed=0, beta=BETA, disable_dropout=True, max_length=128,
        precompute_ref_log_probs=False, activation_checkpointing=False, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, dataloader_num_workers=0,
        disable_tqdm=True, **case.trl)
    trainer = DPOTrainer(model=load(), ref_model=load(), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # the losses are read from log_history
    ds = trainer.train_dataset
    ids = sorted([ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]]
                 for i in range(len(ds)))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "epoch" in h
              and "train_runtime" not in h]
    return {"losses": losses, "ids": ids}


# ---------------------------------------------------------------------------------- rows
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} ({cpu}, {os.cpu_count()} CPUs, {platform.system()})"


def run_case(name: str, work: Path, *, steps: int = 3) -> dict:
    """Both systems on one case; the row that goes into the results file."""
    import torch
    import trl

    from dpolab.tiny import save_tiny

    case = CASES[name]
    work.mkdir(parents=True, exist_ok=True)
    model = work.parent / "model"
    if not (model / "config.json").exists():
        save_tiny(model, vocab_size=512, seed=0)
    train = write_jsonl(make_pairs(data=case.data), work / "train.jsonl")
    held = write_jsonl(make_pairs(data=case.data, seed=1)[:1], work / "held.jsonl")
    os.environ["DPOLAB_CACHE"] = str(work / "dpolab_cache")
    t0 = time.monotonic()
    d = run_dpolab(case, str(model), train, held, work, steps)
    t = run_trl(case, str(model), train, work, steps)
    row = {
        "name": name, "trl": {k: v for k, v in case.trl.items()}, "dpolab": list(case.dpolab),
        "note": case.note, "data": case.data, "steps": steps,
        "same_token_ids": d["ids"] == t["ids"],
        "dpolab_losses": d["losses"], "trl_losses": t["losses"],
        "step1": {"dpolab": d["losses"][0], "trl": t["losses"][0],
                  "abs_diff": abs(d["losses"][0] - t["losses"][0])},
        "last": {"dpolab": d["losses"][-1], "trl": t["losses"][-1],
                 "abs_diff": abs(d["losses"][-1] - t["losses"][-1])},
        "max_abs_diff": max((abs(a - b) for a, b in zip(d["losses"], t["losses"])),
                            default=math.nan),
        "lr": LR, "beta": BETA, "pairs": N_PAIRS, "dtype": "float32", "device": "cpu",
        "machine": machine(), "torch": torch.__version__, "trl_version": trl.__version__,
        "threads": torch.get_num_threads(), "wall_s": time.monotonic() - t0,
    }
    if len(d["losses"]) != steps or len(t["losses"]) != steps:
        row["error"] = f"logged steps: dpolab {len(d['losses'])}, TRL {len(t['losses'])}"
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'name':24} {'ids':4} {'dpolab@1':>11} {'trl@1':>11} {'|d|@1':>9} "
            f"{'dpolab@N':>11} {'trl@N':>11} {'|d|@N':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:24} {'same' if r['same_token_ids'] else 'DIFF':4} "
            f"{r['step1']['dpolab']:11.6f} {r['step1']['trl']:11.6f} {r['step1']['abs_diff']:9.2e} "
            f"{r['last']['dpolab']:11.6f} {r['last']['trl']:11.6f} {r['last']['abs_diff']:9.2e}  "
            f"{r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--names", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    names = [n.strip() for n in a.names.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}", file=sys.stderr)
        return 2
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpolab-trl-conformance-") as tmp:
        for i, name in enumerate(names):
            rows.append(run_case(name, Path(tmp) / f"case{i}", steps=a.steps))
            print(f"{name}: step 1 |d| {rows[-1]['step1']['abs_diff']:.2e}, step {a.steps} "
                  f"|d| {rows[-1]['last']['abs_diff']:.2e}", flush=True)
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with a.results.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
