"""Where preference rows come from: files, a `datasets.Dataset`, a list of dicts.

`read_source` gives (name, iterator of (1-based row, record)); :mod:`dpolab.data` validates
each record.  Two kinds of input are refused here, whole, before any row is read, because no
row-by-row message would say what is wrong:

    several splits   a JSON file holding an object of row lists, or a folder saved by
                     `DatasetDict.save_to_disk`: one source is one split (the message names
                     the splits and which setting takes which); a DatasetDict or a dict of
                     splits in memory is refused by dpolab.api as training data, naming
                     the arguments, and taken as named eval sets (dpolab.splits.eval_rows)
    vision columns   a column of images or videos (`VISION_COLUMNS`): the models dpolab trains
                     read text only, so training on the text alone would silently be another
                     task than the data set's
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from dpolab.errors import DataError

VISION_COLUMNS = ("image", "images", "video", "videos")
# Split names that usually hold held-out rows, most common first.
_HELD_OUT_SPLITS = ("test", "validation", "valid", "eval", "dev")


@dataclass(frozen=True)
class BadRecord:
    message: str                  # why this record could not be read (e.g. invalid JSON)


def read_source(source: Any, name: str | None = None) -> tuple[str, Iterator[tuple[int, Any]]]:
    """(name, iterator of (1-based row, record dict or BadRecord)) for any accepted source.
    `name`: how errors name an in-memory source (default "<dataset>" or "<list>")."""
    if isinstance(source, dict):  # a DatasetDict too; dpolab.api names its splits
        raise DataError(f"{name or '<dataset>'}: expected a file path, a datasets.Dataset or a "
                        f"list of dicts, got {type(source).__name__}")
    splits = split_names(source)
    if splits is not None:   # a folder saved by DatasetDict.save_to_disk
        raise DataError(splits_message(str(source), splits, holder=holder_name(source)))
    if _iterable_dataset(source):  # read once, in order, as a list of rows is
        name = name or "<dataset>"
        if source.column_names is not None:
            _refuse_vision(source.column_names, name)
        return name, _checked(name, enumerate(source, start=1))
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        name = name or "<dataset>"
        _refuse_vision(source.column_names, name)
        return name, _checked(name, enumerate(source, start=1))
    if isinstance(source, (list, tuple)):
        name = name or "<list>"
        return name, _checked(name, enumerate(source, start=1))
    if not isinstance(source, (str, Path)):
        raise DataError(f"{name or repr(source)}: expected a file path, a datasets.Dataset "
                        f"or a list of dicts, got {type(source).__name__}")
    path = Path(source)
    name = str(source)
    if not path.is_file():
        raise DataError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}
    if suffix not in readers:
        raise DataError(f"{name}: unknown extension {path.suffix or '(none)'!r}; "
                        "valid: .jsonl, .json, .parquet")
    return name, _checked(name, readers[suffix](path, name))


def _iterable_dataset(source: Any) -> bool:
    """A `datasets.IterableDataset` (streamed rows; it must end), told without importing
    `datasets`."""
    kind = type(source)
    return kind.__name__ == "IterableDataset" and kind.__module__.startswith("datasets")


def _checked(name: str, records: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """The records, refusing the first that has a vision column (an error for the data set,
    raised as the row is reached, which `skip_invalid` does not skip)."""
    for row, record in records:
        if isinstance(record, dict):
            _refuse_vision(record, f"{name}:{row}")
        yield row, record


def _refuse_vision(columns: Iterable[str], where: str) -> None:
    found = [c for c in VISION_COLUMNS if c in columns]
    if found:
        raise DataError(f"{where}: column {found[0]!r} holds images or videos, but vision "
                        f"models are not supported: dpolab trains causal language models on "
                        f"text; remove the column to train on the text alone")


# ------------------------------------------------------------------------------- splits
def split_names(source: Any) -> list[str] | None:
    """The split names when `source` holds several splits: a DatasetDict or a dict of splits
    in memory, or a folder saved by `DatasetDict.save_to_disk`; None for anything else (a
    dict with a "chosen" key is a dict of columns, not of splits).  A JSON file holding an
    object of splits is found when it is read (`_json_records`), so it is parsed once."""
    if isinstance(source, dict):  # datasets.DatasetDict is a dict too
        return None if "chosen" in source or not source else [str(k) for k in source]
    if not isinstance(source, (str, Path)):
        return None
    saved = Path(source) / "dataset_dict.json"
    if not saved.is_file():
        return None
    try:
        return [str(s) for s in json.loads(saved.read_text())["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ["(unreadable dataset_dict.json)"]


def holder_name(source: Any) -> str:
    """How a message names what holds the splits."""
    if isinstance(source, (str, Path)):
        return "a folder saved by DatasetDict.save_to_disk"
    return f"a {type(source).__name__}" if type(source) is not dict else "a dict"


def train_and_held_out_split(splits: list[str]) -> tuple[str, str | None]:
    """(the split to train on, the split to hold out or None): "train" (else the first) and
    the first of test/validation/valid/eval/dev present (else another one, if any)."""
    train = "train" if "train" in splits else splits[0]
    others = [s for s in splits if s != train]
    held = next((s for s in _HELD_OUT_SPLITS if s in others), others[0] if others else None)
    return train, held


def splits_message(where: str, splits: list[str], *, holder: str,
                   argument: str | None = None) -> str:
    """One line: what `where` holds and which Trainer argument (`argument`: the one the splits
    were given as) or, for a file or folder (`argument` None), which setting takes which."""
    train, held = train_and_held_out_split(splits)
    found = f"{where}: {holder} of {len(splits)} splits ({', '.join(map(repr, splits))})"
    if argument is None:
        take = f"give the {train!r} split as data.path (--data)"
        if held is not None:
            take += f" and the {held!r} split as data.eval_path (--eval-data)"
        return f"{found}, not one split; {take}, each as a JSONL, JSON or Parquet file"
    var = "dataset"
    if argument == "eval_dataset":
        one = held or train
        return (f"{found}; eval_dataset takes one split: pass {var}[{one!r}] as eval_dataset"
                + (f" (and {var}[{train!r}] as train_dataset)" if one != train else ""))
    take = f"pass {var}[{train!r}] as train_dataset"
    if held is not None:
        take += f" and {var}[{held!r}] as eval_dataset"
    return f"{found}; {take}"


def _splits_of_object(data: Any) -> list[str] | None:
    """The names of a parsed JSON object that maps split names to row lists."""
    if (isinstance(data, dict) and data and "data" not in data and "chosen" not in data
            and all(isinstance(v, list) for v in data.values())):
        return list(data)
    return None


# ------------------------------------------------------------------------------ files
def _read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{name}: cannot be read: {err}") from None


def _jsonl_records(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    # Read the whole file first so an unreadable file raises before any row is handled.
    lines = _read_text(path, name).splitlines()
    return _jsonl_lines(lines)


def _jsonl_lines(lines: list[str]) -> Iterator[tuple[int, Any]]:
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue            # blank lines (often a trailing one) are not rows
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as err:
            yield i, BadRecord(f"not valid JSON: {err.msg} (column {err.colno})")


def _json_records(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(_read_text(path, name))
    except json.JSONDecodeError as err:
        raise DataError(f"{name}: not valid JSON: {err.msg} (line {err.lineno}, "
                        f"column {err.colno})") from None
    splits = _splits_of_object(data)
    if splits is not None:
        raise DataError(splits_message(name, splits, holder="a JSON object"))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of rows or {{\"data\": [...]}}, "
                        f"got {type(data).__name__}")
    return enumerate(data, start=1)


def _parquet_records(path: Path, name: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq  # imported here: only Parquet users install and load it
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow, which is not installed: "
                        "pip install 'dpolab[parquet]'") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:         # pyarrow raises several unrelated types for bad files
        raise DataError(f"{name}: cannot be read as Parquet: {err}") from None
    return enumerate(records, start=1)
