"""Preference data in the formats users already have, validated row by row.

Accepted formats (those of TRL's preference data sets, unchanged):

    standard                 {"prompt": str, "chosen": str, "rejected": str}
    conversational           {"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}
                             msg = {"role": "system"|"user"|"assistant"|"tool", "content": str};
                             multi-turn prompts allowed; the completion is the chosen/rejected
                             list and must end with an assistant message.  Messages that
                             chosen and rejected share at their start join the prompt, so a
                             completion may be several turns: its assistant turns are scored,
                             its user and tool turns are context (see dpolab.chat).
    implicit                 {"chosen": str, "rejected": str}: the prompt is their longest
                             common leading text, by TRL's rule (:func:`split_shared_text`);
                             it is "" when they differ from their first character.
    implicit_conversational  {"chosen": [msg, ...], "rejected": [msg, ...]}: full conversations;
                             the prompt is their common leading messages, the completion the
                             messages after it (ending with the final assistant turn).

Conversational rows may also carry TRL's tool-use columns (dpolab.chat_data checks them):
an assistant message may hold ``"tool_calls"`` (its "content" then optional), a ``"tools"``
column (a list of JSON function schemas, or that list as a JSON string) and a
``"chat_template_kwargs"`` column (extra variables for the chat template, e.g.
{"enable_thinking": false}) are passed to the chat template.

An optional "group" column (a string: the value label) is kept on each row; every other column
is kept untouched in ``PreferenceRow.meta``.  Sources (:mod:`dpolab.sources`): a JSONL file,
a JSON file (a list of objects or {"data": [...]}), a Parquet file, a ``datasets.Dataset`` or a
list of dicts; image or video columns and several splits at once are refused whole (a
DatasetDict in memory by dpolab.api, which names the arguments).

Errors name the place and the field, ``FILE:ROW: field 'chosen' is empty``; ROW is the 1-based
line of a JSONL file or the 1-based position in a list/table.  Tokenization and collation live in
:mod:`dpolab.tokenize`, which imports this module (never the other way round).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab import chat_data
from dpolab.errors import DataError
from dpolab.sources import BadRecord, read_source

FORMATS = ("standard", "conversational", "implicit", "implicit_conversational")
_TEXT_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferenceRow:
    """One validated preference pair.  ``prompt`` may be "" for implicit string rows."""
    prompt: str | list[dict]      # text, or the prompt messages
    chosen: str | list[dict]      # the preferred completion (text, or its messages)
    rejected: str | list[dict]    # the dispreferred completion
    group: str | None             # value label from the optional "group" column
    source: str                   # the file as given, or "<dataset>"
    row: int                      # 1-based line (JSONL) or position (JSON, Parquet, Dataset)
    meta: dict = field(default_factory=dict)  # every other column, untouched
    tools: list[dict] | None = None       # "tools" column: function schemas for the template
    chat_template_kwargs: dict | None = None  # "chat_template_kwargs" column: template variables
    # The row had no prompt column: the prompt is the start chosen and rejected share (the
    # implicit formats). A found prompt's end is not a boundary the data set chose, so string
    # rows are then tokenized whole and cut where their tokens diverge (dpolab.common_prefix).
    implicit_prompt: bool = False
    eval_set: str = ""  # the named held-out set the row belongs to ("" in a single held-out set)


@dataclass(frozen=True)
class LoadedRows:
    rows: list[PreferenceRow]     # the valid rows, in file order
    skipped: list[str]            # error messages of rows dropped under skip_invalid
    format: str                   # one of FORMATS


def load_rows(source: Any, *, skip_invalid: bool = False, name: str | None = None) -> LoadedRows:
    """Read and validate preference rows from a path (.jsonl, .json, .parquet), a Dataset or
    a list of dicts. `name`: how errors name an in-memory source (default "<dataset>").

    Every row must have the format of the first valid row (formats cannot be mixed).  With
    ``skip_invalid`` a bad row is dropped and its message kept in ``skipped``; a file that cannot
    be read, and a data set with no valid row, raise :class:`DataError` either way.
    """
    name, records = read_source(source, name)
    rows: list[PreferenceRow] = []
    skipped: list[str] = []
    fmt: str | None = None
    for row_no, record in records:
        try:
            if isinstance(record, BadRecord):
                raise DataError(f"{name}:{row_no}: {record.message}")
            row, row_fmt = parse_row(record, source=name, row=row_no, expected=fmt)
        except DataError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        fmt = fmt or row_fmt
        rows.append(row)
    if not rows:
        extra = f" ({len(skipped)} invalid rows skipped; first: {skipped[0]})" if skipped else ""
        raise DataError(f"{name}: no valid preference rows{extra}")
    return LoadedRows(rows=rows, skipped=skipped, format=fmt)


def write_jsonl(rows: list[PreferenceRow], path: str | Path) -> Path:
    """Write rows as JSONL that :func:`load_rows` reads back to the same rows.

    One object per line: prompt, chosen, rejected (an implicit prompt is written back into both
    completions, with no prompt column), group (when set), then the ``meta`` columns;
    ``source`` and ``row`` are not written, since reading the file gives them anew.
    """
    path = Path(path)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            if row.implicit_prompt:
                record = {"chosen": row.prompt + row.chosen, "rejected": row.prompt + row.rejected}
            else:
                record = {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected}
            if row.group is not None:
                record["group"] = row.group
            if row.tools is not None:
                record["tools"] = row.tools
            if row.chat_template_kwargs is not None:
                record["chat_template_kwargs"] = row.chat_template_kwargs
            record.update(row.meta)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------- validation
def parse_row(record: Any, *, source: str, row: int,
              expected: str | None = None) -> tuple[PreferenceRow, str]:
    """Validate one record; returns the row and its format.  Raises DataError "SOURCE:ROW: ...".

    ``expected`` is the format of earlier rows (None for the first row); a row of another format
    is an error, because a column cannot hold strings in one row and messages in another.
    """
    where = f"{source}:{row}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {_type(record)}")
    fmt = _row_format(record, where, expected)
    conversational = fmt in ("conversational", "implicit_conversational")
    check = _check_messages if conversational else _check_text
    keys = _TEXT_FIELDS if fmt in ("standard", "conversational") else ("chosen", "rejected")
    values = {key: check(record.get(key, _MISSING), key, where) for key in keys}
    if values["chosen"] == values["rejected"]:
        raise DataError(f"{where}: chosen and rejected are identical")
    if fmt == "implicit":
        values["prompt"], values["chosen"], values["rejected"] = split_shared_text(
            values["chosen"], values["rejected"])
    elif fmt == "implicit_conversational":
        values["prompt"] = []
        if values["chosen"][0] != values["rejected"][0]:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' share no leading "
                            "message, so there is no prompt; give a 'prompt' column")
    extras = _chat_columns(record, where, conversational)
    if conversational:
        try:
            values["prompt"], values["chosen"], values["rejected"] = chat_data.split_shared(
                values["prompt"], values["chosen"], values["rejected"])
        except chat_data.RowProblem as err:
            raise DataError(f"{where}: {err}") from None
    group = record.get("group")
    if group is not None and (not isinstance(group, str) or not group.strip()):
        raise DataError(f"{where}: field 'group' must be a non-empty string, got "
                        f"{_type(group) if not isinstance(group, str) else 'an empty string'}")
    meta = {k: v for k, v in record.items() if k not in (*_TEXT_FIELDS, "group", *_CHAT_COLUMNS)}
    return PreferenceRow(prompt=values["prompt"], chosen=values["chosen"],
                         rejected=values["rejected"], group=group, source=source, row=row,
                         meta=meta, implicit_prompt=fmt.startswith("implicit"), **extras), fmt


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of an implicit string row, by TRL's rule
    (`trl.data_utils.extract_prompt`): the prompt is the text before the first character where
    chosen and rejected differ, less a space it would end with (that space then starts both
    completions, where word-level tokenizers attach it to the next word). When one is the
    start of the other, the loop finds no difference and the cut falls before their last
    shared character, so neither completion is empty.  (TRL, differing at character 0 of a
    chosen that ends with a space, would cut at -1; here the prompt is then "".)"""
    n = min(len(chosen), len(rejected))     # >= 1: both are non-empty
    cut = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if cut is None:
        cut = n - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


_CHAT_COLUMNS = ("tools", "chat_template_kwargs")


def _chat_columns(record: dict, where: str, conversational: bool) -> dict:
    """The "tools" and "chat_template_kwargs" columns (null = absent); strings get no chat
    template, so on string rows they are an error rather than silently unused."""
    present = [k for k in _CHAT_COLUMNS if record.get(k) is not None]
    if present and not conversational:
        raise DataError(f"{where}: field '{present[0]}' needs conversational rows (lists of "
                        "messages): string rows are not rendered with the chat template")
    try:
        return {"tools": chat_data.check_tools(record.get("tools")),
                "chat_template_kwargs": chat_data.check_template_kwargs(
                    record.get("chat_template_kwargs"))}
    except chat_data.RowProblem as err:
        raise DataError(f"{where}: {err}") from None


_MISSING = object()


def _row_format(record: dict, where: str, expected: str | None) -> str:
    """The format of one record, checked against the format of earlier rows."""
    chosen = record.get("chosen", _MISSING)
    if chosen is _MISSING or chosen is None:
        raise DataError(f"{where}: field 'chosen' is missing")
    if isinstance(chosen, list):
        kind = "conversational"
    elif isinstance(chosen, str):
        kind = "standard"
    else:
        raise DataError(f"{where}: field 'chosen' must be a string or a list of messages, "
                        f"got {_type(chosen)}")
    has_prompt = record.get("prompt") is not None
    fmt = kind if has_prompt else ("implicit" if kind == "standard"
                                   else "implicit_conversational")
    if expected is None or fmt == expected:
        return fmt
    if _is_conversational(fmt) != _is_conversational(expected):
        want = "a list of messages" if _is_conversational(expected) else "a string"
        raise DataError(f"{where}: field 'chosen' must be {want} like the earlier rows "
                        f"(formats cannot be mixed), got {_type(chosen)}")
    if has_prompt:
        raise DataError(f"{where}: field 'prompt' is present but earlier rows have none "
                        "(formats cannot be mixed)")
    raise DataError(f"{where}: field 'prompt' is missing")


def _is_conversational(fmt: str) -> bool:
    return fmt in ("conversational", "implicit_conversational")


def _check_field(value: Any, key: str, where: str, kind: type, kind_name: str):
    """The field's value if present, of type `kind` and not empty (a string of only
    whitespace counts as empty); a DataError naming the field otherwise."""
    if value is _MISSING or value is None:
        raise DataError(f"{where}: field '{key}' is missing")
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{key}' must be {kind_name}, got {_type(value)}")
    if not (value.strip() if isinstance(value, str) else value):
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _check_text(value: Any, key: str, where: str) -> str:
    return _check_field(value, key, where, str, "a string")


def _check_messages(value: Any, key: str, where: str) -> list[dict]:
    _check_field(value, key, where, list, "a list of messages")
    try:
        return chat_data.check_messages(value, key)
    except chat_data.RowProblem as err:
        raise DataError(f"{where}: {err}") from None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__
