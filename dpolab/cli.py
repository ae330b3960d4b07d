"""`dpolab` command line: thin, every subcommand calls the library.

Each subcommand's module is imported only when that subcommand runs, so `dpolab --help`
stays fast and a missing optional dependency only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpolab.errors import Stopped, UserError

# reproduce NAME -> module whose cli_main(argv) -> int runs the experiment
REPRODUCE = {
    "misspecification": "dpolab.theory.bandit_plots",
    "values": "dpolab.theory.values_report",
    "did": "dpolab.theory.did_report",
}

# subcommand -> (module, one-line help); each module has cli_main(argv: list[str]) -> int
COMMANDS = {
    "train": ("dpolab.train_cli", "train a causal LM with a DPO-family objective"),
    "config": ("dpolab.config_cli", "list every config field: default, meaning, allowed values"),
    "sweep": ("dpolab.sweep_cli", "train a grid of configs (loss.beta=0.1,0.5 ...), sharing "
                                  "what the points have in common"),
    "inspect": ("dpolab.inspect", "audit a preference data set before training"),
    "evaluate": ("dpolab.evaluate", "score a run's weights (or a checkpoint's, or the base "
                                    "model's) on held-out pairs against its reference"),
    "report": ("dpolab.report", "write report.html and figures for a run directory"),
    "compare": ("dpolab.report", "overlay several runs in one report"),
    "pairs": ("dpolab.pairs_cli", "list a run's pairs by how they moved; one pair's trajectory"),
    "bench": ("dpolab.bench", "run a benchmark script of the source checkout: logps, vs_trl, "
                              "values_sweep"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dpolab",
        description="Train, inspect and understand Direct Preference Optimization.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    rep = sub.add_parser("reproduce", help="reproduce a paper's theory: "
                         + ", ".join(REPRODUCE), add_help=False)
    rep.add_argument("experiment", nargs="?", choices=sorted(REPRODUCE))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from dpolab import __version__
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "reproduce":
        if not rest or rest[0] in ("-h", "--help"):
            print("usage: dpolab reproduce {" + ",".join(sorted(REPRODUCE)) + "} [options]")
            return 0
        if rest[0] not in REPRODUCE:
            print(f"dpolab reproduce: unknown experiment {rest[0]!r}; valid: "
                  f"{', '.join(sorted(REPRODUCE))}", file=sys.stderr)
            return 2
        module, rest = REPRODUCE[rest[0]], rest[1:]
    elif command in COMMANDS:
        module = COMMANDS[command][0]
        if command == "compare":
            rest = ["--compare", *rest]
    else:
        parser.print_usage(sys.stderr)
        print(f"dpolab: unknown command {command!r}; valid: "
              f"{', '.join([*COMMANDS, 'reproduce'])}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(module).cli_main(rest) or 0)
    except UserError as err:
        print(f"dpolab {command}: error: {err}", file=sys.stderr)
        return 2
    except Stopped as err:
        if str(err):  # said once: by the main process of a torchrun job
            print(f"dpolab {command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"dpolab {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
