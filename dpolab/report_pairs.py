"""The run report's per-pair section: every pair's trajectory and CHES against displacement.

Read from RUN/pairs/ (dpolab.trajectory). Notation as in dpolab.diagnostics: per pair,
h = logratio_chosen - logratio_rejected (nats), the reward margin beta * h; the chosen
displacement logratio_chosen = log pi(y_w) - log pi_ref(y_w). A run without pair files (an
earlier dpolab, or one stopped before its first evaluation) gets no section.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dpolab import trajectory
from dpolab.ches import spearman
from dpolab.diagnostics import TIE, unflippable_threshold
from dpolab.htmlpage import subplots
from dpolab.report_figures import Figure, _finish, _png

NO_GROUP = "(no group)"


def load(run_dir: Path) -> dict[str, trajectory.Trajectory] | None:
    """The run's trajectories, or None when it kept none yet (a damaged file stays an
    error)."""
    if (not (trajectory.folder(run_dir) / "index.json").exists()
            or not trajectory.step_files(run_dir)):
        return None
    return trajectory.read_trajectories(run_dir)


def _groups(t: trajectory.Trajectory) -> tuple[list[str], np.ndarray]:
    names = [g if g is not None else NO_GROUP for g in t.groups]
    order = sorted(set(names))
    return order, np.array([order.index(g) for g in names])


def _color(i: int) -> str:
    return f"C{i % 10}"


def figures(trajs: dict[str, trajectory.Trajectory], out: Path) -> list[Figure]:
    """Margins of every pair, the fraction flipped per group, when each pair's chosen
    log-prob fell below the reference, and CHES against the final chosen displacement."""
    figs: list[Figure] = []
    held = trajs.get("held_out")
    if held is not None:
        figs += [_margins(held, out), _flipped(trajs, out), _displaced(held, out)]
    scatter = _ches_scatter(trajs, out)
    if scatter is not None:
        figs.append(scatter)
    return figs


def _margins(t: trajectory.Trajectory, out: Path) -> Figure:
    names, gid = _groups(t)
    h = t.margins / t.beta if t.beta > 0 else t.margins  # (T, N) nats
    fig, ax = subplots(figsize=(9, 4))
    alpha = float(np.clip(8.0 / math.sqrt(h.shape[1]), 0.15, 0.8))
    for j in range(h.shape[1]):
        ax.plot(t.steps, h[:, j], color=_color(gid[j]), lw=0.7, alpha=alpha)
    for i, g in enumerate(names):  # one legend entry per group: its median, drawn thick
        ax.plot(t.steps, np.median(h[:, gid == i], axis=1), color=_color(i), lw=2.5,
                label=f"{g} (median)")
    if t.beta > 0:
        bound = unflippable_threshold(t.beta)
        ax.axhline(bound, color="black", ls="--", lw=1, label=f"log(3)/beta = {bound:.2f}")
    ax.axhline(0, color="grey", lw=0.8)
    _finish(ax, ylabel="h = log-ratio chosen - rejected (nats)")
    return ("Every held-out pair's margin", _png(fig, out / "pair_margins.png"),
            f"Each thin line is one held-out pair ({h.shape[1]}), coloured by group; thick lines "
            "are the groups' medians. h > 0: the pair is flipped (the policy moved towards the "
            "chosen response relative to the reference). DPO's reward margin beta * h ends at "
            "most near log 3 (diverse-values paper, Theorem 4.2): the dashed line is that bound "
            "in h; a pair the reference dispreferred by more than it stays dispreferred.")


def _flipped(trajs: dict[str, trajectory.Trajectory], out: Path) -> Figure:
    fig, ax = subplots(figsize=(9, 3.5))
    held = trajs["held_out"]
    names, _ = _groups(held)
    for split, ls, tag in (("held_out", "-", "held-out"), ("train", ":", "train")):
        t = trajs.get(split)
        if t is None:
            continue
        tn, gid = _groups(t)
        flipped = t.margins > t.beta * TIE  # (T, N)
        for g in tn:
            sel = gid == tn.index(g)
            color = _color(names.index(g)) if g in names else "grey"
            kw = dict(ls="none", marker="o", ms=5) if len(t.steps) <= 2 else dict(ls=ls)
            ax.plot(t.steps, flipped[:, sel].mean(1), color=color, label=f"{g} ({tag})", **kw)
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, ylabel="fraction flipped (h > 0)")
    return ("Pairs flipped over training", _png(fig, out / "pair_flipped.png"),
            "Per group, the fraction of pairs whose log-ratio margin h is positive at each "
            "evaluation; training pairs (points) are scored before and after training only.")


def _displaced(t: trajectory.Trajectory, out: Path) -> Figure:
    names, gid = _groups(t)
    first = t.first_displaced()
    never = first < 0
    # rows: by group, then those displaced earliest first, never-displaced last
    order = np.lexsort((np.where(never, np.iinfo(np.int64).max, first), gid))
    lr = t.logratio_chosen[:, order].T  # (N, T)
    lim = float(np.quantile(np.abs(lr), 0.98)) or 1.0
    fig, ax = subplots(figsize=(9, min(9.0, 2.0 + 0.03 * len(order))))
    im = ax.imshow(lr, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest",
                   extent=(-0.5, len(t.steps) - 0.5, len(order) - 0.5, -0.5))
    ax.set_xticks(range(len(t.steps)), [str(s) for s in t.steps])
    bounds = np.flatnonzero(np.diff(gid[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="black", lw=0.8)
    starts = np.concatenate([[-0.5], bounds, [len(order) - 0.5]])
    ax.set_yticks((starts[:-1] + starts[1:]) / 2, [names[i] for i in sorted(set(gid))])
    fig.colorbar(im, ax=ax, label="log pi(y_w) - log pi_ref(y_w) (nats)")
    ax.set(xlabel="optimizer step (evaluation)")
    n_fell = int((t.logratio_chosen[-1] < -TIE).sum())
    return ("When each pair's chosen response was displaced", _png(fig, out / "pair_displaced.png"),
            f"One row per held-out pair, grouped, earliest displaced first; red: the chosen "
            f"response's log-prob is below the reference's (likelihood displacement). At the "
            f"last evaluation {n_fell} of {len(order)} pairs are displaced.")


def ches_findings(trajs: dict[str, trajectory.Trajectory]) -> list[dict[str, Any]]:
    """Per split with CHES: Spearman rho of CHES (and LN-CHES) with the chosen displacement
    at the last evaluation, over the pairs (the paper predicts rho < 0)."""
    out = []
    for split in ("train", "held_out"):
        t = trajs.get(split)
        if t is None or t.ches is None or not t.reference or len(t.steps) < 2:
            continue
        d = t.logratio_chosen[-1]
        out.append({"split": split, "pairs": len(d), "step": int(t.steps[-1]),
                    "spearman_ches": spearman(t.ches, d),
                    "spearman_ln_ches": spearman(t.ln_ches, d),
                    "chosen_displaced_fraction": float(np.mean(d < -TIE))})
    return out


def _ches_scatter(trajs: dict[str, trajectory.Trajectory], out: Path) -> Figure | None:
    found = ches_findings(trajs)
    if not found:
        return None
    fig, axes = subplots(1, len(found), figsize=(5 * len(found) + 2, 4), squeeze=False)
    names = _groups(trajs.get("held_out") or next(iter(trajs.values())))[0]
    for ax, f in zip(axes[0], found):
        t = trajs[f["split"]]
        tn, gid = _groups(t)
        for i, g in enumerate(tn):
            sel = gid == i
            ax.scatter(t.ches[sel], t.logratio_chosen[-1, sel], s=12, alpha=0.7,
                       color=_color(names.index(g)) if g in names else "grey", label=g)
        ax.axhline(0, color="grey", lw=0.8)
        # CHES sums hidden states over tokens: a few long pairs reach far out, most sit near
        # 0; a linear scale within the middle quarter's |CHES|, logarithmic beyond, shows both.
        mid = float(np.quantile(np.abs(t.ches), 0.25)) if len(t.ches) else 0.0
        if mid > 0 and np.ptp(t.ches) > 100 * mid:
            ax.set_xscale("symlog", linthresh=mid, linscale=2.0)
            decades = range(math.ceil(math.log10(mid)) + 1,
                            math.ceil(math.log10(np.abs(t.ches).max())) + 1)
            ax.set_xticks(sorted([0.0, *(s * 10.0 ** k for k in decades for s in (-1, 1))]))
        ax.set_title(f"{f['split']} pairs: Spearman rho = {_rho(f['spearman_ches'])}",
                     fontsize=10)
        _finish(ax, xlabel="CHES at the reference", ylabel="chosen displacement at the end "
                "(nats)", legend=ax is axes[0][-1])
    return ("CHES against chosen displacement", _png(fig, out / "pair_ches.png"),
            "Each point is a pair: its CHES score (Razin et al., ICLR 2025) from the reference's "
            "hidden states before training, against how far its chosen log-prob moved from the "
            "reference by the end (x axis linear near 0, logarithmic beyond, when CHES spans "
            "decades). The paper predicts that higher CHES means more displacement: points "
            "falling to the right, a negative rank correlation.")


def _rho(x: float) -> str:
    return f"{x:+.3f}" if math.isfinite(x) else "n/a"


def notes(trajs: dict[str, trajectory.Trajectory]) -> list[str]:
    """What the paper predicts and what this run found, in sentences."""
    found = ches_findings(trajs)
    if not found:
        return []
    said = ["CHES (centered hidden-embedding similarity of the chosen and rejected responses, "
            "Razin et al., 'Unintentional Unalignment', ICLR 2025) predicts that pairs with "
            "higher CHES see their chosen response's likelihood fall more: a negative Spearman "
            "correlation between CHES and the chosen log-ratio log pi(y_w) - log pi_ref(y_w)."]
    for f in found:
        rho = f["spearman_ches"]
        verdict = ("as predicted" if rho < -0.1 else "against the prediction" if rho > 0.1
                   else "no clear relation" if math.isfinite(rho)
                   else "not measurable: fewer than 3 pairs, or all equal")
        said.append(f"This run, {f['split']} pairs ({f['pairs']}, step {f['step']}): Spearman "
                    f"rho(CHES, chosen displacement) = {_rho(rho)} ({verdict}); length-"
                    f"normalised CHES {_rho(f['spearman_ln_ches'])}; "
                    f"{f['chosen_displaced_fraction']:.0%} of the pairs end displaced.")
    return said
