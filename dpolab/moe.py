"""The routers' load-balancing loss of a mixture-of-experts model, as its own forward computes it.

A MoE causal LM of transformers (Mixtral, Qwen3-MoE, GPT-OSS, Jamba, ...) called with
`output_router_logits=True` returns `aux_loss`, the Switch Transformer load-balancing loss of
its routers' logits over the non-padding tokens, from `load_balancing_loss_func` of its own
modeling module. TRL's DPO trainer adds `router_aux_loss_coef * aux_loss` to the loss and logs
`aux_loss`. dpolab's body runs the decoder, not the model's forward, so it asks the decoder for
the router logits and calls the same function with a weight per slot: the rows TRL's forward
runs (two per pair) hold each prompt twice, so a prompt slot that a shared-prompt layout
computes once counts twice (the function weights tokens by the mask it is given).

The coefficient is the model config's `router_aux_loss_coef` (0 when it declares none), or
`model.router_aux_loss_coef` of the run; 0 turns the loss off. Under `train.scope=last_layer`
the routers do not train: no loss, nothing logged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from dpolab.errors import UserError

Tensor = torch.Tensor


@dataclass(frozen=True)
class RouterLoss:
    """The load-balancing loss of one architecture: `fn(gate_logits, num_experts, top_k,
    attention_mask)` of its modeling module, and its weight in the training loss."""

    fn: Callable
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits: tuple[Tensor, ...], weights: Tensor) -> Tensor:
        """router_logits: one (T, E) tensor per routed layer over the T slots of a forward;
        weights (T,): how many of TRL's rows each slot stands for (0 padding) -> () loss."""
        if not router_logits:
            return weights.new_zeros((), dtype=torch.float32)
        return self.fn(tuple(router_logits), self.num_experts, self.top_k,
                       weights.reshape(1, -1).float())


def router_loss(model, coef: float | None, *, scope: str) -> RouterLoss | None:
    """The router loss `model` trains with, or None: not a MoE model that computes one, a
    coefficient of 0, or a scope whose body does not train (last_layer, token_rows: the
    routers do not train). A coefficient set
    for a model without one is a UserError, as in TRL."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    routed = (hasattr(config, "output_router_logits") and fn is not None
              and hasattr(base, "num_experts") and hasattr(base, "num_experts_per_tok"))
    if coef is not None and coef != 0 and not routed:
        raise UserError(f"model.router_aux_loss_coef={coef}, but {type(base).__name__} computes "
                        "no router load-balancing loss (not a mixture-of-experts model whose "
                        "forward returns aux_loss); leave it unset")
    weight = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else coef
    from dpolab.scopes import SCOPES

    if not routed or weight == 0.0 or not SCOPES[scope].trains_body:
        return None
    return RouterLoss(fn, int(base.num_experts), int(base.num_experts_per_tok), weight)
