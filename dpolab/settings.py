"""A config field's declared values: `setting` puts its default, its meaning and the values
it takes (choices, bounds, named keys) in the dataclass field's metadata; `allowed` says them
in words (`dpolab config`) and `check_field` checks a value against them (`config.validate`).
No torch here: `dpolab config` answers at once."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import field
from typing import Any

from dpolab.errors import UserError

_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le),
        "lt": ("<", operator.lt)}


def setting(default: Any, help: str, *, choices: tuple = (), ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            keys: dict[str, dict] | None = None) -> Any:
    """One config field in one line: its default, its meaning (printed by `dpolab config` and
    `dpolab train --help`) and the values `validate` allows: one of `choices`, or a number
    within the bounds (for a mapping, each of its values). Every float must be finite too.
    `keys`: a mapping with exactly these keys (or empty), each a number within its own
    bounds, e.g. {"every": {"integer": True, "ge": 1}}."""
    bounds = tuple((op, v) for op, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                   if v is not None)
    meta = {"help": help, "choices": tuple(choices), "bounds": bounds, "keys": {
        k: (bool(d.get("integer")), tuple((op, d[op]) for op in _OPS if op in d))
        for k, d in (keys or {}).items()}}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _words(bounds: tuple) -> str:
    return " and ".join(f"{_OPS[op][0]} {v}" for op, v in bounds)


def allowed(f: dataclasses.Field) -> str:
    """The values field `f` takes, in words ("" when its type says it all)."""
    if f.metadata.get("choices"):
        return "one of " + " | ".join(f.metadata["choices"])
    if f.metadata.get("keys"):
        return "{} or {" + ", ".join(f"{k}: {'integer' if i else 'number'} {_words(b)}"
                                     for k, (i, b) in f.metadata["keys"].items()) + "}"
    return _words(f.metadata.get("bounds", ()))


def _check_keys(key: str, f: dataclasses.Field, value: dict) -> None:
    """A mapping with named keys (`setting(keys=...)`): empty, or exactly those keys, each a
    finite number (an integer where said) within its bounds; else one line naming it."""
    spec = f.metadata["keys"]
    if value and set(value) != set(spec):
        raise UserError(f"config: {key}: keys {', '.join(sorted(value))} given; it takes {allowed(f)}")
    for name, (integer, bounds) in spec.items() if value else ():
        v = value[name]
        if (isinstance(v, bool) or not isinstance(v, int if integer else (int, float))
                or not math.isfinite(v) or not all(_OPS[op][1](v, b) for op, b in bounds)):
            raise UserError(f"config: {key}.{name} = {v!r} is out of range: it must be "
                            f"{'an integer' if integer else 'a finite number'} {_words(bounds)}")


def check_field(key: str, f: dataclasses.Field, value: Any) -> None:
    """UserError naming `key` when `value` is outside what its `setting` allows."""
    if f.metadata.get("keys"):
        return _check_keys(key, f, value)
    choices, bounds = f.metadata.get("choices", ()), f.metadata.get("bounds", ())
    if choices and value not in choices:
        raise UserError(f"config: {key} must be one of {', '.join(choices)}, got {value!r}")
    numbers = value.items() if isinstance(value, dict) else [(None, value)]
    for sub, v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        where = key if sub is None else f"{key}.{sub}"
        if not math.isfinite(v) or not all(_OPS[op][1](v, bound) for op, bound in bounds):
            raise UserError(f"config: {where} = {v} is out of range: it must be a finite number"
                            f"{' ' + allowed(f) if bounds else ''} ({f.metadata['help']})")
