"""Per-token completion log-probs of a batch of pairs, for each training scope.

A forward returns a *flat* view: the log-probs of every completion token of the batch
(N,), and which sequence each belongs to, `seg` (N,) in [0, 2B): sequence i < B is pair i's
chosen completion, B + i its rejected one. Sums per sequence are an index_add away, and the
per-token values stay available for displacement diagnostics.

Scopes:
    full, lora   chosen and rejected go through the body in one forward of 2B rows;
    last_layer   the body runs once per example, before training; its final hidden states at
                 completion positions are cached and every step costs only the head.
"""

from __future__ import annotations

import os

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from dpolab.tokenize import collate_pairs
from dpolab.logps import Head, completion_logps, label_logps

Tensor = torch.Tensor


@dataclass(frozen=True)
class FlatLogps:
    tokens: Tensor  # (N,) per-token log-probs of all completion tokens, float32
    seg: Tensor  # (N,) long, sequence id in [0, 2B)
    n_pairs: int  # B
    n_processed: int  # tokens that went through the model for this batch (throughput)

    def sums(self) -> tuple[Tensor, Tensor]:
        """Summed log-probs (chosen (B,), rejected (B,)), differentiable."""
        s = torch.zeros(2 * self.n_pairs, dtype=self.tokens.dtype, device=self.tokens.device)
        s = s.index_add(0, self.seg, self.tokens)
        return s[: self.n_pairs], s[self.n_pairs:]

    def counts(self) -> tuple[Tensor, Tensor]:
        n = torch.bincount(self.seg, minlength=2 * self.n_pairs)
        return n[: self.n_pairs], n[self.n_pairs:]

    def split(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-example per-token tensors (chosen list, rejected list), detached, on CPU."""
        parts = torch.split(self.tokens.detach().cpu(), self.counts_list())
        return list(parts[: self.n_pairs]), list(parts[self.n_pairs:])

    def counts_list(self) -> list[int]:
        c, r = self.counts()
        return torch.cat([c, r]).tolist()


class BodyForward:
    """full / lora scopes: one forward of the 2B (prompt + completion) rows."""

    def __init__(self, body: Callable, head_fn: Callable[[], Head], *, pad_id: int,
                 chunk_size: int, device: torch.device, autocast: bool):
        self.body, self.head_fn, self.pad_id = body, head_fn, pad_id
        self.chunk_size, self.device, self.autocast = chunk_size, device, autocast

    def __call__(self, examples: Sequence) -> FlatLogps:
        batch = collate_pairs(list(examples), pad_id=self.pad_id).to(self.device)
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
               else nullcontext())
        with ctx:
            hidden = self.body(batch.input_ids, attention_mask=batch.attention_mask)  # (2B, T, D)
        tok = completion_logps(hidden, self.head_fn(), batch.labels, batch.loss_mask,
                               chunk_size=self.chunk_size)  # (2B, T)
        mask = batch.loss_mask
        seg = mask.nonzero()[:, 0]
        return FlatLogps(tok[mask], seg, len(examples), int(batch.attention_mask.sum()))


class CachedHeadForward:
    """last_layer scope: cached final hidden states at completion positions, head only."""

    def __init__(self, head_fn: Callable[[], Head], *, chunk_size: int, device: torch.device):
        self.head_fn, self.chunk_size, self.device = head_fn, chunk_size, device
        self.cache: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def fill(self, body: Callable, examples: Sequence, *, split: str, pad_id: int,
             batch_size: int, autocast: bool, store: Path | None = None,
             progress: Callable[[int], None] | None = None) -> None:
        """Run the (frozen) body once over `examples` and keep completion-position states.
        With `store` (a safetensors path keyed by weights and token ids) they are read from
        there when present and written there after computing."""
        if store is not None and store.exists() and self._load(store, examples, split):
            if progress:
                progress(len(examples))
            return
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast
               else nullcontext())
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                chunk = list(examples[s:s + batch_size])
                batch = collate_pairs(chunk, pad_id=pad_id).to(self.device)
                with ctx:
                    hidden = body(batch.input_ids, attention_mask=batch.attention_mask)
                b = len(chunk)
                for i, ex in enumerate(chunk):
                    mc, mr = batch.loss_mask[i], batch.loss_mask[b + i]
                    self.cache[(split, ex.index)] = (
                        hidden[i][mc].float(), batch.labels[i][mc],
                        hidden[b + i][mr].float(), batch.labels[b + i][mr])
                if progress:
                    progress(min(s + batch_size, len(examples)))
        if store is not None:
            self._save(store, examples, split)

    def _save(self, path: Path, examples: Sequence, split: str) -> None:
        entries = [self.cache[(split, ex.index)] for ex in examples]
        hs = [e[0] for e in entries] + [e[2] for e in entries]
        ys = [e[1] for e in entries] + [e[3] for e in entries]
        offsets = torch.tensor([0] + [h.shape[0] for h in hs]).cumsum(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # unique per process (torchrun)
        save_file({"hidden": torch.cat(hs).cpu().contiguous(), "labels": torch.cat(ys).cpu(),
                   "offsets": offsets}, str(tmp))
        tmp.replace(path)

    def _load(self, path: Path, examples: Sequence, split: str) -> bool:
        try:
            t = load_file(str(path))
        except Exception:  # unreadable: recompute
            return False
        n, off = len(examples), t["offsets"].tolist()
        if len(off) != 2 * n + 1:
            return False
        h, y = t["hidden"].to(self.device), t["labels"].to(self.device)
        for i, ex in enumerate(examples):
            c, r = slice(off[i], off[i + 1]), slice(off[n + i], off[n + i + 1])
            self.cache[(split, ex.index)] = (h[c], y[c], h[r], y[r])
        return True

    def forward(self, examples: Sequence, *, split: str, head: Head | None = None) -> FlatLogps:
        """Log-probs under the current head, or under `head` (e.g. the reference head)."""
        entries = [self.cache[(split, ex.index)] for ex in examples]
        hs = [e[0] for e in entries] + [e[2] for e in entries]
        ys = [e[1] for e in entries] + [e[3] for e in entries]
        seg = torch.cat([torch.full((h.shape[0],), j, dtype=torch.long) for j, h in enumerate(hs)])
        tok = label_logps(torch.cat(hs), head if head is not None else self.head_fn(), torch.cat(ys),
                          chunk_size=self.chunk_size)
        return FlatLogps(tok, seg.to(self.device), len(examples), int(seg.numel()))
