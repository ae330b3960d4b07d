"""Experiment trackers that receive metrics.jsonl's rows: `train.report_to`.

Each tracker is optional and imported only when a run names it; metrics.jsonl stays the record
of a run and the trackers get the same rows under the same metric names (`loss`,
`rewards/margins`, `eval/rewards/accuracies`, ...), keyed by the row's `step`. Only the main
process opens trackers; every other process, and a run that names none, gets `NullTracker`, so
the training loop never asks whether a tracker exists.

    tensorboard  event files in RUN/tensorboard (torch.utils.tensorboard; extra `tensorboard`)
    wandb        a run in RUN/wandb; WANDB_MODE=offline logs without a network (extra `wandb`)
    mlflow       a run in the store MLFLOW_TRACKING_URI names, else the local `file:` store
                 RUN/mlruns (extra `mlflow`; recent mlflow versions want
                 MLFLOW_ALLOW_FILE_STORE=true for a `file:` store, which cannot hold both
                 `loss` and `loss/dpo`: there the terms are `loss.dpo`, see file_store_name)
    trackio      a local trackio project (extra `trackio`)
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from dpolab.errors import UserError


class Tracker(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """No tracker: every call does nothing."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def scalars(row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, the row's finite numbers but `step`): what a tracker can plot. Booleans and
    strings are left out; NaN and inf are left out because some trackers refuse them."""
    out = {k: float(v) for k, v in row.items()
           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
           and math.isfinite(v)}
    return int(row.get("step", 0)), out


class TensorBoard:
    def __init__(self, run_dir: Path, project: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]):
        import wandb

        # reinit: a second run in the same Python process (a notebook, a test) gets its own run
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir),
                              config=config, reinit="create_new")

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.file_store = uri.startswith("file:")
        self.names: set[str] = set()  # every name logged so far (file store: see file_store_name)
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        for section, values in config.items():
            for k, v in (values.items() if isinstance(values, dict) else [("", values)]):
                self.client.log_param(self.run_id, f"{section}.{k}" if k else section, str(v)[:500])

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        step, values = scalars(row)
        if self.file_store:
            self.names |= set(values)
            values = {file_store_name(k, self.names): v for k, v in values.items()}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def file_store_name(name: str, names: set[str]) -> str:
    """mlflow's file store keeps a metric in a file at its name's path, so `loss` and
    `loss/dpo` cannot both be metrics there: a name below another metric's name takes "." at
    that point (`loss.dpo`); every other name stays as it is."""
    parts = name.split("/")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in names:
            return "/".join(parts[:i]) + "." + "/".join(parts[i:])
    return name


class Trackio:
    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=run_dir.name, config=config)

    def log(self, row: dict[str, Any]) -> None:
        step, values = scalars(row)
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


# name -> (module that must be importable, pyproject extra, constructor)
TRACKERS: dict[str, tuple[str, str, Callable[..., Tracker]]] = {
    "tensorboard": ("tensorboard", "tensorboard", lambda d, p, c: TensorBoard(d, p)),
    "wandb": ("wandb", "wandb", WandB),
    "mlflow": ("mlflow", "mlflow", MLflow),
    "trackio": ("trackio", "trackio", Trackio),
}


def check(names: tuple[str, ...]) -> None:
    """Every name is a known tracker whose package is installed; a UserError naming the extra
    to install otherwise. Looks the packages up without importing them."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"config train.report_to: unknown tracker {name!r}; valid: "
                            f"{', '.join(TRACKERS)}")
        module, extra, _ = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to={name} needs the {module!r} package: "
                            f"pip install 'dpolab[{extra}]'")


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, row: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(row)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(names: tuple[str, ...], run_dir: Path, *, project: str,
                  config: dict[str, Any], is_main: bool) -> Tracker:
    """The trackers `names` for this run on the main process; NullTracker elsewhere or when
    none is named."""
    if not names or not is_main:
        return NullTracker()
    check(names)
    return Trackers([TRACKERS[n][2](run_dir, project, config) for n in names])
