"""Tiny random configs of the causal-LM architectures dpolab is tested on, built offline.

One entry per transformers model type (transformers 5.24): attention-only (Llama-like, with
sliding windows, mixtures of experts), models whose logits are scaled or capped, and hybrids
whose mixers are not attention (Mamba-2 / Mamba state-space layers, short convolutions, gated
delta-rule linear attention). Two layers, hidden size 32 by default; in a hybrid the last
layer is attention and the others are the other mixer. Weights are drawn with
initializer_range 0.1 (transformers' default, 0.02, makes random logits nearly flat, and a
log-prob that leaks between sequences then moves by ~1e-5 only); sliding windows are WINDOW
tokens, shorter than the tests' sequences, so the window matters. On the CPU the state-space
and convolution layers run transformers' PyTorch fallbacks (no mamba_ssm, causal_conv1d or
flash-linear-attention kernels are needed; transformers logs that it falls back).
"""

from __future__ import annotations

WINDOW = 4  # sliding-window size of the windowed architectures


def _table(hidden: int, layers: int, heads: int) -> dict:
    """model type -> (config class name, its keyword arguments beyond the common ones)."""
    moe = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01)
    hd, ssm = hidden // heads, 2 * hidden // 16  # attention head size; SSM heads of size 16
    mamba2 = dict(mamba_n_heads=ssm, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1,
                  mamba_chunk_size=16)
    last = layers - 1  # the hybrids' attention layer
    return {
        "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
        "qwen3": ("Qwen3Config", dict(head_dim=hd)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=hd, num_experts=4,
                                             moe_intermediate_size=hidden, **moe)),
        "gemma": ("GemmaConfig", dict(head_dim=hd)),
        "gemma2": ("Gemma2Config", dict(head_dim=hd, sliding_window=WINDOW)),
        "gemma3_text": ("Gemma3TextConfig", dict(head_dim=hd, sliding_window=WINDOW,
                                                 final_logit_softcapping=30.0)),
        "phi3": ("Phi3Config", {}),
        "cohere": ("CohereConfig", dict(logit_scale=0.0625)),
        "cohere2": ("Cohere2Config", dict(logit_scale=0.25, sliding_window=WINDOW)),
        "olmo2": ("Olmo2Config", {}),
        "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW)),
        "glm4_moe": ("Glm4MoeConfig", dict(head_dim=hd, n_routed_experts=4,
                                           moe_intermediate_size=hidden, first_k_dense_replace=1,
                                           n_group=1, topk_group=1, num_experts_per_tok=2)),
        "gpt_oss": ("GptOssConfig", dict(head_dim=hd, num_local_experts=4,
                                         sliding_window=WINDOW, **moe)),
        "mixtral": ("MixtralConfig", dict(num_local_experts=4, **moe)),
        "granite": ("GraniteConfig", dict(logits_scaling=4.0)),
        "lfm2": ("Lfm2Config", dict(layer_types=["conv"] * last + ["full_attention"])),
        "nemotron_h": ("NemotronHConfig", dict(
            hybrid_override_pattern="M" * last + "*", mamba_num_heads=ssm, mamba_head_dim=16,
            ssm_state_size=16, n_groups=1, chunk_size=16)),
        "falcon_mamba": ("FalconMambaConfig", dict(state_size=8, expand=2, conv_kernel=4)),
        "mamba2": ("Mamba2Config", dict(num_heads=ssm, head_dim=16, state_size=16, n_groups=1,
                                        chunk_size=16, expand=2)),
        "jamba": ("JambaConfig", dict(attn_layer_period=layers, attn_layer_offset=last,
                                      expert_layer_period=layers, expert_layer_offset=last,
                                      num_experts=4, mamba_d_state=8, **moe)),
        "bamba": ("BambaConfig", dict(attn_layer_indices=[last], **mamba2)),
        "granitemoehybrid": ("GraniteMoeHybridConfig", dict(
            layer_types=["mamba"] * last + ["attention"], logits_scaling=4.0,
            num_local_experts=4, **mamba2, **moe)),
        "falcon_h1": ("FalconH1Config", dict(head_dim=hd, mamba_d_ssm=2 * hidden,
                                             lm_head_multiplier=0.5, **mamba2)),
        "qwen3_next": ("Qwen3NextConfig", dict(
            head_dim=hd, num_experts=4, moe_intermediate_size=hidden,
            shared_expert_intermediate_size=hidden, linear_num_value_heads=heads,
            linear_num_key_heads=max(1, heads // 2), linear_key_head_dim=hd,
            linear_value_head_dim=hd, layer_types=["linear_attention"] * last
            + ["full_attention"], **moe)),
    }


ARCHITECTURES = tuple(_table(32, 2, 4))  # the model types this module builds
_NO_ATTENTION = ("falcon_mamba", "mamba2")  # configs without attention or MLP sizes


def config(arch: str, *, vocab_size: int, hidden_size: int, layers: int, heads: int):
    """The transformers config of model type `arch` (one of ARCHITECTURES)."""
    import transformers as tf

    table = _table(hidden_size, layers, heads)
    if arch not in table:
        raise ValueError(f"unknown tiny arch {arch!r}; valid: {', '.join(table)}")
    cls, extra = table[arch]
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                  initializer_range=0.1, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    if arch not in _NO_ATTENTION:
        common.update(num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      intermediate_size=2 * hidden_size, max_position_embeddings=512)
    return getattr(tf, cls)(**common, **extra)
