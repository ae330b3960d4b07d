"""One system of the dpolab-vs-TRL benchmark, run in its own process so that its peak memory
is its own:  python benchmarks/_vs_trl_child.py SPEC.json OUT.json

SPEC (written by benchmarks/vs_trl.py): system ("dpolab" | "trl"), ref_mode ("stored" |
"precompute" | "in_memory"), model (a local folder), train (jsonl), eval (jsonl), batch,
prompt_len, completion_len, warmup, steps, lr, beta, max_grad_norm, seed, cuda, work (a scratch
folder), trl_grad_checkpointing.  OUT receives one JSON object: per-step seconds and losses,
the token ids of the first batch, and peak memory (whole process and during the steps); or,
when CUDA runs out of memory, {"oom": true, "error": ..., "cuda_peak_mib": ...}: an
out-of-memory is a result to record, not a crash.

Step time is the wall time of one optimizer step (forward, loss, backward, clip, AdamW step);
dpolab's comes from the differences of consecutive `elapsed_s` in its metrics.jsonl (its own
per-step logging included), TRL's from a callback's `on_step_begin` -> `on_step_end`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


class RssSampler:
    """Peak resident memory of this process, whole life (VmHWM) and inside a marked window.

    VmHWM covers the whole process; the window peak (e.g. the training steps alone, without
    model loading or reference computation) comes from sampling VmRSS every `period` seconds,
    so it can miss a spike shorter than one period.
    """

    def __init__(self, *, period: float = 0.005):
        self.period, self.window_peak_kib, self.in_window = period, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if self.in_window:
                self.window_peak_kib = max(self.window_peak_kib, self.status_kib("VmRSS"))

    def open(self) -> None:
        self.window_peak_kib = self.status_kib("VmRSS")
        self.in_window = True

    def close(self) -> None:
        if self.in_window:
            self.window_peak_kib = max(self.window_peak_kib, self.status_kib("VmRSS"))
        self.in_window = False

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        # The kernel updates VmHWM from per-thread counters that lag VmRSS by a few pages,
        # so a sampled VmRSS can exceed it slightly: the process peak is the larger one.
        hwm = max(self.status_kib("VmHWM"), self.window_peak_kib)
        return {"peak_rss_mib": hwm / 1024,
                "steps_peak_rss_mib": self.window_peak_kib / 1024}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e)


def cuda_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------- dpolab
def run_dpolab(spec: dict, sampler: RssSampler) -> dict:
    """`dpolab.train.train` on the spec's data; the step window opens when the step-0
    evaluation line is written (reference already stored) and closes after the last step."""
    import torch

    from dpolab import rundir, splits
    from dpolab.config import apply_overrides, build_config
    from dpolab.tokenize import tokenize_rows
    from dpolab.train import train

    work = Path(spec["work"])
    n_steps = spec["warmup"] + spec["steps"]
    overrides = [
        f"model.name={spec['model']}", "model.dtype=float32",
        f"data.path={spec['train']}", f"data.eval_path={spec['eval']}",
        f"data.max_length={spec['prompt_len'] + spec['completion_len']}",
        f"data.max_prompt_length={spec['prompt_len']}", "data.truncation=keep_start",
        "loss.name=dpo", f"loss.beta={spec['beta']}", "loss.average_logps=false",
        "train.scope=full", "train.schedule=constant", "train.warmup_steps=0",
        f"train.lr={spec['lr']}", "train.weight_decay=0.0",
        f"train.max_grad_norm={spec['max_grad_norm']}", f"train.max_steps={n_steps}",
        f"train.batch_size={spec['batch']}", "train.grad_accum=1", f"train.seed={spec['seed']}",
        "train.did_samples=0", "train.eval_every=0", "train.save_every=0", "train.progress=false",
        f"train.device={'cuda' if spec['cuda'] else 'cpu'}", f"train.bf16_autocast={spec['cuda']}",
        f"out={work / 'dpolab_run'}",
        *spec.get("dpolab_overrides", []),
    ]
    cfg = build_config(apply_overrides({}, overrides))
    # Mark the step window: the benchmark observes the metrics log, it changes no behaviour.
    original_write = rundir.MetricsLog.write

    def observed_write(self, row):
        original_write(self, row)
        if row.get("step") == 0 and not sampler.in_window:  # evaluation before step 1
            sampler.open()
            if spec["cuda"]:
                torch.cuda.reset_peak_memory_stats()
        elif "lr" in row and row["step"] == n_steps:  # the last step's training line
            sampler.close()
            out["steps_cuda_peak_mib"] = cuda_peak_mib()

    out: dict = {}
    rundir.MetricsLog.write = observed_write
    try:
        run_dir = train(cfg)
    finally:
        rundir.MetricsLog.write = original_write
    rows = rundir.read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "lr" in r]
    elapsed = [r["elapsed_s"] for r in steps]
    out["step_seconds"] = [b - a for a, b in zip(elapsed, elapsed[1:])]  # steps 2..N
    out["losses"] = [r["loss"] for r in steps]
    out["logps_chosen"] = [r["logps/chosen"] for r in steps]
    train_rows, _ = splits.load_split_rows(cfg)
    from dpolab.models import load_tokenizer

    tok = tokenize_rows(train_rows, load_tokenizer(spec["model"]),
                        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                        truncation=cfg.data.truncation)
    out["first_batch"] = [[e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in tok.examples]
    out["threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict, sampler: RssSampler) -> dict:
    """TRL's DPOTrainer with the same model, data, loss and optimizer settings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    work = Path(spec["work"])
    cuda = spec["cuda"]
    n_steps = spec["warmup"] + spec["steps"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:  # as dpolab.models.load_tokenizer
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if cuda else "cpu"

    def load():
        m = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        return m.to(device)

    model = load()
    # precompute: TRL scores the reference with the policy at its initial weights and keeps
    # no second copy (passing a ref_model would keep one in memory for nothing).
    ref_model = load() if spec["ref_mode"] == "in_memory" else None
    train_dataset = dataset_of(Path(spec["train"]))
    args = DPOConfig(
        output_dir=str(work / "trl_run"), per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=spec["max_grad_norm"],
        max_steps=n_steps, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], use_cpu=not cuda, bf16=cuda, seed=spec["seed"], data_seed=spec["seed"],
        beta=spec["beta"], loss_type=["sigmoid"], disable_dropout=True,
        max_length=spec["prompt_len"] + spec["completion_len"],
        precompute_ref_log_probs=spec["ref_mode"] == "precompute",
        optim="adamw_torch", dataloader_num_workers=0, disable_tqdm=True,
        **{checkpointing_field(DPOConfig): spec["trl_grad_checkpointing"]},
    )
    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sampler.open()
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            if len(times) == n_steps:
                sampler.close()
                out["steps_cuda_peak_mib"] = cuda_peak_mib()

    out: dict = {}
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args,
                         train_dataset=train_dataset, processing_class=tokenizer,
                         callbacks=[StepClock()])
    ds = trainer.train_dataset
    out["first_batch"] = [[ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]]
                          for i in range(len(ds))]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "logps/chosen" in h]
    out["step_seconds"] = times[1:]  # steps 2..N, as for dpolab
    out["losses"] = [h["loss"] for h in logs]
    out["logps_chosen"] = [h["logps/chosen"] for h in logs]
    out["threads"] = torch.get_num_threads()
    return out


def checkpointing_field(config_cls) -> str:
    """The activation (gradient) checkpointing switch the installed TRL/transformers names:
    `gradient_checkpointing` in transformers' TrainingArguments, `activation_checkpointing`
    in TRL versions that renamed it."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in names:
            return name
    raise RuntimeError(f"{config_cls.__name__} has no checkpointing field")


def dataset_of(path: Path):
    """A `datasets.Dataset` of the JSONL rows, built from an Arrow table with an explicit
    fingerprint: `Dataset.from_list` fingerprints the table by pickling it with dill, which
    fails on some Python/pyarrow pairs (Python 3.12: "Can't pickle <class 'MonthDayNano'>").
    Caching is off, so TRL's own map calls neither hash nor write cache files."""
    import hashlib

    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    datasets.disable_caching()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return datasets.Dataset(InMemoryTable(pa.Table.from_pylist(rows)), fingerprint=f"vs-trl-{digest}")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    # dpolab keeps its reference store there: a fresh one, so every run computes it
    os.environ["DPOLAB_CACHE"] = str(Path(spec["work"]) / "dpolab_cache")
    sampler = RssSampler()
    run = run_dpolab if spec["system"] == "dpolab" else run_trl
    try:
        out = run(spec, sampler)
    except Exception as e:  # only CUDA out-of-memory is a result; anything else propagates
        if not is_oom(e):
            raise
        out = {"oom": True, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    out.update(sampler.stop())
    out["cuda_peak_mib"] = cuda_peak_mib()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
