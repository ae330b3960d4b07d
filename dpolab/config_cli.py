"""`dpolab config`: every config field with its default, meaning and allowed values, read
from the config's dataclasses (no torch import, so it answers at once)."""

from __future__ import annotations

import argparse
import json

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
    print(json.dumps(rows, indent=1) if a.json else C.describe_text(rows))
    return 0
