"""`dpolab config`: every config field with its default, meaning and allowed values, read
from the config's dataclasses (no torch import, so it answers at once)."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

import yaml

from dpolab import config as C


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dpolab config", description=(
        "List the config fields that a YAML file (--config) or a section.key=value override "
        "of `dpolab train` sets: default, meaning and allowed values."))
    p.add_argument("--section", choices=list(C.SECTIONS), help="only this section's fields")
    p.add_argument("--json", action="store_true", help="one JSON list of {key, type, default, "
                   "help, allowed}")
    a = p.parse_args(argv)
    rows = C.describe(a.section)
    print(json.dumps(rows, indent=1) if a.json else describe_text(rows))
    return 0


def describe_text(rows: list[dict[str, Any]], *, width: int = 100) -> str:
    """`section.key = default`, then its meaning and allowed values, one field per entry."""
    lines = []
    for r in rows:
        default = yaml.safe_dump(r["default"], default_flow_style=True, width=1 << 20).strip()
        default = default.removesuffix("\n...").strip()  # a bare scalar's YAML end marker
        head = f"  {r['key']} = {default}"
        text = r["help"] + (f" [{r['allowed']}]" if r["allowed"] else "")
        pad = 46
        if len(head) >= pad:  # a long default: the meaning starts on the next line
            lines.append(head)
            head = ""
        lines.append(textwrap.fill(text, width, initial_indent=f"{head:<{pad}}",
                                   subsequent_indent=" " * pad))
    return "\n".join(lines)
