"""TR-DPO: the reference moves with the policy (Gorbatovski et al., "Learn Your Reference Model
for Real Good Alignment", arXiv 2404.09656; TRL's `sync_ref_model`, `ref_model_mixup_alpha`,
`ref_model_sync_steps`).

After every tau-th optimizer step (`loss.ref_sync: {every: tau, alpha: a}`) the reference
becomes, parameter by parameter over the trained ones (the others are equal in both),

    theta_ref <- a * theta + (1 - a) * theta_ref        (a = 1: a hard update, a copy)

and the stored reference log-probs of every pair of both splits are computed again under the
new weights, by the same `reference.reference_for` that made the first store, and stored under
the new weights' hash: blake2b of the starting weights' hash (the frozen parameters) and of
the reference's trained tensors (`weights_hash`). A later run, or a resume, finds them there.
No sync follows the last step: nothing trains against it.

How each scope holds the reference without a second model (`MovingReference`, made by the
scope: dpolab.scopes):
    last_layer, token_rows  the reference head (V, D) [and bias (V,)]; its store from the
                            cached body states (token_rows: only the trained rows move).
    full                    a copy of every trained parameter: the model's weights once more
                            in memory (4 bytes a parameter in float32). The reference forward
                            swaps the copies into the parameters (no arithmetic) and back.
    lora                    per LoRA target module the reference's merged weight
                            W_ref = W + its own running delta (at the start W + s B0 A0): the
                            target modules' weights once more. The reference forward switches
                            the adapters off and swaps W_ref into the base layers.

Checks. The step-0 check (dpolab.train.check_reference) compares the policy with the starting
reference's store only. A synced store is made by the same code as the first, written
checksummed and read back, on a resume or a later run, through the same checks of checksum and
layout (`reference.load`). After a hard update (a = 1) the policy *is* the new reference, so
the first `CHECKED` training pairs scored by the training forward must give the new store's
sums (`reference.disagree`): that catches a reference forward that does not compute what the
policy does. A soft update has no second forward to compare with at run time (the tests
compare one with a full-logits forward). In a checkpoint the reference tensors are kept as
`ref_sync.<name>` beside the trainable ones and state.json records the syncs and the hash of
those tensors; on resume the tensors read back must hash to it.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from dpolab import atomic, reference
from dpolab.errors import UserError
from dpolab.logps import Head

if TYPE_CHECKING:
    from dpolab.session import Session

Tensor = torch.Tensor
PREFIX = "ref_sync."  # the reference tensors' names in a checkpoint
CHECKED = 8  # training pairs re-scored by the policy after a hard update


@dataclass(frozen=True)
class MovingReference:
    """The reference's trained tensors, what the policy holds in their place, and the
    reference forward that reads them."""

    tensors: dict[str, Tensor]  # name -> the reference's value (a Parameter, no grad)
    policy: Callable[[], dict[str, Tensor]]  # name -> the policy's value now, same shapes
    forward: Callable  # (examples, *, split) -> FlatLogps under `tensors`
    rows: Tensor | None = None  # token_rows: only these rows of each tensor move

    def update(self, alpha: float) -> None:
        """theta_ref <- alpha * theta + (1 - alpha) * theta_ref, over `rows` where given."""
        with torch.no_grad():
            for name, now in self.policy().items():
                ref = self.tensors[name]
                if self.rows is None:
                    ref.copy_(now if alpha == 1.0 else alpha * now + (1 - alpha) * ref)
                else:
                    rows = self.rows.to(ref.device)
                    ref[rows] = (now[rows] if alpha == 1.0
                                 else alpha * now[rows] + (1 - alpha) * ref[rows])


def _kept(named: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.nn.Parameter(t.detach().clone(), requires_grad=False)
            for n, t in named.items()}


@contextmanager
def _swapped(pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Each (parameter, reference tensor) exchanges its storage, and back at the end: the
    model computes with the reference's weights, bit for bit, and no weight is copied."""
    for p, r in pairs:
        p.data, r.data = r.data, p.data
    try:
        yield
    finally:
        for p, r in pairs:
            p.data, r.data = r.data, p.data


def head_reference(states, named: dict[str, Tensor], head0: Head,
                   rows: Tensor | None) -> MovingReference:
    """last_layer, token_rows: `named` the trained head tensors (weight, [bias]); `states` the
    scope's CachedHeadForward, scored under the reference head (`head0`'s cap and scale)."""
    kept = _kept(named)
    weight = next(n for n, t in named.items() if t.dim() == 2)
    bias = next((n for n, t in named.items() if t.dim() == 1), None)

    def forward(examples, *, split=None):
        return states(examples, split=split, head=Head(
            kept[weight], kept[bias] if bias else None, head0.softcap, head0.scale))
    return MovingReference(kept, lambda: dict(named), forward, rows)


def swapped_reference(named: dict[str, Tensor], forward: Callable) -> MovingReference:
    """full: a copy of every trained parameter; `forward` the scope's own, run on the copies."""
    kept = _kept(named)
    pairs = [(named[n], kept[n]) for n in named]

    def ref_forward(examples, *, split=None):
        with torch.no_grad(), _swapped(pairs):
            return forward(examples, split=split)
    return MovingReference(kept, lambda: dict(named), ref_forward)


def lora_reference(peft_model, named: dict[str, Tensor], forward: Callable) -> MovingReference:
    """lora: per LoRA target module its merged reference weight W + delta_ref, started at
    W + s B A (the adapters' delta now); `forward` the scope's own, run with the adapters
    off and W_ref in the base layers. Only plain LoRA on linear layers is additive so: the
    other adapters (DoRA, IA3, LoHa, ...) are refused, as is any other trained tensor."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    adapter = peft_model.active_adapter
    layers = {n: m for n, m in peft_model.named_modules()
              if isinstance(m, LoraLinear) and adapter in m.lora_A}
    factors = {id(getattr(m, f"lora_{ab}")[adapter].weight) for m in layers.values() for ab in "AB"}
    why = ([f"{n} uses DoRA" for n, m in layers.items() if m.use_dora.get(adapter)]
           + [f"{n} trains outside them" for n, t in named.items() if id(t) not in factors]
           + ([] if layers else ["the model has none"]))
    if why:
        raise UserError(f"loss.ref_sync under train.scope=lora merges W + B A into the "
                        f"reference, which needs plain LoRA adapters on linear layers: {why[0]}")

    base = {f"{n}.weight": (m.get_base_layer().weight, m) for n, m in layers.items()}

    def merged() -> dict[str, Tensor]:  # the policy's W + s B A of each target module
        return {k: w + m.get_delta_weight(adapter) for k, (w, m) in base.items()}
    with torch.no_grad():  # kept in the base weights' dtype: swapped into their place
        kept = {k: torch.nn.Parameter(t.to(base[k][0].dtype), requires_grad=False)
                for k, t in merged().items()}
    pairs = [(w, kept[k]) for k, (w, _) in base.items()]

    def ref_forward(examples, *, split=None):
        with torch.no_grad(), peft_model.disable_adapter(), _swapped(pairs):
            return forward(examples, split=split)
    return MovingReference(kept, merged, ref_forward)


class NoRefSync:
    """A run whose reference stays where it started (the null object `RefSync.maybe` gives:
    no tensors to keep, nothing recorded, no step changes it), so the loop never asks."""

    def named(self) -> dict[str, Tensor]:
        return {}

    def record(self) -> dict | None:
        return None

    def resumed(self, found: tuple[Path, dict]) -> None:
        pass

    def after_step(self, step: int, total: int) -> dict:
        return {}


class RefSync:
    """The moving reference of one run: when it syncs, its stores, what checkpoints keep."""

    def __init__(self, s: Session, moving: MovingReference, *, every: int, alpha: float):
        self.s, self.moving, self.every, self.alpha = s, moving, every, alpha
        self.steps: list[int] = []  # the optimizer steps after which it synced
        self.hash = self.weights_hash()

    @classmethod
    def maybe(cls, s: Session) -> RefSync | NoRefSync:
        """The run's RefSync when `loss.ref_sync` is set (config.validate refused what cannot
        sync: no reference term, AuxDPO, fsdp2), else a NoRefSync."""
        rs = s.cfg.loss.ref_sync
        if not rs:
            return NoRefSync()
        if not s.reference_is_start and rs["alpha"] != 1:
            raise UserError("loss.ref_sync with alpha < 1 mixes the policy into the explicit "
                            "reference model's weights, which a run does not hold (only their "
                            "log-probs): use alpha: 1, or no explicit reference")
        return cls(s, s.scope.moving_reference(s.trainable_named()), every=int(rs["every"]),
                   alpha=float(rs["alpha"]))

    @property
    def count(self) -> int:
        return len(self.steps)

    def weights_hash(self) -> str:
        """The reference's part of its stores' keys: the starting weights' hash (identity,
        standing for the frozen parameters) with the digest of its trained tensors."""
        text = f"{self.s.identity.model}|{atomic.digest(self.moving.tensors)}"
        return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()

    def named(self) -> dict[str, Tensor]:
        """The reference tensors by the names a checkpoint keeps them under."""
        return {PREFIX + n: t for n, t in self.moving.tensors.items()}

    def record(self) -> dict:
        """What state.json keeps: the syncs so far and the hash of the tensors kept."""
        return {"syncs": self.count, "steps": list(self.steps), "every": self.every,
                "alpha": self.alpha, "hash": self.hash}

    def resumed(self, found: tuple[Path, dict]) -> None:
        """After the checkpoint `found` was restored (its reference tensors into `named()`):
        they must hash to what it recorded; then the stores of the reference they are."""
        path, state = found
        rec = state.get("reference") or {}
        got = self.weights_hash()
        if rec.get("hash") != got:
            raise UserError(f"{path}: the reference weights read back hash to {got}, the "
                            f"checkpoint recorded {rec.get('hash')}: it does not hold the "
                            f"reference it was saved with; delete it to resume from an "
                            f"earlier checkpoint")
        self.steps, self.hash = [int(x) for x in rec["steps"]], got
        if self.steps:
            self._restore()

    def after_step(self, step: int, total: int) -> dict:
        """After optimizer step `step` (1-based) of `total`: sync when it is due, and return
        the metrics line saying so ({} when no sync)."""
        if step % self.every or step >= total:
            return {}
        self.moving.update(self.alpha)
        self.steps.append(step)
        self.hash = self.weights_hash()
        self._restore()
        return {"step": step, "ref_sync/count": self.count}

    def _restore(self) -> None:
        """Each split's store under the current reference weights: read when stored (every
        rank agreeing, as they compute it together otherwise), else computed, data-parallel
        under torchrun like the first pass, and stored."""
        s = self.s
        for split, sp in s.splits.items():
            key = reference.store_key(self.hash, s.identity.data[split]["hash"])
            missing = s.dist.all_max(int(reference.stored(key, sp.examples) is None))
            ref = reference.reference_for(self.hash, self.moving.forward, sp.examples, s.cfg,
                                          s.dist, split, reuse=not missing)
            rc, rr = ref.sums()
            s.splits[split] = replace(sp, ref=ref, ref_chosen=rc, ref_rejected=rr)
        if self.alpha == 1.0:
            self._check_policy_is_reference()

    def _check_policy_is_reference(self) -> None:
        """After a hard update the training forward's log-probs of the first CHECKED training
        pairs must be the new store's (up to batching's rounding, `reference.disagree`)."""
        sp = self.s.splits["train"]
        n = min(CHECKED, len(sp.examples))
        with torch.no_grad():
            pc, pr = self.s.scope.forward(sp.examples[:n], split="train").sums()
        bad = (reference.disagree(pc.double().cpu(), sp.ref_chosen[:n])
               | reference.disagree(pr.double().cpu(), sp.ref_rejected[:n]))
        if bad.any():
            raise UserError(f"reference sync after step {self.steps[-1]}: the policy scores "
                            f"{int(bad.sum())} of {n} training pairs otherwise than the reference "
                            f"it was just copied into ({reference.store_path(_cache(), sp.ref.key)})")


def _cache() -> Path:
    from dpolab.models import dpolab_cache_dir

    return dpolab_cache_dir()
