"""The reference log-prob store: per-token log pi_ref of every completion, computed once.

DPO's reference is frozen, so its log-probs are a property of (model weights, token ids).
They are computed before training, saved as safetensors under a key made of a hash of the
weights and a hash of the tokenized data, and reused by any later run with the same pair;
training then needs no second model in memory.

Layout: the per-token log-probs of all chosen completions, concatenated in example order,
then of all rejected ones; `offsets` (2N+1,) delimits them (example i's chosen tokens are
tokens[offsets[i]:offsets[i+1]], its rejected ones tokens[offsets[N+i]:offsets[N+i+1]]).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from dpolab import atomic

Tensor = torch.Tensor


@dataclass(frozen=True)
class ReferenceLogps:
    tokens: Tensor  # (sum of completion lengths,) float32 per-token log pi_ref
    offsets: Tensor  # (2N + 1,) int64
    key: str

    @property
    def n(self) -> int:
        return (self.offsets.numel() - 1) // 2

    def sums(self) -> tuple[Tensor, Tensor]:
        """(chosen (N,), rejected (N,)) summed log-probs, float64 for exact accumulation."""
        cs = torch.cat([torch.zeros(1, dtype=torch.float64), self.tokens.double().cumsum(0)])
        seq = cs[self.offsets[1:]] - cs[self.offsets[:-1]]
        return seq[: self.n], seq[self.n:]

    def lengths(self) -> tuple[Tensor, Tensor]:
        n = self.offsets[1:] - self.offsets[:-1]
        return n[: self.n], n[self.n:]

    def per_token(self, i: int, rejected: bool = False) -> Tensor:
        j = i + self.n if rejected else i
        return self.tokens[self.offsets[j]:self.offsets[j + 1]]


def hash_parameters(model: torch.nn.Module) -> str:
    """blake2b over parameter and buffer names, dtypes, shapes and bytes (order-stable). The
    bytes are read in place through a memoryview (a copy only of a tensor that is not
    contiguous or not on the CPU), so a 7B model's key needs no second 7B in memory."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def hash_examples(examples: Iterable) -> str:
    """Hash of the token ids of every (prompt, chosen, rejected) in order, and of their
    scored-token masks where a pair has them (multi-turn rows): the stored log-probs cover
    scored tokens only.  Pairs without masks hash as before, so existing stores stay valid."""
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        item = [ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]
        masks = [getattr(ex, "chosen_mask", None), getattr(ex, "rejected_mask", None)]
        if masks != [None, None]:
            item.append(masks)
        h.update(json.dumps(item).encode())
    return h.hexdigest()


def store_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "reference" / f"{key}.safetensors"


def compute(logps_fn: Callable[[Sequence], tuple[list[Tensor], list[Tensor]]],
            examples: Sequence, *, batch_size: int, key: str,
            progress: Callable[[int], None] | None = None) -> ReferenceLogps:
    """Run `logps_fn` (a batch of examples -> per-example chosen and rejected per-token
    log-prob tensors) over all examples, without gradients."""
    chosen: list[Tensor] = []
    rejected: list[Tensor] = []
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            c, r = logps_fn(examples[s:s + batch_size])
            chosen.extend(t.float().cpu() for t in c)
            rejected.extend(t.float().cpu() for t in r)
            if progress:
                progress(min(s + batch_size, len(examples)))
    return assemble(chosen, rejected, key)


def assemble(chosen: Sequence[Tensor], rejected: Sequence[Tensor], key: str) -> ReferenceLogps:
    """The store of per-example per-token log-probs (chosen list, rejected list, in example
    order), in the layout above."""
    seqs = [t.float().cpu() for t in chosen] + [t.float().cpu() for t in rejected]
    lengths = torch.tensor([0] + [t.numel() for t in seqs], dtype=torch.int64)
    return ReferenceLogps(torch.cat(seqs) if seqs else torch.zeros(0), lengths.cumsum(0), key)


def save(ref: ReferenceLogps, path: Path) -> None:
    """Atomic: write a temp file in the same folder, then rename."""
    atomic.save_tensors({"tokens": ref.tokens.contiguous(), "offsets": ref.offsets.contiguous()},
                        path, metadata={"key": ref.key})


def load(path: Path, key: str) -> ReferenceLogps | None:
    """The stored reference for `key`, or None when absent or unreadable (then recompute)."""
    t = atomic.read_tensors(path)
    return None if t is None else ReferenceLogps(t["tokens"], t["offsets"], key)


def store_key(model_hash: str, examples_hash: str) -> str:
    """The store's key: the weights' hash and the token ids' hash (`hash_examples`)."""
    return f"{model_hash}-{examples_hash[:16]}"


def stored(key: str, n: int) -> ReferenceLogps | None:
    """The stored reference under `key` when it is there whole (n pairs), else None."""
    from dpolab.models import dpolab_cache_dir

    ref = load(store_path(dpolab_cache_dir(), key), key)
    return ref if ref is not None and ref.n == n else None


def reference_for(model_hash: str, forward, examples: list, cfg,
                  dist, split: str, *, collective: bool = False,
                  reuse: bool = True) -> ReferenceLogps:
    """Load the stored reference for (weights, token ids), or compute and store it under
    $DPOLAB_CACHE/reference. `dist`: the run's dpolab.distributed.Distributed.
    `forward(examples, split=split)` -> FlatLogps of the policy at its reference point.

    Data-parallel under torchrun: each rank scores a share of the batches and every rank
    assembles the whole store and keeps its own copy (one writer per machine), so no
    filesystem need be shared. The batches and the key do not depend on the world size: a
    run on any number of processes reuses the store. `collective`: every rank runs as many
    forwards (sharded layers gather their weights in each)."""
    from dpolab.models import dpolab_cache_dir
    from dpolab.progress import Progress

    key = store_key(model_hash, hash_examples(examples))
    path = store_path(dpolab_cache_dir(), key)
    ref = stored(key, len(examples)) if reuse else None
    if ref is not None:
        return ref
    bs = cfg.train.eval_batch_size
    batches = [examples[s:s + bs] for s in range(0, len(examples), bs)]
    bar = Progress(len(examples), f"reference ({split})",
                   enabled=cfg.train.progress and dist.is_main)
    with torch.no_grad():
        parts = dist.map_batches(lambda i: forward(batches[i], split=split).split(), len(batches),
                                 same_count=collective,
                                 progress=lambda done: bar.update(min(len(examples), done * bs)))
    bar.close()
    ref = assemble([c for p in parts for c in p[0]], [r for p in parts for r in p[1]],
                             key)
    if dist.local_main:
        save(ref, path)
    return ref
