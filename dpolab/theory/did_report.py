"""`dpolab reproduce did`: run the differential-information experiments of
:mod:`dpolab.theory.did`, write results.json, PNG figures and report.html.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpolab import htmlpage
from dpolab.theory import did

# DID temperatures of the entropy sweep: below ~0.5 the "novel" target is nearly one-hot and
# a finite fit no longer reaches it (the table's js_to_target column shows how close it gets).
SWEEP_TEMPERATURES = [float(t) for t in np.geomspace(0.5, 30.0, 9)]
MAX_RESPONSES = 512  # the population loss sums M^2 pairs per step


def run(*, responses: int, beta: float, seed: int) -> dict[str, Any]:
    """All experiments as one JSON-ready dict (keys: setting, js_table, entropy_sweep,
    closed_form_checks)."""
    s = did.make_setting(responses=responses, beta=beta, seed=seed)
    setting = {"responses": responses, "beta": beta, "seed": seed,
               "entropy_ref": float(did.entropy(s["logp_ref"])),
               "entropy_target": float(did.entropy(s["logp_target"])),
               "entropy_did": float(did.did_entropy(s["logp_target"], s["logp_ref"])),
               "max_entropy_log_m": math.log(responses),
               "lengths": [int(n) for n in s["lengths"]],
               "sweep_temperatures": SWEEP_TEMPERATURES,
               "data": "y_w ~ pi_ref, y_l ~ pi_l ∝ pi_ref^(1+beta)/pi*^beta, "
                       "p = sigma(log q_{pi_ref/pi_l}(y_w) - log q_{pi_ref/pi_l}(y_l))",
               "optimiser": "full softmax logits from log pi_ref; Adam (300 steps, cosine lr "
                            "from 0.05) then L-BFGS on the population loss, float64"}
    return {"setting": setting,
            "js_table": did.js_table(s, beta=beta),
            "entropy_sweep": did.entropy_sweep(responses=responses, beta=beta, seed=seed,
                                               temperatures=SWEEP_TEMPERATURES),
            "closed_form_checks": did.closed_form_checks(s, beta=beta, seed=seed),
            "_policies": {k: s[k].exp().tolist() for k in ("logp_ref", "logp_target", "logp_l")}
            | {"did": did.did(s["logp_target"], s["logp_ref"]).tolist()}}


def format_tables(results: dict[str, Any]) -> str:
    """The JS table and the entropy sweep as fixed-width text."""
    lines = [f"{'parameterisation':40s} {'JS to pi*':>10s} {'JS to DID':>10s} {'JS to c.f.':>10s}"]
    for r in results["js_table"]:
        lines.append(f"{r['parameterisation']:40s} {r['js_to_target']:10.2e} "
                     f"{r['js_to_did']:10.2e} {r['js_to_closed_form']:10.2e}")
    lines += ["", f"{'family':12s} {'tau':>7s} {'H(DID)':>8s} {'dH(pi)':>8s} "
              f"{'d loglik(y_w)':>14s} {'JS to pi*':>10s}"]
    for r in results["entropy_sweep"]:
        lines.append(f"{r['family']:12s} {r['temperature']:7.3f} {r['did_entropy']:8.3f} "
                     f"{r['policy_entropy_change']:+8.3f} {r['chosen_loglik_change']:+14.4f} "
                     f"{r['js_to_target']:10.2e}")
    return "\n".join(lines)


def make_figures(results: dict[str, Any], out: Path) -> list[tuple[Path, str]]:
    """Three PNGs: the policies, JS per reward form, and the entropy sweep."""

    figs = []
    pol = results["_policies"]
    order = np.argsort(pol["logp_ref"])[::-1]
    fig, ax = htmlpage.subplots(figsize=(8, 3.5))
    for key, label in (("logp_ref", "pi_ref"), ("logp_target", "pi*"),
                       ("did", "DID q_{pi*/pi_ref}"), ("logp_l", "pi_l (optimal rejected)")):
        ax.plot(np.asarray(pol[key])[order], marker=".", label=label)
    ax.set(yscale="log", xlabel="response (sorted by pi_ref)", ylabel="probability")
    ax.legend(fontsize=8)
    figs.append((htmlpage.save_figure(fig, out / "policies.png"),
                 "The reference, target, their DID and the closed-form rejected-response "
                 "sampler."))

    rows = results["js_table"]
    fig, ax = htmlpage.subplots(figsize=(8, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["js_to_target"] for r in rows], 0.4, label="JS to pi*")
    ax.bar(x + 0.2, [r["js_to_did"] for r in rows], 0.4, label="JS to DID")
    ax.set_xticks(x, [r["parameterisation"].split(" (")[0] for r in rows])
    ax.set_ylabel("Jensen-Shannon (nats)")
    ax.legend(fontsize=8)
    figs.append((htmlpage.save_figure(fig, out / "js.png"),
                 "Where each reward form converges: DPO's log-ratio reaches pi*, the "
                 "reference-free reward reaches the DID."))

    fig, axes = htmlpage.subplots(1, 2, figsize=(10, 3.8))
    for family in dict.fromkeys(r["family"] for r in results["entropy_sweep"]):
        fr = [r for r in results["entropy_sweep"] if r["family"] == family]
        h = [r["did_entropy"] for r in fr]
        axes[0].plot(h, [r["policy_entropy_change"] for r in fr], marker="o", label=family)
        axes[1].plot(h, [r["chosen_loglik_change"] for r in fr], marker="o", label=family)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(xlabel="DID entropy H(q)", ylabel="H(pi_theta) - H(pi_ref)")
    axes[1].set(xlabel="DID entropy H(q)", ylabel="E_{y_w~pi_ref}[log pi_theta - log pi_ref]")
    axes[1].set_yscale("symlog", linthresh=0.01)
    for ax in axes:
        ax.axvline(results["setting"]["max_entropy_log_m"], color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=8)
    figs.append((htmlpage.save_figure(fig, out / "entropy_sweep.png"),
                 "DPO trained towards pi* ∝ pi_ref q for DID families of rising entropy "
                 "(dotted: log M, the uniform DID)."))
    return figs



def write_report(results: dict[str, Any], figs: list[tuple[Path, str]], out: Path,
                 extra: list[str] = ()) -> Path:
    s = results["setting"]
    blocks = [
        htmlpage.para(f"Categorical policies over M = {s['responses']} responses, beta = "
                      f"{s['beta']}, seed {s['seed']}. Data: {s['data']}. Training: "
                      f"{s['optimiser']}. H(pi_ref) = {s['entropy_ref']:.3f}, H(pi*) = "
                      f"{s['entropy_target']:.3f}, H(DID) = {s['entropy_did']:.3f} nats."),
        htmlpage.heading("Which policy each reward learns"),
        htmlpage.table(results["js_table"]),
        htmlpage.heading("DID entropy and policy entropy"),
        htmlpage.para("'novel': the DID favours responses the reference finds unlikely; "
                      "'independent': the DID's scores are unrelated to the reference. The "
                      "chosen log-likelihood change equals -KL(pi_ref || pi_theta) and is "
                      "negative in every row, even where pi* is learned exactly."),
        htmlpage.table(results["entropy_sweep"]),
        htmlpage.heading("Closed-form checks"),
        htmlpage.table([{"check": k, "value": v} for k, v in results["closed_form_checks"].items()]),
        htmlpage.heading("Figures"),
        *(htmlpage.image(p, c) for p, c in figs),
        *extra,
    ]
    return htmlpage.write_page(out / "report.html", "Differential information (arXiv 2505.23761)",
                               blocks)


def _parse(argv: list[str]) -> argparse.Namespace:
    from dpolab.errors import UserError

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # one line, no usage dump, non-zero exit
            raise UserError(message)

    p = _Parser(prog="dpolab reproduce did",
                description="Differential information: DPO's log-ratio reward, the DID and "
                            "its entropy on synthetic categorical policies.")
    p.add_argument("--out", default="runs/did", help="output directory (default runs/did)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--responses", type=int, default=32, help="number of responses M (default 32)")
    p.add_argument("--beta", type=float, default=0.5, help="beta of the data and DPO (default 0.5)")
    p.add_argument("--real", action="store_true", help="also the DID across the default data's "
                   "7 value groups: one last_layer run per group and the DID probe")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model of --real")
    p.add_argument("--did-samples", type=int, default=32,
                   help="--real: samples per held-out prompt (default 32)")
    p.add_argument("--did-prompts", type=int, default=8,
                   help="--real: held-out prompts the probe samples (default 8)")
    p.add_argument("--quick", action="store_true", help="--real: tiny runs (CI)")
    args = p.parse_args(argv)
    if args.did_samples < 2 or args.did_prompts < 1:
        raise UserError(f"need --did-samples >= 2 and --did-prompts >= 1, got "
                        f"{args.did_samples}, {args.did_prompts}")
    if not 2 <= args.responses <= MAX_RESPONSES:
        raise UserError(f"--responses must be in [2, {MAX_RESPONSES}], got {args.responses}")
    if not (math.isfinite(args.beta) and 0 < args.beta <= 10):
        raise UserError(f"--beta must be in (0, 10], got {args.beta}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    return args


def cli_main(argv: list[str]) -> int:
    from dpolab.errors import UserError

    args = _parse(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {str(out)!r}: {err.strerror}") from None
    start = time.perf_counter()
    results = run(responses=args.responses, beta=args.beta, seed=args.seed)
    figs = make_figures(results, out)
    results.pop("_policies")
    extra: list[str] = []
    if args.real:
        from dpolab.theory import did_real

        setting = did_real.DidRealSetting(model=args.model, did_samples=args.did_samples,
                                          extra=(f"train.did_prompts={args.did_prompts}",))
        if args.quick:
            setting = did_real.DidRealSetting(
                model=args.model, groups=("factual", "refusal", "reasoning"),
                did_samples=min(args.did_samples, 4),
                extra=("data.per_group=4", "data.eval_per_group=2", "train.max_steps=2",
                       "train.did_prompts=2", "train.did_max_new_tokens=6"))
        results["real"] = did_real.run(setting, out)
        extra = did_real.report_blocks(results["real"], did_real.make_figure(results["real"], out))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = write_report(results, figs, out, extra)
    print(format_tables(results))
    if args.real:
        print(did_real.format_text(results["real"]))
    print(f"\nwrote {out / 'results.json'} and {report} in {time.perf_counter() - start:.1f} s")
    return 0
