"""Per-token completion log-probs of a batch of pairs, for each training scope.

A forward returns a *flat* view: the log-probs of every completion token of the batch
(N,), and which sequence each belongs to, `seg` (N,) in [0, 2B): sequence i < B is pair i's
chosen completion, B + i its rejected one. Sums per sequence are an index_add away, and the
per-token values stay available for displacement diagnostics.

Every forward is called the same way, `forward(examples, split=...) -> FlatLogps`; `split`
names the stored split the examples come from ("train", "held_out") and only the cached-state
forward reads it (its states are stored per split).

Scopes:
    full, lora   chosen and rejected go through the body in one forward, in one of the
                 layouts of FORWARDS (train.pair_forward; `auto` lets dpolab.forward_check
                 pick the fastest one that is exact on the model): one block per pair that
                 computes its prompt once (dpolab.packing: padded rows with a 4D mask, or
                 packed blocks under FlexAttention on CUDA), two rows per pair, or each
                 sequence in a row of its own;
    last_layer   the body runs once per example, before training; its final hidden states at
                 completion positions are cached and every step costs only the head
                 (dpolab.head_cache).

A mixture-of-experts body under a router loss (dpolab.moe.RouterLoss) also returns, while
gradients are on, the routers' load-balancing loss of the batch (`FlatLogps.aux_loss`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dpolab import packing
from dpolab.tokenize import collate_pairs
from dpolab.logps import Head, label_logps_and_stats

Tensor = torch.Tensor


@dataclass(frozen=True)
class FlatLogps:
    tokens: Tensor  # (N,) per-token log-probs of all completion tokens, float32
    seg: Tensor  # (N,) long, sequence id in [0, 2B)
    n_pairs: int  # B
    n_processed: int  # tokens that went through the model for this batch (throughput)
    aux_loss: Tensor | None = None  # () the MoE routers' load-balancing loss, when trained
    stats: Tensor | None = None  # (N, 3) per-token dpolab.logps.STAT_COLUMNS, no gradient

    def sums(self) -> tuple[Tensor, Tensor]:
        """Summed log-probs (chosen (B,), rejected (B,)), differentiable, float64: float32
        sums of ~100 terms differ in the last bits with the summation order, and an exact
        tie with the reference (every margin 0 before training) must stay exact."""
        s = torch.zeros(2 * self.n_pairs, dtype=torch.float64, device=self.tokens.device)
        s = s.index_add(0, self.seg, self.tokens.double())
        return s[: self.n_pairs], s[self.n_pairs:]

    def counts(self) -> tuple[Tensor, Tensor]:
        n = torch.bincount(self.seg, minlength=2 * self.n_pairs)
        return n[: self.n_pairs], n[self.n_pairs:]

    def split(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-example per-token tensors (chosen list, rejected list), detached, on CPU."""
        parts = torch.split(self.tokens.detach().cpu(), self.counts_list())
        return list(parts[: self.n_pairs]), list(parts[self.n_pairs:])

    def counts_list(self) -> list[int]:
        c, r = self.counts()
        return torch.cat([c, r]).tolist()


class _BodyPairs:
    """What the body forwards share: construction (every FORWARDS entry takes the same
    keywords), `hidden` and the call through the head. A subclass defines `_run(examples,
    router) -> (h (N, D), labels (N,), seg (N,), n_tokens, aux_loss or None)`, tokens
    sorted by sequence id."""

    def __init__(self, body: Callable, head_fn: Callable[[], Head], *, pad_id: int,
                 chunk_size: int, device: torch.device, autocast=None,
                 dtype: torch.dtype = torch.float32, router=None):
        self.body, self.head_fn, self.pad_id = body, head_fn, pad_id
        self.chunk_size, self.device, self.autocast, self.dtype = chunk_size, device, autocast, dtype
        self.router = router  # dpolab.moe.RouterLoss, or None: no routers, or not trained

    def hidden(self, examples: Sequence):
        """(h (N, D) states predicting each completion token, labels, seg, n_tokens)."""
        return self._run(list(examples), None)[:4]

    def __call__(self, examples: Sequence, *, split: str | None = None) -> FlatLogps:
        # The router loss only trains: evaluation and the reference pass skip it.
        router = self.router if torch.is_grad_enabled() else None
        h, labels, seg, n_tokens, aux = self._run(list(examples), router)
        return self.through_head((h, labels, seg, n_tokens), self.head_fn(), len(examples), aux=aux)

    def through_head(self, states: tuple, head: Head, n_pairs: int, *,
                     aux: Tensor | None = None) -> FlatLogps:
        """The log-probs under `head` of `n_pairs` pairs whose `hidden` output is `states`."""
        h, labels, seg, n_tokens = states
        tok, stats = label_logps_and_stats(h, head, labels, chunk_size=self.chunk_size)
        return FlatLogps(tok, seg, n_pairs, n_tokens, aux, stats)

    def _body(self, ids: Tensor, weights: Tensor, router, **kw) -> tuple[Tensor, Tensor | None]:
        """The body on `ids` (B, T) under the forward's autocast -> (hidden (B, T, D), the
        routers' loss with each slot counted `weights` (B, T) times, or None)."""
        with _autocast(self.device, self.autocast):
            if router is None:
                return self.body(ids, **kw), None
            hidden, logits = self.body(ids, router_logits=True, **kw)
        return hidden, router(logits, weights.reshape(-1).to(hidden.device))


class BodyForward(_BodyPairs):
    """Two rows per pair (prompt + chosen, prompt + rejected), right-padded, with the model's
    own 2D attention mask (train.pair_forward=two_rows): for attention kernels that take no
    custom 4D mask, and for mixers that ignore one (state-space, convolution) but not what
    comes after a sequence's last token."""

    def _run(self, examples: list, router):
        batch = collate_pairs(examples, pad_id=self.pad_id)
        # Indices on the host before the copy: boolean indexing on the device would wait for it.
        flat = batch.loss_mask.reshape(-1).nonzero().squeeze(1)  # (N,) into (2B * T)
        seg = flat // batch.loss_mask.shape[1]
        labels = batch.labels.reshape(-1).index_select(0, flat)
        hidden, aux = self._body(batch.input_ids.to(self.device), batch.attention_mask, router,
                                 attention_mask=batch.attention_mask.to(self.device))  # (2B, T, D)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(self.device))
        n_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                       for e in examples)
        return (_head_input(h, self.autocast), labels.to(self.device), seg.to(self.device),
                n_tokens, aux)


class SequenceForward(_BodyPairs):
    """Each sequence (prompt + chosen, prompt + rejected) alone in a row, no padding, no
    mask (train.pair_forward=per_sequence): the model's own semantics, exact for any mixer.
    Sequences of equal length share a forward (rows of one length need no padding)."""

    def _run(self, examples: list, router):
        B = len(examples)
        seqs = ([(e.prompt_ids, e.chosen_ids, e.chosen_mask) for e in examples]
                + [(e.prompt_ids, e.rejected_ids, e.rejected_mask) for e in examples])
        by_length: dict[int, list[int]] = {}
        for i, (p, c, _) in enumerate(seqs):
            by_length.setdefault(len(p) + len(c), []).append(i)
        states: list[Tensor | None] = [None] * len(seqs)
        logits_parts, aux = [], None
        for _, idx in sorted(by_length.items()):
            ids = torch.tensor([seqs[i][0] + seqs[i][1] for i in idx], dtype=torch.long)
            if router is None:
                hidden, _ = self._body(ids.to(self.device), ids, None)  # (k, length, D)
            else:
                with _autocast(self.device, self.autocast):
                    hidden, logits = self.body(ids.to(self.device), router_logits=True)
                logits_parts.append(logits)
            for j, i in enumerate(idx):
                p, c, scored = seqs[i]
                keep = torch.arange(len(c)) if scored is None else torch.tensor(
                    [t for t, k in enumerate(scored) if k], dtype=torch.long)
                states[i] = hidden[j].index_select(0, (len(p) - 1 + keep).to(self.device))
        if router is not None:  # every slot is a real token of one sequence: weight 1
            layers = tuple(torch.cat(per_layer) for per_layer in zip(*logits_parts))
            n = layers[0].shape[0] if layers else 0
            aux = router(layers, torch.ones(n, device=self.device))
        labels = torch.tensor([t for p, c, scored in seqs for t, k in
                               zip(c, scored if scored is not None else [True] * len(c)) if k],
                              dtype=torch.long)
        seg = torch.repeat_interleave(torch.arange(2 * B), torch.tensor([s.shape[0] for s in states]))
        n_tokens = sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)
                       for e in examples)
        return (_head_input(torch.cat(states), self.autocast), labels.to(self.device),
                seg.to(self.device), n_tokens, aux)


def shared_prompt_batch(examples: Sequence, *, pad_id: int, dtype: torch.dtype):
    """Pack each pair as one row [prompt | chosen | rejected] that computes its prompt once.

    The rejected tokens must not see the chosen ones: a 4D attention mask (B, 1, L, L) lets a
    token attend to earlier tokens of its own prompt and completion only, and position ids
    restart the rejected completion at len(prompt), so each completion sees exactly what it
    would see after the prompt alone. Padding attends to itself (a fully masked row would
    give NaN in softmax). Returns (input_ids, position_ids, mask (additive float, 0 = attend),
    gather (N,) flat indices into (B * L) of the states that predict each scored completion
    token (see PairExample.chosen_mask), labels (N,), seg (N,)). Built with tensor ops over all pairs (:func:`packing.rows`).
    """
    return packing.rows(list(examples), pad_id=pad_id, dtype=dtype)


def body_autocast(dtype: torch.dtype, device: torch.device, bf16: bool) -> torch.dtype | None:
    """The autocast dtype of the body, or None: float16 weights compute in float16 on any
    device (dpolab trains float32 copies of them: see session.build), other weights in bf16
    on CUDA when `bf16` (train.bf16_autocast), in their own dtype otherwise."""
    if dtype == torch.float16:
        return torch.float16
    return torch.bfloat16 if device.type == "cuda" and bf16 else None


def _autocast_dtype(autocast) -> torch.dtype | None:
    """A forward's `autocast`: a dtype, True (bfloat16) or False / None (off)."""
    return torch.bfloat16 if autocast is True else (autocast or None)


def _autocast(device: torch.device, autocast):
    dtype = _autocast_dtype(autocast)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _head_input(h: Tensor, autocast) -> Tensor:
    """Under autocast the model's own head would multiply 16-bit states (the final norm
    returns float32 only by type promotion): hand the head the same, so its matmuls run in
    16 bits (log-sum-exp stays float32, see logps)."""
    dtype = _autocast_dtype(autocast)
    return h.to(dtype) if dtype is not None else h


def packed_states(body: Callable, examples: Sequence, *, pad_id: int, device: torch.device,
                  autocast: bool, dense: bool = False):
    """The shared-prompt forward in the packed layout (one row of S slots, FlexAttention with
    a BlockMask, :func:`packing.packed`): (h (N, D), labels, seg, n_tokens) as
    SharedPromptForward.hidden. `body`'s model must route a BlockMask to FlexAttention
    (:func:`packing.use_packed_attention`). `dense` gives the same layout a dense (1, 1, S, S)
    mask instead, for checking the layout where FlexAttention has no backward (CPU)."""
    fwd = SharedPromptForward(body, lambda: None, pad_id=pad_id, chunk_size=1, device=device,
                              autocast=autocast)
    return fwd._packed(list(examples), None, dense=dense)[:4]


class SharedPromptForward(_BodyPairs):
    """full / lora scopes: one row per pair, the prompt computed once (see
    :func:`shared_prompt_batch`); same log-probs as two rows per pair, fewer tokens, for a
    body whose every mixer honours the mask (attention; dpolab.forward_check tests it).
    On CUDA, for a model whose attention can be routed to FlexAttention, the packed layout
    (padding only up to each pair's last 128-slot tile, no (L, L) mask); elsewhere one padded
    row per pair with a dense 4D mask (exact and fastest on CPU)."""

    def _run(self, examples: list, router):
        decoder = getattr(self.body, "decoder", None)
        if (self.device.type == "cuda" and decoder is not None
                and packing.use_packed_attention(decoder)):
            return self._packed(examples, router)
        ids, pos, mask, gather, labels, seg = shared_prompt_batch(
            examples, pad_id=self.pad_id, dtype=self.dtype)
        # Router loss weights: a prompt slot stands for the prompt of both rows TRL's forward
        # runs (2), a completion slot for itself (1), padding for nothing (0).
        P, n = (torch.tensor([len(e.prompt_ids) for e in examples])[:, None],
                torch.tensor([_pair_length(e) for e in examples])[:, None])
        col = torch.arange(ids.shape[1])[None, :]
        weights = (col < P).long() + (col < n).long()  # (B, L)
        hidden, aux = self._body(ids.to(self.device), weights, router, attention_mask=mask.to(
            self.device), position_ids=pos.to(self.device))  # (B, L, D)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather.to(self.device))
        n_tokens = sum(_pair_length(e) for e in examples)
        return (_head_input(h, self.autocast), labels.to(self.device), seg.to(self.device),
                n_tokens, aux)

    def _packed(self, examples: list, router, *, dense: bool = False):
        lay = packing.packed(examples, pad_id=self.pad_id)
        device = self.device
        if dense:
            mask = packing.dense_mask(lay, dtype=self.body.decoder.dtype).to(device)
        else:
            mask = packing.block_mask(lay.doc.to(device), lay.kind.to(device),
                                      compile_mask=device.type == "cuda")
        weights = 2 * (lay.kind == packing.PROMPT).long() + (
            (lay.kind == packing.CHOSEN) | (lay.kind == packing.REJECTED)).long()
        hidden, aux = self._body(lay.ids.to(device)[None], weights, router, attention_mask=mask,
                                 position_ids=lay.pos.to(device)[None])  # (1, S, D)
        h = hidden[0].index_select(0, lay.gather.to(device))
        n_tokens = sum(_pair_length(e) for e in examples)
        return (_head_input(h, self.autocast), lay.labels.to(device), lay.seg.to(device),
                n_tokens, aux)


def _pair_length(e) -> int:
    return len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids)


@dataclass(frozen=True)
class ForwardKind:
    """One layout of a batch of pairs through the body (`train.pair_forward` names it)."""

    name: str
    make: type  # (body, head_fn, *, pad_id, chunk_size, device, autocast, dtype, router)
    layout: str  # what one forward holds, as the run records it


# Fastest first: `auto` takes the first one dpolab.forward_check finds exact on the model.
FORWARDS = {k.name: k for k in (
    ForwardKind("shared_prompt", SharedPromptForward,
                "one row per pair, the prompt computed once, the rejected completion masked "
                "from the chosen one"),
    ForwardKind("two_rows", BodyForward,
                "two right-padded rows per pair (prompt + chosen, prompt + rejected)"),
    ForwardKind("per_sequence", SequenceForward,
                "each sequence alone in a row, no padding (equal lengths share a forward)"),
)}


def make_forward(name: str, body: Callable, head, *, pad_id: int, chunk_size: int,
                 device: torch.device, autocast, dtype: torch.dtype, router=None):
    """The FORWARDS entry `name` over `body` and `head` (a Head, or a function reading it);
    `autocast` the body's autocast dtype (body_autocast), or False / None."""
    head_fn = head if callable(head) else (lambda: head)
    return FORWARDS[name].make(body, head_fn, pad_id=pad_id, chunk_size=chunk_size,
                               device=device, autocast=autocast, dtype=dtype, router=router)
