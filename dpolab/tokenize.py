"""Preference rows -> token ids -> padded batches.

Rendering (TRL's convention):
    conversational rows   prompt_text = chat_template(prompt, add_generation_prompt=True)
                          full_text   = chat_template(prompt + completion)
                          When full_text starts with prompt_text, completion_text =
                          full_text[len(prompt_text):].  Both are tokenized without extra
                          special tokens: the template owns them.  A completion of several
                          turns is rendered turn by turn (dpolab.chat); each turn is tokenized
                          on its own, and the tokens of its user and tool turns (and turn
                          headers) get mask False: the model reads them but they are not scored.
                          A template whose renderings do not extend one another (e.g. its
                          generation prompt opens a <think> block the rendered turn lacks):
                          full_text tokenized whole, cut at the longest common token prefix
                          with the prompt's tokens (dpolab.common_prefix; counted).
    string rows           plain text, no chat template; the prompt gets the tokenizer's special
                          tokens (its BOS, if it adds one), the completion none.  An implicit
                          prompt (extracted by dpolab.data): prompt + completion tokenized
                          whole and cut where its tokens leave the prompt's (TRL's rule).
Completion ids end with exactly one EOS: template text after the last EOS (e.g. the "\\n" after
"<|im_end|>") is dropped, and EOS is appended when the rendering has none.  An empty prompt gets
one BOS (or EOS) token, because the first completion token must be predicted from something.

Notation for a batch of B pairs: rows 0..B-1 hold prompt+chosen, rows B..2B-1 prompt+rejected,
T is the padded length.  labels[b, t] = input_ids[b, t+1], so the hidden state at position t is
scored against the token at t+1 and loss_mask[b, t] marks the t whose t+1 is a scored
completion token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from dpolab import common_prefix
from dpolab.chat import Piece, prefix_pieces, render_pair
from dpolab.common_prefix import Completion, encode as _encode, end_with_eos
from dpolab.data import DataError, PreferenceRow

TRUNCATIONS = ("keep_end", "keep_start")


@dataclass(frozen=True)
class PairExample:
    prompt_ids: list[int]         # (P,) prompt tokens, already truncated
    chosen_ids: list[int]         # (C_w,) chosen completion tokens only
    rejected_ids: list[int]       # (C_l,) rejected completion tokens only
    group: str | None             # value label of the row
    index: int                    # position of the row in the row list given to tokenize_rows
    row: int                      # 1-based row in its source
    source: str                   # file name or "<dataset>"
    # Which completion tokens are scored (enter log-probs, sums and token counts): None = all
    # of them; else one bool per token of chosen_ids / rejected_ids, False on the user and tool
    # turns of a multi-turn completion, which the model reads but did not write.
    chosen_mask: tuple[bool, ...] | None = None
    rejected_mask: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class TokenizedPairs:
    examples: list[PairExample]   # kept pairs, in row order
    dropped_identical: int        # pairs dropped: chosen_ids == rejected_ids (after truncation)
    truncated_prompt: int         # pairs whose prompt was cut to max_prompt_length
    truncated_completion: int     # pairs with at least one completion cut to fit max_length
    groups: list[str]             # sorted distinct group names of the input rows
    dropped: list[str]            # "SOURCE:ROW" of every dropped pair
    dropped_unscored: int = 0     # pairs dropped: a completion kept no scored token after the cut
    # pairs whose prompt tokens were not a prefix of the conversation's (a chat template that
    # renders the prompt alone differently, or an implicit prompt ending inside a token): cut
    # at their longest common prefix (dpolab.common_prefix)
    common_prefix: int = 0


def tokenize_rows(rows: Sequence[PreferenceRow], tokenizer: Any, *, max_length: int,
                  max_prompt_length: int, truncation: str = "keep_end",
                  chat_template_kwargs: dict | None = None) -> TokenizedPairs:
    """Tokenize rows and apply the truncation policy.

    Truncation policy: first the prompt is cut to ``max_prompt_length`` tokens, keeping its end
    (``keep_end``: the turn closest to the answer survives) or its start (``keep_start``); then
    each completion is cut, keeping its start, so that prompt + completion <= ``max_length``.
    A cut completion loses its EOS.  A pair whose chosen and rejected ids are equal (before or
    after the cut) carries no preference, so it is dropped and counted, never kept silently;
    so is a multi-turn pair whose cut left a completion without a scored token.
    ``chat_template_kwargs`` are extra chat-template variables for every conversational row.
    """
    if truncation not in TRUNCATIONS:
        raise DataError(f"truncation {truncation!r} is unknown; valid: {', '.join(TRUNCATIONS)}")
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
                        f"({max_length})")
    examples, dropped = [], []
    n_prompt_cut = n_completion_cut = n_identical = n_common = 0
    for index, row in enumerate(rows):
        ids = tokenize_pair(row, tokenizer, chat_template_kwargs=chat_template_kwargs)
        prompt, (chosen, c_mask), (rejected, r_mask) = ids.prompt, ids.chosen, ids.rejected
        n_common += ids.common_prefix
        if len(prompt) > max_prompt_length:
            n_prompt_cut += 1
            prompt = (prompt[-max_prompt_length:] if truncation == "keep_end"
                      else prompt[:max_prompt_length])
        room = max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            n_completion_cut += 1
            chosen, rejected = chosen[:room], rejected[:room]
            c_mask, r_mask = _cut_mask(c_mask, room), _cut_mask(r_mask, room)
        if chosen == rejected or not (_any_scored(c_mask) and _any_scored(r_mask)):
            n_identical += chosen == rejected
            dropped.append(f"{row.source}:{row.row}")
            continue
        examples.append(PairExample(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected,
                                    group=row.group, index=index, row=row.row,
                                    source=row.source, chosen_mask=c_mask, rejected_mask=r_mask))
    if rows and not examples:
        raise DataError(f"all {len(rows)} pairs have identical chosen and rejected tokens (or "
                        f"no scored assistant token) after truncation to "
                        f"max_length={max_length}; raise max_length")
    groups = sorted({row.group for row in rows if row.group is not None})
    return TokenizedPairs(examples=examples, dropped_identical=n_identical,
                          truncated_prompt=n_prompt_cut, truncated_completion=n_completion_cut,
                          groups=groups, dropped=dropped,
                          dropped_unscored=len(dropped) - n_identical, common_prefix=n_common)


def _cut_mask(mask: tuple[bool, ...] | None, room: int) -> tuple[bool, ...] | None:
    return None if mask is None else mask[:room]


def _any_scored(mask: tuple[bool, ...] | None) -> bool:
    return mask is None or any(mask)


def tokenize_row(row: PreferenceRow, tokenizer: Any, *,
                 chat_template_kwargs: dict | None = None
                 ) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one row, untruncated."""
    ids = tokenize_pair(row, tokenizer, chat_template_kwargs=chat_template_kwargs)
    return ids.prompt, ids.chosen[0], ids.rejected[0]


@dataclass(frozen=True)
class RowIds:
    prompt: list[int]             # (P,) prompt tokens, untruncated
    chosen: Completion            # (chosen ids, scored mask or None = all scored)
    rejected: Completion
    common_prefix: bool           # the prompt was cut at the longest common token prefix


def tokenize_pair(row: PreferenceRow, tokenizer: Any, *,
                  chat_template_kwargs: dict | None = None) -> RowIds:
    """The token ids of one row, untruncated (see the module doc for the rules)."""
    _check_encodable(row)
    cut = False
    if isinstance(row.prompt, list):
        rendering = render_pair(row, tokenizer, chat_template_kwargs)
        pieces = [prefix_pieces(rendering.prompt, s) for s in (rendering.chosen,
                                                                rendering.rejected)]
        if None in pieces:
            prompt, chosen_c, rejected_c = common_prefix.conversation_pair(rendering, tokenizer)
            cut = True
        else:
            prompt = _encode(tokenizer, rendering.prompt, special=False)
            chosen_c, rejected_c = (_pieces_ids(tokenizer, p) for p in pieces)
    elif row.implicit_prompt:
        prompt, chosen, rejected, cut = common_prefix.string_pair(row, tokenizer)
        chosen_c, rejected_c = (chosen, None), (rejected, None)
    else:
        prompt = _encode(tokenizer, row.prompt, special=True) if row.prompt else []
        # Some tokenizers also append EOS to every encoding; a prompt must not end the text.
        if prompt and prompt[-1] == tokenizer.eos_token_id and len(prompt) > 1:
            prompt = prompt[:-1]
        chosen_c = (_completion_ids(tokenizer, row.chosen), None)
        rejected_c = (_completion_ids(tokenizer, row.rejected), None)
    if not prompt:
        start = tokenizer.bos_token_id
        prompt = [start if start is not None else tokenizer.eos_token_id]
    return RowIds(prompt, chosen_c, rejected_c, cut)


def _pieces_ids(tokenizer: Any, pieces: list[Piece]) -> Completion:
    """Token ids of a rendered completion and their scored mask (None when all are scored).

    The last piece (the final assistant turn) ends with exactly one EOS, like a single-turn
    completion.  An earlier assistant turn is scored up to and including its last EOS: the
    template text after it (e.g. the "\n" after "<|im_end|>") is read, not generated."""
    ids: list[int] = []
    mask: list[bool] = []
    eos = tokenizer.eos_token_id
    for k, piece in enumerate(pieces):
        if k == len(pieces) - 1:
            part = _completion_ids(tokenizer, piece.text)
            n_scored = len(part)
        else:
            part = _encode(tokenizer, piece.text, special=False)
            n_scored = (0 if not piece.scored else
                        len(part) - part[::-1].index(eos) if eos in part else len(part))
        ids += part
        mask += [True] * n_scored + [False] * (len(part) - n_scored)
    return ids, (None if all(mask) else tuple(mask))


def _check_encodable(row: PreferenceRow) -> None:
    """Text a tokenizer cannot take is a DataError naming the row and field: a lone UTF-16
    surrogate (JSON allows "\\ud800" alone; no UTF-8 text holds it) makes tokenizers raise
    an unhelpful TypeError.  Every string a template may render is checked: message contents,
    tool calls, the tools column."""
    fields = ([("chosen", row.prompt + row.chosen), ("rejected", row.prompt + row.rejected)]
              if row.implicit_prompt else   # the fields as given: the prompt is in both
              [("prompt", row.prompt), ("chosen", row.chosen), ("rejected", row.rejected)])
    fields.append(("tools", row.tools or []))
    for name, value in fields:
        texts = ([(f"message {i + 1} {path}", text) for i, m in enumerate(value)
                  for path, text in _strings(m)] if isinstance(value, list) else [("", value)])
        if name == "tools":
            texts = [(path, text) for path, text in _strings(value)]
        for part, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                bad = text[err.start]
                raise DataError(
                    f"{row.source}:{row.row}: field {name!r}{f' ({part})' if part else ''}: "
                    f"character {err.start + 1} is U+{ord(bad):04X}, a lone UTF-16 surrogate "
                    f"that no tokenizer can encode; fix or remove the text") from None


def _strings(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, text) of every string in a JSON value, e.g. ("content", ...),
    ("tool_calls[0].function.arguments.city", ...)."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _strings(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [x for i, v in enumerate(value) for x in _strings(v, f"{path}[{i}]")]
    return []


def _completion_ids(tokenizer: Any, text: str) -> list[int]:
    """Completion ids ending with exactly one EOS (template text after the last EOS dropped)."""
    return end_with_eos(_encode(tokenizer, text, special=False), tokenizer.eos_token_id)


# --------------------------------------------------------------------------------- collation
@dataclass(frozen=True)
class PairBatch:
    input_ids: torch.Tensor       # (2B, T) long: prompt+chosen rows, then prompt+rejected rows
    attention_mask: torch.Tensor  # (2B, T) long: 1 on real tokens, 0 on padding
    labels: torch.Tensor          # (2B, T) long: input_ids shifted left by one; last col = pad
    loss_mask: torch.Tensor       # (2B, T) bool: labels[b, t] is a completion token
    group_ids: torch.Tensor       # (B,) long: index into the groups list, -1 for no group
    indices: torch.Tensor         # (B,) long: PairExample.index of each pair

    @property
    def n_pairs(self) -> int:
        return self.group_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch, chosen and rejected rows together."""
        return int(self.attention_mask.sum())

    @property
    def n_completion_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: Any) -> "PairBatch":
        return PairBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate_pairs(examples: Sequence[PairExample], *, pad_id: int,
                  pad_to_multiple_of: int | None = None,
                  groups: Sequence[str] | None = None) -> PairBatch:
    """Right-padded (2B, T) batch of prompt+chosen rows followed by prompt+rejected rows.

    loss_mask[b, t] is True for t in [P_b - 1, P_b + C_b - 2] (P_b prompt and C_b completion
    tokens), i.e. exactly where labels[b, t] = input_ids[b, t + 1] is a completion token, so
    loss_mask.sum(1) equals the completion lengths; with a completion mask (multi-turn rows)
    only the positions whose next token is scored: loss_mask[b, P_b - 1 + j] = mask[j], and
    loss_mask.sum(1) counts scored tokens.  ``groups`` maps PairExample.group to group_ids; a
    group missing from it (or groups=None) gives -1.
    """
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    seqs = ([(ex.prompt_ids, ex.chosen_ids, ex.chosen_mask) for ex in examples]
            + [(ex.prompt_ids, ex.rejected_ids, ex.rejected_mask) for ex in examples])
    width = max(len(p) + len(c) for p, c, _ in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of   # ceil to a multiple
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, (prompt, completion, scored) in enumerate(seqs):
        n_p, n = len(prompt), len(prompt) + len(completion)
        input_ids[b, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[b, :n] = 1
        # positions whose next token is a (scored) completion token
        loss_mask[b, n_p - 1:n - 1] = (True if scored is None
                                       else torch.tensor(scored, dtype=torch.bool))
    labels = torch.full_like(input_ids, pad_id)
    labels[:, :-1] = input_ids[:, 1:]
    index_of = {name: i for i, name in enumerate(groups or [])}
    group_ids = torch.tensor([index_of.get(ex.group, -1) for ex in examples], dtype=torch.long)
    indices = torch.tensor([ex.index for ex in examples], dtype=torch.long)
    return PairBatch(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     loss_mask=loss_mask, group_ids=group_ids, indices=indices)
