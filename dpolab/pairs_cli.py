"""`dpolab pairs RUN`: every pair of a run by how it moved, and one pair's text and trajectory.

    dpolab pairs RUN                 the split's pairs, the margin's largest fall first
    dpolab pairs RUN --worst 5       the five whose margin fell most, with their text
    dpolab pairs RUN --group G       only group G's pairs
    dpolab pairs RUN --pair h3       one pair (its id, or SOURCE:ROW): text and trajectory
    --split held_out|train, --json

The numbers come from RUN/pairs/ (dpolab.trajectory); this module selects and prints them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dpolab import trajectory
from dpolab.errors import UserError

USAGE = ("dpolab pairs RUN [--split held_out|train] [--group G] [--worst N] [--pair ID] "
         "[--json]")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dpolab pairs", usage=USAGE, description=(
        "List a run's pairs by how they moved between the first and the last evaluation "
        "(margin change, chosen displacement, flipped or not), or show one pair's text and "
        "trajectory."))
    p.add_argument("run", help="a run directory")
    p.add_argument("--split", default="held_out", choices=trajectory.SPLITS,
                   help="which pairs (default held_out; train pairs are scored at the start "
                        "and the end)")
    p.add_argument("--group", help="only this group's pairs")
    p.add_argument("--worst", type=int, metavar="N",
                   help="the N pairs whose margin fell most, with their text")
    p.add_argument("--pair", metavar="ID", help="one pair: its id (h3, t12) or SOURCE:ROW")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = p.parse_args(argv)
    if a.worst is not None and a.worst < 1:
        raise UserError(f"--worst {a.worst}: give a positive number of pairs")
    return a


def cli_main(argv: list[str]) -> int:
    a = parse(argv)
    trajs = trajectory.read_trajectories(a.run)
    if a.pair is not None:
        traj, j = find_pair(trajs, a.pair)
        text = trajectory.read_text(a.run)
        shown = pair_record(traj, j, None if text is None else text.get(traj.pairs[j]["id"]))
        print(json.dumps(shown, indent=1) if a.json else render_pair(shown))
        return 0
    if a.split not in trajs:
        raise UserError(f"{a.run}: no evaluation scored the {a.split} pairs")
    traj = trajs[a.split]
    moved = select(traj.movement(), group=a.group, groups=sorted(
        {str(g) for g in traj.groups}), worst=a.worst)
    if a.worst is not None:
        text = trajectory.read_text(a.run) or {}
        for m in moved:
            m["text"] = text.get(m["id"])
    if a.json:
        print(json.dumps({"split": a.split, "steps": traj.steps.tolist(), "pairs": moved},
                         indent=1))
        return 0
    print(render_list(traj, moved, worst=a.worst))
    return 0


def find_pair(trajs: dict, key: str) -> tuple[trajectory.Trajectory, int]:
    """The trajectory and position of the pair whose id or SOURCE:ROW is `key`."""
    for traj in trajs.values():
        for j, p in enumerate(traj.pairs):
            if key in (p["id"], p["where"]):
                return traj, j
    some = ", ".join(p["id"] for t in trajs.values() for p in t.pairs[:3])
    raise UserError(f"no pair {key!r} in this run (ids look like {some}; or give SOURCE:ROW)")


def select(moved: list[dict], *, group: str | None, groups: list[str],
           worst: int | None) -> list[dict]:
    """Pairs of `group` (all when None), the largest margin fall first; the first `worst`."""
    if group is not None:
        if group not in groups:
            raise UserError(f"--group {group!r}: no such group; this run's: {', '.join(groups)}")
        moved = [m for m in moved if str(m["group"]) == group]
    moved = sorted(moved, key=lambda m: (m["margin_change"], m["id"]))
    return moved[:worst] if worst is not None else moved


def pair_record(traj: trajectory.Trajectory, j: int, text: dict | None) -> dict[str, Any]:
    """One pair: what it is, its text (None when the run kept none), and per evaluation its
    log-probs, log-ratios and margin."""
    p = traj.pairs[j]
    rows = [{"step": int(s), "logp_chosen": float(traj.policy_chosen[t, j]),
             "logp_rejected": float(traj.policy_rejected[t, j]),
             "logratio_chosen": float(traj.logratio_chosen[t, j]),
             "logratio_rejected": float(traj.logratio_rejected[t, j]),
             "margin": float(traj.margins[t, j])} for t, s in enumerate(traj.steps)]
    return {**p, "split": traj.split, "beta": traj.beta, "reference": traj.reference,
            "movement": traj.movement()[j], "text": text, "trajectory": rows}


# ---------------------------------------------------------------------------------------
# Printing


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:+.3f}" if abs(v) < 1e4 else f"{v:+.3g}"
    return str(v)


def table(header: list[str], rows: list[list[Any]], *, left: int = 2) -> str:
    """Columns padded to their widest cell; the first `left` ones left-aligned."""
    cells = [header] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if k < left else c.rjust(w)
                               for k, (c, w) in enumerate(zip(r, widths))) for r in cells)


def render_list(traj: trajectory.Trajectory, moved: list[dict], *, worst: int | None) -> str:
    first, last = int(traj.steps[0]), int(traj.steps[-1])
    all_moved = traj.movement()
    flipped = sum(m["flipped"] for m in all_moved)
    fell = sum(m["chosen_displacement"] < 0 for m in all_moved)
    head = [f"{traj.split} pairs of this run: {len(all_moved)}, evaluated at steps {first} to "
            f"{last} ({len(traj.steps)} evaluations); beta {traj.beta:g}, unflippable bound "
            f"log(3)/beta = {_unflip(traj.beta)}",
            f"flipped (margin > 0) at step {last}: {flipped}; chosen log-prob below the "
            f"reference: {fell}"]
    what = (f"the {len(moved)} whose margin fell most" if worst is not None
            else f"{len(moved)} listed, the largest margin fall first")
    head.append(what + "; margin = beta * (log-ratio chosen - log-ratio rejected), "
                "displacement = log pi(y_w) - log pi_ref(y_w)")
    header = ["id", "group", "margin first", "last", "change", "chosen displ.",
              "rejected displ.", "flipped", "displaced at", "CHES"]
    rows = [[m["id"], m["group"] or "-", m["margin_first"], m["margin_last"],
             m["margin_change"], m["chosen_displacement"], m["rejected_displacement"],
             m["flipped"], m["displaced_at"], m["ches"]] for m in moved]
    out = [*head, "", table(header, rows)]
    if worst is not None:
        for m in moved:
            out += ["", f"--- {m['id']} ({m['where']}, group {m['group'] or '-'}): margin "
                    f"{m['margin_first']:+.3f} -> {m['margin_last']:+.3f}, chosen "
                    f"displacement {m['chosen_displacement']:+.3f} nats",
                    *_text_lines(m.get("text"))]
    return "\n".join(out)


def _unflip(beta: float) -> str:
    from dpolab.diagnostics import unflippable_threshold

    bound = unflippable_threshold(beta)
    return "-" if bound is None else f"{bound:.3f}"


def render_pair(r: dict[str, Any]) -> str:
    m = r["movement"]
    out = [f"pair {r['id']} ({r['split']}, {r['where']}, group {r['group'] or '-'}): prompt "
           f"{r['prompt_tokens']} tokens, chosen {r['chosen_tokens']}, rejected "
           f"{r['rejected_tokens']} (scored)",
           f"margin {m['margin_first']:+.3f} -> {m['margin_last']:+.3f}; flipped: "
           f"{_fmt(m['flipped'])}; chosen displaced first at step {_fmt(m['displaced_at'])}; "
           f"CHES {_fmt(m['ches'])}, LN-CHES {_fmt(m['ln_ches'])}", "",
           *_text_lines(r["text"]), "",
           "trajectory (log-probs summed over the scored completion tokens, nats)"]
    cols = ["step", "logp_chosen", "logp_rejected", "logratio_chosen", "logratio_rejected",
            "margin"]
    out.append(table(cols, [[t[c] for c in cols] for t in r["trajectory"]], left=1))
    return "\n".join(out)


def _text_lines(text: dict | None) -> list[str]:
    if text is None:
        return ["(this run kept no text of its pairs: data given in memory and too large to "
                "copy, or an earlier dpolab)"]
    out = []
    for part in ("prompt", "chosen", "rejected"):
        out += [f"[{part}]", *_indent(_show(text[part]))]
    if text.get("tools"):
        out += ["[tools]", *_indent(json.dumps(text["tools"], ensure_ascii=False))]
    return out


def _show(value: Any) -> str:
    """Text as it is; messages one per line as `role: content`, tool calls as JSON."""
    if isinstance(value, str):
        return value
    lines = []
    for msg in value:
        content = msg.get("content")
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False)
        line = f"{msg.get('role', '?')}: {content}"
        if msg.get("tool_calls"):
            line += f"  tool_calls={json.dumps(msg['tool_calls'], ensure_ascii=False)}"
        lines.append(line)
    return "\n".join(lines)


def _indent(text: str) -> list[str]:
    return ["    " + line for line in str(text).splitlines() or [""]]
