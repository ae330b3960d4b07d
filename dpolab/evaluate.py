"""Scoring a run after the fact: `Trainer.evaluate()` and `dpolab evaluate RUN`.

A run directory holds what evaluation needs: config.yaml names the model and data, the
checkpoints hold the trained weights (the last one the exported weights), and the reference
is the model config.yaml names, whose store is found again by its key (the weights' hash and
the token ids) or computed once more on another machine. `evaluate_run` rebuilds the run's
session from its config without training (nothing in the run directory is rewritten but
metrics.jsonl, which gets one line marked `"evaluate": <data>`), loads the weights asked
for (the base model at step 0, a checkpoint, or the last one) and scores a data set: the
run's held-out pairs, a new file, or named sets. The reference stays the run's: a new data
set is scored against the same model's log-probs, computed for its token ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from dpolab.errors import UserError


def evaluate_run(run_dir: str | Path, data: Any = None, *, checkpoint: int | None = None,
                 inputs=None, compute_metrics: Callable | None = None,
                 label: str = "") -> dict[str, float]:
    """The run's evaluation metrics (`eval/...`, TRL's names) of `data` with the weights of
    `checkpoint` (None: the last checkpoint, the exported weights; 0: the base model), and
    one line of them appended to RUN/metrics.jsonl, marked `"evaluate": label or data`.

    data: None (the run's held-out pairs), a file path, a `datasets.Dataset`, a list of dicts
    or a dict of named sets of those. `inputs` (dpolab.inputs.Inputs): the run's training
    rows when they were given in memory."""
    from dpolab import config as C, runlock, session, splits
    from dpolab.checkpoint import load_weights
    from dpolab.distributed import Distributed
    from dpolab.inputs import Inputs
    from dpolab.rundir import MetricsLog

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: no config.yaml (not a run directory?)")
    cfg = C.build_config(C.load_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
    if cfg.model.name.startswith("<in-memory"):
        raise UserError(f"{run_dir}: its model was given as an object ({cfg.model.name}), which "
                        f"cannot be loaded again by name; export it and train from the folder")
    inputs = inputs or Inputs()
    if inputs.reference is None and cfg.model.reference.startswith("<in-memory"):
        raise UserError(f"{run_dir}: its reference model was given as an object "
                        f"({cfg.model.reference}); evaluate it from the Trainer that trained it")
    if inputs.rows is None and cfg.data.path.startswith("<in-memory"):
        raise UserError(f"{run_dir}: its training data was given in memory ({cfg.data.path}); "
                        f"evaluate it from the Trainer that trained it")
    train_rows, held_rows = inputs.rows or splits.load_split_rows(cfg)
    if data is not None:
        held_rows = splits.eval_rows(data, cfg, name="data")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False,
                                                             did_samples=0))
    found = _weights(run_dir, checkpoint)
    dist = Distributed.from_env(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    with runlock.hold(run_dir, enabled=dist.is_main):
        s = session.build(cfg, run_dir, dist, Inputs(tokenizer=inputs.tokenizer,
                                                     rows=(train_rows, held_rows),
                                                     compute_metrics=compute_metrics,
                                                     reference=inputs.reference),
                          records=False)
        step = 0
        if found is not None:
            load_weights(found[0], s.trainable_named())
            step = int(found[1]["step"])
        row = s.evaluate(step=step, train_split=False, keep_pairs=False)
        row["evaluate"] = label or _name(data)
        log = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main,
                         kept=_text(run_dir / "metrics.jsonl"))
        log.write(row)
        log.close()
    dist.close()
    return row


def _weights(run_dir: Path, checkpoint: int | None) -> tuple[Path, dict] | None:
    """(folder, state) of the checkpoint to load: the newest intact one for None, the one of
    step `checkpoint` otherwise; None for step 0 (the base model) or a run without any."""
    from dpolab.checkpoint import find_intact, step_dirs, verify

    if checkpoint == 0:
        return None
    if checkpoint is None:
        return find_intact(run_dir)
    root = run_dir / "checkpoints"
    dirs = step_dirs(root)
    path = root / f"step-{checkpoint:06d}"
    if path not in dirs:
        kept = ", ".join(d.name.split("-")[1].lstrip("0") or "0" for d in dirs) or "none"
        raise UserError(f"{path}: no such checkpoint; kept: {kept} (0: the base model)")
    state, why = verify(path)
    if state is None:
        raise UserError(f"{path}: damaged checkpoint, {why}")
    return path, state


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _name(data: Any) -> str:
    if data is None:
        return "held_out"
    if isinstance(data, (str, Path)):
        return str(data)
    if isinstance(data, dict):
        return ",".join(map(str, data))
    return f"<in-memory {type(data).__name__}>"


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dpolab evaluate",
                                description="score a run's weights on held-out pairs against "
                                            "its reference; prints the held-out table")
    p.add_argument("run", help="the run directory")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]FILE",
                   help="pairs to score (default: the run's held-out pairs); repeat with "
                        "NAME=FILE for named sets")
    p.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                   help="the checkpoint's step (default: the last, the exported weights; "
                        "0: the base model)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data: Any = None
    if a.data:
        named = [d.partition("=") for d in a.data]
        if len(a.data) == 1 and not named[0][1]:
            data = a.data[0]
        elif all(sep and name for name, sep, _ in named):
            data = {name: path for name, _, path in named}
        else:
            raise UserError("--data: give one FILE, or NAME=FILE for each of several sets")
    before = evaluate_run(a.run, data, checkpoint=0)
    after = before if a.checkpoint == 0 else evaluate_run(a.run, data, checkpoint=a.checkpoint)
    from dpolab.report import held_out_table

    print(f"run directory: {a.run}, step {int(after['step'])}")
    print(held_out_table(before, after, run_dir=Path(a.run)))
    return 0
