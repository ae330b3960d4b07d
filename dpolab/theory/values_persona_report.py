"""Tables, figures and the report section of the persona-statement experiment
(:mod:`dpolab.theory.values_persona`), the real-model part of `dpolab reproduce values`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpolab import htmlpage
from dpolab.theory.values_persona import FILTER_MAX_HELD_ERROR, OPTIMIZERS

NAMES = {"adam": "Adam", "gd": "gradient descent"}


def tables(res: dict[str, Any]) -> dict[str, list[dict]]:
    """Printable tables: the filter, the recipe, per-K results, fits and the verdicts."""
    s = res["setting"]
    groups = {g["name"]: g for g in s["groups"]}
    k1 = {opt: {r["group"]: r for r in rows} for opt, rows in res["k1"].items()}
    filt = []
    for name, g in groups.items():
        if name not in k1["adam"]:
            filt.append({"group": name, "concept": g["concept"],
                         "K=1 held-out error (Adam)": "too few statements", "kept": False})
            continue
        filt.append({"group": name, "concept": g["concept"],
                     "K=1 held-out error (Adam)": k1["adam"][name]["held_error"],
                     "K=1 held-out error (GD)": k1["gd"][name]["held_error"],
                     "K=1 train error (Adam)": k1["adam"][name]["train_error"],
                     "kept": name in res["kept"]})
    recipe = [{"optimizer": NAMES[opt], "lr": r["lr"], "fits": r["fits"],
               "tried (lr: mean K=1 train error)": ", ".join(
                   f"{t['lr']:g}: {t['mean_train_error']:.3f}" for t in r["tried"])}
              for opt, r in res["recipe"].items()]
    out = {"persona groups: the pre-registered filter": filt, "recipe (K = 1 training "
           "criterion)": recipe}
    for opt in OPTIMIZERS:
        sw = res["sweeps"][opt]
        out[f"K sweep, {NAMES[opt]} (means and sd over draws)"] = [
            {k: (v if not isinstance(v, list) else " ".join(f"{x:.3f}" for x in v))
             for k, v in row.items()} for row in sw["per_k"]]
        out[f"fits, {NAMES[opt]}"] = [{"fit": name, **f} for name, f in sw["fits"].items()
                                      if f is not None]
        out[f"pass marks, {NAMES[opt]}"] = [
            {"mark": name, "value": m["value"], "needs": m["mark"], "pass": m["pass"]}
            for name, m in res["verdicts"][opt]["marks"].items()] + [
            {"mark": "reproduced", "value": "", "needs": "all",
             "pass": res["verdicts"][opt]["reproduced"]}]
    return out


def make_figures(res: dict[str, Any], out: Path) -> dict[str, Path]:
    figs: dict[str, Path] = {}

    k1 = {r["group"]: r for r in res["k1"]["adam"]}
    names = [g["name"] for g in res["setting"]["groups"] if g["name"] in k1]
    fig, ax = htmlpage.subplots(figsize=(11, 3.8))
    err = [k1[n]["held_error"] for n in names]
    ax.bar(range(len(names)), err,
           color=["tab:green" if n in res["kept"] else "tab:gray" for n in names])
    ax.axhline(FILTER_MAX_HELD_ERROR, color="k", ls="--", lw=1,
               label=f"filter: <= {FILTER_MAX_HELD_ERROR}")
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="held-out error, group alone", title="K = 1 (Adam): kept groups in green")
    ax.legend(fontsize=8)
    figs["filter"] = htmlpage.save_figure(fig, out / "persona_filter.png")

    fig, axes = htmlpage.subplots(2, 2, figsize=(11, 8))
    for row, opt in zip(axes, OPTIMIZERS):
        for k, cur in res["sweeps"][opt]["curves"].items():
            for ax, which in zip(row, ("train", "held")):
                ax.plot(cur[which], label=f"K={k}")
        for ax, which in zip(row, ("training", "held-out")):
            ax.set(xlabel="step", ylabel="mean reward margin β h",
                   title=f"{NAMES[opt]}: {which} statements")
        row[1].legend(fontsize=8)
    figs["margins"] = htmlpage.save_figure(fig, out / "persona_margins.png")

    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4))
    for opt, marker in zip(OPTIMIZERS, ("o", "s")):
        sw = res["sweeps"][opt]
        if not sw["per_k"]:
            continue
        ks = np.array([r["k"] for r in sw["per_k"]], dtype=float)
        axes[0].plot([r["k"] for r in sw["runs"]], [r["held_error"] for r in sw["runs"]], ".",
                     alpha=0.4)
        axes[0].errorbar(ks, [r["held_error"] for r in sw["per_k"]],
                         yerr=[r["held_error_sd"] for r in sw["per_k"]], fmt=marker,
                         label=NAMES[opt], capsize=3)
        fit = sw["fits"].get("held_error_vs_k")
        if fit:
            axes[0].plot(ks, fit["slope"] * ks + fit["intercept"], "-",
                         label=f"{fit['slope']:.4f} K + {fit['intercept']:.3f} "
                               f"(R²={fit['r2']:.2f})")
        rates = [r["train_rate"] for r in sw["per_k"]]
        if all(r > 0 for r in rates):
            axes[1].loglog(ks, rates, marker + "-", label=NAMES[opt])
            axes[1].loglog(ks, rates[0] / ks, "k:", lw=0.8)
    axes[0].set(xlabel="K (values)", ylabel="held-out error", title="held-out error vs K")
    axes[1].set(xlabel="K (values)", ylabel="training-margin growth rate (per step)",
                title="growth rate vs K (dotted: ∝ 1/K)")
    for ax in axes:
        ax.legend(fontsize=8)
    figs["scaling"] = htmlpage.save_figure(fig, out / "persona_scaling.png")
    return figs


def report_blocks(res: dict[str, Any], tabs: dict[str, list[dict]],
                  figs: dict[str, Path]) -> list[str]:
    s, pre = res["setting"], res["setting"]["preregistered"]
    c = s["config"]
    licences = [{"group": g["name"], "package": g["package"], "files": ", ".join(g["files"]),
                 "licence": g["licence"]} for g in s["groups"]]
    blocks = [
        htmlpage.heading(f"Real model: persona statements on {c['model']}"),
        htmlpage.para(
            f"Prompt {s['prompt']!r}, responses {s['responses']}; the final hidden state at "
            f"the last prompt token; only the head rows of the two responses train (exactly "
            f"last-layer DPO: the log-partition cancels in the margin). Q = {c['q']} training "
            f"and {c['held']} held-out statements per group, each half Yes and half No; beta "
            f"{c['beta']}, "
            f"{c['steps']} full-batch steps, K in {c['ks']}, {c['draws']} draws of groups per "
            f"K. ||mean x|| / mean ||x|| = {s['shared_fraction']:.3f}."),
        htmlpage.para("Fixed before the sweep ran: " + pre["filter"] + "; " + pre["recipe"]
                      + "; reproduced when " + "; ".join(f"{k} {v}" for k, v in
                                                          pre["pass"].items()) + "."),
        htmlpage.image(figs["filter"], "Every candidate group's held-out error alone; the "
                       "filter keeps the green ones."),
        htmlpage.image(figs["scaling"], "Left: held-out error vs K, every draw (dots), mean "
                       "and sd, least-squares lines. Right: early training-margin growth."),
        htmlpage.image(figs["margins"], "Mean reward margin vs step per K (means over draws)."),
    ]
    for title, rows in tabs.items():
        blocks += [htmlpage.heading(title, 3), htmlpage.table(rows)]
    blocks += [htmlpage.heading("data and licences", 3), htmlpage.table(licences)]
    return blocks
