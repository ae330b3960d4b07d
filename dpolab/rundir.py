"""The run directory, written and read in one place.

    config.yaml       the resolved config (prepare_run_dir)
    metrics.jsonl     one JSON object per line: training steps and evaluations (MetricsLog,
                      read_metrics)
    data.json         pairs per split, truncation and drop counts, the pair forward used and
                      why (write_data_report)
    unflippable.json  pairs the reference makes unflippable, before training (write_unflippable)
    auxdpo.json       AuxDPO's Gram spectrum, when that loss trains (write_auxdpo_record)
    summary.json      the finished run in numbers (write_summary)
    pairs/            every pair at every evaluation, its text and CHES (dpolab.trajectory)
    checkpoints/, model/  written by dpolab.checkpoint and the export
`Run` is the directory read back once, as the report sees it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dpolab import atomic
from dpolab import config as config_mod
from dpolab.config import RunConfig
from dpolab.diagnostics import growth_rate, unflippable, unflippable_threshold
from dpolab.errors import UserError
from dpolab.trackers import NullTracker

# ---------------------------------------------------------------------------------------
# Writing


def prepare_run_dir(cfg: RunConfig, *, resume: bool, is_main: bool) -> Path:
    run_dir = Path(cfg.out)
    if is_main:
        if not resume and (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir}: a run already exists there; use --resume {run_dir} "
                            f"to continue it, or --out for a new directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.dump_yaml(cfg, run_dir / "config.yaml")
    return run_dir


class MetricsLog:
    """metrics.jsonl, one JSON object per line, each flushed as it is written (readers see
    it at once) and the file fsynced at `close`. Its durability in between is the
    checkpoints': each keeps its own checksummed copy of the lines so far, and on resume the
    file restarts from that copy (`kept`), so a resumed run's file equals an uninterrupted
    run's even when metrics.jsonl was cut short or deleted meanwhile, which is said. (An
    fsync per line measured 5.5 ms against 0.2 ms on a shared VM disk: a tenth of a fast GPU
    step, for lines a resume cuts anyway.)"""

    def __init__(self, path: Path, *, enabled: bool, kept: str = "", tracker=None):
        self.path, self.enabled = path, enabled
        self.lines = kept.count("\n")
        self._text = [kept] if enabled else []  # what a checkpoint copies
        if enabled:
            old = path.read_bytes() if path.exists() else b""
            new, n_old = kept.encode("utf-8"), old.count(b"\n")
            if not old.startswith(new):
                found = ("is missing" if not path.exists() else
                         f"has only {n_old} of them" if new.startswith(old) else
                         "differs from them")
                print(f"{path}: the checkpoint recorded {self.lines} line(s); the file {found}: "
                      f"restored from the checkpoint's copy", file=sys.stderr, flush=True)
            atomic.write_text(path, kept)
        # dpolab.trackers: every row written here goes to the trackers too, under the same names
        self.tracker = tracker if tracker is not None and enabled else NullTracker()

    def write(self, row: dict[str, Any]) -> None:
        if not row:
            return
        self.lines += 1
        if not self.enabled:
            return
        line = json.dumps(row, sort_keys=True) + "\n"
        with atomic.writing(self.path), self.path.open("a", encoding="utf-8") as f:
            f.write(line)  # a full disk: one line naming the file
        self._text.append(line)
        self.tracker.log(row)

    def text(self) -> str:
        """Every line written, resumed ones included (empty where not `enabled`)."""
        return "".join(self._text)

    def close(self) -> None:
        if self.enabled and self.path.exists():
            with self.path.open("a") as f:
                os.fsync(f.fileno())
        self.tracker.close()


def write_summary(run_dir: Path, metrics_path: Path, *, wall_s: float) -> dict[str, Any]:
    import resource

    rows = read_metrics(metrics_path)
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    steps = [r for r in rows if "rewards/margins" in r and "step" in r]
    summary = {
        "margin_growth_rate": growth_rate(np.array([r["step"] for r in steps]),
                                          np.array([r["rewards/margins"] for r in steps])),
        "wall_s": wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": max((r.get("step", 0) for r in rows), default=0),
        "before": evals[0] if evals else {},
        "after": evals[-1] if evals else {},
    }
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


def write_data_report(run_dir: Path, tok: dict, *, forward: dict | None = None) -> None:
    """data.json: per split, the pairs kept, what tokenization dropped or cut, and how many rows
    had their prompt cut at the longest common token prefix (`TokenizedPairs.common_prefix`);
    and under "pair_forward" the layout the pairs went through the model in, and why
    (dpolab.forward_check.ForwardChoice.record)."""
    info: dict[str, Any] = {
        split: {"pairs": len(t.examples), "dropped_identical": t.dropped_identical,
                "dropped_unscored": t.dropped_unscored, "truncated_prompt": t.truncated_prompt,
                "truncated_completion": t.truncated_completion,
                "common_prefix": t.common_prefix, "groups": t.groups}
        for split, t in tok.items()}
    if forward is not None:
        info["pair_forward"] = forward
    atomic.write_text(run_dir / "data.json", json.dumps(info, indent=1))


def write_unflippable(run_dir: Path, splits: dict, groups: list[str], *, beta: float) -> dict:
    """unflippable.json: before training, the pairs whose reference preference for the rejected
    response is too strong for DPO to flip (dpolab.diagnostics.unflippable). `splits`: name ->
    (examples, ref_chosen (N,), ref_rejected (N,)). Returns what it wrote."""
    out: dict[str, Any] = {"beta": beta, "threshold_nats": unflippable_threshold(beta)}
    for split, (examples, rc, rr) in splits.items():
        flags = unflippable(rc.numpy(), rr.numpy(), beta=beta)
        out[split] = {
            "count": int(flags.sum()), "pairs": len(examples),
            "by_group": {g: int(sum(1 for e, f in zip(examples, flags) if f and e.group == g))
                         for g in groups},
            "list": [{"where": f"{e.source}:{e.row}", "group": e.group,
                      "ref_margin": float(rc[i] - rr[i])}
                     for i, (e, f) in enumerate(zip(examples, flags)) if f],
        }
    atomic.write_text(run_dir / "unflippable.json", json.dumps(out, indent=1))
    return out


def write_auxdpo_record(run_dir: Path, record: dict[str, Any]) -> None:
    """auxdpo.json: how much room the null space of A leaves AuxDPO's delta."""
    atomic.write_text(run_dir / "auxdpo.json", json.dumps(record, indent=1))


# ---------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory, read once. `train` and `evals` are metrics.jsonl lines, in order."""
    path: Path
    config: dict[str, Any]  # config.yaml as written ({} if missing)
    summary: dict[str, Any] | None  # summary.json; None while the run is in progress
    data: dict[str, Any] | None  # data.json (per split pair counts)
    train: list[dict[str, Any]]  # lines with a training `loss`
    evals: list[dict[str, Any]]  # lines with `eval/` or `train_eval/` keys
    name: str = ""  # how the run is named in a comparison; empty = the directory's name
    syncs: tuple[int, ...] = ()  # the steps after which the reference synced (loss.ref_sync)

    @property
    def label(self) -> str:
        return f"{self.name or self.path.name} ({loss_name(self.config)})"

    @property
    def groups(self) -> list[str]:
        return group_names({k for r in self.evals for k in r})

    @property
    def eval_sets(self) -> list[str]:
        return eval_set_names({k for r in self.evals for k in r})

    @property
    def before(self) -> dict[str, Any]:
        return self.evals[0] if self.evals else {}

    @property
    def after(self) -> dict[str, Any]:
        return self.evals[-1] if len(self.evals) > 1 else {}


# The overall key of each per-group metric name (a group's keys are eval/groups/<g>/<name>).
_OVERALL = {"accuracy": "rewards/accuracies", "margin": "rewards/margins",
            "preference": "preference/model", "accuracy_no_cue": "accuracy_no_cue"}


def metric(row: dict[str, Any], prefix: str, group: str | None, what: str) -> Any:
    """One held-out (prefix 'eval/') or train (prefix 'train_eval/') number of a metrics row,
    overall (group None) or per group; None when the row lacks it."""
    if group is None:
        return row.get(prefix + _OVERALL[what]) if what in _OVERALL else None
    return row.get(f"{prefix}groups/{group}/{what}")


def group_names(keys) -> list[str]:
    """The groups of `eval/groups/<name>/accuracy` keys, sorted. A name is read between that
    prefix and suffix, so it may hold '/' itself (every group has exactly one such key)."""
    pre, post = "eval/groups/", "/accuracy"
    return sorted({k[len(pre):-len(post)] for k in keys
                   if k.startswith(pre) and k.endswith(post) and len(k) > len(pre + post)})


def eval_set_names(keys) -> list[str]:
    """The named held-out sets of `eval/<name>/rewards/accuracies` keys, sorted (a set's name
    holds no '/'; dpolab.splits.eval_rows)."""
    pre, post = "eval/", "/rewards/accuracies"
    return sorted({k[len(pre):-len(post)] for k in keys if k.startswith(pre) and k.endswith(post)
                   and len(k) > len(pre + post) and "/" not in k[len(pre):-len(post)]})


def loss_name(config: dict[str, Any]) -> str:
    """`dpo`, or the weighted terms as `dpo+0.1*sft` when `loss.weights` is set."""
    loss = config.get("loss") or {}
    weights = loss.get("weights") or {}
    if not weights:
        return str(loss.get("name", "?"))
    return "+".join(k if float(w) == 1.0 else f"{float(w):g}*{k}" for k, w in weights.items())


def reference_free(config: dict[str, Any]) -> bool:
    """Whether every loss term of a run's config.yaml reads no reference (then its
    `rewards/accuracies` is the policy's own preference, see dpolab.diagnostics)."""
    from dpolab.losses import LOSSES

    loss = config.get("loss") or {}
    names = list(loss.get("weights") or {}) or [loss.get("name")]
    return all(n in LOSSES and not LOSSES[n].needs_reference for n in names)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl, in order ([] when the file does not exist).
    A cut-short last line (a run being written, or killed mid-write) is left out; a damaged
    line elsewhere is a UserError naming FILE:LINE."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_bytes().rstrip().split(b"\n")  # bytes: a binary file is named, not raised
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{n}: not text (byte {err.start + 1} of the line is not "
                            f"UTF-8); is this a metrics.jsonl?") from None
        except json.JSONDecodeError as err:
            if n == len(lines):  # a line still being written, or cut by a kill
                continue
            raise UserError(f"{path}:{n}: not valid JSON ({err.msg} at column "
                            f"{err.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got "
                            f"{type(row).__name__} {raw.decode('utf-8')[:40]!r}")
        rows.append(row)
    return rows


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing directory or metrics.jsonl is a UserError."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl in this directory (not a run directory?)")
    rows = read_metrics(metrics)
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").exists():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{run_dir / 'config.yaml'}: not valid YAML: {err}") from None
    return Run(path=run_dir, config=config,
               summary=_read_json(run_dir / "summary.json"), data=_read_json(run_dir / "data.json"),
               train=[r for r in rows if "loss" in r],
               syncs=tuple(r["step"] for r in rows if "ref_sync/count" in r),
               evals=[r for r in rows if any(k.startswith(("eval/", "train_eval/")) for k in r)
                      and "evaluate" not in r])  # `dpolab evaluate`'s lines: not the run's curve
