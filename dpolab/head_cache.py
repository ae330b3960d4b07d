"""The last_layer scope's forward: the frozen body's final hidden states at completion
positions, computed once per example (or read from their checked store), then only the head
each step. `CachedHeadForward` is called like every pair forward of dpolab.policy,
`forward(examples, split=...) -> FlatLogps`; `split` names whose cached states to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from dpolab import atomic, cachedir, reference
from dpolab.logps import Head, label_logps_and_stats
from dpolab.policy import FlatLogps

Tensor = torch.Tensor
STATES = "states"  # the kind of file the cached body states are (dpolab.atomic.save_tensors)


class CachedHeadForward:
    """last_layer scope: cached final hidden states at completion positions, head only."""

    def __init__(self, head_fn: Callable[[], Head], *, chunk_size: int, device: torch.device):
        self.head_fn, self.chunk_size, self.device = head_fn, chunk_size, device
        self.cache: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.stores: dict[str, Path] = {}  # split -> the file its states are kept in

    def fill(self, states: Callable, examples: Sequence, *, split: str, batch_size: int,
             store: Path | None = None, progress: Callable[[int], None] | None = None,
             map_batches: Callable | None = None) -> None:
        """Run the (frozen) body once over `examples` and keep completion-position states.
        `states(examples) -> (h (N, D), labels (N,), seg (N,), n_tokens)` is a pair forward's
        `hidden` (tokens sorted by sequence id). With `store` (a safetensors path keyed by
        weights and token ids) they are read from there when present, else written there.
        `map_batches(fn, n_batches, progress=...)` -> [fn(0), ...] runs the batches (each rank
        a share, results on every rank: `Distributed.map_batches`); in order here without it."""
        if store is not None:
            self.stores[split] = store
            if self._load(store, examples, split):
                if progress:
                    progress(len(examples))
                return
            width = self.head_fn().weight.shape[-1]  # float32 states and an int64 label each
            cachedir.require(store, reference.store_bytes(examples, 4 * width + 8),
                             "the cached body states")
        batches = [list(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]

        def run(i: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
            h, labels, seg, _ = states(batches[i])
            b = len(batches[i])
            counts = torch.bincount(seg, minlength=2 * b).tolist()
            hs, ys = torch.split(h.float().cpu(), counts), torch.split(labels.cpu(), counts)
            return [(hs[j], ys[j], hs[b + j], ys[b + j]) for j in range(b)]

        bar = (lambda done: progress(min(len(examples), done * batch_size))) if progress else None
        with torch.no_grad():
            results = (map_batches or _in_order)(run, len(batches), progress=bar)
        for chunk, entries in zip(batches, results):
            for ex, entry in zip(chunk, entries):
                self.cache[(split, ex.index)] = tuple(t.to(self.device) for t in entry)
        if store is not None:
            self._save(store, examples, split)

    def responses(self, examples: Sequence, *, split: str) -> tuple[list[Tensor], list[Tensor]]:
        """The cached (states, labels) of every response of `examples`, chosen ones first:
        response j < B is pair j's chosen completion, B + j its rejected one."""
        entries = [self.cache[(split, ex.index)] for ex in examples]
        return ([e[0] for e in entries] + [e[2] for e in entries],
                [e[1] for e in entries] + [e[3] for e in entries])

    def _save(self, path: Path, examples: Sequence, split: str) -> None:
        hs, ys = self.responses(examples, split=split)
        offsets = torch.tensor([0] + [h.shape[0] for h in hs]).cumsum(0)
        atomic.save_tensors({"hidden": torch.cat(hs).cpu().contiguous(),
                             "labels": torch.cat(ys).cpu(), "offsets": offsets}, path,
                            kind=STATES)

    def _load(self, path: Path, examples: Sequence, split: str) -> bool:
        """Fill the cache from `path` when it holds these examples' states for this head
        (`stored_states`); else a miss said in one line."""
        t = stored_states(path, examples, width=self.head_fn().weight.shape[-1])
        if t is None:
            return False
        n, off = len(examples), t["offsets"].tolist()
        h, y = t["hidden"].to(self.device), t["labels"].to(self.device)
        for i, ex in enumerate(examples):
            c, r = slice(off[i], off[i + 1]), slice(off[n + i], off[n + i + 1])
            self.cache[(split, ex.index)] = (h[c], y[c], h[r], y[r])
        return True

    def __call__(self, examples: Sequence, *, split: str | None = None,
                 head: Head | None = None) -> FlatLogps:
        """Log-probs under the current head, or under `head` (e.g. the reference head), of
        examples whose states `fill` cached under `split`."""
        if split is None:
            raise ValueError("CachedHeadForward needs the split whose cached states to read")
        hs, ys = self.responses(examples, split=split)
        seg = torch.cat([torch.full((h.shape[0],), j, dtype=torch.long) for j, h in enumerate(hs)])
        tok, stats = label_logps_and_stats(torch.cat(hs), head if head is not None
                                           else self.head_fn(), torch.cat(ys),
                                           chunk_size=self.chunk_size)
        return FlatLogps(tok, seg.to(self.device), len(examples), int(seg.numel()), stats=stats)


class SharedBodyText:
    """New text (the DID probe's samples) scored under the trained head and under the
    reference head from one pass of the frozen body: in the head scopes the reference differs
    from the policy in the head alone. `policy(examples)` runs the body (`forward.hidden`,
    `forward` a dpolab.policy pair forward) and keeps its states until `reference(examples)`
    reads them, keyed by the examples' token ids (same tokens, same frozen body, same
    states: the numbers are those of a second body pass, without it)."""

    def __init__(self, forward, reference_head: Head):
        self.forward, self.reference_head = forward, reference_head
        self.kept: dict[tuple, tuple] = {}  # token ids of a batch -> its `hidden` states

    def policy(self, examples: Sequence, *, split: str | None = None) -> FlatLogps:
        states = self.forward.hidden(examples)
        self.kept[_token_key(examples)] = states
        return self.forward.through_head(states, self.forward.head_fn(), len(examples))

    def reference(self, examples: Sequence, *, split: str | None = None) -> FlatLogps:
        """Read once: the states are dropped here (a batch the policy never scored runs
        through the body)."""
        states = self.kept.pop(_token_key(examples), None)
        if states is None:
            states = self.forward.hidden(examples)
        return self.forward.through_head(states, self.reference_head, len(examples))


def _token_key(examples: Sequence) -> tuple:
    return tuple((tuple(e.prompt_ids), tuple(e.chosen_ids), tuple(e.rejected_ids))
                 for e in examples)


def stored_states(path: Path, examples: Sequence, width: int | None = None) -> dict | None:
    """The tensors of the cached-state file `path` when they are the states of `examples`:
    kind and checksum (dpolab.atomic.read_tensors), then keys, float32 (tokens, `width`)
    states, the layout (dpolab.reference.layout_problem) and labels equal to the scored
    tokens. None when absent, or a miss said in one line."""
    t = atomic.read_tensors(path, kind=STATES)
    if t is None:
        return None
    h, y = t.get("hidden"), t.get("labels")
    if set(t) != {"hidden", "labels", "offsets"}:
        problem = f"holds {', '.join(sorted(t))}, not hidden, labels and offsets"
    elif h.dtype != torch.float32 or h.dim() != 2 or width not in (None, h.shape[1]):
        problem = f"its states are {h.dtype} {tuple(h.shape)}, not float32 (tokens, {width})"
    elif y.dtype != torch.int64 or tuple(y.shape) != (h.shape[0],):
        problem = f"its labels are {y.dtype} {tuple(y.shape)}, not int64 ({h.shape[0]},)"
    else:
        problem = reference.layout_problem(t["offsets"], reference.scored_lengths(examples), h)
        if problem is None and not torch.equal(y, scored_tokens(examples)):
            problem = "its labels are not the completions' scored tokens"
    return t if problem is None else atomic.miss(path, problem)


def scored_tokens(examples: Sequence) -> Tensor:
    """(T,) int64: the scored tokens of every chosen completion, then of every rejected one,
    in example order (a cached-state file's labels)."""
    def scored(ids, mask) -> list[int]:
        return list(ids) if mask is None else [t for t, m in zip(ids, mask) if m]
    return torch.tensor([t for e in examples for t in scored(e.chosen_ids, e.chosen_mask)]
                        + [t for e in examples for t in scored(e.rejected_ids, e.rejected_mask)],
                        dtype=torch.int64)


def _in_order(fn: Callable[[int], object], n: int, *, progress=None) -> list:
    out = []
    for i in range(n):
        out.append(fn(i))
        if progress:
            progress(i + 1)
    return out
