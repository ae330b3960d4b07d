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


@dataclass(frozen=True)
class Inputs:
    model: Any = None  # a loaded PreTrainedModel or peft model, trained in place; None: cfg.model
    tokenizer: Any = None  # the model's tokenizer; None: loaded from cfg.model.name
    rows: tuple[list, list] | None = None  # (train, held-out) validated PreferenceRows; None: cfg.data

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
        if not (cfg.train.scope == "full" or is_peft(model)):
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


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")
