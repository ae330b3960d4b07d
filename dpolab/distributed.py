"""The distributed runtime (torchrun): which process this is, on which device, the engine that
synchronises gradients (PyTorch's DistributedDataParallel or FSDP2), and the few collectives
the loop needs besides. A null object when torchrun did not start the process, so
single-process code calls the same methods and they do nothing.

Every collective runs on tensors of the run's device: NCCL takes CUDA tensors only, gloo
takes CPU ones, and `device` is CUDA exactly when the backend is NCCL.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch

Tensor = torch.Tensor


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grouped: bool = False  # a process group exists (torchrun started this process)
    local_rank: int = 0  # this process's index on its machine

    @classmethod
    def from_env(cls, device: str = "auto", *, timeout_s: float = 1800.0) -> "Distributed":
        """Join torchrun's process group whenever torchrun started the process (RANK and
        WORLD_SIZE set), one process included, so a single GPU runs the same NCCL path as
        eight. The timeout bounds every collective, the longest being the ranks' wait for
        each other around the reference pass."""
        cuda = torch.cuda.is_available() and device != "cpu"
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        import torch.distributed as td

        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(dev)  # before the group: NCCL binds each rank to its device
        if not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                  **({"device_id": dev} if cuda else {}))
        return cls(td.get_rank(), td.get_world_size(), dev, grouped=True, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The one process per machine that writes machine-local caches."""
        return self.local_rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a list of floats (float64, on the run's device)."""
        if not self.grouped:
            return values
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t.tolist()

    def all_max(self, value: int) -> int:
        """The largest of every rank's `value` (e.g. a signal number, 0 for none)."""
        if not self.grouped:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return int(t.item())

    def agree(self, facts: dict[str, str], warm: dict[str, bool]) -> dict[str, bool]:
        """Before the first collective of a run: every rank must hold the same `facts` (name
        -> hash: config, model weights, data), else every rank stops with the same one-line
        UserError naming the first rank that differs from rank 0 and in what, instead of
        collectives that wait for each other until the timeout. `warm` (cache name -> this
        rank holds it) comes back as whether EVERY rank holds it: a cache that one rank
        lacks is computed by all of them together, the others ignoring their copy."""
        if not self.grouped or self.world == 1:
            return dict(warm)
        import torch.distributed as td

        from dpolab.errors import UserError

        everyone: list = [None] * self.world
        td.all_gather_object(everyone, {"facts": facts, "warm": warm})
        first = everyone[0]["facts"]
        for rank, theirs in enumerate(everyone):
            differ = [k for k in sorted(set(first) | set(theirs["facts"]))
                      if theirs["facts"].get(k) != first.get(k)]
            if differ:
                raise UserError(
                    f"rank {rank} differs from rank 0 in its {', '.join(differ)} (hash "
                    f"{theirs['facts'].get(differ[0])}, rank 0: {first.get(differ[0])}); every "
                    f"rank must start with the same config, model and data files")
        return {k: all(bool(e["warm"].get(k)) for e in everyone) for k in warm}

    def sum_grad(self, t: Tensor) -> None:
        """Sum `t.grad` over ranks in place (zeros where this rank gave it none): for a
        trained tensor outside the engine's module (AuxDPO's per-pair offsets)."""
        if not self.grouped:
            return
        import torch.distributed as td

        if t.grad is None:
            t.grad = torch.zeros_like(t)
        td.all_reduce(t.grad, op=td.ReduceOp.SUM)

    def map_batches(self, fn: Callable[[int], Any], n: int, *, same_count: bool = False,
                    progress: Callable[[int], None] | None = None) -> list:
        """[fn(0), ..., fn(n - 1)] on every rank, each rank computing a share (i = rank,
        rank + world, ...) and the results gathered (pickled, so keep them on the CPU).
        With `same_count` a rank with one batch fewer runs fn(0) once more and drops it:
        sharded layers gather their weights in every forward, so every rank must run as many.
        Batch i is the same batch whatever the world size, so results do not depend on it."""
        mine = list(range(self.rank, n, self.world))
        rounds = -(-n // self.world) if same_count else len(mine)
        done: dict[int, Any] = {}
        for j in range(rounds):
            if j < len(mine):
                done[mine[j]] = fn(mine[j])
            else:
                fn(0)
            if progress:
                progress(min(n, (j + 1) * self.world))
        if self.grouped and self.world > 1:
            import torch.distributed as td

            parts: list = [None] * self.world
            td.all_gather_object(parts, done)
            for p in parts:
                done.update(p)
        return [done[i] for i in range(n)]

    def engine(self, model: torch.nn.Module, forward: Callable, *, sharded: bool) -> "Engine":
        """The module that trains: `forward` (a pair forward, examples -> FlatLogps) as the
        forward of a module owning `model`, wrapped in DDP (replicated) or FSDP2 (`sharded`)
        under torchrun, called as is otherwise."""
        module = PairModule(model, forward)
        if not self.grouped:
            return Engine(module, sharded=False)
        if sharded:
            from dpolab.sharding import shard

            shard(module, model)
            return Engine(module, sharded=True)
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the pair forward moves its own inputs (token ids built from the
        # examples) to the device. Buffers (rotary tables) are constants, computed alike on
        # every rank: never synced again before a forward. Gradients are views into the
        # communication buckets: no second copy of them.
        ddp = DistributedDataParallel(module, device_ids=None, gradient_as_bucket_view=True,
                                      **_no_buffer_sync())
        # DDP divides the summed gradient by the world size. Each rank's loss is already
        # divided by the global batch, so the gradient of the global mean is the plain SUM
        # over ranks: this hook all-reduces each bucket without the division. (Scaling the
        # loss by the world size instead would be exact only for powers of two.)
        ddp.register_comm_hook(None, _sum_bucket)
        return Engine(ddp, sharded=False)

    def barrier(self) -> None:
        if self.grouped:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.grouped:
            import torch.distributed as td

            td.destroy_process_group()


def _sum_bucket(state, bucket):
    import torch.distributed as td

    fut = td.all_reduce(bucket.buffer(), op=td.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class PairModule(torch.nn.Module):
    """A pair forward as a module: DDP and FSDP2 act on a module's forward (DDP prepares its
    gradient buckets there, FSDP2 gathers the root's weights there), and dpolab's forward is
    not `model(...)` but the body and then the chunked head on completion positions (or, for
    the last_layer scope, the head alone on cached states). It owns `model`, so the engine
    sees every parameter; frozen ones are left alone by both engines' gradient reduction."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.pair_forward = forward  # a plain callable, not a submodule

    def forward(self, examples: Sequence, split: str | None = None):
        """-> (tokens (N,) per-token log-probs, seg (N,), tokens processed, the MoE router
        loss or None, per-token statistics (N, 3) or None): FlatLogps's fields, as a tuple
        so that the engines find the output tensors."""
        flat = self.pair_forward(examples, split=split)
        return flat.tokens, flat.seg, flat.n_processed, flat.aux_loss, flat.stats


class Engine:
    """The trained module as the loop calls it: `engine(examples, split=...)` -> FlatLogps,
    `sync_gradients(False)` before the micro-batches that must not synchronise yet."""

    def __init__(self, wrapped: torch.nn.Module, *, sharded: bool):
        self.wrapped = wrapped  # DistributedDataParallel, the FSDP2 root, or the PairModule
        self.sharded = sharded

    def __call__(self, examples: Sequence, *, split: str | None = None):
        from dpolab.policy import FlatLogps

        tokens, seg, n, aux, stats = self.wrapped(list(examples), split)
        return FlatLogps(tokens, seg, len(examples), n, aux, stats)

    def sync_gradients(self, sync: bool) -> None:
        """Whether the next forward and backward reduce gradients across ranks: off for all
        but the last micro-batch of an optimizer step, whose backward then reduces the
        locally accumulated sum. DDP's `no_sync()` is a context manager around exactly this
        flag (set here per micro-batch instead, so the loop needs no extra block); FSDP2's
        `set_requires_gradient_sync` is its setter."""
        if self.sharded:
            self.wrapped.set_requires_gradient_sync(sync)
        elif hasattr(self.wrapped, "require_backward_grad_sync"):
            self.wrapped.require_backward_grad_sync = sync

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """The whole model usable outside the engine's forward (sampling, scoring text):
        FSDP2 gathers the root's own weights (embeddings, norm, head; the decoder layers
        gather themselves in their forward) and shards them again after. Collective."""
        if not self.sharded:
            yield
            return
        self.wrapped.unshard()
        try:
            yield
        finally:
            self.wrapped.reshard()


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's keyword for "no buffer broadcast before each forward": `forward_sync_buffers`
    where it exists (it replaced `broadcast_buffers`, which now warns), `broadcast_buffers`
    in the torch releases before it (2.8 among them)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
