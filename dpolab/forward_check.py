"""Which pair forward is exact on the model actually loaded: measured, not read off a name.

The fast pair forwards (dpolab.policy.FORWARDS) put a pair's chosen and rejected completions in
one row and keep them apart with a 4D attention mask, or pad rows. Layers that are not
attention (Mamba-2 and other state-space mixers, short convolutions: NemotronH, LFM2, Jamba,
Bamba, FalconMamba) ignore such a mask, so the rejected completion's log-probs would depend on
the chosen tokens; sliding-window attention loses its window under a custom 4D mask. Which
model does what is measured here, before training, on a few real pairs of the run, no grad:

    reference   each sequence (prompt + completion) alone, unpadded, through the model's own
                forward (`model(ids).logits`, log-softmax in float32): the plain model;
    head        dpolab's chunked head on the decoder's final states of those same forwards
                (read by a hook on the decoder): a difference from the reference is a
                transform of the logits dpolab's head does not reproduce, and the model is
                refused (UserError), never trained;
    candidates  the forwards in FORWARDS order (fastest first) under `auto`, or the one
                `train.pair_forward` names: on the pairs, and on the pairs with every chosen
                token replaced by another (same lengths, so the same shapes and kernels).

A candidate passes when its log-probs agree with the reference to the model dtype's rounding
(TOLERANCE), and when the chosen tokens of every other pair are replaced, the rejected
log-probs of those pairs move no more than ROUNDING_FACTOR times the rejected log-probs of the
untouched pairs in the same batch. A mask that is honoured zeroes every masked term exactly,
so with deterministic kernels both move by exactly 0 and any move is a leak; layers that
batch tokens across sequences (mixture-of-experts dispatch: the tokens an expert multiplies
change with the batch) or nondeterministic kernels move the untouched pairs by their rounding
too, and that measured spread is what a leak must stand out from. `auto` takes the first
candidate that passes (the last one, per_sequence, is the model's own semantics); a named
forward that fails is refused with one line. The pairs are the run's longest (sliding windows
and long-range effects show there) and its shortest (cheap: the check costs about as much as
ten forwards of the longest pair); the replacement tokens come from a seeded generator: the
check is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dpolab.errors import UserError
from dpolab.logps import Head
from dpolab.policy import FORWARDS, make_forward
from dpolab.tokenize import PairExample

Tensor = torch.Tensor

# Largest |log-prob difference| per token between two exact layouts of the same sequences:
# different shapes round differently (float32: ~1e-6 on tiny models, ~1e-5 on 30 layers).
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 5e-2,
             torch.float16: 1e-2}
N_PAIRS = 3  # pairs scored: the run's longest and its shortest (dpolab.forward_check.check_pairs)
ROUNDING_FACTOR = 10.0  # a leak moves the perturbed pairs' rejected log-probs this much more


@dataclass(frozen=True)
class Trial:
    """One candidate forward on the check's pairs."""

    name: str
    max_delta: float | None  # max |log-prob - reference| over every completion token
    rejected_moved: float | None  # max |change| of rejected log-probs whose chosen changed
    batch_moved: float | None  # max |change| of rejected log-probs of the untouched pairs
    error: str | None = None  # the forward failed to run on this model (type: message)

    def passed(self, tol: float) -> bool:
        if self.error is not None or self.max_delta is None:
            return False
        return self.max_delta <= tol and not self.leaks()

    def leaks(self) -> bool:
        return self.rejected_moved > ROUNDING_FACTOR * self.batch_moved

    def why_not(self, tol: float) -> str:
        if self.error is not None:
            return f"it fails on this model ({self.error})"
        if self.leaks():
            return (f"the rejected log-probs move by {self.rejected_moved:.2g} nats when only "
                    "the chosen tokens change (a layer ignores the mask)")
        return (f"its log-probs differ from the model's own by up to {self.max_delta:.2g} "
                f"nats (> {tol:g})")


@dataclass(frozen=True)
class ForwardChoice:
    """The forward a run uses, and why: printed in one line, recorded in data.json."""

    name: str  # a FORWARDS entry
    requested: str  # train.pair_forward: auto or a FORWARDS entry
    reason: str
    head_delta: float  # max |dpolab's head - the model's own| log-prob on the same states
    tolerance: float
    pairs: int
    trials: tuple[Trial, ...] = field(default_factory=tuple)

    def line(self) -> str:
        return f"pair forward: {self.name} ({self.reason})"

    def record(self) -> dict:
        return {"forward": self.name, "requested": self.requested, "reason": self.reason,
                "layout": FORWARDS[self.name].layout, "pairs_checked": self.pairs,
                "tolerance": self.tolerance, "head_max_delta": self.head_delta,
                "tried": {t.name: {"max_delta": t.max_delta, "rejected_moved": t.rejected_moved,
                                   "untouched_moved": t.batch_moved, "error": t.error}
                          for t in self.trials}}


def choose(requested: str, model, examples: Sequence[PairExample], *, pad_id: int,
           device: torch.device, chunk_size: int = 1024, n_pairs: int = N_PAIRS,
           where: str = "model") -> ForwardChoice:
    """The forward `requested` ("auto" or a FORWARDS name) resolves to on `model` (a causal
    LM or peft model, eval mode), checked on `n_pairs` of `examples` (check_pairs). UserError
    when the model's logits are not reproduced, or a named forward is not exact."""
    from dpolab.models import body_and_head

    pairs = check_pairs(examples, n_pairs)
    if not pairs:
        raise UserError("no pairs to check the pair forward on")
    if len(pairs) == 1:  # an untouched pair beside the perturbed one: a copy does
        pairs = pairs * 2
    body, head = body_and_head(model)
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 1e-4)
    kw = dict(pad_id=pad_id, chunk_size=chunk_size, device=device, autocast=False, dtype=dtype)
    with torch.no_grad():
        ref, mine = own_logps(model, pairs, device, head=head)
        head_delta = float((mine - ref).abs().max())
        if not head_delta <= tol:
            raise UserError(
                f"{where}: dpolab's output head does not reproduce the model's own logits "
                f"(log-probs differ by up to {head_delta:.3g} nats on the same sequences, "
                f"> {tol:g}): its forward does something to its logits beyond the scales "
                "(logit_scale, logits_scaling, lm_head_multiplier) and soft caps dpolab "
                "reproduces; not trained")
        names = list(FORWARDS) if requested == "auto" else [requested]
        trials = []
        for name in names:
            trial = _try(make_forward(name, body, head, **kw), pairs, ref, head)
            trials.append(trial)
            if trial.passed(tol):
                break
    last = trials[-1]
    if not last.passed(tol):
        if requested != "auto":
            raise UserError(f"train.pair_forward={requested} is not exact on {where}: "
                            f"{last.why_not(tol)}; use train.pair_forward=auto")
        raise UserError(f"{where}: no pair forward reproduces the model's own log-probs "
                        f"({'; '.join(f'{t.name}: {t.why_not(tol)}' for t in trials)})")
    if requested != "auto":
        reason = "as train.pair_forward names it; checked exact on this model"
    elif len(trials) == 1:
        reason = "checked exact on this model"
    else:
        reason = "; ".join(f"not {t.name}: {t.why_not(tol)}" for t in trials[:-1])
    return ForwardChoice(last.name, requested, reason, head_delta, tol, len(pairs), tuple(trials))


def choose_for_run(cfg, model, examples: list, *, pad_id: int, dist) -> ForwardChoice:
    """`cfg.train.pair_forward` resolved on `model` for a run (its config, its pairs, its
    dpolab.distributed.Distributed). Under torchrun every rank checks; where kernels made
    ranks disagree, all take the most exact forward any rank chose (FORWARDS order), so every
    rank runs the same layout."""
    from dataclasses import replace as with_name

    choice = choose(cfg.train.pair_forward, model, examples, pad_id=pad_id, device=dist.device,
                    chunk_size=cfg.train.logps_chunk, where=cfg.model.name)
    names = list(FORWARDS)
    votes = dist.all_sum([float(n == choice.name) for n in names])
    agreed = max(i for i, v in enumerate(votes) if v > 0)
    if names[agreed] != choice.name:
        choice = with_name(choice, name=names[agreed],
                           reason=f"another rank's check chose it (this rank: {choice.name})")
    return choice


def check_pairs(examples: Sequence[PairExample], n: int) -> list[PairExample]:
    """The run's longest pair (its longer sequence; sliding windows and long-range effects
    show there) and its n - 1 shortest (cheap), ties by order."""
    def length(i: int) -> int:
        e = examples[i]
        return len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))

    if not examples:
        return []
    top = min(range(len(examples)), key=lambda i: (-length(i), i))
    rest = sorted((i for i in range(len(examples)) if i != top), key=lambda i: (length(i), i))
    return [examples[i] for i in [top] + rest[:n - 1]]


def own_logps(model, pairs: Sequence[PairExample], device, *, head: Head | None = None):
    """The reference: per-token log-probs of every scored completion token, chosen ones of
    every pair first, then rejected (FlatLogps order), each sequence alone through
    `model(input_ids=...)` with log-softmax in float32. (N,) float32 on the CPU. With `head`,
    also (second) that head's log-probs from the decoder's final states of the same forwards."""
    from dpolab.logps import label_logps

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    states: list[Tensor] = []
    hook = base.get_decoder().register_forward_hook(
        lambda module, args, out: states.append(out[0])) if head is not None else None
    own, mine = [], []
    try:
        for rejected in (False, True):
            for e in pairs:
                comp = e.rejected_ids if rejected else e.chosen_ids
                scored = e.rejected_mask if rejected else e.chosen_mask
                keep = (torch.ones(len(comp), dtype=torch.bool) if scored is None
                        else torch.tensor(scored, dtype=torch.bool))
                ids = torch.tensor([e.prompt_ids + comp], device=device)
                labels = torch.tensor(comp, device=device)
                # the logits of the last C + 1 positions: the C before the last predict comp
                z = _last_logits(model, ids, len(comp) + 1)[:-1].float()  # (C, V)
                tok = torch.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)
                own.append(tok.cpu()[keep])
                if head is not None:
                    P = len(e.prompt_ids)
                    h = states.pop()[0, P - 1:P - 1 + len(comp)]  # (C, D)
                    mine.append(label_logps(h, head, labels).float().cpu()[keep])
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(own) if head is None else (torch.cat(own), torch.cat(mine))


def _last_logits(model, ids: Tensor, n: int) -> Tensor:
    """(n, V) logits of the last n positions of one sequence ids (1, L): the model's head
    on those positions only where its forward takes `logits_to_keep`."""
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n).logits
    except TypeError:  # a forward without logits_to_keep: every position
        logits = model(input_ids=ids, use_cache=False).logits
    return logits[0, -n:]


def perturbed(pairs: Sequence[PairExample], vocab: int, *, seed: int = 0,
              every: int = 1) -> list[PairExample]:
    """The pairs with every chosen token of every `every`-th pair (0, every, ...) replaced by
    a different one (seeded); lengths and everything else kept."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, e in enumerate(pairs):
        if i % every:
            out.append(e)
            continue
        ids = torch.tensor(e.chosen_ids)
        shift = torch.randint(1, vocab, ids.shape, generator=g)
        out.append(replace(e, chosen_ids=((ids + shift) % vocab).tolist()))
    return out


def _try(forward, pairs: list, ref: Tensor, head: Head) -> Trial:
    """The candidate on the pairs, and on them with the chosen tokens of pairs 0, 2, 4, ...
    replaced: the rejected log-probs of those pairs (a leak) against those of pairs 1, 3, ...
    (the batch's rounding)."""
    name = next(k for k, v in FORWARDS.items() if isinstance(forward, v.make))
    try:
        flat = forward(pairs)
        a = flat.tokens.float().cpu()
        b = forward(perturbed(pairs, head.weight.shape[0], every=2)).tokens.float().cpu()
    except Exception as err:  # any failure of a layout disqualifies it
        message = (str(err).splitlines() or [""])[0][:160]
        return Trial(name, None, None, None, f"{type(err).__name__}: {message}")
    seg = flat.seg.cpu()
    rejected_of = seg - len(pairs)  # pair index of a rejected token, negative for chosen ones
    moved = (a - b).abs()
    touched = (rejected_of >= 0) & (rejected_of % 2 == 0)
    untouched = (rejected_of >= 0) & (rejected_of % 2 == 1)
    return Trial(name, float((a - ref).abs().max()),
                 float(moved[touched].max()) if touched.any() else 0.0,
                 float(moved[untouched].max()) if untouched.any() else 0.0)
