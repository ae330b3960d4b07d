"""The DID mechanism across value groups on a real model (arXiv 2505.23761, Sec. 5): one
`last_layer` run of the embedded default per group, then the DID probe.

Prediction (the paper's entropy analysis): learning high-entropy differential information
smooths the policy and displaces likelihood, learning low-entropy DID sharpens it. Across
groups, the DID entropy H(DID) of the trained policy against its reference should therefore
rank *negatively* against the change of the chosen responses' log-likelihood on held-out
pairs, Delta log pi(y_w) (Spearman rho < 0), and positively against the policy's entropy
change.

Per group: `dpolab train` with the embedded default's settings and data.groups=[group], the
DID probe with `did_samples` samples per held-out prompt (dpolab.did_probe: H(DID) by
importance sampling, the policy's entropy by Monte Carlo, the reference's by self-normalised
weights from the same samples). Delta log pi(y_w) is eval/displacement/chosen at the end: the
mean over held-out pairs of log pi(y_w) - log pi_ref(y_w). A group's finished run directory
is reused when its config.yaml is the one this run would write (so a second run reads seven
summaries instead of training again).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KEYS = {"did_entropy": "eval/did/entropy", "did_kl": "eval/did/kl",
        "policy_entropy": "eval/did/policy_entropy", "ref_entropy": "eval/did/ref_entropy",
        "entropy_change": "eval/did/entropy_change",
        "delta_logp_chosen": "eval/displacement/chosen",
        "delta_logp_rejected": "eval/displacement/rejected",
        "accuracy": "eval/rewards/accuracies", "margin": "eval/rewards/margins"}


@dataclass(frozen=True)
class DidRealSetting:
    model: str = "smollm2-135m-instruct"
    groups: tuple[str, ...] = ("factual", "bias", "sycophancy", "deception", "refusal",
                               "overrefusal", "reasoning")
    did_samples: int = 32  # samples per held-out prompt
    extra: tuple[str, ...] = ()  # further `section.key=value` overrides (the quick form)


def overrides(s: DidRealSetting, group: str) -> list[str]:
    """The default run's settings for one group; nothing else changes."""
    return [f"model.name={s.model}", f"data.groups=[{group}]",
            f"train.did_samples={s.did_samples}", "train.progress=false", "train.report=false",
            "train.save_every=0", *s.extra]


def run_group(s: DidRealSetting, group: str, out: Path) -> tuple[Path, bool]:
    """Train (or reuse) one group's run; returns (run directory, reused)."""
    from dpolab import config as C
    from dpolab.train import train

    cfg = C.build_config(C.apply_overrides({"out": str(out)}, overrides(s, group)),
                         source="did --real")
    if (out / "summary.json").exists() and (out / "config.yaml").exists():
        previous = C.build_config(C.load_yaml(out / "config.yaml"), source=str(out))
        if previous == cfg:
            return out, True
    if out.exists():
        shutil.rmtree(out)  # an unfinished or different run of this command's own folder
    run_dir = train(cfg)
    for heavy in ("model", "checkpoints"):  # the weights are not needed again
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return run_dir, False


def group_row(run_dir: Path, group: str) -> dict[str, Any]:
    from dpolab.rundir import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    before, after = evals[0], evals[-1]
    out = {"group": group}
    for name, key in KEYS.items():
        out[name] = float(after[key]) if key in after else None
    out["accuracy_before"] = float(before["eval/rewards/accuracies"])
    out["steps"] = int(max(r.get("step", 0) for r in rows))
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rho and its two-sided p (scipy), NaN for fewer than 3 points."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return {"rho": float("nan"), "p": float("nan"), "n": len(x)}
    r = spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": len(x)}


def run(s: DidRealSetting, out: Path, *, log=print) -> dict[str, Any]:
    """Every group's run and the rank correlations: results.json's "real" entry."""
    t0 = time.perf_counter()
    rows = []
    for group in s.groups:
        t = time.perf_counter()
        run_dir, reused = run_group(s, group, out / "runs" / group)
        rows.append(group_row(run_dir, group) | {"reused": reused,
                                                  "wall_s": time.perf_counter() - t})
        r = rows[-1]
        log(f"did --real: {group}: H(DID) {r['did_entropy']:.3f}, delta log pi(y_w) "
            f"{r['delta_logp_chosen']:+.4f}, entropy change {r['entropy_change']:+.4f}"
            f"{' (reused)' if reused else ''}")
    h = [r["did_entropy"] for r in rows]
    corr = {"did_entropy_vs_delta_logp_chosen": spearman(h, [r["delta_logp_chosen"] for r in rows]),
            "did_entropy_vs_entropy_change": spearman(h, [r["entropy_change"] for r in rows])}
    rho = corr["did_entropy_vs_delta_logp_chosen"]["rho"]
    return {"setting": asdict(s), "groups": rows, "spearman": corr,
            "prediction": "rho(H(DID), delta log pi(y_w)) < 0",
            "agrees": bool(np.isfinite(rho) and rho < 0), "wall_s": time.perf_counter() - t0}


def format_text(res: dict[str, Any]) -> str:
    lines = ["", f"{'group':<13}{'H(DID)':>9}{'KL':>9}{'dH(pi)':>9}{'dlogp(y_w)':>12}"
                 f"{'dlogp(y_l)':>12}{'acc':>7}"]
    for r in res["groups"]:
        lines.append(f"{r['group']:<13}{r['did_entropy']:>9.3f}{r['did_kl']:>9.4f}"
                     f"{r['entropy_change']:>+9.3f}{r['delta_logp_chosen']:>+12.4f}"
                     f"{r['delta_logp_rejected']:>+12.4f}{r['accuracy']:>7.3f}")
    for name, c in res["spearman"].items():
        lines.append(f"Spearman {name}: rho {c['rho']:+.3f} (p {c['p']:.3g}, n {c['n']})")
    lines.append(f"prediction {res['prediction']}: {'agrees' if res['agrees'] else 'does not agree'}")
    return "\n".join(lines)


def make_figure(res: dict[str, Any], out: Path) -> Path:
    from dpolab import htmlpage

    fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4))
    h = [r["did_entropy"] for r in res["groups"]]
    for ax, key, label in ((axes[0], "delta_logp_chosen", "Δ mean log π(y_w), held-out"),
                           (axes[1], "entropy_change", "H(π) − H(π_ref) (estimated)")):
        ys = [r[key] for r in res["groups"]]
        ax.plot(h, ys, "o")
        for r, x, y in zip(res["groups"], h, ys):
            ax.annotate(r["group"], (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        name = f"did_entropy_vs_{key}"
        c = res["spearman"].get(name)
        ax.set(xlabel="H(DID) of the trained policy", ylabel=label,
               title=f"Spearman ρ = {c['rho']:+.2f}" if c else "")
        ax.axhline(0, color="gray", lw=0.6)
    return htmlpage.save_figure(fig, out / "did_real.png")


def report_blocks(res: dict[str, Any], fig: Path) -> list[str]:
    from dpolab import htmlpage

    s = res["setting"]
    c = res["spearman"]["did_entropy_vs_delta_logp_chosen"]
    return [htmlpage.heading(f"Real model: DID across value groups ({s['model']})"),
            htmlpage.para(f"One last_layer run of the embedded default per group "
                          f"({', '.join(s['groups'])}), the DID probe with {s['did_samples']} "
                          f"samples per held-out prompt. Prediction: {res['prediction']}. "
                          f"Measured: rho = {c['rho']:+.3f} (p = {c['p']:.3g}, n = {c['n']}): "
                          f"{'agrees' if res['agrees'] else 'does not agree'}."),
            htmlpage.image(fig, "Per group: the DID entropy against the held-out chosen "
                                "log-likelihood change and the policy's entropy change."),
            htmlpage.table(res["groups"]),
            htmlpage.table([{"correlation": k, **v} for k, v in res["spearman"].items()])]
