"""What the training loop works with, built once: data, reference store, model scope,
forward functions, evaluation, metrics log, distributed helpers.

`build` follows the data path of the design: rows -> token ids -> reference log-probs
(computed once with the untouched model, stored, reused) -> the trainable scope.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpolab import atomic
from dpolab import config as config_mod
from dpolab import reference
from dpolab.errors import UserError
from dpolab.config import RunConfig
from dpolab.diagnostics import PairStats, growth_rate, group_summaries, summarize, unflippable
from dpolab.models import dpolab_cache_dir as cache_dir  # $DPOLAB_CACHE or ~/.cache/dpolab
from dpolab.policy import CachedHeadForward, FlatLogps, SharedPromptForward
from dpolab.progress import Progress
from dpolab.report import read_metrics

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# Distributed (torchrun) — a null object when there is one process


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str = "auto") -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and device != "cpu"
        if world == 1:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        return cls(td.get_rank(), td.get_world_size(),
                   torch.device(f"cuda:{local}" if cuda else "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[Tensor]) -> None:
        """Each rank's loss is already divided by the global batch size, so the sum over
        ranks of the gradients is the gradient of the global mean."""
        if self.world == 1:
            return
        import torch.distributed as td

        from dpolab.sharding import is_sharded

        for p in params:
            if is_sharded(p):
                continue  # FSDP2 reduce-scatters its own shards (summing) in backward
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            td.all_reduce(p.grad, op=td.ReduceOp.SUM)

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Run directory and metrics


def prepare_run_dir(cfg: RunConfig, *, resume: bool, is_main: bool) -> Path:
    run_dir = Path(cfg.out)
    if is_main:
        if not resume and (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir}: a run already exists there; use --resume {run_dir} "
                            f"to continue it, or --out for a new directory")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_mod.dump_yaml(cfg, run_dir / "config.yaml")
    return run_dir


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume it is cut back to the lines the
    checkpoint had seen, so a resumed run's file equals an uninterrupted run's."""

    def __init__(self, path: Path, *, enabled: bool, keep_lines: int):
        self.path, self.enabled, self.lines = path, enabled, keep_lines
        if enabled:
            old = path.read_text().splitlines(keepends=True) if path.exists() else []
            atomic.write_text(path, "".join(old[:keep_lines]))
        self._tb = _tensorboard(path.parent) if enabled else None

    def write(self, row: dict[str, Any]) -> None:
        if not row:
            return
        self.lines += 1
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, row.get("step", 0))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def write_summary(run_dir: Path, metrics_path: Path, *, wall_s: float) -> dict[str, Any]:
    import resource

    rows = read_metrics(metrics_path)
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    steps = [r for r in rows if "rewards/margins" in r and "step" in r]
    summary = {
        "margin_growth_rate": growth_rate(np.array([r["step"] for r in steps]),
                                          np.array([r["rewards/margins"] for r in steps])),
        "wall_s": wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": max((r.get("step", 0) for r in rows), default=0),
        "before": evals[0] if evals else {},
        "after": evals[-1] if evals else {},
    }
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
    return summary


# ---------------------------------------------------------------------------------------
# Per-step statistics


class StepStats:
    """Accumulates one optimizer step's pair statistics across micro-batches (and ranks)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self.tokens = 0
        self.sums: dict[str, float] = {}

    def add(self, pairs, terms: dict[str, Tensor], per_example: Tensor, weights: Tensor,
            flat: FlatLogps, *, beta: float) -> None:
        with torch.no_grad():
            pc, pr = pairs.policy_chosen.double(), pairs.policy_rejected.double()
            rc, rr = pairs.ref_chosen.double(), pairs.ref_rejected.double()
            h = (pc - rc) - (pr - rr)
            acc = torch.where(h.abs() <= 1e-6, 0.5, (h > 0).double())
            add = {
                "loss": float((weights * per_example.detach().double()).sum()),
                "rewards/chosen": float((beta * (pc - rc)).sum()),
                "rewards/rejected": float((beta * (pr - rr)).sum()),
                "rewards/margins": float((beta * h).sum()),
                "rewards/accuracies": float(acc.sum()),
                "logps/chosen": float(pc.sum()), "logps/rejected": float(pr.sum()),
            }
            for name, t in terms.items():
                add[f"loss/{name}"] = float(t.double().sum())
        for k, v in add.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.tokens += flat.n_processed

    def summary(self, dist: Distributed, *, n_global: int) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = dist.all_sum([self.sums[k] for k in keys])
        return {k: v / n_global for k, v in zip(keys, totals)}


def clip(params: list[Tensor], max_norm: float) -> float:
    from dpolab import sharding

    if any(sharding.is_sharded(p) for p in params):
        return sharding.clip_grad_norm(params, max_norm)
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                        for p in grads])))


def check_step0(pairs, terms: dict[str, Tensor], ln2_terms: Sequence[str]) -> None:
    """Before any update the policy is its reference: log-probs agree with the stored ones
    and every DPO-like term equals ln 2. A mismatch means the store belongs to other
    weights or other data."""
    with torch.no_grad():
        for pol, ref, what in ((pairs.policy_chosen, pairs.ref_chosen, "chosen"),
                               (pairs.policy_rejected, pairs.ref_rejected, "rejected")):
            err = (pol.double() - ref.double()).abs()
            tol = 1e-3 + 1e-5 * ref.double().abs()
            if (err > tol).any():
                raise UserError(
                    f"step-0 invariant failed: policy {what} log-probs differ from the stored "
                    f"reference by up to {float(err.max()):.3g} nats; the reference store does "
                    f"not match this model and data (delete it from {cache_dir() / 'reference'})")
        for name in ln2_terms:
            if name in terms:
                v = float(terms[name].double().mean())
                if abs(v - math.log(2.0)) > 1e-3:
                    raise UserError(f"step-0 invariant failed: the {name} loss is {v:.6f}, "
                                    f"expected ln 2 = 0.693147 with the policy at its reference")


# ---------------------------------------------------------------------------------------
# Building a session


@dataclass
class Session:
    cfg: RunConfig
    run_dir: Path
    dist: Distributed
    model: torch.nn.Module
    tokenizer: Any
    train: list  # PairExample, index = position
    held_out: list
    train_rows: list
    held_out_rows: list
    groups: list[str]
    ref: dict[str, reference.ReferenceLogps]
    params: list[Tensor]
    scope_forward: Any  # BodyForward or CachedHeadForward
    head: Any

    def forward(self, examples: Sequence, *, split: str) -> FlatLogps:
        if isinstance(self.scope_forward, CachedHeadForward):
            return self.scope_forward.forward(examples, split=split)
        return self.scope_forward(examples)

    def ref_sums(self, split: str, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        c, r = self._ref_sums[split]
        i = torch.as_tensor(list(idx), dtype=torch.long)
        dev = self.dist.device
        return c[i].to(dev), r[i].to(dev)  # float64, like the policy's sums

    def group_weights(self, split: str, idx: Sequence[int]) -> Tensor:
        return self._group_w[split][torch.as_tensor(list(idx), dtype=torch.long)].to(self.dist.device)

    def trainable_named(self, aux=None) -> dict[str, Tensor]:
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if aux is not None:
            named["auxdpo.delta"] = aux.delta
        return named

    def pair_stats(self, split: str) -> PairStats:
        """Policy vs reference on every pair of `split` ("train" or "held_out"), no grad."""
        examples = self.train if split == "train" else self.held_out
        bs = self.cfg.train.eval_batch_size
        pcs, prs = [], []
        with torch.no_grad():
            for s in range(0, len(examples), bs):
                pc, pr = self.forward(examples[s:s + bs], split=split).sums()
                pcs.append(pc.double().cpu())
                prs.append(pr.double().cpu())
        rc, rr = self._ref_sums[split]
        nc, nr = self.ref[split].lengths()
        return PairStats(torch.cat(pcs).numpy(), torch.cat(prs).numpy(), rc.numpy(), rr.numpy(),
                         nc.numpy(), nr.numpy(), beta=self.cfg.loss.beta)

    def evaluate(self, *, step: int) -> dict[str, float]:
        """Held-out metrics as `eval/...` (plus per-group ones), and per-group train accuracy."""
        row: dict[str, float] = {"step": step}
        for split, prefix in (("held_out", "eval/"), ("train", "train_eval/")):
            if not (self.held_out if split == "held_out" else self.train):
                continue
            stats = self.pair_stats(split)
            gids = self._group_ids[split]
            row.update({prefix + k: v for k, v in summarize(stats).items()})
            flags = unflippable(stats.ref_chosen, stats.ref_rejected, beta=stats.beta)
            row[prefix + "unflippable/fraction"] = float(flags.mean())
            if flags.any():  # did training flip the model's own preference on them anyway?
                pref = stats.policy_chosen[flags] > stats.policy_rejected[flags]
                row[prefix + "unflippable/flipped_fraction"] = float(pref.mean())
            row.update({prefix + k: v for k, v in group_summaries(
                stats, gids, self.groups, {"no_cue": self._no_cue[split]}).items()})
        return row

    def did_eval(self) -> dict[str, float]:
        """DID entropy of the policy against its reference on held-out prompts, by sampling
        (see dpolab.did_probe); `eval/did/...` metrics."""
        from dpolab.did_probe import did_metrics
        from dpolab.models import body_and_head, load_model, resolve_model_path

        tc = self.cfg.train
        if tc.did_samples <= 0 or not self.held_out:
            return {}
        seen, prompts = set(), []
        for ex in self.held_out:
            if tuple(ex.prompt_ids) not in seen and len(prompts) < tc.did_prompts:
                seen.add(tuple(ex.prompt_ids))
                prompts.append(ex)
        peft_model = getattr(self.scope_forward, "peft_model", None)
        model = peft_model if peft_model is not None else self.model
        body, head = body_and_head(model)
        kw = dict(pad_id=self.tokenizer.pad_token_id, chunk_size=tc.logps_chunk,
                  device=self.dist.device, autocast=False)
        policy = SharedPromptForward(body, lambda: head, dtype=model.dtype, **kw)
        if isinstance(self.scope_forward, CachedHeadForward):
            ref_fwd = SharedPromptForward(body, lambda: self.scope_forward.head0,
                                          dtype=model.dtype, **kw)
            ref = lambda b: ref_fwd(b).sums()[0]  # noqa: E731
        elif peft_model is not None:
            def ref(b):
                with peft_model.disable_adapter():
                    return policy(b).sums()[0]
        else:  # full scope: the reference weights are gone from memory; load them again
            ref_model = load_model(resolve_model_path(self.cfg.model.name), device=str(self.dist.device))
            rb, rh = body_and_head(ref_model)
            ref_fwd = SharedPromptForward(rb, lambda: rh, dtype=ref_model.dtype, **kw)
            ref = lambda b: ref_fwd(b).sums()[0]  # noqa: E731
        out = did_metrics(model, prompts, policy_logps=lambda b: policy(b).sums()[0],
                          ref_logps=ref, k=tc.did_samples, max_new_tokens=tc.did_max_new_tokens,
                          eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                          seed=tc.seed, device=self.dist.device)
        return {f"eval/{k}": v for k, v in out.items()}

    def export(self, out: Path) -> None:
        """Collective: every rank calls it (sharded weights are gathered), rank 0 writes."""
        from dpolab import sharding
        from dpolab.checkpoint import export_model

        if sharding.has_sharded_modules(self.model):
            for m in self.model.modules():  # back to the sharded layout: state_dict gathers it
                if hasattr(m, "reshard"):
                    m.reshard()
            state = {k: sharding.full(v).detach().clone()
                     for k, v in self.model.state_dict().items()}
            if self.dist.is_main:
                sharding.save_full_state(state, self.model.config, self.tokenizer, out)
            return
        if not self.dist.is_main:
            return
        peft_model = getattr(self.scope_forward, "peft_model", None)
        export_model(peft_model if peft_model is not None else self.model, self.tokenizer, out,
                     merge_lora=self.cfg.train.export_merged)


def build(cfg: RunConfig, run_dir: Path, dist: Distributed) -> Session:
    from dpolab import scopes
    from dpolab.tokenize import tokenize_rows
    from dpolab.models import load_model, load_tokenizer, resolve_model_path

    tc = cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    device = dist.device
    path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = load_model(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                       device=str(device))
    model.eval()  # dropout off throughout (as TRL's default disable_dropout): determinism
    model.requires_grad_(False)

    train_rows, held_rows = load_split_rows(cfg)
    from dpolab.dedup import dedupe_split  # counts duplicates; no held-out copy of a train pair
    train_rows, held_rows = dedupe_split(train_rows, held_rows, say=print if dist.is_main else None)
    tok = {}
    for split, rows in (("train", train_rows), ("held_out", held_rows)):
        tok[split] = tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length,
                                   max_prompt_length=cfg.data.max_prompt_length,
                                   truncation=cfg.data.truncation)
    if not tok["train"].examples:
        raise UserError("no training pairs left after tokenization "
                        f"({tok['train'].dropped_identical} made identical by truncation)")
    groups = sorted({g for t in tok.values() for g in t.groups})
    autocast = device.type == "cuda" and tc.bf16_autocast
    pad_id = tokenizer.pad_token_id
    model_hash = reference.hash_parameters(model)[:16]  # before the scope changes anything
    params, scope_forward, head = scopes.apply(
        cfg, model, tok, pad_id=pad_id, device=device, autocast=autocast, dist=dist,
        state_store=lambda split, ex: cache_dir() / "states" / (
            f"{model_hash}-{reference.hash_examples(ex)[:16]}.safetensors"))
    # The reference is the policy before its first update: for last_layer the cached body
    # states under the original head (no second body pass), otherwise the scope's own forward
    # (LoRA starts with B = 0, so its output equals the base model's exactly).
    if isinstance(scope_forward, CachedHeadForward):
        ref_fns = {split: (lambda ex, split=split: scope_forward.forward(
            ex, split=split, head=scope_forward.head0)) for split in tok}
    else:
        ref_fns = {split: scope_forward for split in tok}
    sharded = dist.world > 1 and tc.distributed == "fsdp2"
    refs = {split: reference_for(model_hash, ref_fns[split], t.examples, cfg, dist, split,
                                 collective=sharded)
            for split, t in tok.items()}
    s = Session(cfg, run_dir, dist, model, tokenizer, tok["train"].examples,
                tok["held_out"].examples, train_rows, held_rows, groups, refs, params,
                scope_forward, head)
    s._ref_sums = {k: v.sums() for k, v in refs.items()}
    gindex = {g: i for i, g in enumerate(groups)}
    rows_of = {"train": train_rows, "held_out": held_rows}
    s._group_ids = {k: np.array([gindex.get(e.group, -1) for e in t.examples]) for k, t in tok.items()}
    s._no_cue = {k: np.array([not rows_of[k][e.index].meta.get("surface_cue", False)
                              for e in t.examples]) for k, t in tok.items()}
    w = cfg.data.group_weights
    unknown = sorted(set(w) - set(groups))
    if unknown:
        raise UserError(f"config data.group_weights: unknown group(s) {', '.join(unknown)}; "
                        f"groups in the data: {', '.join(groups) or '(none)'}")
    s._group_w = {k: torch.tensor([float(w.get(e.group, 1.0)) for e in t.examples])
                  for k, t in tok.items()}
    _write_data_report(run_dir, tok, dist)
    _write_unflippable(s)
    return s


def _write_unflippable(s: "Session") -> None:
    """List, before training, the pairs whose reference preference for the rejected response
    is too strong for DPO to flip (dpolab.diagnostics.unflippable) into unflippable.json."""
    if not s.dist.is_main:
        return
    out: dict[str, Any] = {"beta": s.cfg.loss.beta,
                           "threshold_nats": float(np.log(3.0) / s.cfg.loss.beta)
                           if s.cfg.loss.beta > 0 else None}
    for split, examples in (("train", s.train), ("held_out", s.held_out)):
        rc, rr = s._ref_sums[split]
        flags = unflippable(rc.numpy(), rr.numpy(), beta=s.cfg.loss.beta)
        out[split] = {
            "count": int(flags.sum()), "pairs": len(examples),
            "by_group": {g: int(sum(1 for e, f in zip(examples, flags) if f and e.group == g))
                         for g in s.groups},
            "list": [{"where": f"{e.source}:{e.row}", "group": e.group,
                      "ref_margin": float(rc[i] - rr[i])}
                     for i, (e, f) in enumerate(zip(examples, flags)) if f],
        }
    atomic.write_text(s.run_dir / "unflippable.json", json.dumps(out, indent=1))
    if s.cfg.train.progress:
        print(f"unflippable at beta={s.cfg.loss.beta}: {out['train']['count']} of "
              f"{out['train']['pairs']} training pairs, {out['held_out']['count']} of "
              f"{out['held_out']['pairs']} held-out (listed in {s.run_dir / 'unflippable.json'})")


def reference_for(model_hash: str, forward, examples: list, cfg: RunConfig,
                  dist: Distributed, split: str, *, collective: bool = False
                  ) -> reference.ReferenceLogps:
    """Load the stored reference for (weights, token ids), or compute and store it.
    `forward`: examples -> FlatLogps of the policy at its reference point."""
    key = f"{model_hash}-{reference.hash_examples(examples)[:16]}"
    path = reference.store_path(cache_dir(), key)
    ref = reference.load(path, key)
    if ref is not None and ref.n == len(examples):
        return ref
    # With sharded layers every rank must run the same forwards (they gather shards).
    if dist.is_main or collective:
        bar = Progress(len(examples), f"reference ({split})",
                       enabled=cfg.train.progress and dist.is_main)
        ref = reference.compute(lambda ex: forward(ex).split(), examples,
                                batch_size=cfg.train.eval_batch_size, key=key,
                                progress=bar.update)
        bar.close()
        if dist.is_main:
            reference.save(ref, path)
    dist.barrier()
    return ref if ref is not None else reference.load(path, key)


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


def _write_data_report(run_dir: Path, tok: dict, dist: Distributed) -> None:
    if not dist.is_main:
        return
    info = {split: {"pairs": len(t.examples), "dropped_identical": t.dropped_identical,
                    "truncated_prompt": t.truncated_prompt,
                    "truncated_completion": t.truncated_completion, "groups": t.groups}
            for split, t in tok.items()}
    (run_dir / "data.json").write_text(json.dumps(info, indent=1))

