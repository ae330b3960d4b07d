"""The reference log-prob store: per-token log pi_ref of every completion, computed once.

DPO's reference is frozen, so its log-probs are a property of (model weights, token ids).
They are computed before training, saved as safetensors under a key made of a hash of the
weights and a hash of the tokenized data, and reused by any later run with the same pair;
training then needs no second model in memory.

Layout: the per-token log-probs of all chosen completions, concatenated in example order,
then of all rejected ones; `offsets` (2N+1,) delimits them (example i's chosen tokens are
tokens[offsets[i]:offsets[i+1]], its rejected ones tokens[offsets[N+i]:offsets[N+i+1]]).
The last_layer scope's cached body states (dpolab.head_cache.CachedHeadForward) use the same
layout. Each entry's length is known from the token ids the key names (`scored_lengths`), so
a file is read back only when its checksum (dpolab.atomic.read_tensors), its offsets and its
values all check out (`layout_problem`); otherwise it is computed again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from dpolab import atomic
from dpolab.errors import UserError

Tensor = torch.Tensor
KIND = "reference"  # the kind of file a store is (dpolab.atomic.save_tensors)


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

    def per_token(self, i: int, rejected: bool = False) -> Tensor:
        j = i + self.n if rejected else i
        return self.tokens[self.offsets[j]:self.offsets[j + 1]]


def hash_parameters(model: torch.nn.Module) -> str:
    """blake2b over parameter and buffer names, dtypes, shapes and bytes (order-stable)."""
    return atomic.digest(model.state_dict())


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


def scored_lengths(examples: Sequence) -> Tensor:
    """(2N,) int64: the scored-token count of every chosen completion, then of every rejected
    one: the length of each entry of a store of `examples`."""
    def n(ids, mask) -> int:
        return len(ids) if mask is None else sum(mask)
    return torch.tensor([n(e.chosen_ids, getattr(e, "chosen_mask", None)) for e in examples]
                        + [n(e.rejected_ids, getattr(e, "rejected_mask", None)) for e in examples],
                        dtype=torch.int64)


def layout_problem(offsets: Tensor, lengths: Tensor, values: Tensor) -> str | None:
    """What is wrong with a file of this layout, or None: `offsets` must be (2N+1,) int64
    from 0 with entry j holding lengths[j] (2N,) tokens, ending at the first dimension of
    `values`, and every value finite."""
    n = lengths.numel() // 2
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (2 * n + 1,):
        return (f"its offsets are {offsets.dtype} {tuple(offsets.shape)}, not int64 "
                f"({2 * n + 1},) for {n} pairs")
    if int(offsets[0]) != 0 or int(offsets[-1]) != values.shape[0]:
        return (f"its offsets run from {int(offsets[0])} to {int(offsets[-1])}, its values "
                f"number {values.shape[0]}")
    wrong = (offsets.diff() != lengths).nonzero()
    if wrong.numel():
        j = int(wrong[0])
        which = f"pair {j}'s chosen" if j < n else f"pair {j - n}'s rejected"
        return (f"{which} entry has {int(offsets[j + 1] - offsets[j])} tokens, its completion "
                f"{int(lengths[j])} scored ones")
    if not torch.isfinite(values).all():
        return "it holds values that are not finite"
    return None


def assemble(chosen: Sequence[Tensor], rejected: Sequence[Tensor], key: str) -> ReferenceLogps:
    """The store of per-example per-token log-probs (chosen list, rejected list, in example
    order), in the layout above."""
    seqs = [t.float().cpu() for t in chosen] + [t.float().cpu() for t in rejected]
    lengths = torch.tensor([0] + [t.numel() for t in seqs], dtype=torch.int64)
    return ReferenceLogps(torch.cat(seqs) if seqs else torch.zeros(0), lengths.cumsum(0), key)


def save(ref: ReferenceLogps, path: Path) -> None:
    """Atomic: write a temp file in the same folder, then rename; checksummed."""
    atomic.save_tensors({"tokens": ref.tokens.contiguous(), "offsets": ref.offsets.contiguous()},
                        path, kind=KIND, metadata={"key": ref.key})


def load(path: Path, key: str, examples: Sequence) -> ReferenceLogps | None:
    """The stored reference of `examples` under `key`, or None when absent, or damaged,
    foreign or not of their layout (said in one line; then recompute)."""
    t = atomic.read_tensors(path, kind=KIND)
    if t is None:
        return None
    if set(t) != {"tokens", "offsets"} or t["tokens"].dtype != torch.float32:
        return atomic.miss(path, f"holds {', '.join(sorted(t))}, not float32 tokens and offsets")
    problem = layout_problem(t["offsets"], scored_lengths(examples), t["tokens"])
    if problem:
        return atomic.miss(path, problem)
    return ReferenceLogps(t["tokens"], t["offsets"], key)


def store_bytes(examples: Sequence, per_token: int = 4) -> int:
    """About the size of a file of this layout for `examples` holding `per_token` bytes per
    scored token (4: a float32 log-prob), its offsets and a header."""
    tokens = int(scored_lengths(examples).sum())
    return tokens * per_token + 8 * (2 * len(examples) + 1) + 4096


def disagree(policy: Tensor, ref: Tensor) -> Tensor:
    """Which summed log-probs of the policy at its reference point differ from the stored
    reference's (bool, same shape). Usually they are bitwise equal, but the batches need not
    be: the reference pass and the evaluation run train.eval_batch_size pairs at once, the
    training step its micro-batches, and padding to another length changes float32 sums of
    ~100 terms in their last bits (~1e-5 nats). 1e-3 + 1e-5 |ref| nats leaves that room: a
    difference beyond it is no rounding."""
    policy, ref = policy.double(), ref.double()
    return (policy - ref).abs() > 1e-3 + 1e-5 * ref.abs()


def check_at_reference(split: str, examples: Sequence, policy: tuple[Tensor, Tensor],
                       ref: ReferenceLogps, *, store: Path, states: Path | None = None,
                       rescore: Callable[[list], tuple[Tensor, Tensor]] | None = None) -> None:
    """Before any update the policy is its reference: the summed log-probs `policy` (chosen
    (N,), rejected (N,)) of every pair of `split` must equal the stored reference's. Where
    some do not, a UserError names the file at fault: the store, or, for a policy that reads
    cached body states (`states`), those states when the first disagreeing pairs scored
    through the body again (`rescore`: examples -> (chosen, rejected) sums) disagree with
    them (and the store too when they disagree with it)."""
    rc, rr = ref.sums()
    pc, pr = policy[0].double(), policy[1].double()
    bad = (disagree(pc, rc) | disagree(pr, rr)).nonzero().flatten().tolist()
    if not bad:
        return
    gap = float(torch.maximum((pc - rc).abs(), (pr - rr).abs())[bad].max())
    at_fault = {"the stored reference log-probs": store}
    if states is not None and rescore is not None:
        few = bad[:8]
        fc, fr = rescore([examples[i] for i in few])
        states_bad = bool((disagree(fc, pc[few]) | disagree(fr, pr[few])).any())
        if states_bad:
            at_fault = {"the cached body states": states,
                        **(at_fault if (disagree(fc, rc[few]) | disagree(fr, rr[few])).any()
                           else {})}
    first = examples[bad[0]]
    raise UserError(
        f"step-0 check failed: {len(bad)} of {len(examples)} {split} pairs score differently "
        f"with the policy at its reference than the stored reference says (first "
        f"{first.source}:{first.row}, by {gap:.3g} nats): {' and '.join(at_fault)} "
        f"({', '.join(map(str, at_fault.values()))}) are not what this model computes; delete "
        f"{'that file' if len(at_fault) == 1 else 'those files'} and run again to compute "
        f"{'it' if len(at_fault) == 1 else 'them'} anew")


def store_key(model_hash: str, examples_hash: str) -> str:
    """The store's key: the weights' hash and the token ids' hash (`hash_examples`)."""
    return f"{model_hash}-{examples_hash[:16]}"


def stored(key: str, examples: Sequence) -> ReferenceLogps | None:
    """The stored reference of `examples` under `key` when it reads back whole and checked
    (`load`), else None."""
    from dpolab.models import dpolab_cache_dir

    return load(store_path(dpolab_cache_dir(), key), key, examples)


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
    from dpolab import cachedir
    from dpolab.models import dpolab_cache_dir
    from dpolab.progress import Progress

    key = store_key(model_hash, hash_examples(examples))
    path = store_path(dpolab_cache_dir(), key)
    ref = stored(key, examples) if reuse else None
    if ref is not None:
        return ref
    cachedir.require(path, store_bytes(examples), "the reference log-probs")  # every rank alike
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
