"""Sweeps: the product of a few config axes, every point an ordinary run directory.

    SWEEP/sweep.json      the axes, the fixed overrides and the points' names (`write_record`)
    SWEEP/<point>/        one run directory per grid point (config.yaml, metrics.jsonl, ...)
    SWEEP/summary.json, SWEEP/report.html   the points compared (dpolab.sweep_report)

What the points share is computed once. Every point keys the reference store and the cached
body states by the starting weights' hash and the token ids (dpolab.reference), so a point
finds what an earlier one stored. Under `train.scope=last_layer`, when the axes change only
what the head's training reads (loss fields, learning rate and its schedule, weight decay,
clipping), the points' heads train together on one session: one tokenization, one model, one
fill of the cached states, one reference (dpolab.stacked_heads). Any other axis, another
scope or several processes (torchrun) run the points one after another, each a whole run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpolab import atomic
from dpolab import config as C
from dpolab.errors import UserError
from dpolab.sweep_report import RECORD, read_record

# Axes whose points may train their heads together (last_layer): they change the loss and
# the optimizer of the head, never the data, the model, the cached states, the batches or
# the evaluation schedule that the points share.
HEAD_ONLY = ("train.lr", "train.weight_decay", "train.schedule", "train.warmup_steps",
             "train.max_grad_norm")


@dataclass(frozen=True)
class Point:
    """One grid point: its values on the axes, its name (the folder under the sweep) and its
    validated config."""

    name: str
    values: dict[str, Any]  # axis key -> value, in the axes' order
    cfg: C.RunConfig


@dataclass(frozen=True)
class Grid:
    axes: dict[str, list]  # `section.key` -> values, in the order given
    fixed: dict[str, Any]  # `section.key` -> one value, applied to every point
    out: Path  # the sweep's folder
    points: tuple[Point, ...]


def split_items(items: list[str]) -> tuple[dict[str, list], dict[str, Any]]:
    """Command-line `section.key=value` items -> (axes, fixed). A value with a comma outside
    brackets is an axis (`loss.beta=0.05,0.1`); a list-valued field takes YAML's brackets
    (`train.lora_targets=[q_proj,v_proj]`). Values are parsed as YAML, like `dpolab train`'s
    overrides."""
    axes: dict[str, list] = {}
    fixed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected section.key=value or "
                            f"section.key=v1,v2,...")
        parts = _top_level_split(text)
        values = [_yaml_value(p, item) for p in parts]
        if key in axes or key in fixed:
            raise UserError(f"override {item!r}: {key} is given twice")
        if len(parts) > 1:
            if len(set(map(repr, values))) != len(values):
                raise UserError(f"sweep axis {key}: a value is repeated in {text!r}")
            axes[key] = values
        else:
            fixed[key] = values[0]
    return axes, fixed


def _top_level_split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _yaml_value(text: str, item: str) -> Any:
    if text == "":
        raise UserError(f"override {item!r}: an empty value in a comma-separated list")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def point_name(values: dict[str, Any], axes: dict[str, list]) -> str:
    """A point's folder name from its values: a string value stands for itself (`ipo`), a
    number or a boolean carries its field's name (`beta0.1`); joined by '-' in axis order.
    Characters outside [A-Za-z0-9._+=] become '_'."""
    parts = []
    for key, v in values.items():
        field = key.rsplit(".", 1)[-1]
        shared = sum(isinstance(x, str) for k, vs in axes.items() if k != key for x in vs)
        own = isinstance(v, str) and not shared  # two string axes: names keep their fields
        parts.append(str(v) if own else f"{field}{v}")
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(parts))


def make_grid(raw: dict[str, Any], axes: dict[str, list], fixed: dict[str, Any], *,
              out: str | Path, source: str = "config") -> Grid:
    """Every point's config built and validated before anything runs: one bad value is a
    one-line error naming its point. `raw`: the config file's mapping (or {})."""
    if not axes:
        raise UserError("sweep: no axis to sweep; give at least one section.key=v1,v2,...")
    for key in [*axes, *fixed]:
        if key == "out":
            raise UserError("sweep: 'out' is where the sweep writes; use --out SWEEP")
    base = C.apply_values(raw, fixed, source=source)
    out = Path(out)
    points, names = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        name = point_name(values, axes)
        if name in names:
            raise UserError(f"sweep: two grid points would share the folder {name!r}; "
                            f"give the axes distinct values")
        names.add(name)
        try:
            point_raw = C.apply_values(base, {**values, "out": str(out / name)}, source=source)
            cfg = C.build_config(point_raw, source=source)
        except UserError as err:
            raise UserError(f"sweep point {name}: {err}") from None
        points.append(Point(name, values, cfg))
    return Grid(axes, fixed, out, tuple(points))


def shared_pass_reason(grid: Grid, world: int = 1) -> str | None:
    """None when the points' heads can train together in one pass over the cached states
    (dpolab.stacked_heads); else why the points run one after another."""
    from dpolab.losses import Objective

    scopes = {p.cfg.train.scope for p in grid.points}
    if scopes != {"last_layer"}:
        return f"train.scope {', '.join(sorted(scopes))}: only last_layer heads train together"
    if world > 1:
        return "under torchrun every point trains data-parallel across the ranks, in turn"
    other = [k for k in grid.axes if not (k.startswith("loss.") or k in HEAD_ONLY)]
    if other:
        return (f"axis {', '.join(other)} changes what the points share (data, model, "
                f"batches or schedule)")
    aux = [p.name for p in grid.points
           if Objective(p.cfg.loss.term_weights(), p.cfg.loss).needs_delta]
    if aux:
        return f"point {aux[0]}: AuxDPO's per-pair rewards train with their own session"
    moving = [p.name for p in grid.points if p.cfg.loss.ref_sync]
    if moving:  # the shared session has one reference store
        return f"point {moving[0]}: loss.ref_sync moves each point's reference with its own head"
    return None


def write_record(grid: Grid) -> None:
    grid.out.mkdir(parents=True, exist_ok=True)
    record = {"axes": grid.axes, "fixed": grid.fixed,
              "points": [{"name": p.name, "values": p.values} for p in grid.points]}
    atomic.write_text(grid.out / RECORD, json.dumps(record, indent=1, default=str) + "\n")


def sweep(config: C.RunConfig | str | Path | None = None, *, grid: dict[str, list] | None = None,
          out: str | Path = "runs/sweep", overrides: dict[str, Any] | None = None,
          resume: bool = False) -> Path:
    """Python's `dpolab sweep`: `config` (a RunConfig, a YAML path or None for the defaults)
    with `overrides` ({"train.max_steps": 20}) on every point, and `grid`
    ({"loss.beta": [0.1, 0.5], "loss.name": ["dpo", "ipo"]}) the axes whose product is
    swept. Returns the sweep folder. `resume=True` finishes the sweep in `out` instead."""
    if resume:
        return resume_sweep(Path(out))
    if isinstance(config, C.RunConfig):
        raw = {k: v for k, v in C.to_dict(config).items() if k != "out"}
    else:
        raw = C.load_yaml(config) if config is not None else {}
    axes = {k: list(v) for k, v in (grid or {}).items()}
    for key, values in axes.items():
        if len(values) < 1:
            raise UserError(f"sweep axis {key}: no values")
    return run_grid(make_grid(raw, axes, dict(overrides or {}), out=out))


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_grid(grid: Grid, *, say=None) -> Path:
    """Train every point of `grid` (a sweep folder that already holds points is refused:
    `resume` finishes one) and write the sweep's report; returns the sweep folder."""
    from dpolab.sweep_report import write_sweep_report

    say = say or _main_print
    refuse_torchrun()
    taken = [p.name for p in grid.points if (grid.out / p.name / "metrics.jsonl").exists()]
    if taken:
        raise UserError(f"{grid.out}: point {taken[0]} has run already; use dpolab sweep "
                        f"--resume {grid.out} to finish the sweep, or --out for a new one")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    write_record(grid)
    reason = shared_pass_reason(grid, world)
    if reason is None:
        from dpolab.stacked_heads import train_heads

        say(f"sweep: {len(grid.points)} points; their heads train together on one pass over "
            f"the cached body states")
        train_heads([p.cfg for p in grid.points])
    else:
        say(f"sweep: {len(grid.points)} points, one after another ({reason}); the reference "
            f"store and cached states are shared")
        _one_after_another([(p.cfg, False) for p in grid.points], grid.axes, say=say)
    if int(os.environ.get("RANK", "0")) == 0:
        write_sweep_report(grid.out)
    return grid.out


def resume_sweep(out: Path, *, say=None) -> Path:
    """Finish every unfinished point of the sweep in `out` (each from its last checkpoint,
    or from the start when it has none) and write the sweep's report again."""
    from dpolab.sweep_report import write_sweep_report

    say = say or _main_print
    refuse_torchrun()
    record = read_record(out)
    todo = []
    for entry in record["points"]:
        run_dir = Path(out) / str(entry.get("name", ""))
        if finished(run_dir):
            continue
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: grid point without config.yaml; the sweep cannot "
                            f"be resumed from it")
        raw = C.load_yaml(run_dir / "config.yaml")
        raw["out"] = str(run_dir)  # the folder as it is now, wherever the sweep moved
        cfg = C.build_config(raw, source=str(run_dir / "config.yaml"))
        todo.append((cfg, (run_dir / "metrics.jsonl").exists()))
    say(f"sweep {out}: {len(record['points']) - len(todo)} of {len(record['points'])} points "
        f"finished; {len(todo)} to run")
    _one_after_another(todo, record.get("axes") or {}, say=say)
    if int(os.environ.get("RANK", "0")) == 0:
        write_sweep_report(Path(out))
    return Path(out)


def refuse_torchrun() -> None:
    """A sweep runs in one process. Under torchrun its points would each form and tear down
    a process group in turn, and a second group formed in the same workers was seen to hang;
    until that is made safe, one line says what to do instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("dpolab sweep runs in one process, not under torchrun; train a point "
                        "on several processes with torchrun ... dpolab train --config "
                        "SWEEP/<point>/config.yaml")


def _main_print(line: str) -> None:
    """print, by the main process only (under torchrun every rank runs the sweep)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def _one_after_another(runs: list[tuple[C.RunConfig, bool]], axes: dict, *, say) -> None:
    """Each (config, resume) as an ordinary run, in turn. The tokenizer is loaded once when
    no axis changes the model, and the rows read and split once when no axis changes the
    data or the seed that splits it; the reference store and cached states are found on disk
    by their keys."""
    from dpolab.inputs import Inputs
    from dpolab.train import train

    shared = Inputs()
    same_model = not any(k.startswith("model.") for k in axes)
    same_rows = same_model and not any(k.startswith("data.") or k == "train.seed" for k in axes)
    for i, (cfg, resuming) in enumerate(runs):
        say(f"sweep: point {i + 1} of {len(runs)}: {cfg.out}")
        inputs = shared.checked(cfg)
        if same_model and i == 0:
            shared = dataclasses.replace(shared, tokenizer=inputs.tokenizer)
        if same_rows and shared.rows is None and not resuming:
            from dpolab.splits import load_split_rows

            shared = dataclasses.replace(shared, rows=load_split_rows(cfg))
            inputs = dataclasses.replace(inputs, rows=shared.rows)
        train(cfg, resume=resuming, inputs=inputs if not resuming else Inputs())
