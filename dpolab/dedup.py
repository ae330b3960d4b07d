"""Exact duplicate pairs between and within the training and held-out splits.

Two rows are exact duplicates when prompt, chosen and rejected are equal as loaded, with the
tools and template variables rendered with them (messages compared whole: a tool call's
arguments count; :func:`dpolab.audit.row_key`, the key `dpolab inspect` lists duplicates by;
the group and other columns do not count). Training keeps its own duplicates (they weigh a
pair more, which a data set may intend) but says how many there are; a held-out pair equal to
a training pair measures memory, not generalization, so it is removed from the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from dpolab.audit import row_key, where
from dpolab.data import PreferenceRow
from dpolab.errors import UserError


def extra_copies(rows: Sequence[PreferenceRow]) -> int:
    """Rows that repeat an earlier row exactly (a row present 3 times counts 2)."""
    return len(rows) - len({row_key(r) for r in rows})


@dataclass(frozen=True)
class SplitDuplicates:
    held_out: list[PreferenceRow]  # the held-out rows, copies of training rows removed
    train_copies: int              # extra copies among the training rows (kept)
    held_out_copies: int           # extra copies among the kept held-out rows
    removed: list[tuple[str, str]]  # (held-out FILE:ROW, the training FILE:ROW it copies)


def split_duplicates(train: Sequence[PreferenceRow],
                     held_out: Sequence[PreferenceRow]) -> SplitDuplicates:
    """Count duplicates and drop the held-out rows that equal a training row."""
    first: dict[tuple[str, ...], PreferenceRow] = {}
    for r in train:
        first.setdefault(row_key(r), r)
    kept, removed = [], []
    for r in held_out:
        twin = first.get(row_key(r))
        if twin is None:
            kept.append(r)
        else:
            removed.append((where(r), where(twin)))
    return SplitDuplicates(kept, extra_copies(train), extra_copies(kept), removed)


def dedupe_split(train: list[PreferenceRow], held_out: list[PreferenceRow], *,
                 say: Callable[[str], None] | None = print
                 ) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(train, held_out without copies of training rows); what was found goes to `say`
    (None: nothing is said, e.g. on the non-main ranks of a torchrun job). A run needs at
    least one held-out pair (its evaluation and reference store are built from them): none
    left is a UserError saying why."""
    found = split_duplicates(train, held_out)
    if not found.held_out:
        if held_out:
            raise UserError(f"no held-out pairs: all {len(held_out)} are copies of training "
                            f"pairs (e.g. {found.removed[0][0]} = {found.removed[0][1]}); give "
                            f"held-out data (data.eval_path) that the training data does not hold")
        raise UserError(f"no held-out pairs: the data has {len(train)} training row(s) and "
                        f"none is left for evaluation; give at least 2 rows, or held-out data "
                        f"in data.eval_path (--eval-data)")
    if say is not None:
        if found.train_copies or found.held_out_copies:
            say(f"data: {found.train_copies} exact duplicate row(s) among the {len(train)} "
                f"training rows and {found.held_out_copies} among the held-out rows, kept "
                f"(`dpolab inspect` lists them)")
        if found.removed:
            held, twin = found.removed[0]
            say(f"data: removed {len(found.removed)} held-out pair(s) identical to a training "
                f"pair from the held-out split (e.g. {held} = {twin}); "
                f"{len(found.held_out)} held-out pairs remain")
    return train, found.held_out
