"""What the tokenized data gives training, checked before it starts.

`truncation`: per split and per group, the pairs dropped because cutting them to
`data.max_length` made chosen and rejected identical or left a completion no scored token,
said on the console. The run stops instead when a whole group is gone from a split, or more
than `MOST` of a split is (the data meant to train is then mostly not what trains), naming
the settings that give completions more room.
`group_weights`: each pair's `data.group_weights` weight, refused when it names no group of
the data or gives every training pair weight 0 (a run that would train nothing).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from dpolab.errors import UserError

MOST = 0.5  # a split that loses more than this share of its pairs stops the run
SPLIT_NAMES = {"train": "training", "held_out": "held-out"}
NO_GROUP = "(no group)"


def truncation(rows: dict[str, Sequence], tok: dict, data_cfg, *,
          say: Callable[[str], None] | None) -> None:
    """`rows`: split -> the rows tokenized; `tok`: split -> their TokenizedPairs. Says one
    line per split that lost pairs (through `say`; None says nothing), or raises UserError."""
    for split, t in tok.items():
        total = Counter(r.group or NO_GROUP for r in rows[split])
        lost = total - Counter(e.group or NO_GROUP for e in t.examples)
        n, n_lost = sum(total.values()), sum(lost.values())
        if not n_lost:
            continue
        where = (f" ({', '.join(f'{g} {lost[g]} of {total[g]}' for g in sorted(lost))})"
                 if set(total) != {NO_GROUP} else "")
        line = (f"data: truncation to data.max_length={data_cfg.max_length} (prompts to "
                f"data.max_prompt_length={data_cfg.max_prompt_length}) dropped {n_lost} of {n} "
                f"{SPLIT_NAMES.get(split, split)} pairs{where}: chosen and rejected became "
                f"identical or kept no scored token")
        gone = sorted(g for g in lost if lost[g] == total[g])
        if gone or n_lost > MOST * n:
            what = (f"group(s) {', '.join(gone)} entirely" if gone
                    else f"more than {MOST:.0%} of the split")
            raise UserError(f"{line}; that loses {what}. Raise data.max_length, or lower "
                            f"data.max_prompt_length to leave the completions more room")
        if say is not None:
            say(line)


def group_weights(tok: dict, groups: list[str], weights: dict[str, float]
                  ) -> dict[str, torch.Tensor]:
    """split -> (N,) float32 weight of each pair's group (a group not named weighs 1)."""
    unknown = sorted(set(weights) - set(groups))
    if unknown:
        raise UserError(f"config data.group_weights: unknown group(s) {', '.join(unknown)}; "
                        f"groups in the data: {', '.join(groups) or '(none)'}")
    out = {split: torch.tensor([float(weights.get(e.group, 1.0)) for e in t.examples])
           for split, t in tok.items()}
    if not (out["train"] > 0).any():
        raise UserError(f"config data.group_weights gives every training pair weight 0 "
                        f"({', '.join(f'{g}: {weights.get(g, 1.0):g}' for g in groups)}); "
                        f"nothing would train. Give some group a weight > 0")
    return out
