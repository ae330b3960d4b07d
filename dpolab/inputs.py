"""What a run takes from memory instead of loading it: `Inputs`, built by dpolab.api.Trainer.

The command line names a model and data files in the config and `session.build` loads them;
from Python a model, a tokenizer or rows may already be loaded. `Inputs` carries them into
`session.build` unchanged (nothing written to disk and read back). The reference store keys on
the hash of the model's weights and of the token ids, so a model from memory finds the same
stored reference as the same weights loaded from a folder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from dpolab.adapters import check_peft
from dpolab.errors import UserError
from dpolab.scopes import SCOPES, is_peft


@dataclass(frozen=True)
class Inputs:
    model: Any = None  # a loaded PreTrainedModel or peft model, trained in place; None: cfg.model
    tokenizer: Any = None  # the model's tokenizer; None: loaded from cfg.model.name
    rows: tuple[list, list] | None = None  # (train, held-out) validated PreferenceRows; None: cfg.data
    compute_metrics: Any = None  # pairs -> {name: number} at each evaluation (dpolab.scoring)
    reference: Any = None  # a loaded model as pi_ref (dpolab.reference_model); None: model.reference

    def checked(self, cfg) -> "Inputs":
        """These inputs, checked to make a run before its run directory exists: the model a
        name points to by its config.json (dpolab.models.check_folder), with the tokenizer it
        will train with, loaded now when none was given. A model object was checked when
        given (`check_model`, `check_fit`)."""
        from dpolab.models import check_folder, load_tokenizer

        if self.model is not None:  # checked when given (dpolab.api.Trainer)
            return self
        tokenizer = self.tokenizer or load_tokenizer(
            cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        check_tokenizer(tokenizer)
        check_folder(cfg.model, tokenizer)
        return Inputs(model=None, tokenizer=tokenizer, rows=self.rows,
                      compute_metrics=self.compute_metrics, reference=self.reference)

    def tokenizer_for(self, cfg):
        """The tokenizer given, with eos as pad when it has none (as `models.load_tokenizer`
        does); else the one of the model `cfg` names."""
        from dpolab.models import load_tokenizer

        if self.tokenizer is None:
            if self.model is not None:
                raise UserError("a model given as an object needs its tokenizer (tokenizer=...)")
            return load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def model_for(self, cfg, device) -> torch.nn.Module:
        """The model given, prepared the way `models.load_configured` prepares a loaded one (on
        `device`, eval mode, nothing requires grad) except that a peft model's own adapters
        stay trainable; else the model `cfg` names, loaded."""
        from dpolab.models import load_configured

        if self.model is None:
            return load_configured(cfg.model, device=device)
        check_peft(self.model)
        # What peft made trainable: its adapters (get_peft_model; none after loading for
        # inference, then an adapter's parameters are found by its name, one component of
        # theirs: `lora_A.default.weight`, but also `ia3_l.default`, `hada_w1_a.default`).
        marked = {n for n, p in self.model.named_parameters() if p.requires_grad}
        model = self.model.to(device).eval().requires_grad_(False)
        if is_peft(model):
            if cfg.train.scope != "lora":
                raise UserError(f"a peft model trains its adapters: train.scope must be lora, "
                                f"not {cfg.train.scope} (or pass model.merge_and_unload())")
            adapter = model.active_adapter
            for name, p in model.named_parameters():
                p.requires_grad_(name in marked if marked else adapter in name.split("."))
        return model

    def reloader(self, cfg, model) -> "Theta0 | None":
        """For a model from memory whose starting weights cannot be loaded again (the full
        scope overwrites them; a peft model's adapters may start nonzero): a CPU copy of its
        weights now, for scoring samples against the reference after training
        (train.did_samples). None otherwise."""
        if self.model is None or cfg.train.did_samples <= 0:
            return None
        if not (SCOPES[cfg.train.scope].overwrites_weights or is_peft(model)):
            return None
        return Theta0(model, {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()})


@dataclass(frozen=True)
class Theta0:
    """A model's weights before training, on the CPU (`weights`: state-dict name -> tensor,
    tied weights under each of their names)."""

    model: torch.nn.Module
    weights: dict

    def __call__(self, device) -> torch.nn.Module:
        """A second model at theta0 on `device` (a peft model's reference beside the policy)."""
        ref = copy.deepcopy(self.model)  # the module tree; its weights are replaced next
        ref.load_state_dict(self.weights)
        return ref.to(device).eval().requires_grad_(False)

    def exchange(self, model: torch.nn.Module) -> None:
        """Swap `model`'s parameters with the kept ones, one tensor at a time: the model
        holds theta0 and the kept copy what the model held. Its own inverse: the full scope
        calls it to score against theta0 after training and again after, so the model the
        caller gave ends trained, and memory holds no more than before. On the kept copy's
        device (the CPU) the swap moves no bytes; on another the kept buffer takes the
        trained tensor (one tensor extra at a time). FSDP2's sharded parameters are gathered
        into the kept buffer and re-sharded from it (collective: every rank calls it)."""
        from dpolab import sharding

        seen = set()
        with torch.no_grad():
            for name, p in model.named_parameters(remove_duplicate=False):
                if id(p) in seen:  # a tied weight: exchanged under its first name
                    continue
                seen.add(id(p))
                kept = self.weights[name]
                if sharding.is_sharded(p):
                    now = sharding.full(p).to("cpu", copy=True)
                    p.copy_(sharding.like(kept, p))
                    kept.copy_(now)
                elif p.device == kept.device:
                    self.weights[name], p.data = p.data, kept
                else:
                    now, p.data = p.data, kept.to(p.device)
                    kept.copy_(now)



def check_model(model) -> None:
    """A model given as an object: a causal LM with an output head and weights (not on the
    meta device). UserError naming what is wrong otherwise."""
    from transformers import PreTrainedModel

    base = model.get_base_model() if is_peft(model) else model
    if not isinstance(base, PreTrainedModel):
        raise UserError(f"model: expected a model name or folder, or a loaded causal LM (a "
                        f"transformers PreTrainedModel or a peft model of one), got "
                        f"{type(model).__name__}")
    if base.get_output_embeddings() is None or not base.can_generate():
        raise UserError(f"model: {type(base).__name__} is not a causal language model (no "
                        f"output head that generates text); load it with AutoModelForCausalLM")
    meta = next((n for n, p in base.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        raise UserError(f"model: its weights are not loaded ({meta} is on the meta device); "
                        f"load them, e.g. with from_pretrained, before training")


def check_fit(model, tokenizer) -> None:
    """A tokenizer that works with `model` (checked by `check_model`): `check_tokenizer`,
    and every token id inside the model's input and output embeddings."""
    from dpolab.models import check_vocab

    base = model.get_base_model() if is_peft(model) else model
    check_tokenizer(tokenizer)
    rows = min(base.get_input_embeddings().weight.shape[0],
               base.get_output_embeddings().weight.shape[0])
    check_vocab(tokenizer, rows, f"{type(base).__name__}'s input and output embeddings")


def check_tokenizer(tokenizer) -> None:
    """Every completion ends with the eos token, and padding falls back to it."""
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise UserError(f"tokenizer: expected a transformers tokenizer (or its folder), got "
                        f"{type(tokenizer).__name__}")
    if tokenizer.eos_token_id is None:
        raise UserError("tokenizer: it has no eos token, which ends every completion (and "
                        "pads when there is no pad token); set tokenizer.eos_token to the "
                        "token that ends the model's replies")
