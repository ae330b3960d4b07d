"""What to know about a preference data set before spending compute on it.

Pure computations over validated rows (:class:`dpolab.data.PreferenceRow`); `dpolab inspect`
(:mod:`dpolab.inspect`) loads the data, the tokenizer and the model, and prints the results.
Every finding names its rows as ``FILE:ROW``, the place :func:`dpolab.data.load_rows` gives.

Duplicates, from strictest to loosest:
    exact          same prompt, chosen and rejected (as loaded).
    normalized     the same after case folding and collapsing whitespace (not exact).
    similar        within one group, the Jaccard index of character n-gram sets of the whole
                   row is >= a threshold.  All pairs would cost O(n^2); instead each group is
                   sorted twice (by its normalized text, and by that text reversed) and every row
                   is compared with its next ``window`` rows in each order: O(n log n + n w).
                   Two near-copies sort next to each other unless they differ both near their
                   start and near their end, which is the price of the bound.
    contradiction  the same prompt with chosen and rejected swapped (after normalization).
Token-based checks (lengths, what truncation cuts or makes identical, chat-template prefix
problems) follow :func:`dpolab.tokenize.tokenize_rows` exactly: it is called for the pairs that
truncation makes identical, and its rules give which rows are cut.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dpolab.data import DataError, PreferenceRow
from dpolab.diagnostics import unflippable, unflippable_threshold

FIELDS = ("prompt", "chosen", "rejected")
NO_GROUP = "(none)"  # the group name shown for rows without a "group" column


def where(row: PreferenceRow) -> str:
    """The row's place, ``FILE:ROW``."""
    return f"{row.source}:{row.row}"


def row_text(value: str | list[dict]) -> str:
    """A field as one string; messages become lines (:func:`message_text`)."""
    if isinstance(value, str):
        return value
    return "\n".join(message_text(m) for m in value)


def message_text(m: dict) -> str:
    """A message as one line: ``role: content``, a tool call as ``call NAME ARGUMENTS``
    (arguments as JSON with sorted keys, decoded first when given as a JSON string), other
    keys the template reads (name, tool_call_id, reasoning_content...) as ``(key=value)``
    after the role.  A turn that only calls tools has no content."""
    extra = "".join(f" ({k}={_json(m[k])})" for k in sorted(m)
                    if k not in ("role", "content", "tool_calls"))
    body = [m["content"]] if m.get("content") else []
    for call in m.get("tool_calls") or []:
        fn = call.get("function", call)    # nested (OpenAI, TRL) or flat form
        body.append(f"call {fn['name']} {_json(_decoded(fn.get('arguments')))}")
    return f"{m['role']}{extra}: {' '.join(body)}"


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True,
                                                           ensure_ascii=False)


def _decoded(arguments: Any) -> Any:
    """Tool-call arguments as an object: a JSON string of one (validated by dpolab.data) is
    decoded, so the two spellings of the same call read alike after normalization."""
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def normalize(text: str) -> str:
    """Case-folded, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.casefold().split())


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """n, min, median, p90, max and mean (numpy's linear interpolation between order
    statistics: the q-quantile of sorted x_0..x_{n-1} is x at position q (n - 1))."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"n": 0}
    med, p90 = np.quantile(x, [0.5, 0.9])
    return {"n": int(x.size), "min": float(x.min()), "median": float(med), "p90": float(p90),
            "max": float(x.max()), "mean": float(x.mean())}


def group_sizes(rows: Sequence[PreferenceRow]) -> dict[str, int]:
    """Rows per group, largest first (ties by name); ungrouped rows count under NO_GROUP."""
    counts: dict[str, int] = {}
    for row in rows:
        key = row.group if row.group is not None else NO_GROUP
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------------------- duplicates
def row_key(row: PreferenceRow) -> tuple[str, ...]:
    """What makes two rows exact duplicates: prompt, chosen and rejected as loaded, and the
    tools and template variables the chat template renders with them (messages as JSON with
    sorted keys: every key of every message counts, a tool call's arguments included)."""
    return tuple(_json(v) for v in (row.prompt, row.chosen, row.rejected, row.tools,
                                    row.chat_template_kwargs))


def _norm_key(row: PreferenceRow) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as normalized text; the prompt with the tools column and
    template variables, which the template renders into it."""
    prompt = row_text(row.prompt)
    for name, value in (("tools", row.tools), ("chat_template_kwargs", row.chat_template_kwargs)):
        if value is not None:
            prompt += f"\n{name}: {_json(value)}"
    return (normalize(prompt), normalize(row_text(row.chosen)), normalize(row_text(row.rejected)))


def _clusters(keys: Sequence[Any]) -> list[list[int]]:
    """Indices sharing a key, for keys seen more than once, in order of first occurrence."""
    seen: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, []).append(i)
    return [idx for idx in seen.values() if len(idx) > 1]


def exact_duplicates(rows: Sequence[PreferenceRow]) -> list[list[str]]:
    """Clusters (FILE:ROW lists, first occurrence first) of rows equal in all three fields."""
    return [[where(rows[i]) for i in c] for c in _clusters([row_key(r) for r in rows])]


def near_duplicates(rows: Sequence[PreferenceRow], *, threshold: float = 0.9, n: int = 4,
                    window: int = 8) -> list[dict[str, Any]]:
    """Pairs of rows that are near copies but not exact ones (see the module doc).

    Returns {"a", "b", "similarity", "reason"} with reason "normalized" (equal after
    :func:`normalize`, similarity 1) or "similar" (character n-gram Jaccard >= threshold within
    one group).  A pair is reported once, under the stricter reason.
    """
    out: list[dict[str, Any]] = []
    reported: set[tuple[int, int]] = set()
    for cluster in _clusters([_norm_key(r) for r in rows]):
        # rows equal as loaded are exact duplicates, not near ones: keep one per exact key
        first_of: dict[tuple[str, ...], int] = {}
        for i in cluster:
            first_of.setdefault(row_key(rows[i]), i)
        firsts = list(first_of.values())
        for j in firsts[1:]:
            out.append({"a": where(rows[firsts[0]]), "b": where(rows[j]), "similarity": 1.0,
                        "reason": "normalized"})
        reported.update((a, b) for a in cluster for b in cluster if a < b)
    texts = ["\x1f".join(_norm_key(r)) for r in rows]
    by_group: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        by_group.setdefault(row.group, []).append(i)
    grams: dict[int, set[str]] = {}
    for members in by_group.values():
        for a, b in _neighbours(members, texts, window=window):
            pair = (min(a, b), max(a, b))
            if pair in reported:
                continue
            reported.add(pair)
            sa = grams.setdefault(a, ngrams(texts[a], n=n))
            sb = grams.setdefault(b, ngrams(texts[b], n=n))
            if min(len(sa), len(sb)) < threshold * max(len(sa), len(sb)):
                continue    # |A & B| / |A | B| <= min / max: the sizes alone rule it out
            sim = jaccard(sa, sb)
            if sim >= threshold:
                out.append({"a": where(rows[pair[0]]), "b": where(rows[pair[1]]),
                            "similarity": sim, "reason": "similar"})
    return out


def _neighbours(members: list[int], texts: list[str], *, window: int):
    """(i, j) for rows within `window` places of each other when sorted by text or by
    reversed text: the candidate pairs of the sorted-neighbourhood method."""
    for key in (lambda i: texts[i], lambda i: texts[i][::-1]):
        order = sorted(members, key=key)
        for p, i in enumerate(order):
            for j in order[p + 1:p + 1 + window]:
                yield i, j


def ngrams(text: str, *, n: int) -> set[str]:
    """The set of character n-grams of text (the text itself when shorter than n)."""
    return {text[i:i + n] for i in range(len(text) - n + 1)} or {text}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def identical_after_normalization(rows: Sequence[PreferenceRow]) -> list[str]:
    """Rows whose chosen and rejected differ only in case or whitespace: no real preference
    (load_rows already refuses rows where they are equal as given)."""
    return [where(r) for r in rows
            if normalize(row_text(r.chosen)) == normalize(row_text(r.rejected))]


def contradictions(rows: Sequence[PreferenceRow]) -> list[dict[str, str]]:
    """Pairs of rows with the same prompt and chosen/rejected swapped (after normalization):
    the data prefers y1 over y2 and y2 over y1."""
    first: dict[tuple[str, str, str], int] = {}
    out = []
    for i, row in enumerate(rows):
        p, c, r = _norm_key(row)
        j = first.get((p, r, c))
        if j is not None:
            out.append({"a": where(rows[j]), "b": where(row)})
        first.setdefault((p, c, r), i)
    return out


# --------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenLengths:
    index: list[int]              # positions (in the rows given) of the rows that tokenized
    prompt: list[int]             # untruncated token counts, aligned with index
    chosen: list[int]
    rejected: list[int]
    problems: list[str]           # DataError messages of rows that did not tokenize
    # FILE:ROW of rows whose prompt was cut at the longest common token prefix (a template that
    # renders the prompt alone differently, an implicit prompt ending inside a token)
    common_prefix: list[str]


def token_lengths(rows: Sequence[PreferenceRow], tokenizer: Any, *,
                  progress: Callable[[int], None] | None = None) -> TokenLengths:
    """Untruncated lengths as training sees them (:func:`dpolab.tokenize.tokenize_pair`: chat
    template for messages, one EOS per completion); a row training refuses (a template that
    cannot render it or whose prompt differs before its generation prompt, text no tokenizer
    takes) is listed in ``problems`` instead."""
    from dpolab.tokenize import tokenize_pair

    index, lengths, problems, cut = [], ([], [], []), [], []
    for i, row in enumerate(rows):
        try:
            ids = tokenize_pair(row, tokenizer)
        except DataError as err:
            problems.append(str(err))
            continue
        index.append(i)
        for out, seq in zip(lengths, (ids.prompt, ids.chosen[0], ids.rejected[0])):
            out.append(len(seq))
        if ids.common_prefix:
            cut.append(where(row))
        if progress and (i + 1) % 256 == 0:
            progress(i + 1)
    if progress:
        progress(len(rows))
    return TokenLengths(index, *lengths, problems=problems, common_prefix=cut)


def truncation_report(rows: Sequence[PreferenceRow], lengths: TokenLengths, tokenizer: Any, *,
                      max_length: int, max_prompt_length: int,
                      truncation: str) -> dict[str, list[str]]:
    """FILE:ROW lists of the rows that truncation would cut or make identical.

    The rule of tokenize_rows: a prompt longer than max_prompt_length is cut to it; then both
    completions are cut to room = max_length - min(P, max_prompt_length) tokens, so a pair is
    completion-cut when max(C_w, C_l) > room; a pair whose chosen and rejected ids are then
    equal is dropped.
    """
    from dpolab.tokenize import tokenize_rows

    prompt_cut, completion_cut = [], []
    for i, p, c, r in zip(lengths.index, lengths.prompt, lengths.chosen, lengths.rejected):
        if p > max_prompt_length:
            prompt_cut.append(where(rows[i]))
        if max(c, r) > max_length - min(p, max_prompt_length):
            completion_cut.append(where(rows[i]))
    ok = [rows[i] for i in lengths.index]
    try:
        dropped = tokenize_rows(ok, tokenizer, max_length=max_length,
                                max_prompt_length=max_prompt_length,
                                truncation=truncation).dropped
    except DataError:   # every pair made identical: tokenize_rows refuses to return none
        dropped = [where(r) for r in ok]
    return {"prompt_cut": prompt_cut, "completion_cut": completion_cut,
            "made_identical": dropped}


# ------------------------------------------------------------------------------- reference
def margin_report(wheres: Sequence[str], groups: Sequence[str | None],
                  ref_chosen: np.ndarray, ref_rejected: np.ndarray, *,
                  beta: float) -> dict[str, Any]:
    """The reference margin m = log pi_ref(y_w|x) - log pi_ref(y_l|x) (summed log-probs) over
    all pairs and per group, and the pairs the reference makes unflippable at beta.

    Unflippable (:func:`dpolab.diagnostics.unflippable`): -m > log(3) / beta, i.e. the
    reference prefers the rejected response by more than DPO's reward margin can end up
    (log 3, diverse-values paper Theorem 4.2) divided by beta.
    """
    rc, rr = np.asarray(ref_chosen, np.float64), np.asarray(ref_rejected, np.float64)  # (N,)
    m = rc - rr                                                                          # (N,)
    stuck = unflippable(rc, rr, beta=beta)                                               # (N,)
    names = np.array([g if g is not None else NO_GROUP for g in groups], dtype=object)
    per_group = {}
    for g in sorted(set(names.tolist())):
        sel = names == g
        per_group[g] = {**quantiles(m[sel]), "negative_fraction": float(np.mean(m[sel] < 0)),
                        "unflippable": int(stuck[sel].sum())}
    order = np.flatnonzero(stuck)
    order = order[np.argsort(m[order], kind="stable")]  # most strongly reversed first
    return {"beta": beta, "threshold": unflippable_threshold(beta),
            "margin": {**quantiles(m), "negative_fraction": float(np.mean(m < 0)) if m.size
                       else 0.0},
            "groups": per_group,
            "unflippable": [{"where": wheres[i], "group": names[i], "margin": float(m[i])}
                            for i in order]}
