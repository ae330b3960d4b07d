"""The run's rows, split once: training rows and held-out rows, from the embedded default, a
data file with a seeded held-out share, or a data file and an explicit held-out file. The same
split serves training, `dpolab inspect` and the benchmarks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dpolab.config import RunConfig
from dpolab.errors import UserError


def load_split_rows(cfg: RunConfig) -> tuple[list, list]:
    """(train rows, held-out rows): the embedded default, a file with a seeded held-out
    split, or a file plus an explicit held-out file."""
    from dpolab.data import load_rows

    d = cfg.data
    if not d.path:
        from dpolab.rho_data import default_rows

        return default_rows(seed=cfg.train.seed, per_group=d.per_group or None,
                            held_out_per_group=d.eval_per_group or None,
                            groups=list(d.groups) or None)
    rows = load_rows(d.path, skip_invalid=d.skip_invalid)
    report_skipped(rows, d.path)
    if d.eval_path or d.eval:
        return list(rows.rows), eval_rows(dict(d.eval) or d.eval_path, cfg, name=None)
    return split_held_out(rows.rows, cfg)


# Names an eval set cannot take: the first part of the evaluation's own metric keys.
RESERVED_SET_NAMES = frozenset({
    "rewards", "logps", "logits", "margins", "displacement", "preference", "gradient_weight",
    "unflippable", "groups", "loss", "entropy", "mean_token_accuracy", "num_tokens", "did"})


def eval_rows(data: Any, cfg: RunConfig, *, name: str | None) -> list:
    """Validated held-out rows of `data`: a file path, a `datasets.Dataset` or finite
    `IterableDataset`, a list of dicts, or a dict of named sets of those (a `DatasetDict`
    too), whose rows carry their set's name (`PreferenceRow.eval_set`). `name`: how errors
    name an in-memory source ("eval_dataset"; a named set's is `eval_dataset[NAME]`)."""
    from dpolab.data import load_rows
    from dpolab.sources import split_names

    if isinstance(data, dict) and split_names(data) is not None:
        out = []
        for key, part in data.items():
            key = str(key)
            if not key or "/" in key or key in RESERVED_SET_NAMES:
                raise UserError(f"{name or 'data.eval'}: eval set name {key!r} is not usable: it "
                                f"must be non-empty, without '/', and none of "
                                f"{', '.join(sorted(RESERVED_SET_NAMES))}")
            rows = eval_rows(part, cfg, name=None if isinstance(part, (str, Path))
                             else f"{name or 'data.eval'}[{key}]")
            out += [replace(r, eval_set=key) for r in rows]
        return out
    loaded = load_rows(data, skip_invalid=cfg.data.skip_invalid, name=name)
    report_skipped(loaded, name or str(data))
    return list(loaded.rows)


def split_held_out(rows: Sequence, cfg: RunConfig) -> tuple[list, list]:
    """(train, held-out): a seeded `data.eval_fraction` of `rows` held out."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(round(cfg.data.eval_fraction * len(order)))) if len(order) > 1 else 0
    held_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in held_idx]
    held = [r for i, r in enumerate(rows) if i in held_idx]
    return train, held


def report_skipped(loaded, path: str) -> None:
    """Say how many invalid rows `data.skip_invalid` dropped from `path`, and the first."""
    if loaded.skipped:
        print(f"{path}: skipped {len(loaded.skipped)} invalid row(s); first: {loaded.skipped[0]}")
