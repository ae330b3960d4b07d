"""Which parameters train: `full`, `lora` (peft adapters) or `last_layer` (the output head).

`apply` returns the trainable parameters, the forward function for the scope and the head.
`last_layer` unties a head that shares its weight with the input embedding, so training it
leaves the embedding (and thus the cached body states) untouched and the export keeps both.
"""

from __future__ import annotations

import torch

from dpolab.logps import Head
from dpolab.policy import BodyForward, CachedHeadForward, SharedPromptForward
from dpolab.progress import Progress


def apply(cfg, model, tok: dict, *, pad_id: int, device: torch.device, autocast: bool, dist,
          state_store=None):
    """state_store(split, examples) -> Path | None: where the last_layer scope keeps its cached
    body states between runs."""
    from dpolab.models import body_and_head

    tc = cfg.train
    if tc.activation_checkpointing and tc.scope in ("full", "lora"):
        from dpolab.models import checkpoint_activations

        checkpoint_activations(model)
    if tc.scope == "full":
        model.requires_grad_(True)
        if dist.world > 1 and tc.distributed == "fsdp2":
            from dpolab.sharding import shard_layers

            shard_layers(model)
        body, head = body_and_head(model)
        params = [p for p in model.parameters() if p.requires_grad]
        return params, pair_forward(tc, body, head, pad_id=pad_id, device=device,
                                    autocast=autocast, dtype=model.dtype), head
    if tc.scope == "lora":
        peft_model = _add_lora(model, tc)
        body, head = body_and_head(peft_model)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        fwd = pair_forward(tc, body, head, pad_id=pad_id, device=device, autocast=autocast,
                           dtype=model.dtype)
        fwd.peft_model = peft_model
        return params, fwd, head
    # last_layer
    untie_head(model)
    body, head = body_and_head(model)
    out = model.get_output_embeddings()
    out.weight.requires_grad_(True)
    params = [out.weight]
    if getattr(out, "bias", None) is not None:
        out.bias.requires_grad_(True)
        params.append(out.bias)
    fwd = CachedHeadForward(lambda: head, chunk_size=tc.logps_chunk, device=device)
    # The reference head, kept for AuxDPO's null-space penalty and for scoring samples.
    fwd.head0 = Head(head.weight.detach().clone(),
                     None if head.bias is None else head.bias.detach().clone(), head.softcap)
    for split, t in tok.items():
        bar = Progress(len(t.examples), f"cache body states ({split})",
                       enabled=tc.progress and dist.is_main)
        states = pair_forward(tc, body, head, pad_id=pad_id, device=device, autocast=autocast,
                              dtype=model.dtype).hidden
        fwd.fill(states, t.examples, split=split, batch_size=tc.eval_batch_size,
                 progress=bar.update, store=state_store(split, t.examples) if state_store else None)
        bar.close()
    return params, fwd, head


def pair_forward(tc, body, head, *, pad_id: int, device, autocast: bool, dtype):
    """The forward over pairs that train.pair_forward names."""
    kw = dict(pad_id=pad_id, chunk_size=tc.logps_chunk, device=device, autocast=autocast)
    if tc.pair_forward == "two_rows":
        return BodyForward(body, lambda: head, **kw)
    return SharedPromptForward(body, lambda: head, dtype=dtype, **kw)


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
