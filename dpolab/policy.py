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
                 completion positions are cached and every step costs only the head.

A mixture-of-experts body under a router loss (dpolab.moe.RouterLoss) also returns, while
gradients are on, the routers' load-balancing loss of the batch (`FlatLogps.aux_loss`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dpolab import atomic, cachedir, packing, reference
from dpolab.tokenize import collate_pairs
from dpolab.logps import Head, label_logps_and_stats

Tensor = torch.Tensor
STATES = "states"  # the kind of file the cached body states are (dpolab.atomic.save_tensors)


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


def padded(tokens: Tensor, seg: Tensor, n_seq: int) -> tuple[Tensor, Tensor]:
    """Flat per-token values (N,) with sequence ids `seg` (N,) in [0, n_seq) -> (values
    (n_seq, T), mask (n_seq, T) bool), each sequence's tokens left-aligned in their order
    (T the longest sequence); differentiable in `tokens`."""
    order = torch.sort(seg, stable=True).indices
    seg_sorted = seg[order]
    counts = torch.bincount(seg_sorted, minlength=n_seq)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(seg.numel(), device=seg.device) - starts[seg_sorted]
    width = int(counts.max()) if counts.numel() else 0
    out = tokens.new_zeros((n_seq, width)).index_put((seg_sorted, col), tokens[order])
    mask = torch.zeros((n_seq, width), dtype=torch.bool, device=seg.device)
    mask[seg_sorted, col] = True
    return out, mask


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
        tok, stats = label_logps_and_stats(h, self.head_fn(), labels, chunk_size=self.chunk_size)
        return FlatLogps(tok, seg, len(examples), n_tokens, aux, stats)

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
        for length, idx in sorted(by_length.items()):
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


class CachedHeadForward:
    """last_layer scope: cached final hidden states at completion positions, head only."""

    def __init__(self, head_fn: Callable[[], Head], *, chunk_size: int, device: torch.device):
        self.head_fn, self.chunk_size, self.device = head_fn, chunk_size, device
        self.cache: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.stores: dict[str, Path] = {}  # split -> the file its states are kept in

    def fill(self, states: Callable, examples: Sequence, *, split: str, batch_size: int,
             store: Path | None = None, progress: Callable[[int], None] | None = None,
             map_batches: Callable | None = None) -> None:
        """Run the (frozen) body once over `examples` and keep completion-position states.
        `states(examples) -> (h (N, D), labels (N,), seg (N,), n_tokens)` is a pair forward's
        `hidden` (tokens sorted by sequence id). With `store` (a safetensors path keyed by
        weights and token ids) they are read from there when present, else written there.
        `map_batches(fn, n_batches, progress=...)` -> [fn(0), ...] runs the batches (each rank
        a share, results on every rank: `Distributed.map_batches`); in order here without it."""
        if store is not None:
            self.stores[split] = store
            if self._load(store, examples, split):
                if progress:
                    progress(len(examples))
                return
            width = self.head_fn().weight.shape[-1]  # float32 states and an int64 label each
            cachedir.require(store, reference.store_bytes(examples, 4 * width + 8),
                             "the cached body states")
        batches = [list(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]

        def run(i: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
            h, labels, seg, _ = states(batches[i])
            b = len(batches[i])
            counts = torch.bincount(seg, minlength=2 * b).tolist()
            hs, ys = torch.split(h.float().cpu(), counts), torch.split(labels.cpu(), counts)
            return [(hs[j], ys[j], hs[b + j], ys[b + j]) for j in range(b)]

        bar = (lambda done: progress(min(len(examples), done * batch_size))) if progress else None
        with torch.no_grad():
            results = (map_batches or _in_order)(run, len(batches), progress=bar)
        for chunk, entries in zip(batches, results):
            for ex, entry in zip(chunk, entries):
                self.cache[(split, ex.index)] = tuple(t.to(self.device) for t in entry)
        if store is not None:
            self._save(store, examples, split)

    def responses(self, examples: Sequence, *, split: str) -> tuple[list[Tensor], list[Tensor]]:
        """The cached (states, labels) of every response of `examples`, chosen ones first:
        response j < B is pair j's chosen completion, B + j its rejected one."""
        entries = [self.cache[(split, ex.index)] for ex in examples]
        return ([e[0] for e in entries] + [e[2] for e in entries],
                [e[1] for e in entries] + [e[3] for e in entries])

    def _save(self, path: Path, examples: Sequence, split: str) -> None:
        hs, ys = self.responses(examples, split=split)
        offsets = torch.tensor([0] + [h.shape[0] for h in hs]).cumsum(0)
        atomic.save_tensors({"hidden": torch.cat(hs).cpu().contiguous(),
                             "labels": torch.cat(ys).cpu(), "offsets": offsets}, path,
                            kind=STATES)

    def _load(self, path: Path, examples: Sequence, split: str) -> bool:
        """Fill the cache from `path` when it holds these examples' states for this head
        (`stored_states`); else a miss said in one line."""
        t = stored_states(path, examples, width=self.head_fn().weight.shape[-1])
        if t is None:
            return False
        n, off = len(examples), t["offsets"].tolist()
        h, y = t["hidden"].to(self.device), t["labels"].to(self.device)
        for i, ex in enumerate(examples):
            c, r = slice(off[i], off[i + 1]), slice(off[n + i], off[n + i + 1])
            self.cache[(split, ex.index)] = (h[c], y[c], h[r], y[r])
        return True

    def __call__(self, examples: Sequence, *, split: str | None = None,
                 head: Head | None = None) -> FlatLogps:
        """Log-probs under the current head, or under `head` (e.g. the reference head), of
        examples whose states `fill` cached under `split`."""
        if split is None:
            raise ValueError("CachedHeadForward needs the split whose cached states to read")
        hs, ys = self.responses(examples, split=split)
        seg = torch.cat([torch.full((h.shape[0],), j, dtype=torch.long) for j, h in enumerate(hs)])
        tok, stats = label_logps_and_stats(torch.cat(hs), head if head is not None
                                           else self.head_fn(), torch.cat(ys),
                                           chunk_size=self.chunk_size)
        return FlatLogps(tok, seg.to(self.device), len(examples), int(seg.numel()), stats=stats)


def stored_states(path: Path, examples: Sequence, width: int | None = None) -> dict | None:
    """The tensors of the cached-state file `path` when they are the states of `examples`:
    kind and checksum (dpolab.atomic.read_tensors), then keys, float32 (tokens, `width`)
    states, the layout (dpolab.reference.layout_problem) and labels equal to the scored
    tokens. None when absent, or a miss said in one line."""
    t = atomic.read_tensors(path, kind=STATES)
    if t is None:
        return None
    h, y = t.get("hidden"), t.get("labels")
    if set(t) != {"hidden", "labels", "offsets"}:
        problem = f"holds {', '.join(sorted(t))}, not hidden, labels and offsets"
    elif h.dtype != torch.float32 or h.dim() != 2 or width not in (None, h.shape[1]):
        problem = f"its states are {h.dtype} {tuple(h.shape)}, not float32 (tokens, {width})"
    elif y.dtype != torch.int64 or tuple(y.shape) != (h.shape[0],):
        problem = f"its labels are {y.dtype} {tuple(y.shape)}, not int64 ({h.shape[0]},)"
    else:
        problem = reference.layout_problem(t["offsets"], reference.scored_lengths(examples), h)
        if problem is None and not torch.equal(y, scored_tokens(examples)):
            problem = "its labels are not the completions' scored tokens"
    return t if problem is None else atomic.miss(path, problem)


def scored_tokens(examples: Sequence) -> Tensor:
    """(T,) int64: the scored tokens of every chosen completion, then of every rejected one,
    in example order (a cached-state file's labels)."""
    def scored(ids, mask) -> list[int]:
        return list(ids) if mask is None else [t for t, m in zip(ids, mask) if m]
    return torch.tensor([t for e in examples for t in scored(e.chosen_ids, e.chosen_mask)]
                        + [t for e in examples for t in scored(e.rejected_ids, e.rejected_mask)],
                        dtype=torch.int64)


def _in_order(fn: Callable[[int], object], n: int, *, progress=None) -> list:
    out = []
    for i in range(n):
        out.append(fn(i))
        if progress:
            progress(i + 1)
    return out


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
