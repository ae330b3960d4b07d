"""Every pair's trajectory: the per-pair numbers of each evaluation, kept in RUN/pairs/.

    pairs/index.json                 what each pair is, per split: id (`h3`: held-out pair at
                                     position 3; `t3`: training), where (SOURCE:ROW), its
                                     group, token counts; beta; whether the run has a
                                     reference and whether its log-probs are per-token means;
                                     the checksums of text.jsonl and of itself
    pairs/text.jsonl                 each pair's prompt, chosen and rejected as the data had
                                     them (messages and tools too), written at the start
    pairs/ches.safetensors           CHES and LN-CHES of each pair at the reference
                                     (dpolab.ches), before training
    pairs/step-NNNNNN.safetensors    one evaluation: for each split it scored,
                                     `SPLIT/policy_chosen`, `SPLIT/policy_rejected`,
                                     `SPLIT/ref_chosen`, `SPLIT/ref_rejected` (N,) float64: the
                                     PairStats that the evaluation's metrics are the means of

Written whole (dpolab.atomic), read back only when their checksums hold (a damaged file is a
UserError naming it). Held-out pairs are in every evaluation; training pairs in the first
and the last (train.eval_every). This module writes and reads the files and derives each
pair's movement from them (`Trajectory`); it computes none of the numbers it stores.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpolab import atomic
from dpolab.diagnostics import TIE, LogRatios, PairStats
from dpolab.errors import UserError

SPLITS = ("held_out", "train")
PREFIX = {"held_out": "h", "train": "t"}
STEP_KIND, CHES_KIND = "dpolab-pair-step", "dpolab-pair-ches"
FIELDS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_STEP = re.compile(r"^step-(\d+)\.safetensors$")
TEXT_LIMIT = 64 << 20  # bytes of text.jsonl above which the rows' text is not copied


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "pairs"


def _checksum(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------
# Writing


def write_start(run_dir: Path, tok: dict, rows: dict, *, ches: dict[str, tuple] | None,
                beta: float, reference: bool, average: bool) -> None:
    """index.json, text.jsonl and ches.safetensors at the start of a run. `tok`: split ->
    TokenizedPairs; `rows`: split -> the PreferenceRows they were tokenized from; `ches`:
    split -> (CHES (N,), LN-CHES (N,)) or None."""
    out = folder(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits, lines = {}, []
    for split in SPLITS:
        pairs = []
        for pos, e in enumerate(tok[split].examples):
            pid = f"{PREFIX[split]}{pos}"
            pairs.append({"id": pid, "where": f"{e.source}:{e.row}", "group": e.group,
                          "prompt_tokens": len(e.prompt_ids),
                          "chosen_tokens": _scored(e.chosen_ids, e.chosen_mask),
                          "rejected_tokens": _scored(e.rejected_ids, e.rejected_mask)})
            r = rows[split][e.index]
            lines.append(json.dumps({"id": pid, "prompt": r.prompt, "chosen": r.chosen,
                                     "rejected": r.rejected, "tools": r.tools},
                                    ensure_ascii=False))
        splits[split] = pairs
    text = "\n".join(lines) + "\n"
    keep_text = len(text.encode("utf-8")) <= TEXT_LIMIT
    if keep_text:
        atomic.write_text(out / "text.jsonl", text)
    if ches is not None:
        atomic.save_tensors({f"{s}/{k}": torch.as_tensor(np.asarray(v, np.float64))
                             for s, (c, ln) in ches.items() for k, v in (("ches", c),
                                                                         ("ln_ches", ln))},
                            out / "ches.safetensors", kind=CHES_KIND)
    index = {"format": 1, "beta": beta, "reference": reference, "average": average,
             "text_checksum": _checksum(text) if keep_text else None, "splits": splits}
    body = json.dumps(index, sort_keys=True)
    atomic.write_text(out / "index.json", json.dumps({**index, "checksum": _checksum(body)},
                                                     sort_keys=True) + "\n")


def _scored(ids: Sequence[int], mask) -> int:
    return len(ids) if mask is None else int(sum(mask))


def write_step(run_dir: Path, step: int, stats: dict[str, PairStats]) -> Path:
    """pairs/step-NNNNNN.safetensors: each scored split's per-pair statistics."""
    tensors = {f"{split}/{f}": torch.as_tensor(np.ascontiguousarray(getattr(s, f), np.float64))
               for split, s in stats.items() for f in FIELDS}
    return atomic.save_tensors(tensors, folder(run_dir) / f"step-{step:06d}.safetensors",
                               kind=STEP_KIND, metadata={"step": str(step)})


# ---------------------------------------------------------------------------------------
# Reading


def _damaged(path: Path, why: str):
    raise UserError(f"{path}: {why}; the run's pair files cannot be trusted")


def read_index(run_dir: Path) -> dict[str, Any]:
    path = folder(run_dir) / "index.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no pairs/index.json (a run from a dpolab that kept no "
                        f"per-pair trajectories, or not a run directory)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        _damaged(path, f"not valid JSON ({err})")
    if not isinstance(index, dict) or "checksum" not in index:
        _damaged(path, "has no checksum")
    body = json.dumps({k: v for k, v in index.items() if k != "checksum"}, sort_keys=True)
    if _checksum(body) != index["checksum"]:
        _damaged(path, "does not match its recorded checksum (damaged)")
    return index


def read_text(run_dir: Path) -> dict[str, dict] | None:
    """id -> the pair's text as the data had it, or None when the run kept none."""
    index = read_index(run_dir)
    path = folder(run_dir) / "text.jsonl"
    if index.get("text_checksum") is None or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if _checksum(text) != index["text_checksum"]:
        _damaged(path, "does not match the checksum recorded in index.json (damaged)")
    return {row["id"]: row for row in map(json.loads, text.splitlines())}


def step_files(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder(run_dir).glob("step-*.safetensors")
             if (m := _STEP.match(p.name))]
    return sorted(found)


@dataclass(frozen=True)
class Trajectory(LogRatios):
    """One split's pairs over the evaluations that scored them. Notation as in
    dpolab.diagnostics; arrays are (T, N): T evaluations (`steps`), N pairs (`pairs`)."""

    split: str
    pairs: list[dict]  # index.json's entries: id, where, group, token counts
    steps: np.ndarray  # (T,) int
    policy_chosen: np.ndarray  # (T, N)
    policy_rejected: np.ndarray
    ref_chosen: np.ndarray
    ref_rejected: np.ndarray
    beta: float
    reference: bool  # False: the reference-free form (ref 0, dpolab.diagnostics)
    ches: np.ndarray | None = None  # (N,) CHES at the reference, None when not computed
    ln_ches: np.ndarray | None = None

    @property
    def groups(self) -> list[str | None]:
        return [p["group"] for p in self.pairs]

    def stats(self, t: int) -> PairStats:
        """Evaluation t's PairStats (token counts from the index)."""
        nc, nr = (np.array([p[k] for p in self.pairs], float)
                  for k in ("chosen_tokens", "rejected_tokens"))
        return PairStats(self.policy_chosen[t], self.policy_rejected[t], self.ref_chosen[t],
                         self.ref_rejected[t], nc, nr, beta=self.beta)

    def first_displaced(self) -> np.ndarray:
        """(N,) the first evaluated step at which log pi(y_w) fell below the reference
        (logratio_chosen < -TIE), -1 where it never did."""
        fell = self.logratio_chosen < -TIE  # (T, N)
        return np.where(fell.any(0), self.steps[fell.argmax(0)], -1)

    def movement(self) -> list[dict[str, Any]]:
        """Per pair, from the first evaluation to the last: margins, their change, the
        chosen and rejected displacement at the end, flipped (h > TIE at the end), when
        the chosen response was first displaced, CHES."""
        m, first = self.margins, self.first_displaced()
        out = []
        for j, p in enumerate(self.pairs):
            out.append({"id": p["id"], "where": p["where"], "group": p["group"],
                        "margin_first": float(m[0, j]), "margin_last": float(m[-1, j]),
                        "margin_change": float(m[-1, j] - m[0, j]),
                        "chosen_displacement": float(self.logratio_chosen[-1, j]),
                        "rejected_displacement": float(self.logratio_rejected[-1, j]),
                        "flipped": bool(m[-1, j] > self.beta * TIE),
                        "displaced_at": int(first[j]) if first[j] >= 0 else None,
                        "ches": None if self.ches is None else float(self.ches[j]),
                        "ln_ches": None if self.ln_ches is None else float(self.ln_ches[j])})
        return out


def read_trajectories(run_dir: str | Path) -> dict[str, Trajectory]:
    """split -> its Trajectory, for the splits some evaluation scored. Every file's checksum
    is checked; a run without pair files is a UserError saying so."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    index = read_index(run_dir)
    files = step_files(run_dir)
    if not files:
        raise UserError(f"{run_dir}: no pairs/step-*.safetensors yet (no evaluation written)")
    per: dict[str, list] = {s: [] for s in SPLITS}
    for step, path in files:
        t = atomic.read_tensors(path, kind=STEP_KIND, on_miss=_damaged)
        for split in SPLITS:
            if f"{split}/policy_chosen" in t:
                n = len(index["splits"][split])
                got = {f: t[f"{split}/{f}"].numpy() for f in FIELDS}
                if any(v.shape != (n,) for v in got.values()):
                    _damaged(path, f"its {split} arrays do not have the index's {n} pairs")
                per[split].append((step, got))
    ches_t = atomic.read_tensors(folder(run_dir) / "ches.safetensors", kind=CHES_KIND,
                                 on_miss=_damaged)
    out = {}
    for split, seq in per.items():
        if not seq:
            continue
        stack = {f: np.stack([g[f] for _, g in seq]) for f in FIELDS}
        ches = ln = None
        if ches_t is not None and f"{split}/ches" in ches_t:
            ches, ln = ches_t[f"{split}/ches"].numpy(), ches_t[f"{split}/ln_ches"].numpy()
        out[split] = Trajectory(split, index["splits"][split], np.array([s for s, _ in seq]),
                                **stack, beta=float(index["beta"]),
                                reference=bool(index["reference"]), ches=ches, ln_ches=ln)
    return out
