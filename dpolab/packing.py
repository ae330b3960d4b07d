"""Where each token of a batch of pairs sits, and which earlier tokens it may attend to.

A pair is laid out as one block [prompt | chosen | rejected] that computes its prompt once.
The rejected tokens must not see the chosen ones, and position ids restart the rejected
completion at len(prompt), so each completion sees exactly what it would see after the prompt
alone. Two layouts place those blocks:

    rows     (B, L): block b in row b, right-padded; a dense additive mask (B, 1, L, L) that any
             attention kernel takes (SDPA, eager). The CPU path: exact and fastest there.
    packed   (1, S): the blocks one after another, each padded only to a multiple of
             FlexAttention's 128-token tile; attention through FlexAttention with a BlockMask,
             whose kernel skips the (tile, tile) pairs no token of which may attend to the
             other, so cost grows with sum(n_b^2), not (sum n_b)^2, and nothing of size S^2 is
             ever built. The CUDA path. Starting every block on a tile boundary makes a pair's
             attention tiles, and so its rounding, the same whatever pairs share its batch:
             the reference, computed in other batches, then matches the policy at step 0.

Notation: B pairs; P_b, C_b, R_b prompt, chosen, rejected lengths; n_b = P_b + C_b + R_b;
`kind` of a slot: 0 prompt, 1 chosen, 2 rejected, 3 padding; `doc` the pair a slot belongs to
(padding belongs to the pair it follows: it comes after that pair's tokens, so no real token
attends to it). Every index below is computed with tensor ops over all pairs at once: the
only per-pair Python work is concatenating token lists, O(tokens).

Completion tokens are scored where `PairExample.chosen_mask` / `rejected_mask` (per completion
token, True = scored) say so; a missing or None mask scores every completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

Tensor = torch.Tensor

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
ATTENTION = "dpolab_packed"  # the attention implementation name registered with transformers


@dataclass(frozen=True)
class PairLayout:
    ids: Tensor     # (S,) long token ids, pad_id in padding slots
    pos: Tensor     # (S,) long position ids (0 in padding)
    doc: Tensor     # (S,) long pair index (padding: the pair it follows)
    kind: Tensor    # (S,) long PROMPT | CHOSEN | REJECTED | PAD
    gather: Tensor  # (N,) slots whose hidden state predicts each scored completion token
    labels: Tensor  # (N,) the token each of them predicts
    seg: Tensor     # (N,) sequence id: pair b's chosen completion b, its rejected one B + b


def _lengths(examples: Sequence) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.tensor([len(getattr(e, f)) for e in examples], dtype=torch.long)
                 for f in ("prompt_ids", "chosen_ids", "rejected_ids"))


def _ranks(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For segments of `counts` (B,): each element's segment (M,) and rank in it (M,)."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(int(counts.sum())) - first[owner]


def _score_mask(examples: Sequence, field: str, counts: Tensor) -> Tensor | None:
    masks = [getattr(e, field, None) for e in examples]
    if all(m is None for m in masks):
        return None
    for e, m, n in zip(examples, masks, counts.tolist()):
        if m is not None and len(m) != n:
            raise ValueError(f"{e.source}:{e.row}: {field} has {len(m)} entries for {n} "
                             "completion tokens")
    return torch.tensor(list(chain.from_iterable(
        [True] * n if m is None else list(m) for m, n in zip(masks, counts.tolist()))),
        dtype=torch.bool)


def pair_layout(examples: Sequence, starts: Tensor, size: int, *, pad_id: int) -> PairLayout:
    """Place pair b's block at slots starts[b] .. starts[b] + n_b - 1 of `size` slots."""
    B = len(examples)
    P, C, R = _lengths(examples)
    doc_t, off = _ranks(P + C + R)  # (T,) over the real tokens, pair by pair
    slot = starts[doc_t] + off
    kind_t = (off >= P[doc_t]).long() + (off >= (P + C)[doc_t]).long()
    ids = torch.full((size,), pad_id, dtype=torch.long)
    ids[slot] = torch.tensor(list(chain.from_iterable(
        e.prompt_ids + e.chosen_ids + e.rejected_ids for e in examples)), dtype=torch.long)
    pos = torch.zeros(size, dtype=torch.long)
    pos[slot] = off - C[doc_t] * (kind_t == REJECTED)
    doc = torch.searchsorted(starts, torch.arange(size), right=True) - 1
    kind = torch.full((size,), PAD, dtype=torch.long)
    kind[slot] = kind_t
    # The first completion token is predicted from the last prompt slot; each later one from
    # the slot before it, which for the rejected completion is in the rejected block itself.
    cb, ct = _ranks(C)
    rb, rt = _ranks(R)
    g_c = starts[cb] + P[cb] - 1 + ct
    g_r = starts[rb] + torch.where(rt == 0, P[rb] - 1, P[rb] + C[rb] + rt - 1)
    gather = torch.cat([g_c, g_r])  # chosen tokens of every pair first: seg stays sorted
    labels = torch.tensor(list(chain(chain.from_iterable(e.chosen_ids for e in examples),
                                     chain.from_iterable(e.rejected_ids for e in examples))),
                          dtype=torch.long)
    seg = torch.cat([cb, B + rb])
    mc, mr = _score_mask(examples, "chosen_mask", C), _score_mask(examples, "rejected_mask", R)
    if mc is not None or mr is not None:
        keep = torch.cat([torch.ones(len(g_c), dtype=torch.bool) if mc is None else mc,
                          torch.ones(len(g_r), dtype=torch.bool) if mr is None else mr])
        gather, labels, seg = gather[keep], labels[keep], seg[keep]
    return PairLayout(ids, pos, doc, kind, gather, labels, seg)


def allowed(doc_q: Tensor, kind_q: Tensor, q: Tensor, doc_k: Tensor, kind_k: Tensor,
            k: Tensor) -> Tensor:
    """May query slot q attend to key slot k: same pair, not later, and not a rejected token
    looking at a chosen one. Elementwise over broadcast operands (also FlexAttention's
    mask_mod body)."""
    return (doc_q == doc_k) & (k <= q) & ~((kind_q == REJECTED) & (kind_k == CHOSEN))


def rows(examples: Sequence, *, pad_id: int, dtype: torch.dtype):
    """The rows layout: (ids (B, L), pos (B, L), mask (B, 1, L, L) additive, 0 = attend,
    finfo.min = masked; gather (N,) into (B * L), labels (N,), seg (N,)). Padding attends to
    itself only (a fully masked row would give NaN in softmax)."""
    B = len(examples)
    P, C, R = _lengths(examples)
    L = int((P + C + R).max())
    lay = pair_layout(examples, torch.arange(B) * L, B * L, pad_id=pad_id)
    kind = lay.kind.view(B, L)
    # `allowed` with one pair per row, in few passes over (B, L, L): the (L, L) causal part is
    # shared, rejected-sees-chosen is an outer product of two (B, L) flags, and padding (after
    # every real token, so causality already hides it from them) sees only itself.
    causal = torch.ones(L, L, dtype=torch.bool).tril_()
    allow = causal & ~((kind == REJECTED)[:, :, None] & (kind == CHOSEN)[:, None, :])
    allow = torch.where((kind == PAD)[:, :, None], torch.eye(L, dtype=torch.bool), allow)
    mask = torch.where(allow[:, None], torch.zeros((), dtype=dtype),
                       torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return (lay.ids.view(B, L), lay.pos.view(B, L), mask, lay.gather, lay.labels, lay.seg)


def packed(examples: Sequence, *, pad_id: int, multiple: int = 128) -> PairLayout:
    """The packed layout: blocks back to back in one row, each starting at a multiple of
    `multiple` (FlexAttention's tile; 1 packs without any padding)."""
    P, C, R = _lengths(examples)
    n = -(-(P + C + R) // multiple) * multiple
    return pair_layout(examples, torch.cumsum(n, 0) - n, int(n.sum()), pad_id=pad_id)


def dense_mask(lay: PairLayout, *, dtype: torch.dtype) -> Tensor:
    """The packed layout's mask as a dense additive (1, 1, S, S) tensor (tests, CPU)."""
    j = torch.arange(lay.doc.numel())
    allow = allowed(lay.doc[:, None], lay.kind[:, None], j[:, None],
                    lay.doc[None, :], lay.kind[None, :], j[None, :])
    return torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)[None, None]


def block_mask(doc: Tensor, kind: Tensor, *, compile_mask: bool):
    """FlexAttention BlockMask of the packed layout; doc, kind (S,) on the target device.
    `compile_mask` builds it with a compiled kernel (no (S, S) tensor; for CUDA); otherwise
    create_block_mask evaluates the predicate densely (fine for small S, e.g. CPU tests)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return allowed(doc[q], kind[q], q, doc[k], kind[k], k)

    S = doc.numel()
    return create_block_mask(mask_mod, None, None, S, S, device=doc.device,
                             _compile=compile_mask)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        from transformers import AttentionInterface  # noqa: F401
    except ImportError:
        return False
    return True


def _attention(module, query, key, value, attention_mask, **kwargs):
    """A transformers attention function: FlexAttention for a BlockMask (the packed layout),
    SDPA for anything else (generation, scoring with 2D masks), so a model switched to it
    behaves as an SDPA model everywhere but in the packed forward."""
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.device.type == "cuda":
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _eager_flex(query, key, value, attention_mask, scaling=kwargs.get("scaling"),
                       softcap=kwargs.get("softcap"))


def _eager_flex(query, key, value, mask, *, scaling, softcap):
    """Uncompiled FlexAttention, for CPU (tests): (B, H, S, d) in, (B, S, H, d) out."""
    from torch.nn.attention.flex_attention import flex_attention

    if key.shape[1] != query.shape[1]:  # grouped-query attention: share each kv head
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, k):
            return softcap * torch.tanh(score / softcap)
    out = flex_attention(query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_SWITCHABLE = ("sdpa", "eager", "flex_attention", ATTENTION)


def use_packed_attention(decoder) -> bool:
    """Route the attention of `decoder` (a transformers model) through :func:`_attention`
    (registered once under ATTENTION). Permanent, not scoped to one forward: activation
    checkpointing recomputes attention in backward, after any scope would have ended. Returns
    False, changing nothing, for a model that takes no BlockMask (GPT-2), one on another kernel
    (e.g. flash attention) or a stack without FlexAttention."""
    config = getattr(decoder, "config", None)
    if (not flex_available() or not getattr(decoder, "_supports_flex_attn", False)
            or getattr(config, "_attn_implementation", None) not in _SWITCHABLE):
        return False
    if config._attn_implementation != ATTENTION:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        config._attn_implementation = ATTENTION
    return True
