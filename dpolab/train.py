"""The training loop: one readable function, `train`, with named sections.

    setup -> data -> reference (once, stored) -> scope -> optimizer -> [resume] ->
    loop { schedule, forward, loss, backward, step, log, evaluate, checkpoint } -> export

Everything it builds is prepared by small helpers in `dpolab.session`; the loop itself only
moves batches through them. More than one process (torchrun) means data parallelism: each
rank takes an interleaved slice of every global batch and gradients are averaged with an
all-reduce, so N processes give the same step as one process on the same global batch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from dpolab import checkpoint, memory, runlock, session
from dpolab.auxdpo import AuxRewards
from dpolab.config import RunConfig
from dpolab.losses import LossHyper, Objective, PairLogps
from dpolab.progress import Progress
from dpolab.report import write_run_report

LN2 = math.log(2.0)
# Terms whose value at h = 0 (the policy equal to its reference) is ln 2.
_LN2_AT_START = ("dpo", "robust", "dpop", "auxdpo")


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


def train(cfg: RunConfig, *, resume: bool = False) -> Path:
    with runlock.hold(cfg.out, enabled=os.environ.get("RANK", "0") == "0"):  # one run per dir
        return _train(cfg, resume=resume)


def _train(cfg: RunConfig, *, resume: bool = False) -> Path:
    # ---- setup -------------------------------------------------------------------------
    dist = session.Distributed.from_env(cfg.train.device)
    if dist.device.type == "cpu" and cfg.train.cpu_reuse_memory:
        memory.reuse_freed_blocks()  # no page faults for the same buffers every step
    run_dir = session.prepare_run_dir(cfg, resume=resume, is_main=dist.is_main)
    t_start = time.monotonic()
    s = session.build(cfg, run_dir, dist)  # data, reference, model scope, forward functions
    tc, lc = cfg.train, cfg.loss
    objective = Objective(lc.term_weights(), LossHyper(
        beta=lc.beta, label_smoothing=lc.label_smoothing, dpop_lambda=lc.dpop_lambda,
        average_logps=lc.average_logps, sft_average=lc.sft_average))
    aux = AuxRewards.maybe(objective, s, lc)

    # ---- optimizer and schedule ----------------------------------------------------------
    groups = [{"params": s.params, "lr": tc.lr, "weight_decay": tc.weight_decay}]
    if aux is not None:
        groups.append({"params": [aux.delta], "lr": lc.aux_lr, "weight_decay": 0.0})
    optimizer = make_adamw(groups, lr=tc.lr)
    global_batch = tc.batch_size * tc.grad_accum * dist.world
    steps_per_epoch = math.ceil(len(s.train) / global_batch)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    start = kept_lines = 0
    if resume:
        start, kept_lines = checkpoint.restore(run_dir, s.trainable_named(aux), optimizer)
    metrics = session.MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main,
                                 keep_lines=kept_lines)
    if start == 0:
        metrics.write(s.evaluate(step=0))
    bar = Progress(total, "train", enabled=tc.progress and dist.is_main)
    bar.update(start)

    # ---- loop --------------------------------------------------------------------------
    batches = global_batches(len(s.train), seed=tc.seed, epochs=epochs, global_batch=global_batch)
    for step, (epoch, positions) in enumerate(batches):
        if step >= total:
            break
        if step < start:
            continue  # already trained before the checkpoint; the order is deterministic
        t0 = time.monotonic()
        lr = lr_at(step, peak=tc.lr, warmup=tc.warmup_steps, total=total, schedule=tc.schedule)
        optimizer.param_groups[0]["lr"] = lr
        if aux is not None:
            optimizer.param_groups[1]["lr"] = lc.aux_lr
        optimizer.zero_grad(set_to_none=True)
        stats = session.StepStats()
        mine = positions[dist.rank::dist.world]
        for micro in range(tc.grad_accum):
            idx = mine[micro * tc.batch_size:(micro + 1) * tc.batch_size]
            if not idx:
                continue
            # forward
            examples = [s.train[i] for i in idx]
            flat = s.forward(examples, split="train")
            pc, pr = flat.sums()
            nc, nr = flat.counts()
            rc, rr = s.ref_sums("train", idx)
            delta_c, delta_r = aux.batch(idx) if aux is not None else (None, None)
            pairs = PairLogps(pc, pr, rc, rr, nc, nr, delta_c, delta_r)
            # loss
            per_example, terms = objective(pairs)
            weights = s.group_weights("train", idx)
            loss = (weights * per_example).sum() / len(positions)
            if aux is not None:
                loss = loss + aux.penalty(idx, examples, n_global=len(positions))
            if step == 0 and start == 0 and micro == 0:
                session.check_step0(pairs, terms, _LN2_AT_START)
            if not torch.isfinite(loss):
                raise checkpoint.nonfinite_error(run_dir, step + 1, "loss", loss.item())
            # backward
            loss.backward()
            stats.add(pairs, terms, per_example, weights, flat, beta=lc.beta)
        # step
        dist.average_gradients(s.params + ([aux.delta] if aux is not None else []))
        grad_norm = session.clip(s.params, tc.max_grad_norm)
        if not math.isfinite(grad_norm):  # never applied, so never checkpointed
            raise checkpoint.nonfinite_error(run_dir, step + 1, "gradient norm", grad_norm)
        optimizer.step()
        # log
        row = stats.summary(dist, n_global=len(positions))
        row.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm,
                   tokens_per_s=stats.tokens * dist.world / max(time.monotonic() - t0, 1e-9),
                   elapsed_s=time.monotonic() - t_start)
        metrics.write(row)
        bar.update(step + 1, loss=row["loss"], acc=row["rewards/accuracies"])
        done = step + 1 == total
        if done or (tc.eval_every and (step + 1) % tc.eval_every == 0):
            row = s.evaluate(step=step + 1)
            if done:
                row.update(s.did_eval())
            metrics.write(row)
        if done or (tc.save_every and (step + 1) % tc.save_every == 0):
            checkpoint.save(run_dir, step + 1, s.trainable_named(aux), optimizer,
                            metrics_lines=metrics.lines, is_main=dist.is_main,
                            keep=tc.keep_checkpoints)  # collective
            dist.barrier()
    bar.close()

    # ---- export ------------------------------------------------------------------------
    s.export(run_dir / "model")  # collective
    if dist.is_main:
        session.write_summary(run_dir, metrics.path, wall_s=time.monotonic() - t_start)
        if tc.report:
            write_run_report(run_dir)
    dist.barrier()
    dist.close()
    return run_dir


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
    rows = session.read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return evals[-1] if evals else {}

