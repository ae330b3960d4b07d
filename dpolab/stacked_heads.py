"""A last_layer sweep's heads trained together: one session, G heads, one pass over the data.

Under `train.scope=last_layer` a run trains the output head (V, D) on body states cached once.
Grid points that differ only in the head's loss and optimizer (dpolab.sweeps.HEAD_ONLY and
`loss.*`) share everything else: the tokenization, the model, the cached states, the
reference store, the batches. `train_heads` builds that session once and keeps one weight
tensor (V, D) and one AdamW per point; every optimizer step runs each point's head in turn
on the step's micro-batches of the same cached states. The session's one head parameter
holds the weights of the point being worked on (its `.data` is that point's tensor), so
the session's own `pair_logps`, `evaluate`, checkpoints and export serve every point
unchanged, and each point's run directory is the one the same config writes alone
(tests/test_sweep.py compares them number by number).

Notation: G points, V vocabulary rows, D the hidden width. The loop below is the per-step
part of `dpolab.train.train` for one process without AuxDPO or MoE routers (a sweep with
those runs its points one after another), built from the same helpers.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from dpolab import checkpoint, rundir, runlock, session
from dpolab.config import RunConfig
from dpolab.config import to_dict as config_dict
from dpolab.distributed import Distributed
from dpolab.errors import Stopped, UserError
from dpolab.inputs import Inputs
from dpolab.losses import Objective
from dpolab.progress import Progress
from dpolab.report import write_run_report
from dpolab.stopping import NAMES, StopSignals
from dpolab.trackers import open_trackers
from dpolab.train import (StepStats, check_reference, check_step0, clip, eval_interval,
                          global_batches, lr_at, make_adamw, pair_tokens)

Tensor = torch.Tensor


class PointHead:
    """One grid point in the joint pass: its config, its view of the shared session (its
    run directory, its loss's beta; no reference where its loss reads none), its head's
    weights and its own AdamW state and metrics file."""

    def __init__(self, cfg: RunConfig, shared: session.Session, start: list[Tensor]):
        self.cfg, tc = cfg, cfg.train
        splits = shared.splits
        if not session.needs_reference(cfg):  # what this point's run alone would have
            splits = {k: replace(sp, ref=None, ref_chosen=None, ref_rejected=None)
                      for k, sp in splits.items()}
        self.view = replace(shared, cfg=cfg, run_dir=Path(cfg.out), splits=splits,
                            tokens_processed=0)
        self.weights = [w.clone() for w in start]  # (V, D) [and (V,)]: this point's own
        self.objective = Objective(cfg.loss.term_weights(), cfg.loss)
        self.optimizer = make_adamw([{"params": shared.params, "lr": tc.lr,
                                      "weight_decay": tc.weight_decay}], lr=tc.lr)
        tracker = open_trackers(tc.report_to, self.view.run_dir, project=tc.tracker_project,
                                config=config_dict(cfg), is_main=True)
        self.metrics = rundir.MetricsLog(self.view.run_dir / "metrics.jsonl", enabled=True,
                                         tracker=tracker)

    def use(self) -> session.Session:
        """Point the session's head parameters at this point's weights; returns its view."""
        for p, w in zip(self.view.params, self.weights):
            p.data = w
        return self.view

    def train_step(self, step: int, epoch: int, positions: list[int], *, total: int,
                   t_start: float, num_tokens: int) -> dict[str, float]:
        """One optimizer step of this point on `positions` (schedule, forward, loss,
        backward, step, log), as dpolab.train.train takes it with one process."""
        s, tc, lc = self.use(), self.cfg.train, self.cfg.loss
        t0, tokens0 = time.monotonic(), s.tokens_processed
        lr = lr_at(step, peak=tc.lr, warmup=tc.warmup_steps, total=total, schedule=tc.schedule)
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        stats = StepStats()
        for micro in range(math.ceil(len(positions) / tc.batch_size)):
            idx = positions[micro * tc.batch_size:(micro + 1) * tc.batch_size]
            pairs = s.pair_logps("train", idx)
            per_example, terms = self.objective(pairs)
            weights = s.group_weights("train", idx)
            loss = (weights * per_example).sum() / len(positions)
            if step == 0 and micro == 0:
                check_step0(pairs, terms, self.objective.at_reference())
            if not torch.isfinite(loss):
                raise checkpoint.nonfinite_error(s.run_dir, step + 1, "loss", loss.item())
            loss.backward()
            stats.add(pairs, terms, per_example, weights, beta=lc.beta, average=s.reward_average)
        grad_norm = clip(s.params, tc.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise checkpoint.nonfinite_error(s.run_dir, step + 1, "gradient norm", grad_norm)
        self.optimizer.step()
        row = stats.summary(s.dist, n_global=len(positions))
        row.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm, num_tokens=num_tokens,
                   tokens_per_s=(s.tokens_processed - tokens0) / max(time.monotonic() - t0, 1e-9),
                   elapsed_s=time.monotonic() - t_start)
        self.metrics.write(row)
        return row

    def save(self, step: int) -> Path:
        s = self.use()
        return checkpoint.save(s.run_dir, step, s.trainable_named(), self.optimizer,
                               metrics=self.metrics.text(), identity=s.identity.record(),
                               is_main=True, keep=self.cfg.train.keep_checkpoints)

    def finish(self, total: int, wall_s: float) -> None:
        """The last evaluation, export and DID probe, summary and report; frees the point's
        optimizer state and weights (they are in the export)."""
        s = self.use()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = None  # its moments: the DID probe needs the memory
        row = s.evaluate(step=total)
        row.update(s.export_and_probe(s.run_dir / "model"))
        self.metrics.write(row)
        self.metrics.close()
        rundir.write_summary(s.run_dir, self.metrics.path, wall_s=wall_s)
        if self.cfg.train.report:
            write_run_report(s.run_dir)


def train_heads(cfgs: list[RunConfig], *, inputs: Inputs | None = None) -> list[Path]:
    """Train the grid points `cfgs` (last_layer, differing only in the head's loss and
    optimizer) together; returns their run directories, each as the point's config run alone
    writes it. Raises errors.Stopped after checkpointing every point when a signal asks."""
    # The session is built for a point that reads the reference (if any does): it is
    # computed or read once and given to every point whose loss reads it.
    base = next((c for c in cfgs if session.needs_reference(c)), cfgs[0])
    inputs = (inputs or Inputs()).checked(base)
    with ExitStack() as stack:
        for cfg in cfgs:
            stack.enter_context(runlock.hold(cfg.out, enabled=True))
        signals = stack.enter_context(StopSignals())
        return _train_heads(cfgs, base, inputs, signals)


def _train_heads(cfgs: list[RunConfig], base: RunConfig, inputs: Inputs,
                 signals: StopSignals) -> list[Path]:
    # ---- setup: one session for all points ----------------------------------------------
    dist = Distributed.from_env(base.train.device, timeout_s=base.train.dist_timeout_s)
    if dist.world > 1:
        raise UserError("heads train together in one process; under torchrun a sweep runs "
                        "its points one after another")
    t_start = time.monotonic()
    dirs = [rundir.prepare_run_dir(c, resume=False, is_main=True) for c in cfgs]
    shared = session.build(base, Path(base.out), dist, inputs)
    data_json = (Path(base.out) / "data.json").read_bytes()
    for cfg, run_dir in zip(cfgs, dirs):
        if cfg is not base:  # what build wrote for the base point, for each other point
            (run_dir / "data.json").write_bytes(data_json)
            if session.needs_reference(cfg):
                session._report_unflippable(cfg, run_dir, shared.splits, shared.groups)
    start = [p.detach().clone() for p in shared.params]  # the head at theta0
    heads = [PointHead(cfg, shared, start) for cfg in cfgs]

    # ---- schedule: the points share batches, steps and evaluations ---------------------
    tc = base.train
    global_batch = tc.batch_size * tc.grad_accum
    steps_per_epoch = math.ceil(len(shared.train) / global_batch)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    every = eval_interval(tc.eval_every, total)
    # Every pair of both splits at the reference point, checked. Every head is theta0's
    # here: the pairs are scored once and each point summarises them with its own beta.
    at_theta0: dict = {}
    for h in heads:
        view = replace(h.use(), unchanged_logps=at_theta0)
        h.metrics.write(view.evaluate(
            step=0, check=lambda split, st, v=view: check_reference(v, split, st)))
    bar = Progress(total, f"train {len(heads)} heads", enabled=tc.progress)

    # ---- loop: each step, every point's head in turn -------------------------------------
    batches = global_batches(len(shared.train), seed=tc.seed, epochs=epochs,
                             global_batch=global_batch)
    signals.armed = True
    num_tokens = 0  # TRL's num_tokens, as dpolab.train counts it
    for step, (epoch, positions) in enumerate(batches):
        if step >= total:
            break
        num_tokens += sum(pair_tokens(shared.train[i]) for i in positions)
        for h in heads:
            h.train_step(step, epoch, positions, total=total, t_start=t_start,
                         num_tokens=num_tokens)
        done = step + 1 == total
        if not done and every and (step + 1) % every == 0:
            for h in heads:
                h.metrics.write(h.use().evaluate(step=step + 1, train_split=False))
        stop = signals.received
        if done or stop or (tc.save_every and (step + 1) % tc.save_every == 0):
            for h in heads:
                h.save(step + 1)
        bar.update(step + 1)
        if stop:
            bar.close()
            for h in heads:
                h.metrics.close()
            sweep_dir = Path(base.out).parent
            raise Stopped(f"stopped by {NAMES.get(stop, f'signal {stop}')} after step "
                          f"{step + 1} of {total}, every point checkpointed; continue with: "
                          f"dpolab sweep --resume {sweep_dir}", 128 + stop)
    signals.armed = False
    bar.close()

    # ---- the last evaluation, export, DID probe, per point ------------------------------
    for h in heads:
        h.finish(total, wall_s=time.monotonic() - t_start)
        h.weights = []
    return dirs
