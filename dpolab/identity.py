"""What makes a run the run it is: the starting weights, the token ids of each split and the
batch geometry. Recorded in every checkpoint's state.json and compared on `--resume`, so a
resumed run continues its own first half or refuses, naming what changed; the same facts,
with a hash of the config, are what torchrun ranks compare before their first collective
(`Distributed.agree`), together with which stores each rank holds (`warm_caches`).

A changed global batch is refused, not adapted: `--resume` keeps the run's config, so another
number of processes always means another global batch (batch_size x grad_accum x world).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPLIT_NAMES = {"train": "training data", "held_out": "held-out data"}


@dataclass(frozen=True)
class RunIdentity:
    model: str  # reference.hash_parameters of the starting weights (its first 16 hex digits)
    data: dict[str, dict[str, Any]]  # split -> {"hash": reference.hash_examples, "pairs": N}
    world: int  # processes (torchrun's WORLD_SIZE; 1 without torchrun)
    batch_size: int  # pairs per micro-batch per process
    grad_accum: int  # micro-batches per optimizer step

    @classmethod
    def of(cls, model_hash: str, tok: dict, *, world: int, train) -> "RunIdentity":
        """`tok`: split -> TokenizedPairs; `train`: the run's TrainConfig."""
        from dpolab.reference import hash_examples

        data = {split: {"hash": hash_examples(t.examples), "pairs": len(t.examples)}
                for split, t in tok.items()}
        return cls(model_hash, data, world, train.batch_size, train.grad_accum)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def record(self) -> dict[str, Any]:
        """What state.json keeps (the global batch spelled out for a reader)."""
        return {**asdict(self), "global_batch": self.global_batch}

    def facts(self, config: dict[str, Any]) -> dict[str, str]:
        """What every torchrun rank must hold alike, by name (the batch geometry is the
        config's, hashed with it)."""
        out = {"config": _digest(config), "model weights": self.model}
        out.update({SPLIT_NAMES.get(s, s): d["hash"] for s, d in self.data.items()})
        return out

    def changes(self, recorded: dict[str, Any]) -> list[str]:
        """What differs from an identity `recorded` in a checkpoint, one phrase each (empty
        when this is the same run)."""
        out = []
        if recorded.get("model") != self.model:
            out.append(f"the model's starting weights differ (hash {recorded.get('model')} "
                       f"when the run started, {self.model} now)")
        for split, now in self.data.items():
            then = (recorded.get("data") or {}).get(split) or {}
            if then.get("hash") != now["hash"]:
                out.append(f"the {SPLIT_NAMES.get(split, split)} differ ({then.get('pairs')} "
                           f"pairs with token-id hash {str(then.get('hash'))[:16]} when the run "
                           f"started, {now['pairs']} with {now['hash'][:16]} now)")
        if recorded.get("global_batch") != self.global_batch:
            out.append(f"the global batch differs ({_geometry(recorded)} when the run started, "
                       f"{_geometry(self.record())} now); resume it on "
                       f"{recorded.get('world')} process(es)")
        return out


def warm_caches(tok: dict, reference_keys: dict[str, str | None],
                states: dict[str, Path]) -> dict[str, bool]:
    """Which stores this process could read whole, per split: the reference log-probs under
    `reference_keys[split]` (None: the run has no reference) and the last_layer scope's
    cached body states at `states[split]` (read only if present)."""
    from dpolab.head_cache import stored_states
    from dpolab.reference import stored

    warm = {}
    for split, t in tok.items():
        if reference_keys[split] is not None:  # the checks the run's own reads make
            warm[f"reference {split}"] = stored(reference_keys[split], t.examples) is not None
        warm[f"states {split}"] = stored_states(states[split], t.examples) is not None
    return warm


def _geometry(r: dict[str, Any]) -> str:
    return (f"{r.get('global_batch')} = {r.get('world')} process(es) x {r.get('batch_size')} "
            f"pairs x {r.get('grad_accum')} micro-batch(es)")


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
