"""`dpolab reproduce misspecification`: figures and report.html for the misspecified-bandit
experiment (:mod:`dpolab.theory.bandit`), and its `cli_main`.

Reward vectors are drawn in the plane of reward differences (x, y) = (r1 - r3, r2 - r3):
Bradley-Terry labels and every DPO-family loss see rewards only up to a constant, so this plane
loses nothing. There the implicit rewards beta log(pi_theta/pi0) are exactly the line
y = -x (x = beta theta), r* = (1, 2) lies off it, and the null space of A adds the direction
(1, 1), along which the rewards of one RLHF equivalence class lie.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dpolab import htmlpage
from dpolab.losses import dpo_loss
from dpolab.theory.bandit import (METHODS, PAIRS, BanditSetting, check_setting, format_table,
                                  sweep, table)

_STYLE = {  # method -> (colour, marker, linestyle)
    "base": ("0.4", "o", ":"), "DPO": ("tab:red", "s", "-"), "IPO": ("tab:orange", "^", "-"),
    "DPOP": ("tab:purple", "v", "-"), "AuxDPO": ("tab:green", "D", "-"),
    "RLHF": ("tab:blue", "*", "--"), "RLHF-linearised": ("tab:cyan", "P", "--"),
}


def _diff(reward: list[float]) -> tuple[float, float]:
    """(r1 - r3, r2 - r3): a reward vector modulo constants."""
    return reward[0] - reward[2], reward[1] - reward[2]


def projection_objective(x: np.ndarray, y: np.ndarray, setting: BanditSetting) -> np.ndarray:
    """sum_ij n_ij [p_ij l(i > j) + (1 - p_ij) l(j > i)] with l the DPO loss at beta = 1 and
    the reward r = (x, y, 0) in place of the log-ratio: the weighted KL of Prop. 1 up to a
    constant. x, y same shape; returns that shape."""
    r = torch.stack([torch.as_tensor(x, dtype=torch.float64),
                     torch.as_tensor(y, dtype=torch.float64),
                     torch.zeros(np.shape(x), dtype=torch.float64)])  # (3, ...)
    zero = torch.zeros(np.shape(x), dtype=torch.float64)
    total = torch.zeros(np.shape(x), dtype=torch.float64)
    for (i, j), n in zip(PAIRS, setting.counts):
        p = 1.0 / (1.0 + np.exp(-(setting.r_star[i] - setting.r_star[j])))
        total += n * (p * dpo_loss(r[i], r[j], zero, zero, beta=1.0)
                      + (1 - p) * dpo_loss(r[j], r[i], zero, zero, beta=1.0))
    return total.numpy()


def _geometry_panel(ax, setting: BanditSetting, rows: list[dict], title: str) -> None:
    r_star = _diff(list(setting.r_star))
    pts = {r["method"]: _diff(r["reward"]) for r in rows}
    span = 1.3 * max(3.0, *(abs(v) for p in pts.values() for v in p))
    g = np.linspace(-span, span, 241)
    X, Y = np.meshgrid(g, g)
    Z = projection_objective(X, Y, setting)
    levels = np.quantile(Z, np.linspace(0.0, 0.6, 14) ** 2)
    ax.contour(X, Y, Z, levels=np.unique(levels), colors="0.75", linewidths=0.7)
    ax.plot(g, -g, color="k", lw=1.6, label="implicit rewards span(A$^T$)")
    ax.plot(g, g + (r_star[1] - r_star[0]), color="tab:green", lw=0.8, ls=":",
            label="r* + N(A) (RLHF class of r*)")
    ax.plot(*r_star, marker="*", color="gold", mec="k", ms=16, ls="none", label="r*")
    for m in METHODS:
        if m == "base":
            continue
        colour, marker, _ = _STYLE[m]
        ax.plot(*pts[m], marker=marker, color=colour, mec="k", ms=8, ls="none", label=m)
    ax.axhline(0, color="0.85", lw=0.5)
    ax.axvline(0, color="0.85", lw=0.5)
    ax.set(xlim=(-span, span), ylim=(-span, span), aspect="equal", title=title,
           xlabel="r(a1) - r(a3)", ylabel="r(a2) - r(a3)")


def geometry_figure(setting: BanditSetting, rows: list[dict], path: Path) -> Path:
    """Two panels, the given counts and balanced counts: contours of the weighted-KL objective
    in reward-difference space, the implicit-reward line, and where each method lands."""

    balanced = replace(setting, counts=(1.0, 1.0, 1.0))
    fig, axes = htmlpage.subplots(1, 2, figsize=(12, 5.6))
    n = ", ".join(f"{c:g}" for c in setting.counts)
    _geometry_panel(axes[0], setting, rows, f"counts (n12, n23, n31) = ({n})")
    _geometry_panel(axes[1], balanced, table(balanced), "counts (1, 1, 1)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"Learned rewards in the plane of reward differences (beta = {setting.beta:g}); "
                 "grey: weighted KL to p(r*), DPO's projection objective", fontsize=10)
    return htmlpage.save_figure(fig, path)


def sweep_figure(sweep: dict, *, xlabel: str, path: Path, base: float,
                 betas: list[float]) -> Path:
    """E_pi[r*] (left) and beta * theta (right; = r(a1) - r(a3) of the implicit reward, which
    keeps small-beta runs on one scale) of every method against one swept setting (log x).
    betas: the beta of each swept point."""

    fig, (ax_r, ax_t) = htmlpage.subplots(1, 2, figsize=(12, 4.4))
    x = sweep["values"]
    for m in METHODS:
        colour, _, ls = _STYLE[m]
        ax_r.plot(x, sweep["expected_reward"][m], color=colour, ls=ls, label=m)
        ax_t.plot(x, np.multiply(betas, sweep["theta"][m]), color=colour, ls=ls, label=m)
    ax_r.axhline(base, color="0.4", lw=0.6)
    ax_r.set(xscale="log", xlabel=xlabel, ylabel="E_pi[r*]",
             title="expected true reward (below the grey line: degradation)")
    ax_t.axhline(0, color="0.4", lw=0.6)
    ax_t.set(xscale="log", xlabel=xlabel, ylabel="beta * theta",
             title="optimal beta * theta (> 0 promotes a1 over a2: reversal)")
    ax_t.legend(fontsize=8)
    return htmlpage.save_figure(fig, path)


def write_report(result: dict, setting: BanditSetting, out: Path) -> Path:
    """Figures (PNG) and report.html in out; returns the report's path."""
    rows = result["table"]
    base = next(r["expected_reward"] for r in rows if r["method"] == "base")
    geo = geometry_figure(setting, rows, out / "geometry.png")
    by_n31, by_beta = result["sweeps"]["n31"], result["sweeps"]["beta"]
    s_n = sweep_figure(by_n31, xlabel="n31 (n12 = %g, n23 = %g)" % setting.counts[:2],
                       path=out / "sweep_n31.png", base=base,
                       betas=[setting.beta] * len(by_n31["values"]))
    s_b = sweep_figure(by_beta, xlabel="beta", path=out / "sweep_beta.png", base=base,
                       betas=by_beta["values"])
    columns = ["method", "theta", "policy", "expected_reward", "reversal", "degradation",
               "order", "policy_order", "policy_reversal"]
    blocks = [
        htmlpage.para(
            "Policy pi_theta = softmax([theta, -theta, 0]), reference theta0 = 0 (uniform), true "
            "reward r* = [1, 2, 0], soft Bradley-Terry labels p_ij = sigma(r*_i - r*_j) on the "
            f"pairs (1,2), (2,3), (3,1) with counts {tuple(setting.counts)}, beta = "
            f"{setting.beta:g}, DPOP lambda = {setting.dpop_lambda:g}. Each row is the exact "
            "population optimum (solved to 1e-8 or better)."),
        htmlpage.heading("Population optima"),
        htmlpage.table(rows, columns),
        htmlpage.para(
            "order: ranking of the learned reward beta log(pi/pi0) (+ delta for AuxDPO); "
            "reversal: that ranking puts some pair strictly against r*. policy_order / "
            "policy_reversal: the same for pi itself. This family cannot rank a2 > a1 > a3 with "
            "its policy, so AuxDPO's correct order is that of its reward r_theta + delta; its "
            "policy is the linearised RLHF policy. degradation: E_pi[r*] below the reference's."),
        htmlpage.para(
            "The paper's table (DPO 0.895, IPO 0.969, DPOP 0.969, AuxDPO 1.199) is these "
            "expected rewards truncated to three decimals."),
        htmlpage.pre(format_table(rows)),
        htmlpage.heading("Geometry"),
        htmlpage.image(geo, "DPO is a weighted-KL projection of r* onto the implicit-reward "
                            "line; where it lands depends on the counts. AuxDPO's delta "
                            "moves along N(A) and reaches r* itself."),
        htmlpage.heading("Sweeps"),
        htmlpage.image(s_n, "Against n31: the more (3,1) pairs, the further DPO moves toward "
                            "a1 (theta > 0) and below the reference's reward."),
        htmlpage.image(s_b, "Against beta (counts as above). AuxDPO and linearised RLHF "
                            "coincide (theta = -1/(2 beta) for every beta and every count)."),
    ]
    if "real" in result:  # dpolab reproduce misspecification --real
        from dpolab.theory.bandit_real import report_blocks
        blocks += report_blocks(result["real"])
    if "real_bandit" in result:  # --real-bandit
        from dpolab.theory import misspec_real
        blocks += misspec_real.report_blocks(
            result["real_bandit"], misspec_real.make_figures(result["real_bandit"], out))
    return htmlpage.write_page(out / "report.html",
                               "DPO as a misspecified estimator: the 3-response bandit", blocks)


# ---------------------------------------------------------------------------------------
# dpolab reproduce misspecification


def _real_bandit(args) -> dict:
    """--real-bandit: the settings the flags ask for, run (:mod:`misspec_real`)."""
    from dataclasses import replace

    from dpolab.models import dpolab_cache_dir
    from dpolab.theory import auxdpo_heldout, bandit_geometry, misspec_real, values_persona

    geometry = bandit_geometry.GeometrySetting(model=args.model, directions=args.directions)
    heldout = auxdpo_heldout.HeldoutSetting()
    persona = values_persona.PersonaConfig(model=args.model)
    if args.quick:
        geometry = replace(geometry, directions=min(args.directions, 2), lora_directions=2)
        heldout = replace(heldout, seeds=1, dominant=8, minority=2)
        persona = replace(persona, q=8, held=8, steps=40)
    return misspec_real.run(geometry, heldout, persona,
                            store_dir=dpolab_cache_dir() / "values_persona")


def _parse_counts(text: str) -> tuple[float, float, float]:
    from dpolab.errors import UserError
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--counts must be three numbers n12,n23,n31, got {text!r}") from None
    if len(vals) != 3:
        raise UserError(f"--counts needs three numbers n12,n23,n31, got {len(vals)}: {text!r}")
    return vals  # type: ignore[return-value]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, no usage dump) instead of exiting 2."""

    def error(self, message: str):  # type: ignore[override]
        from dpolab.errors import UserError
        raise UserError(message)


def cli_main(argv: list[str]) -> int:
    """dpolab reproduce misspecification [--out DIR] [--counts a,b,c] [--beta B]
    [--dpop-lambda L] [--real [--real-steps N] [--real-groups g1,g2,..] ...]: the table, the
    sweeps, figures and report.html. --real runs, in addition to the bandit, DPO vs AuxDPO on
    a real model with one value group dominant (:mod:`dpolab.theory.bandit_real`), written
    under "real" in results.json and as the last section of report.html."""
    from dpolab.errors import UserError
    from dpolab.theory.bandit_real import (add_real_arguments, format_real_table,
                                           real_setting_from_args, run_experiment)
    parser = _Parser(
        prog="dpolab reproduce misspecification",
        description="The 3-response bandit on which DPO is a misspecified estimator "
                    "(arXiv 2510.20413, Prop. 3): population optima of DPO, IPO, DPOP, AuxDPO "
                    "and RLHF.")
    parser.add_argument("--out", default="runs/misspecification", help="output directory")
    parser.add_argument("--counts", default="1,1,10", help="pair counts n12,n23,n31")
    parser.add_argument("--beta", type=float, default=1.0, help="beta (> 0)")
    parser.add_argument("--dpop-lambda", type=float, default=1.0, help="DPOP lambda (>= 0)")
    add_real_arguments(parser)
    parser.add_argument("--real-bandit", action="store_true",
                        help="the bandit on a real model's geometry (random head and rank-1 "
                             "LoRA directions) and AuxDPO vs DPO on held-out persona statements")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model of --real-bandit (name, folder or .gguf)")
    parser.add_argument("--directions", type=int, default=20,
                        help="--real-bandit: random directions per family (>= 1)")
    parser.add_argument("--quick", action="store_true",
                        help="--real-bandit: 2 directions, 1 seed, short runs (CI)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # only --help exits here: bad flags raise through _error
        return int(exc.code or 0)
    real = real_setting_from_args(args)  # None without --real
    if args.directions < 1:
        raise UserError(f"--directions must be >= 1, got {args.directions}")
    setting = BanditSetting(counts=_parse_counts(args.counts), beta=args.beta,
                            dpop_lambda=args.dpop_lambda)
    try:
        check_setting(setting)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(setting)
    sweeps = {"n31": sweep(setting, over="n31", values=np.logspace(-1, 2, 61).tolist()),
              "beta": sweep(setting, over="beta", values=np.logspace(-1, 1, 41).tolist())}
    result = {"setting": asdict(setting), "table": rows, "sweeps": sweeps}
    if real is not None:
        result["real"] = run_experiment(real, out / "real")
    if args.real_bandit:
        result["real_bandit"] = _real_bandit(args)
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_report(result, setting, out)
    print(format_table(rows))
    if real is not None:
        print(format_real_table(result["real"]))
    if args.real_bandit:
        from dpolab.theory.misspec_real import format_text
        print(format_text(result["real_bandit"]))
    print(f"wrote {out / 'results.json'}, {out / 'report.html'}")
    return 0
