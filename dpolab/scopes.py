"""Which parameters train: `full`, `lora` (peft adapters), `last_layer` (the output head) or
`token_rows` (the head rows of the tokens that occur in the training completions).

`apply` decides it once and returns a frozen :class:`Scope`: everything a caller needs to know
about the scope is a field of it, so no other module asks which scope it has.
`last_layer` unties a head that shares its weight with the input embedding, so training it
leaves the embedding (and thus the cached body states) untouched and the export keeps both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dpolab import ref_sync
from dpolab.logps import Head
from dpolab.head_cache import CachedHeadForward, SharedBodyText
from dpolab.policy import FlatLogps, make_forward
from dpolab.progress import Progress

Tensor = torch.Tensor
# (examples, *, split=None) -> FlatLogps: the one call signature of every pair forward
Forward = Callable[..., FlatLogps]


@dataclass(frozen=True)
class Scope:
    """What training one scope means, decided once by :func:`apply`."""

    params: tuple[Tensor, ...]  # the trained parameters
    forward: Forward  # the policy's log-probs of stored pairs, differentiable
    reference: Forward  # the same at the reference point theta0 (computed once, then stored)
    model: torch.nn.Module  # the module that samples and is exported (the peft model for lora)
    # last_layer only: the cached body states (CachedHeadForward.responses) and the head at
    # theta0; with them AuxDPO's null-space penalty has a closed form. None otherwise.
    head_states: CachedHeadForward | None
    reference_head: Head | None
    # kw -> the reference's forward over any pairs (e.g. sampled completions), where kw are
    # make_forward's keywords and `forward`, its name: the reference weights as this scope
    # still has them (the full scope has not: it loads them into the policy's parameters,
    # ending the policy).
    text_reference: Callable[[dict], Forward]
    # text_reference loads the reference weights into the policy's parameters (the full
    # scope: no second model in memory), so it comes after the policy's last use.
    reference_replaces_policy: bool = False
    # token_rows only: (U,) the sorted token ids whose head rows train (the gradient of
    # every other row is zeroed); AuxDPO's A has only these rows. None otherwise.
    trained_rows: Tensor | None = None
    forward_name: str = "shared_prompt"  # the FORWARDS layout of every forward of the body
    # trained tensors by name -> the reference that TR-DPO moves (dpolab.ref_sync), its
    # tensors kept as this scope allows without a second model
    moving_reference: Callable[[dict], ref_sync.MovingReference] | None = None

    def text_forwards(self, *, pad_id: int, chunk_size: int, device
                      ) -> tuple[Forward, Callable[[], Forward]]:
        """(policy forward, a function making the reference forward) over any pairs, in the
        run's layout (`forward_name`), no autocast: the training forward's log-probs without
        its caches. Make the reference's only after the policy's last use: for the full scope
        it takes the policy's place in memory. Where the reference is another head on the same
        frozen body (`reference_head`), the reference reads the states of the policy's body
        pass over the same examples instead of running the body again."""
        from dpolab.models import body_and_head

        kw = dict(forward=self.forward_name, pad_id=pad_id, chunk_size=chunk_size,
                  device=device, autocast=False)
        body, _ = body_and_head(self.model)
        policy = _text_forward(kw, body, lambda: body_and_head(self.model)[1], self.model.dtype)
        if self.reference_head is not None:  # the head scopes: one body pass serves both
            shared = SharedBodyText(policy, self.reference_head)
            return shared.policy, lambda: shared.reference
        return policy, lambda: self.text_reference(kw)


def apply(cfg, model, tok: dict, *, pad_id: int, device: torch.device, autocast: bool, dist,
          state_store=None, reload=None, forward: str = "shared_prompt", router=None) -> Scope:
    """Make `model` train as `cfg.train.scope` says (its SCOPES entry). state_store(split,
    examples) -> Path | None: where the head scopes keep their cached body states between
    runs. reload(device) -> the model at theta0 again, for scoring new text after training
    (full scope; lora on a model that already has adapters); None: load what `cfg.model`
    names. forward: the FORWARDS layout of the body (dpolab.forward_check chose it); router:
    the MoE routers' load-balancing loss trained with it (dpolab.moe), or None."""
    kind = SCOPES[cfg.train.scope]
    if cfg.train.activation_checkpointing and kind.trains_body:
        from dpolab.models import checkpoint_activations

        checkpoint_activations(model)
    kw = dict(pad_id=pad_id, chunk_size=cfg.train.logps_chunk, device=device,
              autocast=autocast, router=router)
    return kind.make(cfg, model, tok, kw, forward=forward, reload=reload, dist=dist,
                     state_store=state_store)


def _full(cfg, model, tok, kw, *, forward, reload, dist, state_store) -> Scope:
    from dpolab.models import body_and_head

    model.requires_grad_(True)
    body, _ = body_and_head(model)
    # The head read at each call: under FSDP2 the head's parameter is swapped between
    # its sharded and its gathered form (dpolab.sharding).
    fwd = make_forward(forward, body, lambda: body_and_head(model)[1], dtype=model.dtype, **kw)
    # The reference weights are gone from memory once training starts: at the end they
    # are loaded again, into the policy's place.
    return Scope(params=tuple(p for p in model.parameters() if p.requires_grad), forward=fwd,
                 reference=fwd, model=model, head_states=None, reference_head=None,
                 text_reference=lambda kw: _reference_in_place(cfg, model, kw, reload),
                 reference_replaces_policy=True, forward_name=forward,
                 moving_reference=lambda named: ref_sync.swapped_reference(named, fwd))


def _lora(cfg, model, tok, kw, *, forward, reload, dist, state_store) -> Scope:
    from dpolab.models import body_and_head

    # A peft model given as it is (dpolab.api.Trainer) trains its own adapters.
    peft_model = model if is_peft(model) else _add_lora(model, cfg.train)
    body, head = body_and_head(peft_model)
    fwd = make_forward(forward, body, head, dtype=model.dtype, **kw)
    # LoRA starts with B = 0: the scope's own forward is the reference's exactly.
    # Adapters that start nonzero are part of theta0: switching them off is no reference.
    text_ref = ((lambda kw: _reloaded_forward(cfg, kw, reload)) if reload is not None
                else (lambda kw: _adapter_off_forward(peft_model, kw)))
    return Scope(params=tuple(p for p in peft_model.parameters() if p.requires_grad),
                 forward=fwd, reference=fwd, model=peft_model, head_states=None,
                 reference_head=None, text_reference=text_ref, forward_name=forward,
                 moving_reference=lambda named: ref_sync.lora_reference(peft_model, named, fwd))


def _head(cfg, model, tok, kw, *, forward, reload, dist, state_store,
          token_rows: bool = False) -> Scope:
    """last_layer, and token_rows (`token_rows`: only the rows of the training tokens)."""
    from dpolab.models import body_and_head

    tc = cfg.train
    untie_head(model)
    body, head = body_and_head(model)
    out = model.get_output_embeddings()
    out.weight.requires_grad_(True)
    params = [out.weight]
    if getattr(out, "bias", None) is not None:
        out.bias.requires_grad_(True)
        params.append(out.bias)
    rows = train_rows_only(params, tok["train"].examples) if token_rows else None
    fwd = CachedHeadForward(lambda: head, chunk_size=tc.logps_chunk, device=kw["device"])
    # The reference head: the reference forward (cached body states under the original head,
    # no second body pass), AuxDPO's null-space penalty and scoring samples.
    head0 = Head(head.weight.detach().clone(),
                 None if head.bias is None else head.bias.detach().clone(), head.softcap,
                 head.scale)
    for split, t in tok.items():
        bar = Progress(len(t.examples), f"cache body states ({split})",
                       enabled=tc.progress and dist.is_main)
        states = make_forward(forward, body, head, dtype=model.dtype, **kw).hidden
        # Data-parallel under torchrun: each rank runs the body on its share of the batches,
        # every rank keeps (and stores) all states.
        fwd.fill(states, t.examples, split=split, batch_size=tc.eval_batch_size,
                 progress=bar.update, store=state_store(split, t.examples) if state_store else None,
                 map_batches=dist.map_batches)
        bar.close()

    def reference(examples: Sequence, *, split: str | None = None) -> FlatLogps:
        return fwd(examples, split=split, head=head0)
    return Scope(params=tuple(params), forward=fwd, reference=reference, model=model,
                 head_states=fwd, reference_head=head0,
                 text_reference=lambda kw: _text_forward(kw, body, lambda: head0, model.dtype),
                 trained_rows=rows, forward_name=forward,
                 moving_reference=lambda named: ref_sync.head_reference(fwd, named, head0, rows))


@dataclass(frozen=True)
class ScopeKind:
    """One value of train.scope: how it is made, and the facts other modules ask of it."""

    name: str
    make: Callable[..., Scope]  # (cfg, model, tok, forward kw, *, forward, reload, dist, state_store)
    trains_body: bool  # the body is in the training graph (activation checkpointing, router loss)
    overwrites_weights: bool  # trains the model's own weights: a model given in memory loses
    # its starting ones unless they are copied first (dpolab.inputs.Theta0)


SCOPES: dict[str, ScopeKind] = {k.name: k for k in (
    ScopeKind("full", _full, trains_body=True, overwrites_weights=True),
    ScopeKind("lora", _lora, trains_body=True, overwrites_weights=False),
    ScopeKind("last_layer", _head, trains_body=False, overwrites_weights=False),
    ScopeKind("token_rows", lambda *a, **kw: _head(*a, **kw, token_rows=True),
              trains_body=False, overwrites_weights=False),
)}


def is_peft(model) -> bool:
    """Whether `model` is a peft model (adapters on a base model)."""
    return hasattr(model, "peft_config")


def completion_tokens(examples: Sequence) -> Tensor:
    """(U,) sorted ids of the tokens that occur in the examples' completions (chosen and
    rejected, scored or not)."""
    ids = {t for ex in examples for t in (*ex.chosen_ids, *ex.rejected_ids)}
    return torch.tensor(sorted(ids), dtype=torch.long)


def train_rows_only(params: Sequence[Tensor], examples: Sequence) -> Tensor:
    """token_rows: zero the gradient of every head row (weight (V, D), bias (V,)) whose token
    is not in a training completion, in backward and in autograd.grad alike (a hook on the
    tensor), so an optimizer without weight decay never moves those rows. Returns the trained
    token ids (U,).

    For single-token completions this is exactly the last_layer scope under any loss of the
    log-ratio margin: chosen and rejected share the state x, the log-partition cancels, and
    the margin's gradient on every other row is zero anyway; longer completions score later
    tokens from states the two completions do not share, and there the two scopes differ."""
    rows = completion_tokens(examples)
    keep = torch.zeros(params[0].shape[0], dtype=params[0].dtype, device=params[0].device)
    keep[rows.to(keep.device)] = 1.0
    for p in params:
        mask = keep if p.dim() == 1 else keep[:, None]
        p.register_hook(lambda g, mask=mask: g * mask.to(g.dtype))
    return rows


def _adapter_off_forward(peft_model, kw: dict) -> Forward:
    """LoRA's reference: the same model with its adapters switched off."""
    from dpolab.models import body_and_head

    body, head = body_and_head(peft_model)
    fwd = _text_forward(kw, body, lambda: head, peft_model.dtype)

    def reference(examples: Sequence, *, split: str | None = None) -> FlatLogps:
        with peft_model.disable_adapter():
            return fwd(examples)
    return reference


def _reference_in_place(cfg, model, kw: dict, reload=None) -> Forward:
    """The full scope's reference: its weights are gone from memory. They are read again and
    put in the policy's own parameters, so memory never holds two models: this ends the
    policy (its last use, after export). Replicated weights are freed before the read, and
    the read tensors are adopted (moved to the device one at a time); sharded ones (FSDP2)
    receive this rank's shard of each read tensor. A model given in memory (`reload`: its
    starting weights, kept on the CPU) exchanges its weights with the kept ones instead
    (inputs.Theta0.exchange), and is exchanged back after the probe: the caller's model
    ends trained."""
    from dpolab import sharding
    from dpolab.models import body_and_head, load_configured

    named = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        if reload is not None:
            reload.exchange(model)
        else:
            for p in named.values():
                if not sharding.is_sharded(p):
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            source = dict(load_configured(cfg.model, device="cpu").named_parameters(
                remove_duplicate=False))
            for name, p in named.items():
                r = source[name].detach()
                if sharding.is_sharded(p):
                    p.copy_(sharding.like(r, p))
                else:
                    p.data = r.to(p.device)  # adopted: no second copy on the same device
            del source
    body, _ = body_and_head(model)
    return _text_forward(kw, body, lambda: body_and_head(model)[1], model.dtype)


def _reloaded_forward(cfg, kw: dict, reload=None) -> Forward:
    """A reference model loaded again beside the policy (a peft model given in memory whose
    adapters start nonzero: switching them off is no reference)."""
    from dpolab.models import body_and_head, load_configured

    ref_model = (reload(kw["device"]) if reload is not None
                 else load_configured(cfg.model, device=kw["device"]))
    body, head = body_and_head(ref_model)
    return _text_forward(kw, body, lambda: head, ref_model.dtype)


def _text_forward(kw: dict, body, head_fn, dtype) -> Forward:
    """The run's layout (kw["forward"]) over any pairs, with make_forward's other keywords."""
    rest = {k: v for k, v in kw.items() if k != "forward"}
    return make_forward(kw["forward"], body, head_fn, dtype=dtype, **rest)


def untie_head(model) -> None:
    """Give the output head its own copy of a weight it shares with the input embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        raise ValueError("the model has no output embeddings (head) to train")
    if inp is not None and out.weight is inp.weight:
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _add_lora(model, tc):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in tc.lora_targets if t not in present]
    if missing:
        from dpolab.errors import UserError

        raise UserError(f"config train.lora_targets: module(s) {', '.join(missing)} not in the "
                        f"model; linear layers it has include: "
                        f"{', '.join(sorted(_linear_names(model))[:12])}")
    lcfg = LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=0.0,
                      target_modules=list(tc.lora_targets), bias="none", task_type="CAUSAL_LM")
    # peft draws LoRA A from the global RNG; fork it so the draw is a function of the seed
    # alone and nothing outside this block sees a changed RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        return get_peft_model(model, lcfg)


def _linear_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
