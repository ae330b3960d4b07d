"""A sweep's points compared: SWEEP/summary.json and SWEEP/report.html.

Per grid point, from its run directory's last evaluation (held-out pairs): the reward
accuracy, the mean reward margin beta * h, and the chosen displacement
log pi(y_w) - log pi_ref(y_w) (nats), overall and per group. Where two axes vary, heat maps
of the three over those axes (one row of maps per value of any further axis); with one axis,
the same three against its values. A point whose loss reads no reference (simpo, cpo, orpo)
has no displacement, and its accuracy is the policy's own preference (dpolab.diagnostics).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from dpolab import atomic, htmlpage
from dpolab.errors import UserError
from dpolab.rundir import group_names, load_run, reference_free

RECORD = "sweep.json"  # the axes, the fixed overrides and the points (dpolab.sweeps writes it)

# (summary key, metric of the last evaluation, heading of its heat map)
METRICS = (("accuracy", "eval/rewards/accuracies", "held-out reward accuracy"),
           ("margin", "eval/rewards/margins", "held-out reward margin"),
           ("chosen_displacement", "eval/displacement/chosen", "chosen displacement (nats)"))
GROUP_METRICS = (("accuracy", "accuracy"), ("margin", "margin"),
                 ("chosen_displacement", "displacement/chosen"))
MAX_MAP_ROWS = 6  # rows of heat maps (values of the third axis on) drawn; the rest are in the table


def point_summary(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """One point's final held-out numbers (None where the run has none)."""
    out: dict[str, Any] = {"name": entry["name"], "values": entry.get("values", {}),
                           "finished": (run_dir / "summary.json").is_file()}
    if not (run_dir / "metrics.jsonl").is_file():
        return {**out, **{k: None for k, _, _ in METRICS}, "groups": {}, "reference_free": None}
    run = load_run(run_dir)
    after = run.after if out["finished"] else (run.evals[-1] if run.evals else {})
    out.update({k: after.get(key) for k, key, _ in METRICS})
    out["reference_free"] = reference_free(run.config)
    out["groups"] = {g: {k: after.get(f"eval/groups/{g}/{key}") for k, key in GROUP_METRICS}
                     for g in group_names(after)}
    return out


def read_record(out: Path) -> dict[str, Any]:
    path = Path(out) / RECORD
    try:
        record = json.loads(path.read_text())
    except OSError:
        raise UserError(f"{out}: not a sweep folder (no {RECORD})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("points"), list):
        raise UserError(f"{path}: field points: expected a list of grid points")
    return record


def summarize_sweep(sweep_dir: Path) -> dict[str, Any]:
    record = read_record(sweep_dir)
    points = [point_summary(sweep_dir / p["name"], p) for p in record["points"]]
    return {"axes": record.get("axes", {}), "fixed": record.get("fixed", {}), "points": points}


def write_sweep_report(sweep_dir: Path) -> Path:
    """SWEEP/summary.json and SWEEP/report.html (figures in SWEEP/report/); returns the page."""
    sweep_dir = Path(sweep_dir)
    summary = summarize_sweep(sweep_dir)
    atomic.write_text(sweep_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    axes = summary["axes"]
    points = summary["points"]
    blocks = [htmlpage.para(
        f"Sweep folder {sweep_dir.resolve()}: {len(points)} grid points over "
        + ", ".join(f"{k} = {', '.join(map(str, v))}" for k, v in axes.items())
        + (f"; on every point {', '.join(f'{k}={v}' for k, v in summary['fixed'].items())}"
           if summary["fixed"] else "") + ". Each point is a run directory with its own report.")]
    unfinished = [p["name"] for p in points if not p["finished"]]
    if unfinished:
        blocks.append(htmlpage.para(f"Not finished: {', '.join(unfinished)} (their last "
                                    f"evaluation is shown; dpolab sweep --resume "
                                    f"{sweep_dir} finishes them)."))
    if any(p["reference_free"] for p in points):
        blocks.append(htmlpage.para(
            "Points marked * have a reference-free loss: their accuracy is the policy's own "
            "preference log pi(y_w) > log pi(y_l) and their margin beta times that difference "
            "(per-token means for simpo and orpo); they have no displacement."))
    for title, path, caption in sweep_figures(summary, sweep_dir / "report"):
        blocks += [htmlpage.heading(title), htmlpage.image(path, caption)]
    blocks += [htmlpage.heading("Final held-out metrics per grid point"),
               htmlpage.table(table_rows(points))]
    groups = sorted({g for p in points for g in p["groups"]})
    if groups:
        blocks += [htmlpage.heading("Chosen displacement per group (nats)"),
                   htmlpage.table([{"point": _label(p), **{g: _num(p["groups"].get(g, {}).get(
                       "chosen_displacement")) for g in groups}} for p in points])]
    from dpolab.report import _IMAGE_CHECK

    blocks.append(_IMAGE_CHECK)
    return htmlpage.write_page(sweep_dir / "report.html", f"dpolab sweep {sweep_dir.name}", blocks)


def _label(p: dict[str, Any]) -> str:
    return p["name"] + (" *" if p["reference_free"] else "")


def _num(x: Any) -> Any:
    return "—" if x is None else x


def table_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row: dict[str, Any] = {"point": _label(p), **{k: v for k, v in p["values"].items()}}
        row.update({k: _num(p[k]) for k, _, _ in METRICS})
        row["finished"] = "yes" if p["finished"] else "no"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Figures


def sweep_figures(summary: dict[str, Any], out: Path) -> list[tuple[str, Path, str]]:
    """Heat maps over the first two axes (one row per value of the others), or curves
    against the one axis; none without points that have numbers."""
    axes = {k: v for k, v in summary["axes"].items()}
    points = summary["points"]
    if not any(p["accuracy"] is not None for p in points):
        return []
    keys = list(axes)
    if len(keys) == 1:
        return [_curves(points, keys[0], axes[keys[0]], out / "sweep_metrics.png")]
    return [_heat_maps(points, axes, out / "sweep_heat_maps.png")]


def _value_of(points: list[dict[str, Any]], values: dict[str, Any]) -> dict[str, Any] | None:
    for p in points:
        if all(json.dumps(p["values"].get(k), default=str) == json.dumps(v, default=str)
               for k, v in values.items()):
            return p
    return None


def _heat_maps(points: list[dict[str, Any]], axes: dict[str, list], path: Path):
    import numpy as np

    (ky, ys), (kx, xs), *rest = axes.items()
    others = list(itertools.product(*[v for _, v in rest]))[:MAX_MAP_ROWS]
    rest_keys = [k for k, _ in rest]
    fig, axs = htmlpage.subplots(len(others), len(METRICS), squeeze=False,
                            figsize=(4.3 * len(METRICS), 0.55 * len(ys) * len(others)
                                     + 1.6 * len(others) + 0.4))
    for r, other in enumerate(others):
        for c, (key, _, heading) in enumerate(METRICS):
            ax = axs[r][c]
            grid = np.full((len(ys), len(xs)), np.nan)
            starred = np.zeros((len(ys), len(xs)), dtype=bool)
            for i, y in enumerate(ys):
                for j, x in enumerate(xs):
                    p = _value_of(points, {ky: y, kx: x, **dict(zip(rest_keys, other))})
                    if p is not None and p[key] is not None:
                        grid[i, j] = p[key]
                        starred[i, j] = bool(p["reference_free"])
            _draw_map(ax, grid, starred, key)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_yticks(range(len(ys)), [str(y) for y in ys])
            ax.set_xlabel(kx)
            ax.set_ylabel(ky)
            suffix = "".join(f", {k}={v}" for k, v in zip(rest_keys, other))
            ax.set_title(heading + suffix, fontsize=10)
    return ("Heat maps", htmlpage.save_figure(fig, path, dpi=90),
            f"Final held-out metrics of every grid point over {ky} (rows) and {kx} (columns); "
            "each cell is labelled with its value. Accuracy: 0 to 1 (0.5 chance); margin and "
            "displacement: red below 0, blue above. 'none': no number (no reference, or not run); "
            "*: reference-free loss (accuracy and margin are the policy's own preference).")


def _draw_map(ax, grid, starred, key: str) -> None:
    import numpy as np

    finite = grid[np.isfinite(grid)]
    if key == "accuracy":
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    else:
        lim = float(np.max(np.abs(finite))) if finite.size else 1.0
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim or -1, vmax=lim or 1, aspect="auto")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    for (i, j), v in np.ndenumerate(grid):
        if not math.isfinite(v):
            ax.text(j, i, "none", ha="center", va="center", fontsize=9, color="grey")
        else:
            rgba = im.cmap(im.norm(v))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(j, i, f"{v:.2f}{'*' if starred[i, j] else ''}", ha="center", va="center",
                    fontsize=10, color="white" if dark else "black")


def _curves(points: list[dict[str, Any]], key_x: str, xs: list, path: Path):
    fig, axs = htmlpage.subplots(1, len(METRICS), figsize=(4.3 * len(METRICS), 3.2), squeeze=False)
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    for ax, (key, _, heading) in zip(axs[0], METRICS):
        ps = [_value_of(points, {key_x: x}) for x in xs]
        ys = [math.nan if p is None or p[key] is None else p[key] for p in ps]
        pos = xs if numeric else list(range(len(xs)))
        ax.plot(pos, ys, "o-")
        if not numeric:
            ax.set_xticks(pos, [str(x) for x in xs])
        elif min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key_x)
        ax.set_title(heading, fontsize=10)
        ax.grid(alpha=0.3)
    return ("Final metrics against " + key_x, htmlpage.save_figure(fig, path, dpi=90),
            f"Final held-out accuracy, reward margin and chosen displacement of every point "
            f"against {key_x}.")
