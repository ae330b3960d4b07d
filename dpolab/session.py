"""The training session: what the loop works with, assembled once by `build`.

`build` follows the data path of the design: rows -> token ids -> reference log-probs
(computed once with the untouched model, stored, reused) -> the trainable scope. The session
then answers the loop's questions per micro-batch (`pair_logps`, `group_weights`), evaluates
(`evaluate`) and exports with the DID probe (`export_and_probe`).

A run whose loss terms all read no reference (sft, simpo, cpo, orpo; the registry's
`needs_reference`) has none: no reference pass, no stored file, `PairLogps.ref_*` None. Its
evaluation reports the policy's own preference in place of the reward against a reference
(see :func:`dpolab.diagnostics.reference_free_stats`) and leaves the metrics that compare
with a reference out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dpolab import cachedir, datachecks, forward_check, moe, reference, rundir
from dpolab import splits as splits_mod
from dpolab.config import RunConfig
from dpolab.config import to_dict as config_dict
from dpolab.diagnostics import (PairStats, group_summaries, reference_free_stats, summarize,
                                unflippable, without_reference_metrics)
from dpolab.distributed import Distributed, Engine
from dpolab.errors import UserError
from dpolab.identity import RunIdentity, warm_caches
from dpolab.inputs import Inputs, Theta0
from dpolab.losses import Objective, PairLogps, ld_sequence_logps, logps_reduction
from dpolab.models import dpolab_cache_dir as cache_dir  # $DPOLAB_CACHE or ~/.cache/dpolab
from dpolab.policy import body_autocast, padded
from dpolab.scopes import Scope

Tensor = torch.Tensor


@dataclass(frozen=True)
class Split:
    """One split ("train" or "held_out") of the data, tokenized, with its stored reference
    (None in a run whose loss needs no reference)."""

    examples: list  # PairExample, index = position
    ref: reference.ReferenceLogps | None
    ref_chosen: Tensor | None  # (N,) float64 summed reference log-probs, CPU
    ref_rejected: Tensor | None
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
    identity: RunIdentity  # starting weights, token ids, batch geometry: in every checkpoint
    theta0: Theta0 | None = None  # a model from memory: its starting weights, kept on the CPU
    router: moe.RouterLoss | None = None  # MoE load balancing trained with the scope, or None
    tokens_processed: int = 0  # tokens through the model in pair_logps, for throughput
    # split -> the policy's log-probs, scored once and reused while the policy is known to be
    # unchanged (a sweep's heads at theta0: dpolab.stacked_heads); None: always scored
    unchanged_logps: dict | None = None

    @cached_property
    def needs_reference(self) -> bool:
        return needs_reference(self.cfg)

    @cached_property
    def reward_average(self) -> bool:
        """Reference-free runs: whether the implicit reward reads per-token mean log-probs."""
        return reward_average(self.cfg)

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
        counts of the pairs at positions `idx` of `split`; differentiable in the policy's.
        The reference ones are None in a reference-free run. With loss.ld_alpha < 1 both
        are LD-DPO's sums (:func:`dpolab.losses.ld_sequence_logps`), as in TRL."""
        flat = self.engine([self.splits[split].examples[i] for i in idx], split=split)
        self.tokens_processed += flat.n_processed
        nc, nr = flat.counts()
        sp, dev, alpha = self.splits[split], self.dist.device, self.cfg.loss.ld_alpha
        if alpha == 1.0:
            pc, pr = flat.sums()
        else:
            tok, mask = padded(flat.tokens.double(), flat.seg, 2 * flat.n_pairs)
            b = flat.n_pairs
            pc, pr = ld_sequence_logps(tok[:b], mask[:b], tok[b:], mask[b:], alpha=alpha)
        if sp.ref is None:
            return PairLogps(pc, pr, None, None, nc, nr, router_loss=flat.aux_loss)
        if alpha == 1.0:
            i = torch.as_tensor(list(idx), dtype=torch.long)
            rc, rr = sp.ref_chosen[i], sp.ref_rejected[i]
        else:
            seqs = ([sp.ref.per_token(j) for j in idx]
                    + [sp.ref.per_token(j, rejected=True) for j in idx])
            seg = torch.cat([torch.full((t.numel(),), k, dtype=torch.long)
                             for k, t in enumerate(seqs)])
            tok, mask = padded(torch.cat(seqs).double(), seg, len(seqs))
            b = len(idx)
            rc, rr = ld_sequence_logps(tok[:b], mask[:b], tok[b:], mask[b:], alpha=alpha)
        return PairLogps(pc, pr, rc.to(dev), rr.to(dev), nc, nr, router_loss=flat.aux_loss)

    def group_weights(self, split: str, idx: Sequence[int]) -> Tensor:
        return self.splits[split].weights[torch.as_tensor(list(idx), dtype=torch.long)].to(
            self.dist.device)

    def trainable_named(self, aux=None) -> dict[str, Tensor]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if aux is not None:
            named["auxdpo.delta"] = aux.delta
        return named

    def pair_stats(self, split: str) -> PairStats:
        """Policy vs reference on every pair of `split` ("train" or "held_out"), no grad;
        in a reference-free run the policy's own preference (`reference_free_stats`)."""
        sp = self.splits[split]
        memo = self.unchanged_logps
        if memo is not None and split in memo:
            pc, pr, nc, nr = memo[split]
        else:
            pc, pr, nc, nr = self._policy_logps(split)
            if memo is not None:
                memo[split] = (pc, pr, nc, nr)
        if sp.ref is None:
            return reference_free_stats(pc, pr, nc, nr, beta=self.cfg.loss.beta,
                                        average=self.reward_average)
        return PairStats(pc, pr, sp.ref_chosen.numpy(), sp.ref_rejected.numpy(), nc, nr,
                         beta=self.cfg.loss.beta)

    def _policy_logps(self, split: str) -> tuple[np.ndarray, ...]:
        """(N,) summed log pi(y_w), log pi(y_l) (float64) and completion token counts."""
        sp, bs = self.splits[split], self.cfg.train.eval_batch_size
        pcs, prs, ncs, nrs = [], [], [], []
        with torch.no_grad():
            for s in range(0, len(sp.examples), bs):
                flat = self.engine(sp.examples[s:s + bs], split=split)
                pc, pr = flat.sums()
                nc, nr = flat.counts()
                pcs.append(pc.double().cpu())
                prs.append(pr.double().cpu())
                ncs.append(nc.cpu())
                nrs.append(nr.cpu())
        return (torch.cat(pcs).numpy(), torch.cat(prs).numpy(), torch.cat(ncs).numpy(),
                torch.cat(nrs).numpy())

    def evaluate(self, *, step: int, train_split: bool = True,
                 check: Callable[[str, PairStats], None] | None = None) -> dict[str, float]:
        """Held-out metrics as `eval/...` (plus per-group ones), and with `train_split` the
        same of the training pairs as `train_eval/...` (they are usually the larger split).
        `check(split, stats)` sees each split's statistics (the step-0 check of every pair)."""
        row: dict[str, float] = {"step": step}
        for split, prefix in (("held_out", "eval/"), ("train", "train_eval/")):
            sp = self.splits[split]
            if split == "train" and not train_split:
                continue
            if not sp.examples:
                continue
            stats = self.pair_stats(split)
            if check is not None:
                check(split, stats)
            if sp.ref is None:  # the policy's own preference; nothing to compare with
                row.update({prefix + k: v for k, v in
                            without_reference_metrics(summarize(stats)).items()})
            else:
                row.update({prefix + k: v for k, v in summarize(stats).items()})
                flags = unflippable(stats.ref_chosen, stats.ref_rejected, beta=stats.beta)
                row[prefix + "unflippable/fraction"] = float(flags.mean())
                if flags.any():  # did training flip the model's own preference on them anyway?
                    pref = stats.policy_chosen[flags] > stats.policy_rejected[flags]
                    row[prefix + "unflippable/flipped_fraction"] = float(pref.mean())
            per_group = group_summaries(stats, sp.group_ids, self.groups, {"no_cue": sp.no_cue})
            if sp.ref is None:  # no reference: no displacement per group either
                per_group = without_reference_metrics(per_group)
            row.update({prefix + k: v for k, v in per_group.items()})
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
        if tc.did_samples <= 0 or not self.held_out or not self.needs_reference:
            self.export(out)  # DID is measured against the reference: none without one
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
        if self.scope.reference_replaces_policy and self.theta0 is not None:
            self.theta0.exchange(self.model)  # the caller's model ends trained, as exported
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


def build(cfg: RunConfig, run_dir: Path, dist: Distributed, inputs: Inputs | None = None,
          *, resuming: tuple[Path, dict] | None = None) -> Session:
    """`inputs`: what is already in memory (model, tokenizer, rows) instead of what `cfg` names.
    `resuming`: the checkpoint (folder, state) a resume continues, whose run identity must be
    this one's (checked before anything is computed or written)."""
    from dpolab import scopes
    from dpolab.tokenize import tokenize_rows

    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    device = dist.device
    inputs = inputs or Inputs()
    if dist.local_main:  # what killed writers left; never a live process's
        cachedir.remove_orphans(run_dir)
    from dpolab.dedup import dedupe_split  # counts duplicates; no held-out copy of a train pair

    # rows first: bad data stops the run before a model is loaded
    train_rows, held_rows = inputs.rows or splits_mod.load_split_rows(cfg)
    train_rows, held_rows = dedupe_split(train_rows, held_rows, say=print if dist.is_main else None)
    tokenizer = inputs.tokenizer_for(cfg)
    model = inputs.model_for(cfg, device)  # eval mode: dropout off, as TRL's default
    rows = {"train": train_rows, "held_out": held_rows}
    tok = {split: tokenize_rows(r, tokenizer, max_length=cfg.data.max_length,
                                max_prompt_length=cfg.data.max_prompt_length,
                                truncation=cfg.data.truncation,
                                chat_template_kwargs=cfg.data.chat_template_kwargs)
           for split, r in rows.items()}
    if not tok["train"].examples:
        raise UserError("no training pairs left after tokenization "
                        f"({tok['train'].dropped_identical} made identical by truncation)")
    model_hash = reference.hash_parameters(model)[:16]  # before the scope changes anything
    # float16 weights train as float32 copies under float16 autocast (below): the reference
    # is that forward's, a function of these weights and the procedure, keyed as such.
    if model.dtype == torch.float16:
        model_hash += "-f16"
    identity = RunIdentity.of(model_hash, tok, world=dist.world, train=tc)
    keys = {split: reference.store_key(model_hash, d["hash"]) for split, d in identity.data.items()}
    has_reference = needs_reference(cfg)
    # Under torchrun, before the first collective: the ranks agree on what they train, and
    # a cache that one rank lacks is computed by every rank (a warm rank ignores its copy).
    warm = (warm_caches(tok, {s: keys[s] if has_reference else None for s in keys},
                        {s: _states_path(k) for s, k in keys.items()})
            if dist.world > 1 else {})
    everywhere = dist.agree(identity.facts(config_dict(cfg)), warm)
    if resuming is not None:  # the same run as the checkpoint's, or a one-line refusal
        from dpolab.checkpoint import check_identity

        check_identity(resuming, identity)
    datachecks.truncation(rows, tok, cfg.data, say=print if dist.is_main else None)
    groups = sorted({g for t in tok.values() for g in t.groups})
    weights = datachecks.group_weights(tok, groups, cfg.data.group_weights)
    every_pair = [e for t in tok.values() for e in t.examples]  # the longest may be held out
    choice = forward_check.choose_for_run(cfg, model, every_pair, pad_id=tokenizer.pad_token_id,
                                          dist=dist)
    router = moe.router_loss(model, cfg.model.router_aux_loss_coef, scope=tc.scope)
    if dist.is_main:  # what the run's log-probs are made of: said whatever the progress setting
        print(choice.line())
        if router is not None:
            print(f"router load-balancing loss: weight {router.coef:g} (logged as aux_loss)")
    # A store every rank holds is read; one some rank lacks is computed by all, and stored
    # by those that lacked it (the others keep their copy of the same numbers).
    reuse = {k: v or not warm[k] for k, v in everywhere.items()}
    theta0 = inputs.reloader(cfg, model)  # a model from memory: its starting weights, kept
    compute = model.dtype
    scope = scopes.apply(
        cfg, model, tok, pad_id=tokenizer.pad_token_id, device=device,
        autocast=body_autocast(compute, device, tc.bf16_autocast), dist=dist,
        state_store=lambda split, ex: (_states_path(keys[split])
                                       if reuse.get(f"states {split}", True) else None),
        reload=theta0, forward=choice.name, router=router)
    if compute == torch.float16:
        # float16 weights train as float32 copies (AdamW's second moment underflows in
        # float16: measured, a tiny model's third step diverged), the body computes in
        # float16 under autocast; frozen weights stay float16.
        with torch.no_grad():
            for p in scope.params:
                p.data = p.data.float()
    # Under torchrun the scope's forward trains as DDP's or FSDP2's module. FSDP2 replaces
    # the parameters by sharded ones: the scope's list is read again.
    engine = dist.engine(scope.model, scope.forward, sharded=tc.distributed == "fsdp2")
    if engine.sharded:
        scope = replace(scope, params=tuple(p for p in scope.model.parameters()
                                            if p.requires_grad))
    # The reference is the policy before its first update (scope.reference): for last_layer
    # the cached body states under the original head, otherwise the scope's own forward,
    # which under FSDP2 (full scope only) must run as the engine's forward. A run whose terms
    # read no reference has none.
    ref_forward = engine if engine.sharded else scope.reference
    refs = {split: reference.reference_for(model_hash, ref_forward, t.examples, cfg, dist,
                                           split, collective=engine.sharded,
                                           reuse=everywhere.get(f"reference {split}", True))
            if has_reference else None for split, t in tok.items()}
    gindex = {g: i for i, g in enumerate(groups)}
    splits = {}
    for split, t in tok.items():
        rc, rr = refs[split].sums() if refs[split] is not None else (None, None)
        splits[split] = Split(
            t.examples, refs[split], rc, rr, weights=weights[split],
            group_ids=np.array([gindex.get(e.group, -1) for e in t.examples]),
            no_cue=np.array([not rows[split][e.index].meta.get("surface_cue", False)
                             for e in t.examples]))
    if dist.is_main:
        rundir.write_data_report(run_dir, tok, forward=choice.record())
        if has_reference:  # unflippable is a property of the reference
            _report_unflippable(cfg, run_dir, splits, groups)
    return Session(cfg, run_dir, dist, model, tokenizer, scope, splits, groups, engine,
                   identity, theta0=theta0, router=router)


def _states_path(key: str) -> Path:
    return cache_dir() / "states" / f"{key}.safetensors"


def needs_reference(cfg: RunConfig) -> bool:
    """Whether any loss term of the run reads pi_ref (the registry's `needs_reference`)."""
    return Objective(cfg.loss.term_weights(), cfg.loss).needs_reference


def reward_average(cfg: RunConfig) -> bool:
    """Reference-free runs: the implicit reward beta * log pi(y) reads per-token means when
    any term reads means (SimPO, ORPO, SFT), sums otherwise (CPO), as TRL logs them."""
    obj = Objective(cfg.loss.term_weights(), cfg.loss)
    return any(logps_reduction(term.logps, cfg.loss) == "mean" for term, _ in obj.terms.values())


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
