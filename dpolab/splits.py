"""The run's rows, split once: training rows and held-out rows, from the embedded default, a
data file with a seeded held-out share, or a data file and an explicit held-out file. The same
split serves training, `dpolab inspect` and the benchmarks."""

from __future__ import annotations

from typing import Sequence

import torch

from dpolab.config import RunConfig


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
    if d.eval_path:
        held = load_rows(d.eval_path, skip_invalid=d.skip_invalid)
        report_skipped(held, d.eval_path)
        return list(rows.rows), list(held.rows)
    return split_held_out(rows.rows, cfg)


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
