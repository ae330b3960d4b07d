"""`dpolab sweep`: parse a grid of `section.key=v1,v2,...` axes and run it (dpolab.sweeps)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dpolab.models import stay_offline

USAGE = """dpolab sweep [--config FILE] [--out SWEEP] section.key=v1,v2,... [section.key=value ...]
       dpolab sweep --resume SWEEP"""


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="dpolab sweep", usage=USAGE, description=(
        "Train every point of a grid: each comma-separated override is an axis, the grid is "
        "their product, each point an ordinary run directory SWEEP/<name> (e.g. beta0.1-ipo). "
        "Under train.scope=last_layer the points' heads train together on one pass over the "
        "cached body states when the axes change only the loss and the head's optimizer; "
        "otherwise the points run one after another, sharing the reference store. "
        "SWEEP/report.html compares them."))
    p.add_argument("--config", help="YAML file with sections model, data, loss, train")
    p.add_argument("--out", default="runs/sweep", help="the sweep folder (default runs/sweep)")
    p.add_argument("--resume", metavar="SWEEP", help="finish every unfinished point of a sweep")
    p.add_argument("--online", action="store_true", help="allow fetching a model from a hub")
    p.add_argument("overrides", nargs="*", metavar="section.key=v1,v2,...")
    return p.parse_intermixed_args(argv)


def cli_main(argv: list[str]) -> int:
    from dpolab import config as C
    from dpolab import sweeps
    from dpolab.errors import UserError

    a = parse(argv)
    stay_offline(a.online)
    if a.resume:
        if a.config or a.overrides:
            raise UserError("--resume finishes a sweep with its own points; give no other options")
        out = sweeps.resume_sweep(Path(a.resume))
    else:
        raw = C.load_yaml(a.config) if a.config else {}
        axes, fixed = sweeps.split_items(a.overrides)
        grid = sweeps.make_grid(raw, axes, fixed, out=a.out, source=a.config or "config")
        out = sweeps.run_grid(grid)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(out)
    return 0


def print_summary(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nsweep folder: {out} ({len(summary['points'])} points); report: {out / 'report.html'}")
    print(f"{'point':24s} {'acc':>6s} {'margin':>8s} {'chosen disp.':>12s}")
    for p in summary["points"]:
        def f(x):
            return "—" if x is None else f"{x:.3f}"
        print(f"{p['name']:24s} {f(p['accuracy']):>6s} {f(p['margin']):>8s} "
              f"{f(p['chosen_displacement']):>12s}")
