"""Model loading, the body/head split, tiny models, and the embedded default's conversion."""


import pytest
import torch

from dpolab.errors import UserError
from dpolab.logps import Head
from dpolab.gguf_models import _default_gguf, default_model_path, max_logit_difference, save_converted
from dpolab.models import DEFAULT_MODEL, body_and_head, load_model, load_tokenizer, resolve_model_path
from dpolab.tiny import qwen_shape_config, tiny_model, tiny_tokenizer


def _apply_head(head: Head, hidden):
    """logits = softcap(hidden @ W.T + b), softcap(z) = c tanh(z / c); the reference formula."""
    z = hidden @ head.weight.T  # (B, T, V)
    if head.bias is not None:
        z = z + head.bias
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def _ids(vocab: int, *, b: int = 2, t: int = 7, seed: int = 0):
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_tiny_tokenizer_is_deterministic_with_chatml_specials():
    """Same arguments -> same vocabulary; specials are ids 0..2; eos, pad, template are set."""
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and len(a) == 512
    assert a.convert_ids_to_tokens([0, 1, 2]) == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert (a.eos_token, a.pad_token) == ("<|im_end|>", "<|pad|>")
    text = a.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = a("The cat likes the red ball.").input_ids
    assert a.decode(ids) == "The cat likes the red ball."  # byte-level BPE round-trips text
    assert len(ids) < len("The cat likes the red ball.")   # and merges, not only bytes


def test_tiny_model_depends_on_seed_only_and_keeps_global_rng():
    """Init uses a forked RNG seeded by `seed`: equal seeds -> equal weights, others differ,
    and the caller's global torch RNG draws the same numbers as if nothing had run."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model(vocab_size=64, seed=1)
    assert torch.equal(torch.rand(3), expected)
    b, c = tiny_model(vocab_size=64, seed=1), tiny_model(vocab_size=64, seed=2)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pa[w], pb[w]) and not torch.equal(pa[w], pc[w])


def test_save_tiny_round_trip_gives_same_logits(tiny_dir):
    """save_tiny -> load_model reproduces tiny_model(seed) exactly; load_tokenizer keeps
    pad, eos and the chat template."""
    model = load_model(str(tiny_dir))
    fresh = tiny_model(vocab_size=512, seed=0)
    assert max_logit_difference(model, fresh, [5, 17, 300, 2, 9]) == 0.0
    tok = load_tokenizer(str(tiny_dir))
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    assert (tiny_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_head_of_body_equals_logits(arch):
    """softcap(body(x) @ W.T + b) == model(x).logits to 1e-5, with padding in the mask."""
    model = tiny_model(vocab_size=128, arch=arch, seed=3)
    body, head = body_and_head(model)
    ids = _ids(128)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on the first row
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        got = _apply_head(head, body(ids, attention_mask=mask))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert head.weight is model.get_output_embeddings().weight  # live, so gradients reach it


def test_gemma_head_has_softcap_and_it_matters():
    """Gemma's final_logit_softcapping reaches Head.softcap; |logits| <= c = 30, and with a
    scaled-up head the capped logits differ from the uncapped ones (the cap is not a no-op)."""
    model = tiny_model(vocab_size=128, arch="gemma3", seed=3)
    _, head = body_and_head(model)
    assert head.softcap == 30.0
    assert body_and_head(tiny_model(vocab_size=128, arch="llama"))[1].softcap is None
    h = torch.full((1, 1, 64), 10.0)
    capped = _apply_head(head, h)
    assert capped.abs().max() <= 30.0
    assert not torch.allclose(capped, h @ head.weight.T)


def test_body_of_peft_model_uses_lora_layers():
    """With peft LoRA (B initialised to 0) the body first equals the base model's; after
    perturbing a LoRA B matrix the body output changes, so body runs the adapters."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(vocab_size=128, seed=4)
    ids = _ids(128)
    with torch.no_grad():
        before = body_and_head(base)[0](ids)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    body, head = body_and_head(peft_model)
    with torch.no_grad():
        assert torch.allclose(body(ids), before, atol=1e-6)
        lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
        lora_b.add_(0.5)
        after = body(ids)
        assert (after - before).abs().max() > 1e-3
        assert torch.allclose(_apply_head(head, after), peft_model(input_ids=ids).logits,
                              atol=1e-5)


def test_resolve_model_path(tiny_dir, tmp_path):
    """A folder resolves to itself; a hub-style name is returned unchanged."""
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    assert resolve_model_path("nobody/no-such-model") == "nobody/no-such-model"


def test_unknown_name_offline_is_a_fast_user_error(monkeypatch, tmp_path):
    """Offline, a name neither local nor cached raises UserError at once (no hub timeout);
    a missing path says there is no such folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(UserError, match="cannot be fetched offline"):
        load_model("nobody/no-such-model")
    with pytest.raises(UserError, match="cannot be fetched offline"):
        load_tokenizer("nobody/no-such-model")
    with pytest.raises(UserError, match="no such folder"):
        load_model(str(tmp_path / "missing"))


def test_qwen_shape_config_has_qwen25_05b_shape():
    """494,032,768 parameters, counted by hand: tied embedding 151936 * 896 = 136,134,656;
    per layer q, o 896*896 (+896 bias on q only), k, v 896*128 + 128 (head_dim 64 x 2 kv heads),
    MLP 3 * 896*4864, two norms 2 * 896 -> 14,912,384; 24 layers + final norm 896."""
    from transformers import AutoModelForCausalLM

    c = qwen_shape_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (
        896, 24, 14, 2, 4864, 151936, True)
    layer = 896 * 896 * 2 + 896 + (896 * 128 + 128) * 2 + 3 * 896 * 4864 + 2 * 896
    assert layer == 14_912_384
    assert 151936 * 896 + 24 * layer + 896 == 494_032_768
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(c)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768


def test_default_model_conversion(tmp_path_factory, monkeypatch):
    """The embedded GGUF converts to a plain folder whose logits equal the GGUF-loaded model's
    (max |diff| <= 1e-4 on 8 tokens), with tied embeddings, the ChatML template, eos = pad =
    <|im_end|>, the same tokenization; default_model_path then finds it without converting again.
    (How fast the converted folder reloads is measured in benchmarks/model_reload.py.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _default_gguf()
    cache = tmp_path_factory.mktemp("cache")
    gguf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    dest = save_converted(gguf_model, gguf_tok, cache / "models" / "SmolLM2-135M-Instruct")
    assert default_model_path(cache_dir=cache, progress=False) == dest  # no second conversion
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]      # no temp folder left
    model, tok = load_model(str(dest)), load_tokenizer(str(dest))
    assert max_logit_difference(gguf_model, model, [1, 9690, 28, 638, 359, 346, 47, 2]) <= 1e-4
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in model.config.to_dict()
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.chat_template == gguf_tok.chat_template and "<|im_start|>" in tok.chat_template
    text = "Hello, how are you? DPO!"
    assert tok(text).input_ids == gguf_tok(text).input_ids
    monkeypatch.setenv("DPOLAB_CACHE", str(cache))
    assert resolve_model_path(DEFAULT_MODEL) == str(dest)
