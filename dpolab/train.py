"""The training loop: one readable function, `train`, with named sections.

    setup -> data -> reference (once, stored) -> scope -> optimizer -> [resume] ->
    loop { schedule, forward, loss, backward, step, log, evaluate, checkpoint } -> export

What it trains on is assembled by `dpolab.session.build`; per micro-batch the loop asks the
session for the pairs' log-probs (`pair_logps`) and does the rest itself. More than one
process (torchrun) means data parallelism: each rank takes an interleaved slice of every
global batch and PyTorch's engine (DDP, or FSDP2 for sharded weights; `session.engine`) sums
the gradients during the backward of the step's last micro-batch, so N processes give the
same step as one process on the same global batch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dpolab import atomic, checkpoint, memory, rundir, runlock, session
from dpolab.auxdpo import AuxRewards
from dpolab.config import RunConfig
from dpolab.config import to_dict as config_dict
from dpolab.diagnostics import PairStats, reference_free_stats, reward_sums
from dpolab.distributed import Distributed
from dpolab.errors import Stopped, UserError
from dpolab.inputs import Inputs
from dpolab.logps import STAT_COLUMNS
from dpolab.losses import Objective, PairLogps
from dpolab.models import dpolab_cache_dir as cache_dir
from dpolab.progress import Progress
from dpolab.ref_sync import RefSync
from dpolab.report import write_run_report
from dpolab.scoring import token_metrics
from dpolab.stopping import NAMES, StopSignals
from dpolab.trackers import open_trackers

Tensor = torch.Tensor


def lr_at(step: int, *, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over `warmup` steps to `peak`, then constant or cosine to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The permutation of training examples for one epoch: a pure function of (seed, epoch),
    so a resumed run sees exactly the batches an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, *, seed: int, epochs: int, global_batch: int):
    """Yield (epoch, list of example positions) for every optimizer step."""
    for epoch in range(epochs):
        order = epoch_order(n, seed=seed, epoch=epoch)
        for s in range(0, n, global_batch):
            yield epoch, order[s:s + global_batch]


def eval_interval(eval_every: int, total: int) -> int:
    """Optimizer steps between held-out evaluations (0: start and end only). -1 spreads about
    8 evaluations evenly over `total` steps, so the report's curves have points to draw."""
    if eval_every >= 0:
        return eval_every
    return max(1, math.ceil(total / 8))


def train(cfg: RunConfig, *, resume: bool = False, inputs: Inputs | None = None) -> Path:
    """Train as `cfg` says; returns the run directory. `inputs`: a model, tokenizer or data
    already in memory (dpolab.api.Trainer), used instead of loading what `cfg` names.
    Raises errors.Stopped after saving a checkpoint when SIGTERM or SIGHUP asks it to stop."""
    inputs = (inputs or Inputs()).checked(cfg)  # a model that cannot train: no run directory
    with (runlock.hold(cfg.out, enabled=os.environ.get("RANK", "0") == "0"),  # one run per dir
          StopSignals() as signals):
        try:
            return _train(cfg, resume=resume, inputs=inputs, signals=signals)
        except atomic.WriteError as err:  # what was written stays: say how to go on
            raise checkpoint.after_write_error(Path(cfg.out), err) from None


def _train(cfg: RunConfig, *, resume: bool, inputs: Inputs, signals: StopSignals) -> Path:
    # ---- setup -------------------------------------------------------------------------
    dist = Distributed.from_env(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    if dist.device.type == "cpu" and cfg.train.cpu_reuse_memory:
        memory.reuse_freed_blocks()  # no page faults for the same buffers every step
    run_dir = rundir.prepare_run_dir(cfg, resume=resume, is_main=dist.is_main)
    t_start = time.monotonic()
    found = checkpoint.resume_point(run_dir) if resume else None  # the checkpoint continued
    s = session.build(cfg, run_dir, dist, inputs, resuming=found)  # data, reference, scope
    tc, lc = cfg.train, cfg.loss
    objective = Objective(lc.term_weights(), lc)
    aux = AuxRewards.maybe(objective, s, lc)
    sync = RefSync.maybe(s)  # TR-DPO's moving reference, or the null object

    # ---- optimizer and schedule ----------------------------------------------------------
    groups = [{"params": s.params, "lr": tc.lr, "weight_decay": tc.weight_decay},
              *aux.param_groups(lc.aux_lr)]  # group 0 follows the schedule, the rest keep theirs
    optimizer = make_adamw(groups, lr=tc.lr)
    global_batch = tc.batch_size * tc.grad_accum * dist.world
    steps_per_epoch = math.ceil(len(s.train) / global_batch)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    start, kept = 0, ""
    if found is not None:
        start, kept = checkpoint.restore(found, {**s.trainable_named(aux), **sync.named()},
                                         optimizer, run_dir / "metrics.jsonl")
        sync.resumed(found)  # the reference read back checked, its stores
    tracker = open_trackers(tc.report_to, run_dir, project=tc.tracker_project,
                            config=config_dict(cfg), is_main=dist.is_main)
    metrics = rundir.MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main, kept=kept,
                                tracker=tracker)
    every = eval_interval(tc.eval_every, total)
    if start == 0:  # every pair of both splits scored at the reference point: check them
        metrics.write(s.evaluate(step=0, check=lambda split, st: check_reference(s, split, st)))
    bar = Progress(total, "train", enabled=tc.progress and dist.is_main)
    bar.update(start)

    # ---- loop --------------------------------------------------------------------------
    batches = global_batches(len(s.train), seed=tc.seed, epochs=epochs, global_batch=global_batch)
    num_tokens = 0  # TRL's num_tokens: the training pairs' tokens so far, a prompt per row
    signals.armed = True  # SIGTERM, SIGHUP: stop after the step, with a checkpoint
    for step, (epoch, positions) in enumerate(batches):
        if step >= total:
            break
        num_tokens += sum(pair_tokens(s.train[i]) for i in positions)
        if step < start:
            continue  # already trained before the checkpoint; the order is deterministic
        # schedule
        t0, tokens0 = time.monotonic(), s.tokens_processed
        lr = lr_at(step, peak=tc.lr, warmup=tc.warmup_steps, total=total, schedule=tc.schedule)
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        stats = StepStats()
        mine = positions[dist.rank::dist.world]
        # Every rank runs as many micro-batches as rank 0 (the longest slice), the last one
        # synchronising gradients; a rank whose slice is shorter (the end of an epoch) runs a
        # stand-in pair with weight 0, so the engine's collectives line up.
        n_micro = math.ceil(len(positions[::dist.world]) / tc.batch_size)
        for micro in range(n_micro):
            idx = mine[micro * tc.batch_size:(micro + 1) * tc.batch_size]
            stand_in = not idx
            idx = idx or positions[:1]
            s.engine.sync_gradients(micro == n_micro - 1)  # the earlier ones accumulate locally
            # forward
            pairs = aux.with_delta(s.pair_logps("train", idx), idx)
            # loss
            per_example, terms = objective(pairs)
            weights = s.group_weights("train", idx) * (0.0 if stand_in else 1.0)
            loss = (weights * per_example).sum() / len(positions)
            if pairs.router_loss is not None:  # MoE load balancing: TRL's coef * aux_loss per batch
                loss = loss + s.router.coef * pairs.router_loss * (
                    0.0 if stand_in else len(idx) / len(positions))
            if not stand_in:
                loss = loss + aux.penalty(idx, n_global=len(positions))
            if step == 0 and start == 0 and micro == 0 and s.reference_is_start:
                check_step0(pairs, terms, objective.at_reference())
            if not torch.isfinite(loss):
                raise checkpoint.nonfinite_error(run_dir, step + 1, "loss", loss.item())
            # backward
            loss.backward()
            # a stand-in adds zeros: every rank sums the same keys
            stats.add(pairs, terms, per_example, weights, beta=lc.beta,
                      average=s.reward_average, scale=float(not stand_in))
        # step
        aux.sync(dist)  # outside the engine's module: summed here, once
        grad_norm = clip(s.params, tc.max_grad_norm)
        if not math.isfinite(grad_norm):  # never applied, so never checkpointed
            raise checkpoint.nonfinite_error(run_dir, step + 1, "gradient norm", grad_norm)
        optimizer.step()
        # log
        row = stats.summary(dist, n_global=len(positions))
        tokens = (s.tokens_processed - tokens0) * dist.world
        row.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm,
                   num_tokens=num_tokens, tokens_per_s=tokens / max(time.monotonic() - t0, 1e-9),
                   elapsed_s=time.monotonic() - t_start)
        metrics.write(row)
        bar.update(step + 1, loss=row["loss"], acc=row["rewards/accuracies"])
        # evaluate (the last evaluation follows the export)
        done = step + 1 == total
        if not done and every and (step + 1) % every == 0:
            metrics.write(s.evaluate(step=step + 1, train_split=False))  # train pairs: start, end
        metrics.write(sync.after_step(step + 1, total))  # the reference moves (TR-DPO)
        # checkpoint (and stop, when a signal reached any rank)
        stop = dist.all_max(signals.received)
        if done or stop or (tc.save_every and (step + 1) % tc.save_every == 0):
            saved = checkpoint.save(run_dir, step + 1, {**s.trainable_named(aux), **sync.named()},
                                    optimizer, metrics=metrics.text(), identity=s.identity.record(),
                                    is_main=dist.is_main, keep=tc.keep_checkpoints,
                                    reference=sync.record())  # collective
            dist.barrier()
        if stop:
            bar.close()
            metrics.close()
            dist.close()
            raise stopped(stop, step + 1, total, saved, is_main=dist.is_main)
    signals.armed = False
    bar.close()

    # ---- the last evaluation, export, DID probe ----------------------------------------
    optimizer.zero_grad(set_to_none=True)
    del optimizer  # its moments: the DID probe below needs the model's weights alone
    row = s.evaluate(step=total)
    row.update(s.export_and_probe(run_dir / "model"))  # collective; the policy's last use
    metrics.write(row)
    metrics.close()
    if dist.is_main:
        rundir.write_summary(run_dir, metrics.path, wall_s=time.monotonic() - t_start)
        if tc.report:
            write_run_report(run_dir)
    dist.barrier()
    dist.close()
    return run_dir


def pair_tokens(ex) -> int:
    """A pair's tokens as TRL's `num_tokens` counts them: two rows, prompt + chosen and
    prompt + rejected (the attention mask's ones), whatever layout the forward uses."""
    return 2 * len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids)


def stopped(signum: int, step: int, total: int, saved: Path, *, is_main: bool) -> Stopped:
    """The end of a run stopped by a signal after `step`, checkpointed at `saved` (said by
    the main process only)."""
    run_dir = saved.parent.parent
    name = NAMES.get(signum, f"signal {signum}")
    return Stopped(f"stopped by {name} after step {step} of {total}; checkpoint {saved}; "
                   f"continue with: dpolab train --resume {run_dir}" if is_main else "",
                   128 + signum)


# ---------------------------------------------------------------------------------------
# One step's statistics, gradient norm and the step-0 check


class StepStats:
    """Accumulates one optimizer step's pair statistics across micro-batches (and ranks):
    sums here, divided by the global batch size in `summary`. Without reference log-probs
    (a reference-free run) `rewards/...` are beta * log pi(y) itself, per-token means when
    `average` (:func:`dpolab.diagnostics.reference_free_stats`)."""

    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, pairs: PairLogps, terms: dict[str, Tensor], per_example: Tensor,
            weights: Tensor, *, beta: float, average: bool = False, scale: float = 1.0) -> None:
        with torch.no_grad():
            pc, pr, nc, nr = (t.detach().double().cpu().numpy() for t in (
                pairs.policy_chosen, pairs.policy_rejected, pairs.n_chosen, pairs.n_rejected))
            if pairs.ref_chosen is None or pairs.ref_rejected is None:
                add = reward_sums(reference_free_stats(pc, pr, nc, nr, beta=beta, average=average))
            else:
                rc, rr = (t.detach().double().cpu().numpy()
                          for t in (pairs.ref_chosen, pairs.ref_rejected))
                add = reward_sums(PairStats(pc, pr, rc, rr, nc, nr, beta=beta))
            add["loss"] = float((weights * per_example.detach().double()).sum())
            if pairs.token_sums is not None:  # token-weighted: their own denominators
                ts = pairs.token_sums.double()
                add.update({"_tokens/chosen": float(nc.sum()), "_tokens/rejected": float(nr.sum()),
                            **{f"_sums/{r}/{c}": float(ts[:, i, j].sum())
                               for i, r in enumerate(("chosen", "rejected"))
                               for j, c in enumerate(STAT_COLUMNS)}})
            if pairs.router_loss is not None:  # logged per batch, as TRL does: a pair-weighted mean
                add["aux_loss"] = float(pairs.router_loss) * len(pc)
            for name, t in terms.items():
                add[f"loss/{name}"] = float(t.double().sum())
        for k, v in add.items():
            self.sums[k] = self.sums.get(k, 0.0) + scale * v

    def summary(self, dist: Distributed, *, n_global: int) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = dict(zip(keys, dist.all_sum([self.sums[k] for k in keys])))
        out = {k: v / n_global for k, v in totals.items() if not k.startswith("_")}
        if "_tokens/chosen" in totals:  # TRL's token-weighted metrics (dpolab.scoring)
            sums = np.array([[[totals[f"_sums/{r}/{c}"] for c in STAT_COLUMNS]
                              for r in ("chosen", "rejected")]])  # (1, 2, 3)
            out.update(token_metrics(sums, np.array([totals["_tokens/chosen"]]),
                                     np.array([totals["_tokens/rejected"]])))
        return out


def clip(params: list[Tensor], max_norm: float) -> float:
    """The gradient norm before clipping; clipped to max_norm when max_norm > 0."""
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


def check_step0(pairs: PairLogps, terms: dict[str, Tensor],
                at_reference: Mapping[str, float]) -> None:
    """Before any update the policy is its reference: the first micro-batch's log-probs agree
    with the stored ones and every term has its value at zero log-ratios (`at_reference`, from
    the loss registry: ln 2 for DPO). The step-0 evaluation has compared every pair of both
    splits with the store already (dpolab.reference.check_at_reference, naming a damaged
    file), so a mismatch here is the training forward's own: its micro-batches score pairs
    otherwise than the evaluation's batches. A reference-free run has neither: its terms'
    values depend on the policy itself (their `at_reference` is None), so only their
    finiteness is checked, by the loop."""
    from dpolab.reference import disagree

    if pairs.ref_chosen is None or pairs.ref_rejected is None:
        return
    with torch.no_grad():
        for pol, ref, what in ((pairs.policy_chosen, pairs.ref_chosen, "chosen"),
                               (pairs.policy_rejected, pairs.ref_rejected, "rejected")):
            if disagree(pol.cpu(), ref.cpu()).any():
                err = float((pol.double() - ref.double()).abs().max())
                raise UserError(
                    f"step-0 invariant failed: the training forward's {what} log-probs differ "
                    f"from the reference by up to {err:.3g} nats, though every pair's agreed "
                    f"in the step-0 evaluation: the policy's log-probs depend on how its pairs "
                    f"are batched (train.batch_size against train.eval_batch_size)")
        for name, expected in at_reference.items():
            if name in terms:
                v = float(terms[name].double().mean())
                if abs(v - expected) > 1e-3 * max(1.0, abs(expected)):
                    raise UserError(f"step-0 invariant failed: the {name} loss is {v:.6f}, "
                                    f"expected {expected:.6f} with the policy at its reference")


def check_reference(s: session.Session, split: str, stats: PairStats) -> None:
    """The step-0 evaluation's log-probs of every pair of `split` (`stats`, the policy before
    any update) against the stored reference (:func:`dpolab.reference.check_at_reference`).
    Where the policy reads cached body states, disagreeing pairs are scored through the body
    again to tell damaged states from a damaged store."""
    from dpolab.reference import check_at_reference, store_path

    sp, cached, tc, dev = s.splits[split], s.scope.head_states, s.cfg.train, s.dist.device
    if sp.ref is None or not s.reference_is_start:  # model.reference: checked when stored
        return
    states = cached.stores.get(split) if cached is not None else None

    def rescore(examples: list) -> tuple[Tensor, Tensor]:
        fwd = s.scope.text_reference(dict(forward=s.scope.forward_name,
                                          pad_id=s.tokenizer.pad_token_id, device=dev,
                                          chunk_size=tc.logps_chunk,
                                          autocast=dev.type == "cuda" and tc.bf16_autocast))
        with torch.no_grad():
            c, r = fwd(examples).sums()
        return c.double().cpu(), r.double().cpu()
    check_at_reference(split, sp.examples, (torch.from_numpy(stats.policy_chosen),
                                            torch.from_numpy(stats.policy_rejected)), sp.ref,
                       store=store_path(cache_dir(), sp.ref.key), states=states,
                       rescore=rescore if states is not None else None)


def make_adamw(groups: list[dict], *, lr: float) -> torch.optim.Optimizer:
    """AdamW, in its fused form (one kernel over all parameters, no per-step temporaries the
    size of the model) when every parameter is a plain floating-point tensor on the CPU or a
    CUDA device; the per-parameter loop otherwise (e.g. FSDP2's sharded DTensors)."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        type(p.data) is torch.Tensor and p.dtype in (torch.float32, torch.float16, torch.bfloat16,
                                                    torch.float64)
        and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last evaluation line of a run, for callers and tests."""
    rows = rundir.read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r) and "evaluate" not in r]
    return evals[-1] if evals else {}

