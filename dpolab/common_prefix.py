"""Token ids of rows whose prompt ends where it is found, not where it was given.

Two kinds of rows take this path (:func:`dpolab.tokenize.tokenize_pair` picks it):

    implicit string rows   the prompt is the text chosen and rejected share (TRL's rule,
                           :func:`dpolab.data.split_shared_text`)
    conversational rows    whose chat template does not render turn by turn: some rendering
                           (with or without the generation prompt) is not a prefix of the next
                           (dpolab.chat lists the templates that do this)

Rule (TRL 1.16's `common_prefix_length` in DPOTrainer's tokenization): each conversation F
(prompt + chosen, prompt + rejected) is tokenized whole; with P the tokens of the prompt as
rendered (with the generation prompt), the prompt is the first

    k = min(lcp(P, F_chosen), lcp(P, F_rejected))      (lcp: longest common prefix length)

tokens, shared by both, and each completion is the rest of its F.  Within a multi-turn
completion an assistant turn starts where its header rendering (context with the generation
prompt) stops agreeing with F; it ends at its last end-of-turn token when its own rendering
is a prefix of F, else (a turn rewritten once later turns follow) at its first.

Why token ids and not text: a text prefix can end inside a token (DeepSeek-V3.1 opens the
generation prompt with "<think>" and the rendered turn with "</think>": they share "<"), and
the text on either side would then be tokenized into pieces the model never reads.  Cut in
token ids, the training sequence is exactly the tokens of the rendered conversation, and
prompt + completion re-concatenate to them (checked for every row).  The cut must not fall
before the generation prompt: a template that renders the prompt's own messages differently
once an answer follows would put prompt text into the completion, and is refused.
"""

from __future__ import annotations

from typing import Any

from dpolab.chat import Rendering, Step, divergence
from dpolab.data import PreferenceRow

Completion = tuple[list[int], "tuple[bool, ...] | None"]   # (ids, scored mask or None = all)


def encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def end_with_eos(ids: list[int], eos: int) -> list[int]:
    """`ids` ending with exactly one EOS: what follows the last EOS (e.g. the "\\n" a template
    writes after "<|im_end|>") is dropped; without an EOS, one is appended."""
    if eos in ids:
        return ids[:len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


# ------------------------------------------------------------------------------ strings
def string_pair(row: PreferenceRow, tokenizer: Any) -> tuple[list[int], list[int], list[int], bool]:
    """(prompt_ids, chosen_ids, rejected_ids, cut) of an implicit string row: prompt + chosen
    and prompt + rejected tokenized whole (special tokens as a text gets them), the prompt cut
    at their longest common prefix with the prompt's own tokens; `cut` when that is shorter
    than the prompt's tokens (the found prompt ends inside a token of the text)."""
    eos = tokenizer.eos_token_id
    prompt = encode(tokenizer, row.prompt, special=True)
    if len(prompt) > 1 and prompt[-1] == eos:   # tokenizers that end every encoding with EOS
        prompt = prompt[:-1]
    full = [encode(tokenizer, row.prompt + c, special=True) for c in (row.chosen, row.rejected)]
    k = min(common_prefix(prompt, f) for f in full)
    chosen, rejected = (end_with_eos(f[k:], eos) for f in full)
    for ids, f in zip((chosen, rejected), full):
        _check_cut(row, prompt[:k], ids, None, f, eos)
    return prompt[:k], chosen, rejected, k < len(prompt)


# ------------------------------------------------------------------------ conversations
def conversation_pair(r: Rendering, tokenizer: Any) -> tuple[list[int], Completion, Completion]:
    """(prompt_ids, (chosen_ids, mask), (rejected_ids, mask)) of a conversational row whose
    renderings do not extend one another (see the module doc)."""
    enc = lambda text: encode(tokenizer, text, special=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    prompt = enc(r.prompt)
    full = {key: enc(steps[-1].text) for key, steps in (("chosen", r.chosen),
                                                         ("rejected", r.rejected))}
    k = min(common_prefix(prompt, f) for f in full.values())
    if k == 0:   # nothing in common: no prompt to condition on
        key = min(full, key=lambda c: common_prefix(prompt, full[c]))
        raise divergence(r.row, r.prompt, getattr(r, key)[-1].text, "the prompt",
                         "prompt + completion", " (their tokens share no start)")
    # The cut may fall inside the generation prompt, not before it: the prompt's messages
    # alone (no generation prompt) must agree with the gen rendering up to k.
    bare = enc(r.render(r.row.prompt, gen=False)) if r.gen else prompt
    if k < common_prefix(bare, prompt):
        key = min(full, key=lambda c: common_prefix(prompt, full[c]))
        raise divergence(r.row, r.prompt, getattr(r, key)[-1].text, "the prompt",
                         "prompt + completion", _BEFORE_GENERATION_PROMPT)
    out = []
    for key, steps in (("chosen", r.chosen), ("rejected", r.rejected)):
        spans = _scored_spans(r, steps, full[key], k, enc, eos)
        ids, mask = _completion(full[key], k, spans, eos)
        _check_cut(r.row, prompt[:k], ids, mask, full[key], eos)
        out.append((ids, None if all(mask) else tuple(mask)))
    return prompt[:k], out[0], out[1]


_BEFORE_GENERATION_PROMPT = (" before its generation prompt (the template renders the "
                             "earlier messages differently once an answer follows, so no cut "
                             "keeps them out of the completion)")


def _scored_spans(r: Rendering, steps: tuple[Step, ...], full: list[int], k: int,
                  enc, eos: int) -> list[tuple[int, int]]:
    """[start, end) in `full` of each assistant turn's scored tokens, in order."""
    starts: list[tuple[int, int]] = []    # (index of the turn's step, its first token in full)
    start, before = k, r.prompt           # `before`: the rendering of the context so far
    for i, step in enumerate(steps):
        if step.header:
            head = enc(step.text)
            start = common_prefix(head, full)
            if start < common_prefix(enc(before), head):
                raise divergence(r.row, step.text, steps[-1].text, step.name, "the whole "
                                 "conversation", _BEFORE_GENERATION_PROMPT)
        elif step.scored:
            starts.append((i, start))
        before = step.text
    spans: list[tuple[int, int]] = []
    for t, (i, start) in enumerate(starts):
        bound = starts[t + 1][1] if t + 1 < len(starts) else len(full)
        if spans and start < spans[-1][1]:
            raise divergence(r.row, steps[i - 1].text, steps[-1].text, steps[i - 1].name,
                             "the whole conversation", " (it renders earlier turns differently)")
        if i == len(steps) - 1:
            spans.append((start, len(full)))          # the final turn: cut at its EOS later
            continue
        if steps[-1].text.startswith(steps[i].text):  # the turn keeps its rendering
            end = max(start, min(common_prefix(enc(steps[i].text), full), bound))
            seg = full[start:end]
            spans.append((start, end - seg[::-1].index(eos) if eos in seg else end))
            continue
        # rewritten once later turns follow: the turn ends at its first end-of-turn token
        seg = full[start:bound]
        if eos not in seg:
            raise divergence(r.row, steps[i].text, steps[-1].text, steps[i].name,
                             "the whole conversation", " (the template rewrites this turn once "
                             "later turns follow, and no end-of-turn token marks where it ends)")
        spans.append((start, start + seg.index(eos) + 1))
    return spans


def _completion(full: list[int], k: int, spans: list[tuple[int, int]],
                eos: int) -> tuple[list[int], list[bool]]:
    """full[k:] up to the final turn's last EOS (one appended if it has none), and one bool per
    token: inside a scored span."""
    last_start = spans[-1][0]
    final = end_with_eos(full[last_start:], eos)
    ids = full[k:last_start] + final
    scored = [False] * len(ids)
    for a, b in spans[:-1]:
        scored[a - k:b - k] = [True] * (b - a)
    scored[last_start - k:] = [True] * len(final)
    return ids, scored


def _check_cut(row: PreferenceRow, prompt: list[int], ids: list[int],
               mask: "list[bool] | None", full: list[int], eos: int) -> None:
    """Every completion token in place, once: prompt + completion is the start of the
    tokenized conversation (or all of it and an appended EOS), one mask entry per token."""
    k, n = len(prompt), len(ids)
    in_place = prompt == full[:k] and (ids == full[k:k + n] or ids == full[k:] + [eos])
    if not in_place or (mask is not None and len(mask) != n):
        raise RuntimeError(f"{row.source}:{row.row}: internal error: the completion cut from "
                           f"the tokenized conversation does not re-concatenate to it")
