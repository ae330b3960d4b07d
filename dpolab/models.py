"""Loading causal LMs offline, and splitting them into body and output head.

A model name resolves to a folder: the embedded default and users' GGUF files are converted
once into plain Hugging Face folders in the cache, `$DPOLAB_CACHE` or `~/.cache/dpolab`
(dpolab.gguf_models); later loads take well under a second.

Pad token: a tokenizer without one gets its eos token as pad. Padded positions are always
masked out of attention and of the log-probs, so the choice only has to be a valid id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dpolab.errors import UserError

if TYPE_CHECKING:  # annotations only: dpolab.logps imports torch's autograd machinery
    from dpolab.logps import Head

DEFAULT_MODEL = "smollm2-135m-instruct"


def stay_offline(online: bool) -> None:
    """Unless `online`, tell the Hugging Face libraries not to reach a hub: offline, a lookup
    hangs for ~45 s before failing. Values the user set in the environment win."""
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def dpolab_cache_dir() -> Path:
    """`$DPOLAB_CACHE` if set, else `~/.cache/dpolab` (a UserError when that is a file)."""
    from dpolab.cachedir import root

    return root()


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to what `from_pretrained` should load.

    `DEFAULT_MODEL` -> the converted embedded model; an existing folder -> itself; a `.gguf`
    file -> its converted folder in the cache; anything else -> unchanged, as a hub name.
    """
    if name_or_path == DEFAULT_MODEL:
        from dpolab.gguf_models import default_model_path

        return str(default_model_path(cache_dir=dpolab_cache_dir()))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        from dpolab.gguf_models import gguf_folder

        return str(gguf_folder(path, cache_dir=dpolab_cache_dir()))
    return name_or_path


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_loadable(name: str) -> None:
    """Raise UserError at once for a name that cannot load, instead of a slow hub failure."""
    path = Path(name).expanduser()
    if path.is_dir():
        return
    looks_local = name.startswith((".", "/", "~")) or path.suffix == ".gguf" or name.count("/") > 1
    if looks_local:
        raise UserError(f"model {name!r}: no such folder (a model is a local folder, a .gguf "
                        f"file, {DEFAULT_MODEL!r}, or a hub name like org/name)")
    if _offline():
        from huggingface_hub import try_to_load_from_cache
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # an invalid repo id is not in the cache either
            cached = None
        if not isinstance(cached, str):
            raise UserError(f"model {name!r} is not a local folder and cannot be fetched offline "
                            "(HF_HUB_OFFLINE is set and it is not in the Hugging Face cache); "
                            f"pass a local folder, a .gguf file or {DEFAULT_MODEL!r}")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors")


def check_model_folder(folder: str | Path, *, weights: bool = True) -> None:
    """Raise UserError naming the folder and what is wrong when a local model folder cannot
    hold a loadable model: empty, no config.json, no tokenizer files, no weights (with
    `weights`), or a safetensors file whose header or length is damaged (a truncated copy
    or a download cut short). Does nothing for a hub name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    expected = "config.json, tokenizer files and weights (model.safetensors)"
    if not names:
        raise UserError(f"{folder}: the model folder is empty; it should hold {expected}")
    if not weights:  # a tokenizer may live in a folder of its own
        if not names & set(_TOKENIZER_FILES):
            raise UserError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                            f"a model folder holds {expected}")
        return
    if not names & {"config.json", "adapter_config.json"}:
        raise UserError(f"{folder}: no config.json; a model folder holds {expected}")
    if not names & set(_WEIGHT_FILES) and not any(n.endswith(".safetensors") for n in names):
        raise UserError(f"{folder}: no weights (model.safetensors or pytorch_model.bin); only "
                        f"{', '.join(sorted(names))}")
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"{path}: {problem}")


# safetensors' reasons for refusing a file, in words that say what happened to it
_SAFETENSORS_WORDS = {
    "header too small": "not a safetensors file (empty or cut short)",
    "header too large": "damaged safetensors file: its header length exceeds the file "
                        "(truncated or not safetensors)",
    "incomplete metadata": "truncated safetensors file: its size is not what its header's "
                           "tensors need",
    "invalid json": "damaged safetensors file: its header is not valid JSON",
    "invalid utf-8": "damaged safetensors file: its header is not valid JSON (not UTF-8)",
}


def safetensors_problem(path: Path) -> str | None:
    """What safetensors finds wrong opening the file (its header length, JSON header and
    the size its offsets imply), in words; None when it opens."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
    words = next((w for key, w in _SAFETENSORS_WORDS.items() if key in reason.lower()),
                 "damaged safetensors file")
    return f"{words} ({path.stat().st_size} bytes; safetensors: {reason})"


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False, device: str | torch.device = "cpu"):
    """`AutoModelForCausalLM.from_pretrained` of a resolved name, on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM

    from dpolab.adapters import refuse_adapter_folder

    name = resolve_model_path(name_or_path)
    _check_loadable(name)
    refuse_adapter_folder(name)
    check_model_folder(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:  # missing repo, no network, no config.json
        raise UserError(f"model {name!r} could not be loaded: {str(err).splitlines()[0]}") from None
    except Exception as err:  # a damaged file the checks above cannot see
        raise UserError(f"model {name!r} could not be loaded: {type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}") from None
    return model.to(device).eval()


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained` of a resolved name; pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    name = resolve_model_path(name_or_path)
    _check_loadable(name)
    check_model_folder(name, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"tokenizer {name!r} could not be loaded: "
                        f"{str(err).splitlines()[0]}") from None
    except Exception as err:  # a damaged tokenizer file
        raise UserError(f"tokenizer {name!r} could not be loaded: {type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocab(tokenizer, rows: int, where: str) -> None:
    """Every token id of `tokenizer` (added tokens included) must index one of the `rows`
    rows of the model's embedding (`where` names them), or the first forward fails deep."""
    top = max([len(tokenizer) - 1, *tokenizer.get_vocab().values()])
    if top >= rows:
        raise UserError(f"tokenizer: token id {top} ({tokenizer.convert_ids_to_tokens(top)!r}) "
                        f"does not fit the model's {rows} embedding rows ({where}); use the "
                        f"model's own tokenizer, or model.resize_token_embeddings(len(tokenizer))")


def check_folder(model_cfg, tokenizer) -> None:
    """Before a run directory exists: the model `model_cfg` names is a causal LM (by its
    config.json, weights not loaded) whose embedding fits `tokenizer`."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    from dpolab.adapters import refuse_adapter_folder

    name = resolve_model_path(model_cfg.name)
    _check_loadable(name)
    refuse_adapter_folder(name)
    check_model_folder(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:  # OSError, ValueError (unknown model type), a damaged JSON
        raise UserError(f"model {name!r}: its config cannot be read: {type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0]}") from None
    if not (type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
            or "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})):
        raise UserError(f"model {name!r}: a {config.model_type!r} model is not a causal "
                        f"language model (AutoModelForCausalLM cannot load it)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_vocab(tokenizer, text.vocab_size, f"vocab_size in {name}/config.json")


def decoder_layers(model):
    """The decoder's list of transformer blocks (`.layers`, or GPT-2's `.h`)."""
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no .layers (or .h) list of blocks")
    return layers


def checkpoint_activations(model) -> int:
    """Activation checkpointing of every decoder block: under autograd a block keeps only its
    input and recomputes its inside during backward (one more forward of the body; the
    activations held shrink from all blocks' internals to one hidden state per block). Works
    in eval mode, where dpolab trains (no dropout, so the recomputation is exact). Returns the
    number of blocks wrapped; idempotent."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_dpolab_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._dpolab_checkpointed = True
    return len(layers)


def body_and_head(model) -> tuple[Callable, Head]:
    """Split a causal LM into `body(input_ids, attention_mask, position_ids) -> (B, T, D)`
    final hidden states (after the final norm) and the output `Head`, so that
    logits = softcap(body(x) @ W.T + b) equals `model(x).logits` without the (B, T, V) tensor.

    Works for Llama / Qwen2 / Gemma3 / GPT-2 style models and for a peft `PeftModel`, whose
    LoRA layers sit inside the decoder and so are used by `body`. The head holds the live
    output weight (tied to the embedding when the model ties them), so gradients reach it.
    """
    from dpolab.logps import Head, head_transform

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    out = base.get_output_embeddings()
    if hasattr(out, "base_layer") or not isinstance(getattr(out, "weight", None), torch.Tensor):
        raise UserError(f"{type(base).__name__}: an adapter on the output layer "
                        f"({type(out).__name__}) is not supported: dpolab's chunked head reads "
                        "the plain output weight; put adapters on decoder modules")
    scale, softcap = head_transform(base.config)
    head = Head(weight=out.weight, bias=getattr(out, "bias", None), softcap=softcap, scale=scale)

    def body(input_ids, attention_mask=None, position_ids=None, *, router_logits=False):
        """(B, T, D) final hidden states; with `router_logits` also the MoE routers' logits,
        one (B * T, E) tensor per routed layer (the decoder's own record of them)."""
        extra = {"output_router_logits": True} if router_logits else {}
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False, **extra)
        if router_logits:
            return out.last_hidden_state, tuple(out.router_logits or ())
        return out.last_hidden_state  # (B, T, D)

    body.decoder = decoder  # lets a pair forward pick the attention path its config allows
    return body, head


def load_configured(model_cfg, *, device: str | torch.device) -> torch.nn.Module:
    """The model a run's `model:` section names (name, dtype, trust_remote_code) on `device`,
    in eval mode (dropout off: determinism) with no parameter requiring grad: the one way the
    trainer, its reference reload and the data audit load weights."""
    model = load_model(model_cfg.name, dtype=torch_dtype(model_cfg.dtype),
                       trust_remote_code=model_cfg.trust_remote_code, device=str(device))
    return model.requires_grad_(False)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `model.dtype` name (config.DTYPES are torch's own names)."""
    from dpolab.config import DTYPES

    if name not in DTYPES:
        raise UserError(f"model.dtype {name!r}: must be one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str | None:
    """The `model.dtype` name of a torch dtype; None for one dpolab does not train in."""
    from dpolab.config import DTYPES

    return next((n for n in DTYPES if getattr(torch, n) == dtype), None)
