"""`dpolab report RUN_DIR` and `dpolab compare RUN_DIR RUN_DIR ...`: one HTML page per run
(or per comparison) with figures, before/after tables and notes computed from the metrics.

A run directory holds `config.yaml`, `metrics.jsonl` (training-step lines and evaluation
lines, told apart by their keys), `data.json` and, once the run finished, `summary.json`.
Everything but `metrics.jsonl` is optional here: a run still in progress, a run without
evaluation lines or groups gets a report with a note saying what is missing.

Notation of the notes: `eval/` keys are held-out pairs, `train_eval/` the training pairs
re-scored at the same steps; displacement is the mean change of log pi(y) - log pi_ref(y)
(nats), the reward margin is beta * h with h = displacement(chosen) - displacement(rejected).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from dpolab import htmlpage
from dpolab.errors import UserError
from dpolab.rundir import Run, load_run, loss_name, metric, reference_free

# Thresholds of the "what to look at" notes, chosen to flag what the eye would flag on the
# figures; they only select which sentences are printed.
GAP_LARGE = 0.15  # train_eval minus held-out accuracy of a group
CUE_LARGE = 0.15  # accuracy minus no-cue accuracy of a group
SATURATED = 0.05  # mean DPO gradient weight sigma(-margin) below this: most pairs stopped learning

# Once the page has loaded, count the figures the browser could decode; a harmless attribute
# that lets a headless browser check the page without looking at pixels.
_IMAGE_CHECK = ("<script>window.addEventListener('load',function(){var im=document.images,n=0;"
                "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)n++;}"
                "document.body.setAttribute('data-images-loaded',n+'/'+im.length);});</script>")


# ---------------------------------------------------------------------------------------
# Tables


def before_after_rows(run: Run) -> list[dict[str, Any]]:
    """Per group (and '(all)'): held-out accuracy, margin and model preference before and
    after training, no-cue accuracy where logged, and the train-minus-held-out accuracy gap."""
    b, a = run.before, run.after
    rows = []
    for g in [None, *run.groups]:
        row: dict[str, Any] = {"group": g or "(all)"}
        n = metric(a or b, "eval/", g, "n")
        if n is not None:
            row["n"] = int(n)
        for what in ("accuracy", "accuracy_no_cue", "margin", "preference"):
            for when, src in (("before", b), ("after", a)):
                v = metric(src, "eval/", g, what)
                if v is not None:
                    row[f"{what.replace('_', ' ')} {when}"] = v
        tr, ho = metric(a, "train_eval/", g, "accuracy"), metric(a, "eval/", g, "accuracy")
        if tr is not None and ho is not None:
            row["train acc after"], row["gap"] = tr, tr - ho
        rows.append(row)
    return rows


def before_after_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The table's columns present in any row, in reading order (a group without a no-cue
    subset must not push those columns to the end)."""
    order = ["group", "n"] + [f"{w} {t}" for w in ("accuracy", "accuracy no cue", "margin",
                                                   "preference") for t in ("before", "after")]
    order += ["train acc after", "gap"]
    return [c for c in order if any(c in r for r in rows)]


def eval_set_rows(run: Run) -> list[dict[str, Any]]:
    """Per named held-out set: reward accuracy and loss before and after training."""
    b, a = run.before, run.after or run.before
    return [{"set": name, "acc before": b.get(f"eval/{name}/rewards/accuracies"),
             "acc after": a.get(f"eval/{name}/rewards/accuracies"),
             "loss before": b.get(f"eval/{name}/loss"), "loss after": a.get(f"eval/{name}/loss"),
             "margin after": a.get(f"eval/{name}/rewards/margins")} for name in run.eval_sets]


def final_row(run: Run) -> dict[str, Any]:
    """The comparison table's row: final held-out metrics of one run."""
    a = run.after or run.before
    row: dict[str, Any] = {"run": run.label, "steps": max((r.get("step", 0) for r in
                                                            run.train + run.evals), default=0)}
    if run.train:
        row["final loss"] = run.train[-1].get("loss")
    for key, name in (("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                      ("margins/p10", "margin p10"), ("preference/model", "model pref"),
                      ("displacement/chosen", "disp chosen"),
                      ("displacement/rejected", "disp rejected")):
        if f"eval/{key}" in a:
            row[name] = a[f"eval/{key}"]
    for g in run.groups:
        if f"eval/groups/{g}/accuracy" in a:
            row[f"acc {g}"] = a[f"eval/groups/{g}/accuracy"]
    return row


# ---------------------------------------------------------------------------------------
# Notes


def missing_notes(run: Run) -> list[str]:
    """What this report cannot show, and why."""
    notes = []
    if run.summary is None:
        notes.append("No summary.json: the run is still in progress or stopped early; the "
                     "last evaluation line is used as 'after'.")
    if not run.config:
        notes.append("No config.yaml in the run directory.")
    if not run.train:
        notes.append("No training-step lines yet: loss, learning-rate and throughput figures "
                     "are left out.")
    elif len(run.train) == 1:
        notes.append("A single training step: curves are single points.")
    if not run.evals:
        notes.append("No evaluation lines: held-out margins, displacement and group "
                     "figures are left out.")
    elif len(run.evals) == 1:
        notes.append("Only the evaluation before training: there is no 'after' yet.")
    if run.evals and not run.groups:
        notes.append("No per-group metrics in the evaluation lines: group figures are left out.")
    return notes


def _fmt(x: float) -> str:
    return f"{x:+.3g}"


def _displacement_notes(a: dict[str, Any]) -> list[str]:
    dc, dr = a.get("eval/displacement/chosen"), a.get("eval/displacement/rejected")
    if dc is None or dr is None:
        return []
    if dc < 0 and dr < 0:
        note = (f"Both held-out log-probs fell (chosen {_fmt(dc)}, rejected {_fmt(dr)} nats "
                f"against the reference): likelihood displacement. The margin grew because the "
                f"rejected response fell faster, and probability mass went to responses that "
                f"are neither.")
    elif dc < 0:
        note = (f"The chosen held-out log-prob fell ({_fmt(dc)} nats) while the rejected one "
                f"changed by {_fmt(dr)}: the margin grew only by pushing rejected down.")
    else:
        note = (f"The chosen held-out log-prob rose ({_fmt(dc)} nats; rejected {_fmt(dr)}): "
                f"no likelihood displacement on average.")
    fell = a.get("eval/displacement/chosen_fell_fraction")
    if fell is not None:
        note += f" The chosen response became less likely on {fell:.0%} of held-out pairs."
    return [note]


def _margin_notes(run: Run) -> list[str]:
    a = run.after
    notes = []
    p10 = [r["eval/margins/p10"] for r in run.evals[1:] if "eval/margins/p10" in r]
    if p10 and all(v < 0 for v in p10):
        notes.append(f"The 10th percentile of held-out margins stays negative at every "
                     f"evaluation (last {_fmt(p10[-1])}): at least a tenth of held-out pairs "
                     f"still rank the rejected response higher.")
    elif p10 and p10[-1] < 0:
        notes.append(f"The 10th percentile of held-out margins ends negative ({_fmt(p10[-1])}).")
    elif p10:
        notes.append(f"The 10th percentile of held-out margins ends positive ({_fmt(p10[-1])}): "
                     f"nine in ten held-out pairs rank the chosen response higher.")
    w = a.get("eval/gradient_weight/mean")
    if w is not None and w < SATURATED:
        notes.append(f"The mean DPO gradient weight sigma(-margin) is {w:.3g}: most pairs are "
                     f"saturated and contribute almost nothing to further training.")
    return notes


def _group_notes(run: Run) -> list[str]:
    b, a = run.before, run.after
    notes = []
    for g in run.groups:
        ho, tr = a.get(f"eval/groups/{g}/accuracy"), a.get(f"train_eval/groups/{g}/accuracy")
        if ho is not None and tr is not None and tr - ho > GAP_LARGE:
            notes.append(f"Group {g}: train accuracy {tr:.2f} vs held-out {ho:.2f} (gap "
                         f"{tr - ho:.2f}): it fits its training pairs much better than it "
                         f"generalizes.")
        hb = b.get(f"eval/groups/{g}/accuracy")
        if ho is not None and hb is not None and ho < hb:
            notes.append(f"Group {g}: held-out accuracy fell from {hb:.2f} to {ho:.2f}.")
        nc = a.get(f"eval/groups/{g}/accuracy_no_cue")
        if ho is not None and nc is not None and ho - nc > CUE_LARGE:
            notes.append(f"Group {g}: held-out accuracy {ho:.2f} but {nc:.2f} on pairs without "
                         f"the group's cue: the preference leans on the cue.")
    return notes


def observations(run: Run) -> list[str]:
    """'What to look at': sentences computed from the metrics (never from thresholds alone:
    each quotes the numbers it rests on)."""
    notes = []
    if len(run.train) > 1:
        l0, l1 = run.train[0]["loss"], run.train[-1]["loss"]
        trend = "fell" if l1 < l0 else "did not fall"
        notes.append(f"The training loss {trend}: {l0:.4g} at step {run.train[0].get('step')} "
                     f"to {l1:.4g} at step {run.train[-1].get('step')}.")
    b, a = run.before, run.after
    both = "eval/rewards/accuracies" in b and "eval/rewards/accuracies" in a
    if both and reference_free(run.config):
        notes.append(f"No reference (a reference-free loss): held-out 'accuracy' is the "
                     f"policy's own preference, log pi(y_w) > log pi(y_l) (per-token means for "
                     f"SimPO, ORPO and SFT, sums for CPO), and rewards are beta * log pi(y). "
                     f"It went from {b['eval/rewards/accuracies']:.3f} to "
                     f"{a['eval/rewards/accuracies']:.3f} (ties count 1/2). Displacement, "
                     f"unflippable pairs and DID need a reference and are left out.")
    elif both:
        notes.append(f"Held-out reward accuracy went from {b['eval/rewards/accuracies']:.3f} "
                     f"to {a['eval/rewards/accuracies']:.3f} (ties count 1/2, so 0.5 before "
                     f"training).")
    if a:
        notes += _displacement_notes(a) + _margin_notes(run) + _group_notes(run)
    return notes or ["Nothing to observe yet: no training steps and no evaluation after training."]


# ---------------------------------------------------------------------------------------
# Pages


def _summary_rows(run: Run) -> list[dict[str, Any]]:
    rows = []
    if run.summary is not None:
        rows.append({k: run.summary[k] for k in ("steps", "wall_s", "peak_rss_mib")
                     if k in run.summary})
    return rows


def _data_rows(run: Run) -> list[dict[str, Any]]:
    return [{"split": split, **{k: v for k, v in info.items() if not isinstance(v, (list, dict))}}
            for split, info in (run.data or {}).items() if isinstance(info, dict) and "pairs" in info]


def write_run_report(run_dir: Path) -> Path:
    """Figures into RUN_DIR/report/, the page into RUN_DIR/report.html; returns the page."""
    from dpolab import report_figures

    run = load_run(run_dir)
    figures = report_figures.run_figures(run, run.path / "report")
    blocks = [htmlpage.para(f"Run directory: {run.path.resolve()}; loss: {loss_name(run.config)}.")]
    blocks += [htmlpage.heading("What to look at")] + [htmlpage.para(n) for n in observations(run)]
    missing = missing_notes(run)
    if missing:
        blocks += [htmlpage.heading("Missing pieces")] + [htmlpage.para(n) for n in missing]
    rows = before_after_rows(run)
    blocks += [htmlpage.heading("Held-out metrics before and after training, per group"),
               htmlpage.table(rows, before_after_columns(rows)) if run.evals
               else htmlpage.para("(no evaluation lines)")]
    if run.eval_sets:
        blocks += [htmlpage.heading("Held-out sets", 3), htmlpage.table(eval_set_rows(run))]
    if _summary_rows(run):
        blocks += [htmlpage.heading("Run summary", 3), htmlpage.table(_summary_rows(run))]
    if _data_rows(run):
        blocks += [htmlpage.heading("Data", 3), htmlpage.table(_data_rows(run))]
    forward = (run.data or {}).get("pair_forward")
    if isinstance(forward, dict):
        blocks += [htmlpage.para(f"Pair forward: {forward.get('forward')} "
                                 f"({forward.get('reason')}).")]
    for section, path, caption in figures:
        blocks += [htmlpage.heading(section), htmlpage.image(path, caption)]
    blocks += _pairs_section(run)
    blocks += [htmlpage.heading("Configuration"),
               htmlpage.pre(yaml.safe_dump(run.config, sort_keys=False) if run.config
                            else "(no config.yaml)"), _IMAGE_CHECK]
    return htmlpage.write_page(run.path / "report.html", f"dpolab run {run.path.name}", blocks)


def _pairs_section(run: Run) -> list[str]:
    """Every pair's trajectory and CHES (dpolab.report_pairs), when the run kept them."""
    from dpolab import report_pairs

    trajs = report_pairs.load(run.path)
    if not trajs:
        return []
    blocks = [htmlpage.heading("Every pair")]
    blocks += [htmlpage.para(n) for n in report_pairs.notes(trajs)]
    for section, path, caption in report_pairs.figures(trajs, run.path / "report"):
        blocks += [htmlpage.heading(section, 3), htmlpage.image(path, caption)]
    return blocks


def write_compare_report(run_dirs: list[Path], out: Path) -> Path:
    """Overlay several runs' curves in OUT/report.html (figures in OUT/report/)."""
    from dpolab import report_figures

    runs = [load_run(d) for d in run_dirs]
    names = [r.path.name for r in runs]
    # runs/a/seed0 and runs/b/seed0 must not share a legend entry: add the parent's name.
    runs = [dataclasses.replace(r, name=f"{r.path.resolve().parent.name}/{r.path.name}")
            if names.count(r.path.name) > 1 else r for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = report_figures.compare_figures(runs, out / "report")
    blocks = [htmlpage.heading("Final held-out metrics per run"),
              htmlpage.table([final_row(r) for r in runs])]
    for run in runs:
        for note in missing_notes(run):
            blocks.append(htmlpage.para(f"{run.label}: {note}"))
    for section, path, caption in figures:
        blocks += [htmlpage.heading(section), htmlpage.image(path, caption)]
    blocks.append(_IMAGE_CHECK)
    return htmlpage.write_page(out / "report.html", "dpolab: " + ", ".join(r.label for r in runs),
                               blocks)


def cli_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dpolab report",
        description="Write RUN_DIR/report.html (figures in RUN_DIR/report/); with --compare "
                    "(`dpolab compare`), overlay several runs in OUT/report.html.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--compare", action="store_true", help="one page overlaying all runs")
    p.add_argument("--out", type=Path, default=None,
                   help="compare: output directory (default runs/compare)")
    a = p.parse_args(argv)
    if a.out is not None and not a.compare:
        raise UserError("--out is for `dpolab compare`; a run's report goes into its directory")
    if a.compare:
        if len(a.run_dirs) < 2:
            raise UserError("compare needs at least two run directories")
        print(write_compare_report(a.run_dirs, a.out or Path("runs/compare")))
        return 0
    for d in a.run_dirs:
        print(write_run_report(d))
    return 0


def held_out_table(before: dict, after: dict, *, run_dir: Path) -> str:
    """The held-out table per group: accuracy before (`before`, an evaluation line) and after
    (`after`), the margin, the model's own preference and the no-cue accuracy after."""
    from dpolab.rundir import group_names, load_run, metric, reference_free

    nan = float("nan")
    lines = [f"{'held-out':14s} {'acc before':>10s} {'acc after':>10s} {'margin':>8s} "
             f"{'model pref':>10s} {'acc no-cue':>10s}"]
    for g in [None, *group_names(after)]:
        acc0, acc, margin, pref, nc = (metric(row, "eval/", g, what) for row, what in (
            (before, "accuracy"), (after, "accuracy"), (after, "margin"), (after, "preference"),
            (after, "accuracy_no_cue")))
        lines.append(f"{g or '(all)':14s} {nan if acc0 is None else acc0:10.3f} "
                     f"{nan if acc is None else acc:10.3f} {nan if margin is None else margin:8.3f} "
                     f"{nan if pref is None else pref:10.3f} {'' if nc is None else f'{nc:.3f}':>10s}")
    if reference_free(load_run(run_dir).config):
        lines.append("no reference (reference-free loss): acc is the policy's own preference "
                     "log pi(y_w) > log pi(y_l), per-token means for simpo/orpo/sft, sums for "
                     "cpo; margin is beta times that difference")
    return "\n".join(lines)
