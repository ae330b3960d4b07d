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

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dpolab import (cachedir, datachecks, forward_check, moe, reference, reference_model,
                    rundir, scoring, trajectory)
from dpolab import splits as splits_mod
from dpolab.config import RunConfig
from dpolab.config import to_dict as config_dict
from dpolab.diagnostics import PairStats
from dpolab.distributed import Distributed, Engine
from dpolab.errors import UserError
from dpolab.identity import RunIdentity, warm_caches
from dpolab.inputs import Inputs, Theta0
from dpolab.losses import Objective, PairLogps, ld_flat_logps, logps_reduction
from dpolab.models import dpolab_cache_dir as cache_dir  # $DPOLAB_CACHE or ~/.cache/dpolab
from dpolab.policy import body_autocast
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
    sets: np.ndarray | None = None  # (N,) int, index into Session.eval_sets (held-out split)


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
    eval_sets: list[str] = field(default_factory=list)  # names of the held-out sets (none: one)
    compute_metrics: Callable | None = None  # a user's per-pair metrics (dpolab.scoring)
    reference_is_start: bool = True  # pi_ref is the starting weights (not model.reference)
    unchanged_logps: dict | None = None  # forward outputs reused at theta0 (dpolab.scoring)

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
        are LD-DPO's sums (:func:`dpolab.losses.ld_flat_logps`), as in TRL."""
        flat = self.engine([self.splits[split].examples[i] for i in idx], split=split)
        self.tokens_processed += flat.n_processed
        return self.logps_of(split, idx, flat)

    def logps_of(self, split: str, idx: Sequence[int], flat) -> PairLogps:
        """`pair_logps` of the pairs at `idx` of `split` from their forward's `flat` output."""
        nc, nr = flat.counts()
        sp, dev, alpha = self.splits[split], self.dist.device, self.cfg.loss.ld_alpha
        if alpha == 1.0:
            pc, pr = flat.sums()
        else:
            pc, pr = ld_flat_logps(flat.tokens.double(), flat.seg, flat.n_pairs, alpha=alpha)
        if sp.ref is None:
            return PairLogps(pc, pr, None, None, nc, nr, router_loss=flat.aux_loss,
                             token_sums=scoring.per_response_sums(flat))
        if alpha == 1.0:
            i = torch.as_tensor(list(idx), dtype=torch.long)
            rc, rr = sp.ref_chosen[i], sp.ref_rejected[i]
        else:
            seqs = ([sp.ref.per_token(j) for j in idx]
                    + [sp.ref.per_token(j, rejected=True) for j in idx])
            seg = torch.repeat_interleave(torch.arange(len(seqs)),
                                          torch.tensor([t.numel() for t in seqs]))
            rc, rr = ld_flat_logps(torch.cat(seqs).double(), seg, len(idx), alpha=alpha)
        return PairLogps(pc, pr, rc.to(dev), rr.to(dev), nc, nr, router_loss=flat.aux_loss,
                         token_sums=scoring.per_response_sums(flat))

    def group_weights(self, split: str, idx: Sequence[int]) -> Tensor:
        return self.splits[split].weights[torch.as_tensor(list(idx), dtype=torch.long)].to(
            self.dist.device)

    def trainable_named(self, aux=None) -> dict[str, Tensor]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if aux is not None:
            named.update(aux.named())
        return named

    def pair_stats(self, split: str) -> PairStats:
        """Policy vs reference on every pair of `split` ("train" or "held_out"), no grad;
        in a reference-free run the policy's own preference (`reference_free_stats`)."""
        return scoring.score(self, split).stats

    def evaluate(self, *, step: int, train_split: bool = True,
                 check: Callable[[str, PairStats], None] | None = None,
                 keep_pairs: bool = True) -> dict[str, float]:
        """Held-out metrics as `eval/...` (plus per-group ones), and with `train_split` the
        same of the training pairs as `train_eval/...` (they are usually the larger split).
        `check(split, stats)` sees each split's statistics (the step-0 check of every pair).
        `keep_pairs`: every pair's numbers into RUN/pairs/ (not for dpolab.evaluate)."""
        row: dict[str, float] = {"step": step}
        scored: dict[str, PairStats] = {}  # every pair's numbers: RUN/pairs/ (dpolab.trajectory)
        for split, prefix in (("held_out", "eval/"), ("train", "train_eval/")):
            sp = self.splits[split]
            if split == "train" and not train_split:
                continue
            if not sp.examples:
                continue
            result = scoring.score(self, split)
            scored[split] = result.stats
            if check is not None:
                check(split, result.stats)
            parts = [(prefix, np.arange(len(sp.examples)))]
            if split == "held_out":  # each named eval set on its own too
                parts += [(f"eval/{name}/", np.flatnonzero(sp.sets == k))
                          for k, name in enumerate(self.eval_sets)]
            for pre, sel in parts:
                row.update({pre + k: v for k, v in scoring.split_metrics(
                    result.subset(sel), sp, sel, self.groups,
                    own=self.compute_metrics if split == "held_out" else None).items()})
        if scored and keep_pairs and self.dist.is_main:
            trajectory.write_step(self.run_dir, step, scored)
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
        if (tc.did_samples <= 0 or not self.held_out or not self.needs_reference
                or not self.reference_is_start):  # DID against the starting weights only
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
        if self.scope.reference_replaces_policy and self.theta0 is not None:
            self.theta0.exchange(self.model)  # the caller's model ends trained, as exported
        if not self.scope.reference_replaces_policy:
            self.export(out)
        return {f"eval/{k}": v for k, v in did_summary(logp, logr).items()}

    def export(self, out: Path) -> None:
        """Collective: every rank calls it (sharded weights are gathered), rank 0 writes."""
        from dpolab.checkpoint import export_model, export_sharded_model

        if self.engine.sharded:
            export_sharded_model(self.engine.wrapped, self.model, self.tokenizer, out,
                                 write=self.dist.is_main)
            return
        if self.dist.is_main:
            export_model(self.scope.model, self.tokenizer, out,
                         merge_lora=self.cfg.train.export_merged)


def build(cfg: RunConfig, run_dir: Path, dist: Distributed, inputs: Inputs | None = None,
          *, resuming: tuple[Path, dict] | None = None, records: bool = True) -> Session:
    """`inputs`: what is already in memory (model, tokenizer, rows) instead of what `cfg` names.
    `resuming`: the checkpoint (folder, state) a resume continues, whose run identity must be
    this one's (checked before anything is computed or written). `records`: write data.json
    and unflippable.json (not when a finished run is evaluated again, dpolab.evaluate)."""
    from dpolab import ches, scopes

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
    tok = {split: tokenize_split(r, tokenizer, cfg.data) for split, r in rows.items()}
    if not tok["train"].examples:
        raise UserError("no training pairs left after tokenization "
                        f"({tok['train'].dropped_identical} made identical by truncation)")
    model_hash = weights_key(model)  # before the scope changes anything
    has_reference = needs_reference(cfg)
    spec = inputs.reference or cfg.model.reference  # another model as pi_ref (its store only)
    explicit = (reference_model.Explicit(cfg, spec, tokenizer, device)
                if spec and has_reference else None)
    ref_hash = model_hash if explicit is None else explicit.hash
    identity = RunIdentity.of(model_hash if explicit is None else f"{model_hash}+ref-{ref_hash}",
                              tok, world=dist.world, train=tc)
    keys = {split: reference.store_key(model_hash, d["hash"]) for split, d in identity.data.items()}
    ref_keys = {split: reference.store_key(ref_hash, d["hash"])
                for split, d in identity.data.items()}
    # Under torchrun, before the first collective: the ranks agree on what they train, and
    # a cache that one rank lacks is computed by every rank (a warm rank ignores its copy).
    warm = (warm_caches(tok, {s: ref_keys[s] if has_reference else None for s in keys},
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
    # CHES of every pair at theta0 (dpolab.ches): a prediction of displacement, before training
    ches_scores = {split: ches.at_reference(scope, t.examples, split,
                                            batch_size=tc.eval_batch_size, dist=dist)
                   for split, t in tok.items()}
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
    if explicit is not None:  # model.reference: its own weights through the run's forward
        ref_forward = explicit.forward(cfg, name=choice.name, pad_id=tokenizer.pad_token_id,
                                       device=device, autocast=body_autocast(
                                           explicit.model.dtype, device, tc.bf16_autocast))
    refs = {split: reference.reference_for(ref_hash, ref_forward, t.examples, cfg, dist,
                                           split, collective=engine.sharded and explicit is None,
                                           reuse=everywhere.get(f"reference {split}", True))
            if has_reference else None for split, t in tok.items()}
    if explicit is not None:  # the step-0 check's part for it; then no second model is held
        explicit.check(tok, refs, device)
        del explicit, ref_forward
    gindex = {g: i for i, g in enumerate(groups)}
    eval_sets = list(dict.fromkeys(r.eval_set for r in rows["held_out"] if r.eval_set))
    splits = {}
    for split, t in tok.items():
        rc, rr = refs[split].sums() if refs[split] is not None else (None, None)
        splits[split] = Split(
            t.examples, refs[split], rc, rr, weights=weights[split],
            group_ids=np.array([gindex.get(e.group, -1) for e in t.examples]),
            no_cue=np.array([not rows[split][e.index].meta.get("surface_cue", False)
                             for e in t.examples]),
            sets=np.array([eval_sets.index(rows[split][e.index].eval_set)
                           if rows[split][e.index].eval_set else -1 for e in t.examples]))
    if dist.is_main and records:
        rundir.write_data_report(run_dir, tok, forward=choice.record())
        trajectory.write_start(run_dir, tok, rows, ches=ches_scores, beta=cfg.loss.beta,
                               reference=has_reference, average=reward_average(cfg))
        if has_reference:  # unflippable is a property of the reference
            _report_unflippable(cfg, run_dir, splits, groups)
    return Session(cfg, run_dir, dist, model, tokenizer, scope, splits, groups, engine,
                   identity, theta0=theta0, router=router, eval_sets=eval_sets,
                   compute_metrics=inputs.compute_metrics, reference_is_start=not spec)


def weights_key(model) -> str:
    """The weights' part of the stores' keys (reference log-probs, cached body states), as
    `train` and `inspect` make it. float16 weights train as float32 copies under float16
    autocast (`build`): the reference is that forward's, a function of these weights and the
    procedure, keyed as such."""
    return reference.hash_parameters(model)[:16] + ("-f16" if model.dtype == torch.float16
                                                     else "")


def tokenize_split(rows: list, tokenizer, data) -> Any:
    """One split's rows as the run tokenizes them (`data`: the run's DataConfig)."""
    from dpolab.tokenize import tokenize_rows

    return tokenize_rows(rows, tokenizer, max_length=data.max_length,
                         max_prompt_length=data.max_prompt_length, truncation=data.truncation,
                         chat_template_kwargs=data.chat_template_kwargs)


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
