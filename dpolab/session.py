"""The training session: what the loop works with, assembled once by `build`.

`build` follows the data path of the design: rows -> token ids -> reference log-probs
(computed once with the untouched model, stored, reused) -> the trainable scope. The session
then answers the loop's questions per micro-batch (`pair_logps`, `group_weights`), evaluates
(`evaluate`) and exports with the DID probe (`export_and_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpolab import reference, rundir
from dpolab.config import RunConfig
from dpolab.diagnostics import PairStats, group_summaries, summarize, unflippable
from dpolab.distributed import Distributed, Engine
from dpolab.errors import UserError
from dpolab.losses import PairLogps
from dpolab.models import dpolab_cache_dir as cache_dir  # $DPOLAB_CACHE or ~/.cache/dpolab
from dpolab.progress import Progress
from dpolab.scopes import Scope

Tensor = torch.Tensor


@dataclass(frozen=True)
class Split:
    """One split ("train" or "held_out") of the data, tokenized, with its stored reference."""

    examples: list  # PairExample, index = position
    ref: reference.ReferenceLogps
    ref_chosen: Tensor  # (N,) float64 summed reference log-probs, CPU
    ref_rejected: Tensor
    weights: Tensor  # (N,) float32 data.group_weights of each pair's group
    group_ids: np.ndarray  # (N,) int, index into Session.groups (-1: no group)
    no_cue: np.ndarray  # (N,) bool, pairs without a surface cue (rho_data.surface_cue)


@dataclass
class Session:
    cfg: RunConfig
    run_dir: Path
    dist: Distributed
    model: torch.nn.Module  # the loaded model (the base model under LoRA's adapters)
    tokenizer: Any
    scope: Scope
    splits: dict[str, Split]
    groups: list[str]  # sorted group names of both splits
    engine: Engine  # the scope's forward as the trained module (DDP / FSDP2 under torchrun)
    tokens_processed: int = 0  # tokens through the model in pair_logps, for throughput

    @property
    def train(self) -> list:
        return self.splits["train"].examples

    @property
    def held_out(self) -> list:
        return self.splits["held_out"].examples

    @property
    def params(self) -> list[Tensor]:
        return list(self.scope.params)

    def pair_logps(self, split: str, idx: Sequence[int]) -> PairLogps:
        """Policy and stored reference log-probs (summed, float64) and completion token
        counts of the pairs at positions `idx` of `split`; differentiable in the policy's."""
        flat = self.engine([self.splits[split].examples[i] for i in idx], split=split)
        self.tokens_processed += flat.n_processed
        pc, pr = flat.sums()
        nc, nr = flat.counts()
        i = torch.as_tensor(list(idx), dtype=torch.long)
        sp, dev = self.splits[split], self.dist.device
        return PairLogps(pc, pr, sp.ref_chosen[i].to(dev), sp.ref_rejected[i].to(dev), nc, nr)

    def group_weights(self, split: str, idx: Sequence[int]) -> Tensor:
        return self.splits[split].weights[torch.as_tensor(list(idx), dtype=torch.long)].to(
            self.dist.device)

    def trainable_named(self, aux=None) -> dict[str, Tensor]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if aux is not None:
            named["auxdpo.delta"] = aux.delta
        return named

    def pair_stats(self, split: str) -> PairStats:
        """Policy vs reference on every pair of `split` ("train" or "held_out"), no grad."""
        sp = self.splits[split]
        bs = self.cfg.train.eval_batch_size
        pcs, prs = [], []
        with torch.no_grad():
            for s in range(0, len(sp.examples), bs):
                pc, pr = self.engine(sp.examples[s:s + bs], split=split).sums()
                pcs.append(pc.double().cpu())
                prs.append(pr.double().cpu())
        nc, nr = sp.ref.lengths()
        return PairStats(torch.cat(pcs).numpy(), torch.cat(prs).numpy(), sp.ref_chosen.numpy(),
                         sp.ref_rejected.numpy(), nc.numpy(), nr.numpy(), beta=self.cfg.loss.beta)

    def evaluate(self, *, step: int) -> dict[str, float]:
        """Held-out metrics as `eval/...` (plus per-group ones), and per-group train accuracy."""
        row: dict[str, float] = {"step": step}
        for split, prefix in (("held_out", "eval/"), ("train", "train_eval/")):
            sp = self.splits[split]
            if not sp.examples:
                continue
            stats = self.pair_stats(split)
            row.update({prefix + k: v for k, v in summarize(stats).items()})
            flags = unflippable(stats.ref_chosen, stats.ref_rejected, beta=stats.beta)
            row[prefix + "unflippable/fraction"] = float(flags.mean())
            if flags.any():  # did training flip the model's own preference on them anyway?
                pref = stats.policy_chosen[flags] > stats.policy_rejected[flags]
                row[prefix + "unflippable/flipped_fraction"] = float(pref.mean())
            row.update({prefix + k: v for k, v in group_summaries(
                stats, sp.group_ids, self.groups, {"no_cue": sp.no_cue}).items()})
        return row

    def export_and_probe(self, out: Path) -> dict[str, float]:
        """Export the policy to `out`, and measure its DID entropy against its reference on
        held-out prompts by sampling (see dpolab.did_probe): `eval/did/...` metrics. These
        are the policy's last uses, ordered so that memory never holds two models: the policy
        samples and scores, then, where the reference takes the policy's place (the full
        scope), the policy is exported before the reference is loaded; otherwise the
        reference scores first (exporting merged LoRA adapters removes them, and with them
        the reference). Collective: every rank calls it."""
        from dpolab.did_probe import did_summary, score_samples

        tc = self.cfg.train
        if tc.did_samples <= 0 or not self.held_out:
            self.export(out)
            return {}
        seen, prompts = set(), []
        for ex in self.held_out:
            if tuple(ex.prompt_ids) not in seen and len(prompts) < tc.did_prompts:
                seen.add(tuple(ex.prompt_ids))
                prompts.append(ex)
        with self.engine.gathered():
            policy, make_reference = self.scope.text_forwards(
                pad_id=self.tokenizer.pad_token_id, chunk_size=tc.logps_chunk,
                device=self.dist.device)
            batches, logp = score_samples(
                self.scope.model, prompts, policy_logps=lambda b: policy(b).sums()[0],
                k=tc.did_samples, max_new_tokens=tc.did_max_new_tokens,
                eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                seed=tc.seed, device=self.dist.device)
        if self.scope.reference_replaces_policy:
            self.export(out)
        ref = make_reference()  # outside gathered(): sharded weights are loaded as shards
        with self.engine.gathered(), torch.no_grad():
            logr = torch.stack([ref(b).sums()[0].double().cpu() for b in batches])
        if not self.scope.reference_replaces_policy:
            self.export(out)
        return {f"eval/{k}": v for k, v in did_summary(logp, logr).items()}

    def export(self, out: Path) -> None:
        """Collective: every rank calls it (sharded weights are gathered), rank 0 writes."""
        from dpolab import sharding
        from dpolab.checkpoint import export_model

        if self.engine.sharded:
            for m in self.engine.wrapped.modules():  # the sharded layout: state_dict gathers it
                if hasattr(m, "reshard"):
                    m.reshard()
            state = {k: sharding.full(v).detach().clone()
                     for k, v in self.model.state_dict().items()}
            if self.dist.is_main:
                sharding.save_full_state(state, self.model.config, self.tokenizer, out)
            return
        if self.dist.is_main:
            export_model(self.scope.model, self.tokenizer, out,
                         merge_lora=self.cfg.train.export_merged)


def build(cfg: RunConfig, run_dir: Path, dist: Distributed) -> Session:
    from dpolab import scopes
    from dpolab.models import load_configured, load_tokenizer
    from dpolab.tokenize import tokenize_rows

    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    device = dist.device
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    model = load_configured(cfg.model, device=device)  # eval mode: dropout off, as TRL's default

    rows = dict(zip(("train", "held_out"), load_split_rows(cfg)))
    tok = {split: tokenize_rows(r, tokenizer, max_length=cfg.data.max_length,
                                max_prompt_length=cfg.data.max_prompt_length,
                                truncation=cfg.data.truncation,
                                chat_template_kwargs=cfg.data.chat_template_kwargs)
           for split, r in rows.items()}
    if not tok["train"].examples:
        raise UserError("no training pairs left after tokenization "
                        f"({tok['train'].dropped_identical} made identical by truncation)")
    groups = sorted({g for t in tok.values() for g in t.groups})
    w = cfg.data.group_weights
    unknown = sorted(set(w) - set(groups))
    if unknown:
        raise UserError(f"config data.group_weights: unknown group(s) {', '.join(unknown)}; "
                        f"groups in the data: {', '.join(groups) or '(none)'}")
    model_hash = reference.hash_parameters(model)[:16]  # before the scope changes anything
    scope = scopes.apply(
        cfg, model, tok, pad_id=tokenizer.pad_token_id, device=device,
        autocast=device.type == "cuda" and tc.bf16_autocast, dist=dist,
        state_store=lambda split, ex: cache_dir() / "states" / (
            f"{model_hash}-{reference.hash_examples(ex)[:16]}.safetensors"))
    # Under torchrun the scope's forward trains as DDP's or FSDP2's module. FSDP2 replaces
    # the parameters by sharded ones: the scope's list is read again.
    engine = dist.engine(scope.model, scope.forward, sharded=tc.distributed == "fsdp2")
    if engine.sharded:
        scope = replace(scope, params=tuple(p for p in scope.model.parameters()
                                            if p.requires_grad))
    # The reference is the policy before its first update (scope.reference): for last_layer
    # the cached body states under the original head, otherwise the scope's own forward,
    # which under FSDP2 (full scope only) must run as the engine's forward.
    ref_forward = engine if engine.sharded else scope.reference
    refs = {split: reference_for(model_hash, ref_forward, t.examples, cfg, dist, split,
                                 collective=engine.sharded)
            for split, t in tok.items()}
    gindex = {g: i for i, g in enumerate(groups)}
    splits = {}
    for split, t in tok.items():
        rc, rr = refs[split].sums()
        splits[split] = Split(
            t.examples, refs[split], rc, rr,
            weights=torch.tensor([float(w.get(e.group, 1.0)) for e in t.examples]),
            group_ids=np.array([gindex.get(e.group, -1) for e in t.examples]),
            no_cue=np.array([not rows[split][e.index].meta.get("surface_cue", False)
                             for e in t.examples]))
    if dist.is_main:
        rundir.write_data_report(run_dir, tok)
        _report_unflippable(cfg, run_dir, splits, groups)
    return Session(cfg, run_dir, dist, model, tokenizer, scope, splits, groups, engine)


def _report_unflippable(cfg: RunConfig, run_dir: Path, splits: dict[str, Split],
                        groups: list[str]) -> None:
    """List, before training, the pairs too strongly dispreferred by the reference for DPO to
    flip (unflippable.json), and say how many."""
    out = rundir.write_unflippable(
        run_dir, {k: (sp.examples, sp.ref_chosen, sp.ref_rejected) for k, sp in splits.items()},
        groups, beta=cfg.loss.beta)
    if cfg.train.progress:
        print(f"unflippable at beta={cfg.loss.beta}: {out['train']['count']} of "
              f"{out['train']['pairs']} training pairs, {out['held_out']['count']} of "
              f"{out['held_out']['pairs']} held-out (listed in {run_dir / 'unflippable.json'})")


def reference_for(model_hash: str, forward, examples: list, cfg: RunConfig,
                  dist: Distributed, split: str, *, collective: bool = False
                  ) -> reference.ReferenceLogps:
    """Load the stored reference for (weights, token ids), or compute and store it.
    `forward(examples, split=split)` -> FlatLogps of the policy at its reference point.

    Data-parallel under torchrun: each rank scores a share of the batches and every rank
    assembles the whole store and keeps its own copy (one writer per machine), so no
    filesystem need be shared. The batches and the key do not depend on the world size: a
    run on any number of processes reuses the store. `collective`: every rank runs as many
    forwards (sharded layers gather their weights in each)."""
    key = f"{model_hash}-{reference.hash_examples(examples)[:16]}"
    path = reference.store_path(cache_dir(), key)
    ref = reference.load(path, key)
    if ref is not None and ref.n == len(examples):
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
    ref = reference.assemble([c for p in parts for c in p[0]], [r for p in parts for r in p[1]],
                             key)
    if dist.local_main:
        reference.save(ref, path)
    return ref


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
    _report_skipped(rows, d.path)
    if d.eval_path:
        held = load_rows(d.eval_path, skip_invalid=d.skip_invalid)
        _report_skipped(held, d.eval_path)
        return list(rows.rows), list(held.rows)
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(rows.rows), generator=g).tolist()
    n_eval = max(1, int(round(d.eval_fraction * len(order)))) if len(order) > 1 else 0
    held_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows.rows) if i not in held_idx]
    held = [r for i, r in enumerate(rows.rows) if i in held_idx]
    return train, held


def _report_skipped(loaded, path: str) -> None:
    if loaded.skipped:
        print(f"{path}: skipped {len(loaded.skipped)} invalid row(s); first: {loaded.skipped[0]}")
