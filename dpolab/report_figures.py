"""The PNG figures of :mod:`dpolab.report`: one run's curves, or several runs overlaid.

Every builder returns (section title, PNG path, caption) triples and leaves out a figure whose
data the run does not have (no evaluation lines, no groups, no training steps), so a run in
progress still gets a report. Steps on the x axis are 1-based optimizer steps; evaluation
lines at step 0 were written before the first update.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpolab.htmlpage import save_figure, subplots

if TYPE_CHECKING:
    from dpolab.rundir import Run

Figure = tuple[str, Path, str]

# Evaluation keys (after the `eval/` or `train_eval/` prefix) that have their own figure or
# table; any other numeric key of an evaluation line goes to "Other metrics".
KNOWN_EVAL = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "margins/p10", "margins/p50", "margins/p90",
    "margins/negative_fraction", "displacement/chosen", "displacement/rejected",
    "displacement/chosen_per_token", "displacement/rejected_per_token",
    "displacement/chosen_fell_fraction", "preference/model", "gradient_weight/mean", "loss",
}
# Held-out diagnostics shown as small panels: fractions and the mean gradient weight.
DIAGNOSTICS = ["margins/negative_fraction", "displacement/chosen_fell_fraction",
               "preference/model", "gradient_weight/mean"]
MAX_PANELS = 12  # other-metrics panels per figure; the rest are named in the caption
# A run report holds many figures: smaller files than the theory reports' 110 dpi.
_png = partial(save_figure, dpi=90)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold a finite number under `key`."""
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax, rows, key, label=None, **kw) -> bool:
    x, y = _series(rows, key)
    if not x:
        return False
    if len(x) <= 2:
        # Points only: a line from the start to the end would draw a path never measured
        # (the training pairs are scored before and after training only).
        kw = {**kw, "ls": "none"}
        ax.plot(x, y, marker="o", ms=5, label=label or key, **kw)
        return True
    ax.plot(x, y, marker="o" if len(x) < 12 else None, ms=3, label=label or key, **kw)
    return True


def _band(ax, x, lo, hi, **kw) -> None:
    """The p10-p90 range: a band over several evaluations, a bar at each of one or two."""
    if len(x) > 2:
        ax.fill_between(x, lo, hi, alpha=0.2, **kw)
    else:
        ax.vlines(x, lo, hi, lw=6, alpha=0.3, **kw)


def _finish(ax, xlabel="optimizer step", ylabel="", legend=True) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        # Outside the axes, to their right: a legend inside covers some run's curve sooner or
        # later. save_figure's tight layout makes room for it.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _syncs(ax, run: Run) -> str:
    """A TR-DPO run's reference syncs (loss.ref_sync) as dotted vertical lines on a panel
    against the step; the caption's sentence on them ("" when the run has none)."""
    for i, step in enumerate(run.syncs):
        ax.axvline(step, color="grey", ls=":", lw=1, label="reference sync" if i == 0 else None)
    return (" Dotted vertical lines: the reference synced with the policy after that step "
            "(loss.ref_sync); rewards and margins after it are against the new reference."
            if run.syncs else "")


def _step_panel(fig, ax, run: Run, path: Path, title: str, ylabel: str, caption: str) -> Figure:
    """A one-panel figure against the optimizer step, finished: the run's reference syncs
    marked, axes labelled, saved to `path`, its caption with the syncs' sentence."""
    synced = _syncs(ax, run)
    _finish(ax, ylabel=ylabel)
    return (title, _png(fig, path), caption + synced)


# ---------------------------------------------------------------------------------------
# One run


def loss_figure(run: Run, out: Path) -> list[Figure]:
    if not run.train:
        return []
    fig, ax = subplots(figsize=(8, 3.5))
    _plot(ax, run.train, "loss", "loss (weighted total)", lw=2, color="k")
    for key in sorted({k for r in run.train for k in r if k.startswith("loss/")}):
        _plot(ax, run.train, key)
    _plot(ax, run.evals, "eval/loss", "held-out loss", color="C0", lw=2)
    _plot(ax, run.evals, "train_eval/loss", "train-pairs loss (eval)", color="C1", ls=":")
    return [_step_panel(fig, ax, run, out / "loss.png", "Loss", "loss per pair",
                        "Training loss per optimizer step and each loss term (unweighted); the "
                        "objective on the held-out pairs (eval/loss) and on the training pairs "
                        "at each evaluation.")]


def eval_sets_figure(run: Run, out: Path) -> list[Figure]:
    """Reward accuracy and loss of each named held-out set (eval/<name>/...)."""
    sets = run.eval_sets
    if not sets:
        return []
    fig, (a1, a2) = subplots(1, 2, figsize=(10, 3.5))
    for i, name in enumerate(sets):
        _plot(a1, run.evals, f"eval/{name}/rewards/accuracies", name, color=f"C{i % 10}")
        _plot(a2, run.evals, f"eval/{name}/loss", name, color=f"C{i % 10}")
    _finish(a1, xlabel="step", ylabel="reward accuracy")
    _finish(a2, xlabel="step", ylabel="loss per pair")
    return [("Held-out sets", _png(fig, out / "eval_sets.png"),
             "Each named held-out set on its own: reward accuracy (ties count 1/2) and the "
             "objective per pair.")]


def margins_figure(run: Run, out: Path) -> list[Figure]:
    """Reward margins: the held-out and train-pair spread at each evaluation and the
    training batches' mean."""
    if not run.train and not run.evals:
        return []
    fig, ax = subplots(figsize=(8, 3.5))
    for prefix, color, what in (("eval/", "C0", "held-out"), ("train_eval/", "C1", "train pairs")):
        x, lo = _series(run.evals, prefix + "margins/p10")
        _, hi = _series(run.evals, prefix + "margins/p90")
        if x and len(lo) == len(hi):
            _band(ax, x, lo, hi, color=color, label=f"{what} p10-p90")
        _plot(ax, run.evals, prefix + "margins/p50", f"{what} median", color=color, ls="--")
    _plot(ax, run.train, "rewards/margins", "train batch mean", color="k", alpha=0.7)
    ax.axhline(0, color="grey", lw=0.8)
    return [_step_panel(fig, ax, run, out / "margins.png", "Reward margins",
                        "reward margin beta*h",
                        "Reward margins: p10-p90 band and median at each evaluation, and the "
                        "mean over each training batch. A band reaching below 0 means pairs "
                        "still ranked wrongly.")]


def displacement_figure(run: Run, out: Path) -> list[Figure]:
    """The change of chosen and rejected log-probs against the reference (held-out and
    train pairs), beside the training batches' implicit rewards."""
    if not run.train and not run.evals:
        return []
    fig, (a1, a2) = subplots(1, 2, figsize=(12, 3.5))  # room for two outside legends
    drawn = {a1: False, a2: False}
    for side, color in (("chosen", "C2"), ("rejected", "C3")):
        drawn[a1] |= _plot(a1, run.evals, f"eval/displacement/{side}", f"held-out {side}",
                           color=color)
        drawn[a1] |= _plot(a1, run.evals, f"train_eval/displacement/{side}", f"train {side}",
                           color=color, ls=":")
        drawn[a2] |= _plot(a2, run.train, f"rewards/{side}", f"rewards/{side}", color=color)
    for ax, ok in drawn.items():
        ax.axhline(0, color="grey", lw=0.8)
        synced = _syncs(ax, run)
        if not ok:  # say so on the panel rather than leave an unexplained blank
            ax.text(0.5, 0.5, "no data yet", ha="center", transform=ax.transAxes, color="grey")
    a1.set_title("displacement (eval lines)", fontsize=10)
    a2.set_title("implicit rewards (training batches)", fontsize=10)
    _finish(a1, ylabel="log pi(y) - log pi_ref(y)  [nats]")
    _finish(a2, ylabel="beta * (log pi - log pi_ref)")
    return [("Chosen and rejected displacement", _png(fig, out / "displacement.png"),
             "Left: mean change of the sequence log-prob against the reference, held-out "
             "(solid) and train pairs (dotted; dots alone when scored only before and after). "
             "Right: training-batch rewards. Both below 0 is likelihood displacement." + synced)]


def group_figures(run: Run, out: Path) -> list[Figure]:
    """Reward accuracy per group over the run, and before against after (none without
    groups)."""
    groups = run.groups
    if not groups:
        return []
    fig, ax = subplots(figsize=(8, 3.5))
    _plot(ax, run.evals, "eval/rewards/accuracies", "(all) held-out", color="k", lw=2)
    for i, g in enumerate(groups):
        _plot(ax, run.evals, f"eval/groups/{g}/accuracy", f"{g} held-out", color=f"C{i % 10}")
        _plot(ax, run.evals, f"train_eval/groups/{g}/accuracy", f"{g} train",
              color=f"C{i % 10}", ls=":")
    ax.set_ylim(-0.02, 1.02)
    return [_step_panel(fig, ax, run, out / "group_accuracy.png", "Per-group accuracy",
                        "reward accuracy",
                        "Reward accuracy per group at each evaluation: held-out (solid), train "
                        "pairs (dotted; dots alone when scored only before and after training)."),
            _group_bars(run, groups, out)]


def _group_bars(run: Run, groups: list[str], out: Path) -> Figure:
    bars = [("before", run.before, "accuracy"), ("after", run.after, "accuracy"),
            ("after, no cue", run.after, "accuracy_no_cue")]
    bars = [b for b in bars if any(f"eval/groups/{g}/{b[2]}" in b[1] for g in groups)]
    fig, ax = subplots(figsize=(max(6, 1.2 * len(groups) + 3), 3.5))
    width = 0.8 / max(len(bars), 1)
    for j, (name, row, key) in enumerate(bars):
        ys = [row.get(f"eval/groups/{g}/{key}", math.nan) for g in groups]
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))], ys,
               width, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 6 else 0)
    ax.set_ylim(0, 1.05)
    _finish(ax, xlabel="group", ylabel="held-out reward accuracy")
    return ("Per-group accuracy before and after", _png(fig, out / "group_before_after.png"),
            "Held-out reward accuracy per group before and after training, and on the pairs "
            "without the group's cue where logged (dashed line: chance).")


def lr_throughput_figure(run: Run, out: Path) -> list[Figure]:
    if not run.train:
        return []
    fig, (a1, a2) = subplots(1, 2, figsize=(10, 3))
    _plot(a1, run.train, "lr", "learning rate")
    _plot(a2, run.train, "tokens_per_s", "tokens/s", color="C4")
    _finish(a1, ylabel="learning rate", legend=False)
    _finish(a2, ylabel="tokens / s", legend=False)
    return [("Learning rate and throughput", _png(fig, out / "lr_throughput.png"),
             "Learning-rate schedule and training throughput (completion tokens per second).")]


def diagnostics_figure(run: Run, out: Path) -> list[Figure]:
    present = [k for k in DIAGNOSTICS if any(f"eval/{k}" in r for r in run.evals)]
    if not present:
        return []
    return [("Held-out diagnostics", _panels(run.evals, present, out / "diagnostics.png"),
             "Fraction of held-out pairs ranked wrongly, fraction whose chosen response became "
             "less likely, the model's own preference for chosen, and the mean DPO gradient "
             "weight sigma(-margin); dotted: train pairs.")]


def _panels(rows: list[dict[str, Any]], keys: list[str], path: Path) -> Path:
    """One small panel per key, `eval/` solid and `train_eval/` dotted."""
    cols = min(len(keys), 4)
    nrows = math.ceil(len(keys) / cols)
    fig, axes = subplots(nrows, cols, figsize=(2.8 * cols + 1, 2.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _plot(ax, rows, "eval/" + key, "held-out", color="C0")
        _plot(ax, rows, "train_eval/" + key, "train", color="C1", ls=":")
        ax.set_title(key, fontsize=8)
        _finish(ax, xlabel="step", legend=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _png(fig, path)


def other_keys(run: Run) -> list[str]:
    """Numeric evaluation keys (prefix stripped) with no figure of their own, sorted."""
    keys, sets = set(), set(run.eval_sets)
    for r in run.evals:
        for k, v in r.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or k == "step":
                continue
            base = k.split("/", 1)[1] if k.startswith(("eval/", "train_eval/")) else None
            if base is not None and base.split("/", 1)[0] in sets:
                continue  # a named held-out set: its own figure and table
            if base is not None and base not in KNOWN_EVAL and not base.startswith("groups/"):
                keys.add(base)
            elif base is None:
                keys.add(k)  # an unprefixed key on an evaluation line, e.g. unflippable/...
    return sorted(keys)


def other_figure(run: Run, out: Path) -> list[Figure]:
    keys = other_keys(run)
    if not keys:
        return []
    # Unprefixed keys are plotted by their own name; prefixed ones as eval/train_eval pairs.
    rows = [{**r, **{f"eval/{k}": r[k] for k in keys if k in r and f"eval/{k}" not in r}}
            for r in run.evals]
    shown = keys[:MAX_PANELS]
    rest = f" Not shown: {', '.join(keys[MAX_PANELS:])}." if len(keys) > MAX_PANELS else ""
    return [("Other metrics", _panels(rows, shown, out / "other_metrics.png"),
             "Further evaluation metrics, held-out (solid) and train pairs (dotted)." + rest)]


def run_figures(run: Run, out: Path) -> list[Figure]:
    """Every figure the run's data allows, in page order."""
    figs: list[Figure] = []
    for build in (loss_figure, margins_figure, displacement_figure, group_figures,
                  eval_sets_figure, diagnostics_figure, lr_throughput_figure, other_figure):
        figs += build(run, out)
    return figs


# ---------------------------------------------------------------------------------------
# Several runs


def compare_figures(runs: list[Run], out: Path) -> list[Figure]:
    """Loss, held-out accuracy, held-out margins and displacement, one color per run."""
    figs: list[Figure] = []
    if any(r.train for r in runs):
        fig, ax = subplots(figsize=(8, 3.5))
        for i, r in enumerate(runs):
            _plot(ax, r.train, "loss", r.label, color=f"C{i % 10}")
        _finish(ax, ylabel="training loss per pair")
        figs.append(("Loss", _png(fig, out / "loss.png"), "Training loss of each run. Losses "
                     "of different objectives are on different scales."))
    if not any(r.evals for r in runs):
        return figs
    fig, ax = subplots(figsize=(8, 3.5))
    for i, r in enumerate(runs):
        _plot(ax, r.evals, "eval/rewards/accuracies", r.label, color=f"C{i % 10}")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, ylabel="held-out reward accuracy")
    figs.append(("Held-out accuracy", _png(fig, out / "accuracy.png"),
                 "Held-out reward accuracy at each evaluation."))
    fig, ax = subplots(figsize=(8, 3.5))
    for i, r in enumerate(runs):
        x, lo = _series(r.evals, "eval/margins/p10")
        _, hi = _series(r.evals, "eval/margins/p90")
        if x and len(lo) == len(hi):
            ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.15)
        _plot(ax, r.evals, "eval/margins/p50", r.label, color=f"C{i % 10}")
    ax.axhline(0, color="grey", lw=0.8)
    _finish(ax, ylabel="held-out reward margin")
    figs.append(("Held-out margins", _png(fig, out / "margins.png"),
                 "Median held-out reward margin (line) and its p10-p90 band per run. Margins "
                 "scale with each run's beta."))
    fig, ax = subplots(figsize=(8, 3.5))
    for i, r in enumerate(runs):
        _plot(ax, r.evals, "eval/displacement/chosen", f"{r.label} chosen", color=f"C{i % 10}")
        _plot(ax, r.evals, "eval/displacement/rejected", f"{r.label} rejected",
              color=f"C{i % 10}", ls="--")
    ax.axhline(0, color="grey", lw=0.8)
    _finish(ax, ylabel="log pi(y) - log pi_ref(y)  [nats]")
    figs.append(("Held-out displacement", _png(fig, out / "displacement.png"),
                 "Mean held-out displacement of the chosen (solid) and rejected (dashed) "
                 "responses per run."))
    return figs
