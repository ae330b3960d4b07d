"""Log-probs of completion tokens from final hidden states and the output head, chunked.

A causal LM's logits are (B, T, V); in float32 for B=8, T=512 and a 49k vocabulary that is
800 MB before autograd keeps a copy. DPO needs only log pi(label) at completion positions, so
here the head runs on those positions only, a chunk of positions at a time, and each chunk
is recomputed in backward instead of stored: extra memory is O(chunk_size x V).

Notation: N completion positions selected from (B, T); D hidden size; V vocabulary.
Label alignment is the caller's: ``labels[b, t]`` is the token predicted by ``hidden[b, t]``
(the next token), and ``mask[b, t]`` says whether that token is part of a completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Head:
    """The output layer: logits = softcap(scale * (hidden @ weight.T + bias)).

    weight (V, D) may be tied to the input embedding; scale s multiplies the linear layer's
    output (Cohere's logit_scale, 1 / Granite's logits_scaling); softcap c (Gemma's
    final_logit_softcapping) maps z -> c * tanh(z / c).
    """

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0


# What a causal LM's own forward does to its output layer's result (transformers 5.24's
# modeling files): logits times the config value to this power (Cohere multiplies by
# logit_scale, the Granite family divides by logits_scaling, HyperCLOVA X multiplies by it,
# Falcon-H1 multiplies by lm_head_multiplier), then a soft cap c * tanh(z / c). Anything else
# is caught by dpolab.forward_check (the head against the model's own logits) and refused.
_LOGIT_SCALES = {"logit_scale": 1, "logits_scaling": -1, "lm_head_multiplier": 1}
_SCALE_POWER_OF_TYPE = {"hyperclovax": 1}  # model_type -> power where it differs
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


def head_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) of the logits of a model with this config: logits =
    softcap(scale * lm_head(h)); (1.0, None) for a plain head."""
    scale = 1.0
    for name, power in _LOGIT_SCALES.items():
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            power = _SCALE_POWER_OF_TYPE.get(getattr(config, "model_type", ""), power)
            scale *= float(value) ** power
    caps = [getattr(config, n) for n in _SOFTCAPS if getattr(config, n, None)]
    return scale, (float(caps[0]) if caps else None)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Log-probs in float32 at least; float64 stays float64 (tests, theory).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head's matmuls: the weight's, except for 16-bit states against wider
    (float32 master) weights, the bf16 autocast case: then the states' dtype, as autocast would
    run the model's own head. Exponents and sums stay in the compute dtype either way."""
    if h.dtype in (torch.bfloat16, torch.float16) and h.dtype.itemsize < weight.dtype.itemsize:
        return h.dtype
    return weight.dtype


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                  scale: float, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(n, D) -> float logits (n, V) and, with softcap, tanh(z / c) for the backward."""
    # The matmul runs in the dtype of `weight` (already cast by the caller, see _matmul_dtype),
    # its result is upcast before any exponent is taken; the scale multiplies the upcast
    # values (the model's own forward multiplies in its dtype: the same up to its rounding).
    z = torch.nn.functional.linear(h.to(weight.dtype), weight, bias).to(dtype)
    if scale != 1.0:
        z = z * scale
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, t


def head_logits(h: Tensor, head: Head, dtype: torch.dtype = torch.float32
                ) -> tuple[Tensor, Tensor | float]:
    """(n, D) states -> (logits (n, V) in `dtype`, slope): slope = d logits / d(h W^T + b),
    (n, V) with a softcap (scale * (1 - tanh^2)), else the scalar scale. For closed-form
    gradients of the head (dpolab.auxdpo); no chunking, no custom backward."""
    z, t = _chunk_logits(h, head.weight.to(dtype), None if head.bias is None
                         else head.bias.to(dtype), head.softcap, head.scale, dtype)
    return z, head.scale if t is None else head.scale * (1.0 - t * t)


def _cast(weight: Tensor, bias: Tensor | None, mm: torch.dtype):
    """The head in the matmul dtype, cast once per call, not per chunk (a no-op when equal)."""
    return weight.to(mm), None if bias is None else bias.to(mm)


# The per-token reductions of the logits that TRL logs beside the log-probs (`token_stats`):
# columns of the (N, 3) array the chunked head fills in the same pass.
STAT_COLUMNS = ("mean_logit", "entropy", "top1")


def _token_stats(z: Tensor, lse: Tensor, labels: Tensor) -> Tensor:
    """(n, V) logits, their logsumexp (n,), labels (n,) -> (n, 3): the mean logit over the
    vocabulary, the entropy -sum_v p_v log p_v = lse - sum_v p_v z_v, and 1.0 where the
    label is the argmax (TRL's `is_top1`; the first of tied maxima, as torch.argmax)."""
    p = torch.exp(z - lse[:, None])  # (n, V) softmax, one chunk at a time
    entropy = lse - (p * z).sum(1)
    top1 = (z.argmax(1) == labels).to(z.dtype)
    return torch.stack([z.mean(1), entropy, top1], dim=1)


class _ChunkedLabelLogps(torch.autograd.Function):
    """log_softmax(head(h))[label] for (N, D) selected hidden states, chunk by chunk; and,
    with `with_stats`, the per-token reductions `STAT_COLUMNS` (N, 3) from the same chunks
    (not differentiable)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                softcap: float | None, scale: float, chunk_size: int,
                with_stats: bool = False):
        dtype = _compute_dtype(h.dtype)
        w_mm, b_mm = _cast(weight, bias, _matmul_dtype(h, weight))
        out = torch.empty(h.shape[0], dtype=dtype, device=h.device)
        stats = torch.empty((h.shape[0], len(STAT_COLUMNS)) if with_stats else (0, 3),
                            dtype=dtype, device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            z, _ = _chunk_logits(h[s:s + chunk_size], w_mm, b_mm, softcap, scale, dtype)  # (n, V)
            lse = torch.logsumexp(z, dim=1)
            out[s:s + chunk_size] = z.gather(1, labels[s:s + chunk_size, None]).squeeze(1) - lse
            if with_stats:
                stats[s:s + chunk_size] = _token_stats(z, lse, labels[s:s + chunk_size])
        ctx.save_for_backward(h, weight, bias, labels)
        ctx.softcap, ctx.scale, ctx.chunk_size = softcap, scale, chunk_size
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_stats: Tensor | None = None):
        h, weight, bias, labels = ctx.saved_tensors
        softcap, scale, chunk_size = ctx.softcap, ctx.scale, ctx.chunk_size
        dtype = _compute_dtype(h.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
            bias is not None and ctx.needs_input_grad[2])
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        mm = _matmul_dtype(h, weight)
        w_mm, b_mm = _cast(weight, bias, mm)
        # 16-bit matmuls against float32 master weights (autocast): the backward's two matmuls
        # run in 16 bits too, gradients accumulate in float32. Otherwise, as before: float32.
        low = mm != weight.dtype
        w = (w_mm if low else weight.to(dtype)) if need_h else None
        for s in range(0, h.shape[0], chunk_size):
            hc, yc, gc = h[s:s + chunk_size], labels[s:s + chunk_size], grad_out[s:s + chunk_size]
            z, t = _chunk_logits(hc, w_mm, b_mm, softcap, scale, dtype)  # recomputed, (n, V)
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z), scaled by the upstream grad.
            dz = torch.softmax(z, dim=1).mul_(-gc[:, None].to(dtype))
            dz.scatter_add_(1, yc[:, None], gc[:, None].to(dtype))
            if t is not None:  # through c * tanh(u / c): derivative 1 - tanh^2
                dz.mul_(1.0 - t * t)
            if scale != 1.0:  # through u = s * (h W^T + b): derivative s
                dz.mul_(scale)
            if need_h:
                grad_h[s:s + chunk_size] = ((dz.to(mm) if low else dz) @ w).to(h.dtype)
            if need_w and low:
                grad_w.add_(dz.to(mm).transpose(0, 1) @ hc.to(mm))
            elif need_w:
                grad_w.addmm_(dz.transpose(0, 1), hc.to(dtype))
            if need_b:
                grad_b.add_(dz.sum(0))
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None)


def label_logps(hidden: Tensor, head: Head, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """log_softmax(head(hidden))[labels] for already-selected positions: hidden (N, D),
    labels (N,) -> (N,) float32 (float64 for float64 input), chunked with recomputation."""
    return label_logps_and_stats(hidden, head, labels, chunk_size=chunk_size, stats=False)[0]


def label_logps_and_stats(hidden: Tensor, head: Head, labels: Tensor, *, chunk_size: int = 1024,
                          stats: bool = True) -> tuple[Tensor, Tensor]:
    """`label_logps` and, from the same chunks of logits, the per-token `STAT_COLUMNS`
    (N, 3) (no gradient; (0, 3) when not `stats`): what TRL logs as `logits/...`, `entropy`
    and `mean_token_accuracy`, without the (N, V) logits ever existing whole."""
    if chunk_size < 1:
        raise ValueError(f"label_logps: chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLabelLogps.apply(hidden, head.weight, head.bias, labels, head.softcap,
                                    float(head.scale), chunk_size, stats)


def completion_logps(hidden: Tensor, head: Head, labels: Tensor, mask: Tensor, *,
                     chunk_size: int = 1024) -> Tensor:
    """Per-token log pi(labels[b, t]) at completion positions, zeros elsewhere.

    hidden (B, T, D) final hidden states (after the final norm); labels (B, T) long;
    mask (B, T) bool. Returns (B, T) in float32 (float64 for float64 hidden states).
    Prompt and padding positions never go through the head.
    """
    if hidden.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"completion_logps: hidden {tuple(hidden.shape)}, labels "
                         f"{tuple(labels.shape)} and mask {tuple(mask.shape)} disagree")
    mask = mask.bool()
    flat = mask.reshape(-1).nonzero().squeeze(1)  # (N,) positions into B*T
    h_sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)  # (N, D)
    y_sel = labels.reshape(-1).index_select(0, flat)  # (N,)
    token = label_logps(h_sel, head, y_sel, chunk_size=chunk_size)  # (N,)
    out = torch.zeros(mask.numel(), dtype=token.dtype, device=hidden.device)
    return out.index_put((flat,), token).reshape(mask.shape)


def naive_completion_logps(hidden: Tensor, head: Head, labels: Tensor, mask: Tensor) -> Tensor:
    """Reference implementation: the full (B, T, V) logits, then log_softmax and gather.
    For tests and the benchmark only; it is what the chunked path avoids."""
    dtype = _compute_dtype(hidden.dtype)
    w, b = _cast(head.weight, head.bias, _matmul_dtype(hidden, head.weight))
    z, _ = _chunk_logits(hidden, w, b, head.softcap, head.scale, dtype)
    lp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return lp * mask


def naive_token_stats(hidden: Tensor, head: Head, labels: Tensor) -> Tensor:
    """Reference implementation of the `STAT_COLUMNS` for (N, D) states: the full (N, V)
    logits, then torch's own mean, entropy of the softmax and argmax. For tests only."""
    dtype = _compute_dtype(hidden.dtype)
    w, b = _cast(head.weight, head.bias, _matmul_dtype(hidden, head.weight))
    z, _ = _chunk_logits(hidden, w, b, head.softcap, head.scale, dtype)
    entropy = torch.distributions.Categorical(logits=z).entropy()
    return torch.stack([z.mean(-1), entropy, (z.argmax(-1) == labels).to(dtype)], dim=-1)
