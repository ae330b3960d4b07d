"""FSDP2 (`fully_shard`) for models that do not fit on one device (train.distributed=fsdp2).

Each decoder layer becomes one FSDP unit: its parameters are DTensors sharded across ranks,
gathered for its forward and backward and reduce-scattered after. The module that runs the
pair forward (`distributed.PairModule`, owning the model) is the root unit: the parameters
outside the layers (embeddings, final norm, the head) are sharded too, gathered when the pair
forward starts and again before its backward (the chunked head's backward reads the gathered
head weight it saved), and reduce-scattered like the layers'. Nothing is replicated, so no
gradient is reduced outside FSDP2.

Gradient reduction sums (divide factor 1): each rank's loss is already divided by the global
batch size. Everything that turns sharded tensors into full ones (checkpoints, export) is a
collective: every rank calls it, rank 0 writes. They go through PyTorch's own
torch.distributed.checkpoint.state_dict, which keys the optimizer's state by parameter
name, so a resume does not depend on the order the parameters are created in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Tensor = torch.Tensor


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard(root: torch.nn.Module, model: torch.nn.Module) -> int:
    """fully_shard every decoder layer of `model`, then `root` (which owns `model`) for the
    rest; returns how many units were made."""
    import torch.distributed as td
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dpolab.models import decoder_layers

    # The mesh on the model's device type (FSDP2 would pick CUDA whenever present, even for
    # a run on the CPU).
    mesh = init_device_mesh(next(model.parameters()).device.type, (td.get_world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The root reshards after its forward as the layers do (FSDP2 keeps a root gathered by
    # default): an evaluation or reference forward must leave every parameter in its
    # sharded form, which is what the optimizer, checkpoints and export hold.
    fully_shard(root, mesh=mesh, reshard_after_forward=True)
    for unit in [*layers, root]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return len(layers) + 1


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (collective for a sharded one)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: Tensor, param: Tensor) -> Tensor:
    """A full tensor laid out like `param` (sharded the same way when param is sharded)."""
    if not is_sharded(param) or value.shape != param.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)


def by_name(named: Mapping[str, Tensor]) -> torch.nn.Module:
    """A module whose parameters are exactly `named`, under those names (the same tensors, not
    copies), for torch.distributed.checkpoint.state_dict to read names from. What trains is
    not one module's: AuxDPO's per-pair offsets live in the optimizer but outside the model."""
    root = torch.nn.Module()
    for name, param in named.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, param)
    return root


def gather_state(named: Mapping[str, Tensor], optimizer: torch.optim.Optimizer
                 ) -> tuple[dict[str, Tensor], dict]:
    """(the `named` tensors, the optimizer's state), both keyed by parameter name, whole and on
    the CPU on rank 0 and empty on the other ranks. Collective: sharded tensors are gathered."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    owner, options = by_name(named), StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(owner, options=options),
            get_optimizer_state_dict(owner, optimizer, options=options))


def load_state(named: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
               tensors: Mapping[str, Tensor], optimizer_state: dict) -> None:
    """The inverse of :func:`gather_state`, from the whole state on every rank: each tensor
    is copied into its parameter (its shard of it), and each parameter's optimizer state is
    the one saved under its name, whatever order the optimizer now holds the parameters in.
    A parameter saved without state (no gradient had reached it) is not an error: it keeps
    the zero state PyTorch's loader gives every parameter first, which differs from none only
    once a gradient reaches it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    owner = by_name(named)
    set_model_state_dict(owner, dict(tensors), options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(owner, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def full_model_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """model.state_dict() whole and on the CPU on rank 0, empty on the other ranks
    (collective: sharded tensors are gathered)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def clip_grad_norm(params: list[Tensor], max_norm: float) -> float:
    """Global gradient norm over sharded (and any replicated) gradients; clip when
    max_norm > 0. Sharded gradients contribute their local shards, summed over ranks
    (disjoint shards); a replicated gradient, equal on every rank, counts once. Reduced on
    the gradients' device (NCCL reduces device tensors only)."""
    import torch.distributed as td

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local_of = lambda g: g.to_local() if is_sharded(g) else g  # noqa: E731
    device = local_of(grads[0]).device
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        sq = local_of(g).double().pow(2).sum()
        if is_sharded(g):
            sharded += sq
        else:
            replicated += sq
    td.all_reduce(sharded, op=td.ReduceOp.SUM)
    norm = float((sharded + replicated).sqrt())
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def save_full_state(state: dict[str, Tensor], config, tokenizer, out) -> None:
    """Write a from_pretrained-loadable folder from a gathered state dict: model.safetensors
    (a tied head is stored once, as transformers does), config, tokenizer; atomically."""
    from safetensors.torch import save_file

    from dpolab import atomic

    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with atomic.write_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
