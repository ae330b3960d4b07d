"""The distributed runtime (torchrun): which process this is, on which device, and the
collectives the loop needs. A null object when there is one process, so single-process code
calls the same methods and they do nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


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
