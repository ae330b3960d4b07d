"""Atomic, resumable checkpoints of the trainable state.

A checkpoint is a folder `checkpoints/step-NNNNNN/` holding the trainable tensors
(`trainable.safetensors`), the optimizer state (`optimizer.pt`, read back with
`torch.load(weights_only=True)`) and `state.json` (step, metrics lines written). It is
written under a temporary name and renamed into place; `checkpoints/latest` names the newest
complete one and is itself replaced atomically, so a run killed at any instant (kill -9
included) leaves the previous checkpoint intact and readable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab import atomic
from dpolab.errors import UserError


def save(run_dir: Path, step: int, named: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, *, metrics_lines: int, is_main: bool = True) -> Path:
    """Collective under FSDP2: every rank calls it (sharded tensors are gathered), rank 0
    writes."""
    from dpolab import sharding

    named = {k: sharding.full(v) for k, v in named.items()}
    opt_state = sharding.optimizer_state_full(optimizer)
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    if not is_main:
        return final
    with atomic.write_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in named.items()},
                  str(tmp / "trainable.safetensors"))
        torch.save(opt_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "metrics_lines": metrics_lines}))
    atomic.write_text(root / "latest", final.name)
    for old in root.glob("step-*"):  # keep only the newest complete checkpoint
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").exists() else None


def restore(run_dir: Path, named: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer) -> int:
    """Load the newest checkpoint into `named` tensors (in place) and the optimizer; returns
    its step, or 0 when the run has none yet (it then starts from the beginning)."""
    path = latest(run_dir)
    if path is None:
        return 0
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(named) - set(tensors))
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensor(s), e.g. "
                        f"{missing[0]!r}; was the config changed since the run started?")
    from dpolab import sharding

    with torch.no_grad():
        for k, t in named.items():
            t.copy_(sharding.like(tensors[k], t))
    sharding.load_optimizer_state_full(optimizer, torch.load(path / "optimizer.pt",
                                                             weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


def metrics_lines(run_dir: Path) -> int:
    path = latest(run_dir)
    return int(json.loads((path / "state.json").read_text())["metrics_lines"]) if path else 0


def export_model(model, tokenizer, out: Path, *, merge_lora: bool = True) -> Path:
    """A folder that `AutoModelForCausalLM.from_pretrained` loads: LoRA merged into the base
    weights (or, with merge_lora=False, the adapter alone), safetensors, the tokenizer beside.
    Written under a temporary name and renamed into place."""
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model = model.merge_and_unload()
    with atomic.write_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return Path(out)
