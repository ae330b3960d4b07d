"""Which peft adapters dpolab trains, and a one-line refusal of the rest.

dpolab runs the base model's decoder and a chunked head (dpolab.models.body_and_head), not the
peft model's own forward. Adapters that live inside the decoder's layers are in that path and
train: LoRA and its variants (rsLoRA, DoRA), IA3, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, LN
tuning, adaption prompts (a peft model given from Python, `dpolab.Trainer(model=...)`; the
forward check, dpolab.forward_check, compares dpolab's log-probs with the peft model's own
before training). Methods that work outside that path are refused when the model is given,
before anything is loaded or trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpolab.errors import UserError

# peft methods whose training dpolab's loop does not do (by peft_type). Prompt-learning methods
# (prompt and prefix tuning, p-tuning, ...: peft's `is_prompt_learning`) are refused by that.
_UNTRAINABLE = {
    "ADALORA": "it allocates ranks during training (update_and_allocate after every step) and "
               "adds an orthogonality penalty in its own forward; dpolab's loop does neither "
               "(LoRA, rsLoRA and DoRA train)",
}


def check_peft(model) -> None:
    """Refuse, in one line, a peft model whose method dpolab cannot train. dpolab runs the
    base model's decoder and a chunked head (dpolab.models.body_and_head), so adapters that
    live inside the layers train (LoRA and its variants, IA3, LoHa, LoKr, OFT, ...): the
    forward check compares that with the peft model's own forward before training. Virtual
    tokens that the peft model's own forward prepends (prompt learning) never enter it."""
    if not hasattr(model, "peft_config") or not hasattr(model, "active_adapter"):
        return
    cfg = model.peft_config.get(model.active_adapter)
    if cfg is None:
        return
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if getattr(cfg, "is_prompt_learning", False):
        raise UserError(f"model: a peft {kind} model is not trainable by dpolab: its virtual "
                        "tokens are prepended by the peft model's own forward, and dpolab runs "
                        "the decoder and its head instead; use adapters inside the layers "
                        "(LoRA, DoRA, rsLoRA, IA3, LoHa, LoKr, OFT)")
    if kind in _UNTRAINABLE:
        raise UserError(f"model: a peft {kind} model is not trainable by dpolab: "
                        f"{_UNTRAINABLE[kind]}")


def refuse_adapter_folder(name: str) -> None:
    """A folder holding a peft adapter (adapter_config.json) loads as a base model with the
    adapter attached by transformers, whose weights dpolab would neither train nor export as
    an adapter: refused, naming the two ways that work."""
    path = Path(name).expanduser() / "adapter_config.json"
    if not path.is_file():
        return
    try:
        kind = json.loads(path.read_text()).get("peft_type", "?")
    except (OSError, ValueError, AttributeError):
        kind = "?"
    raise UserError(f"{path.parent}: a peft adapter folder ({kind}), not a model; merge it "
                    "into its base (PeftModel.merge_and_unload(), then save_pretrained) to "
                    "train from it, or pass the PeftModel from Python (dpolab.Trainer(model=...))")
