"""`dpolab reproduce misspecification --real-bandit`: the bandit on a real model's geometry
(:mod:`dpolab.theory.bandit_geometry`) and AuxDPO vs DPO on held-out persona statements
(:mod:`dpolab.theory.auxdpo_heldout`): runs, tables, figures and the report section."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dpolab import htmlpage
from dpolab.theory import auxdpo_heldout as AH
from dpolab.theory import bandit_geometry as BG
from dpolab.theory import values_persona as VP


def run(geometry: BG.GeometrySetting, heldout: AH.HeldoutSetting, persona: VP.PersonaConfig,
        *, store_dir: Path | None, log=print) -> dict[str, Any]:
    """Both experiments; results.json's "real_bandit" entry."""
    t0 = time.perf_counter()
    bandit = BG.run(geometry, log=log)
    bandit["verdict"] = BG.verdict(bandit)
    t1 = time.perf_counter()
    st = VP.build_states(persona, store_dir=store_dir, progress=True)
    recipe, k1, kept = VP.recipe_and_filter(st, persona, log=log)
    held = AH.run(st, kept, recipe, persona, heldout, log=log)
    held["verdict"] = AH.verdict(held)
    held["recipe"] = {opt: r["lr"] for opt, r in recipe.items()}
    held["kept"] = kept
    held["persona_config"] = asdict(persona)
    held["states_cache_hit"] = st.info["cache_hit"]
    return {"bandit": bandit, "heldout": held,
            "timings": {"bandit_s": t1 - t0, "heldout_s": time.perf_counter() - t1}}


def format_text(res: dict[str, Any]) -> str:
    b, h = res["bandit"], res["heldout"]
    lines = ["", "real-model bandit: share of directions whose optimum lowers E[r*]",
             f"{'family':<7}{'counts':<16}" + "".join(f"{m:>9}" for m in BG.METHODS)]
    for f in b["fractions"]:
        lines.append(f"{f['family']:<7}{str(tuple(int(c) for c in f['counts'])):<16}"
                     + "".join(f"{f[m]:>9.2f}" for m in BG.METHODS))
    v = b["verdict"]
    lines.append(f"reproduced (head, (1,1,10): DPO >= 0.30, AuxDPO = RLHF = 0): "
                 f"{v['reproduced']} {v.get('values', '')}")
    if "comparisons" in h:
        lines += ["", "held-out persona statements, one group dominant 10:1:1 (AuxDPO - DPO)",
                  f"{'optimizer':<10}{'method':<24}{'minority gain':>14}{'sign p':>9}"
                  f"{'dominant':>10}{'mean |delta|':>13}{'helps':>7}"]
        for c in h["comparisons"]:
            lines.append(f"{c['optimizer']:<10}{c['method']:<24}{c['minority_gain_mean']:>+14.4f}"
                         f"{c['sign_test_p']:>9.3g}{c['dominant_change_mean']:>+10.4f}"
                         f"{c['delta_abs_mean']:>13.3g}{str(c['helps']):>7}")
        lines.append(f"verdict: {h['verdict']['summary']}")
    else:
        lines.append(f"held-out experiment: {h.get('skipped')}")
    return "\n".join(lines)


def make_figures(res: dict[str, Any], out: Path) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    b = res["bandit"]
    fam_counts = [(f["family"], f["counts"]) for f in b["fractions"]]
    fig, ax = htmlpage.subplots(figsize=(11, 4))
    width = 0.8 / len(BG.METHODS)
    for j, m in enumerate(BG.METHODS):
        ax.bar(np.arange(len(fam_counts)) + j * width, [f[m] for f in b["fractions"]], width,
               label=m)
    ax.set_xticks(np.arange(len(fam_counts)) + 0.4 - width / 2,
                  [f"{f} {tuple(int(c) for c in cs)}" for f, cs in fam_counts], fontsize=8)
    ax.set(ylabel="share of directions lowering E[r*]", ylim=(0, 1.05),
           title="Optima on random one-parameter directions through " + b["setting"]["model"])
    ax.legend(fontsize=8)
    figs["fractions"] = htmlpage.save_figure(fig, out / "real_bandit_fractions.png")

    fig, ax = htmlpage.subplots(figsize=(6, 4.5))
    mine = [r for r in b["runs"] if r["counts"] == [1.0, 1.0, 10.0]]
    for m, marker in zip(BG.METHODS, "o^sDx"):
        ref = [next(x for x in r["rows"] if x["method"] == m)["expected_reward_ref"] for r in mine]
        got = [next(x for x in r["rows"] if x["method"] == m)["expected_reward"] for r in mine]
        ax.plot(ref, np.array(got) - np.array(ref), marker, label=m, alpha=0.7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="E_pi0[r*]", ylabel="E_pi[r*] - E_pi0[r*] at the optimum",
           title="counts (1, 1, 10), every direction")
    ax.legend(fontsize=8)
    figs["gains"] = htmlpage.save_figure(fig, out / "real_bandit_gains.png")

    h = res["heldout"]
    if "comparisons" in h:
        fig, axes = htmlpage.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, opt in zip(axes, VP.OPTIMIZERS):
            rows = [c for c in h["comparisons"] if c["optimizer"] == opt]
            x = np.arange(len(rows))
            ax.bar(x - 0.2, [c["minority_gain_mean"] for c in rows], 0.4, label="minority")
            ax.bar(x + 0.2, [c["dominant_change_mean"] for c in rows], 0.4, label="dominant")
            ax.axhline(AH.MIN_GAIN, color="k", ls="--", lw=0.8)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xticks(x, [c["method"].replace("AuxDPO ", "") for c in rows], fontsize=8)
            ax.set(title=f"{opt}: AuxDPO - DPO, held-out accuracy")
        axes[0].legend(fontsize=8)
        figs["heldout"] = htmlpage.save_figure(fig, out / "real_heldout_auxdpo.png")
    return figs


def report_blocks(res: dict[str, Any], figs: dict[str, Path]) -> list[str]:
    b, h = res["bandit"], res["heldout"]
    s = b["setting"]
    blocks = [
        htmlpage.heading("Real model: the bandit on " + s["model"] + "'s geometry"),
        htmlpage.para(
            f"Prompt {b['texts'][0]!r}; replies a1 {b['texts'][1]!r}, a2 {b['texts'][2]!r}, a3 "
            f"{b['texts'][3]!r} ({b['reply_tokens']} tokens), r* = [1, 2, 0]; pi0 over the "
            f"three = {[round(p, 4) for p in b['pi0']]}. Policy classes: theta along "
            f"{s['directions']} random head directions (W0 + theta M) and "
            f"{s['lora_directions']} rank-1 LoRA directions on the last layer's "
            f"down-projection; beta {s['beta']}, DPOP lambda "
            f"{s['dpop_lambda']}, soft labels. AuxDPO exact: delta in the null space of the "
            f"pi0-weighted 1 x 3 gradient."),
        htmlpage.para("Reproduced when DPO lowers E[r*] in at least 30% of the head directions "
                      "under counts (1, 1, 10) and AuxDPO and RLHF in none: "
                      f"{b['verdict']['reproduced']} ({b['verdict'].get('values')})."),
        htmlpage.image(figs["fractions"], "Share of directions in which each method's "
                       "population optimum lowers the expected true reward."),
        htmlpage.image(figs["gains"], "Change of E[r*] at each optimum, one point per "
                       "direction (head and lora), counts (1, 1, 10)."),
        htmlpage.table(b["fractions"]),
        htmlpage.heading("Real model: AuxDPO vs DPO on held-out persona statements"),
    ]
    if "comparisons" not in h:
        return blocks + [htmlpage.para(f"Not run: {h.get('skipped')}.")]
    hs = h["setting"]
    blocks += [
        htmlpage.para(
            f"Two-row persona scope (the ' Yes'/' No' head rows; the trainer's token_rows "
            f"scope on these data), decodable groups {h['kept']}, per seed three of them, one "
            f"dominant ({hs['dominant']} training statements vs {hs['minority']} of each "
            f"other), both directions, {hs['seeds']} seeds; the values recipe (lr "
            f"{h['recipe']}, beta {h['persona_config']['beta']}, "
            f"{h['persona_config']['steps']} steps). AuxDPO exact: null space of A over the "
            f"{h['runs'][0]['responses']} training responses and "
            f"{h['runs'][0]['trained_parameters']} parameters, dimension "
            f"{next((r['null_dim'] for r in h['runs'] if r['null_dim'] is not None), 0)}. "
            f"Authors' form: cap {hs['cap']}, lambda_amp {hs['amp_weight']}, lambda_null in "
            f"{list(hs['null_weights'])}, aux_lr {hs['aux_lr_adam']} (Adam) / the head's lr "
            f"(GD)."),
        htmlpage.para(f"An AuxDPO variant helps when its minority-group held-out accuracy is "
                      f"at least +{AH.MIN_GAIN} above DPO's (sign test p < {AH.MAX_P}) and "
                      f"the dominant group loses at most {AH.MAX_DOMINANT_LOSS}. Verdict: "
                      f"{h['verdict']['summary']}."),
        htmlpage.image(figs["heldout"], "Mean paired difference AuxDPO - DPO of held-out "
                       "accuracy, minority and dominant groups; dashed: +0.05."),
        htmlpage.table(h["comparisons"]),
        htmlpage.heading("count sensitivity: a group's accuracy as dominant minus as minority", 3),
        htmlpage.table(h["count_sensitivity"]),
    ]
    return blocks
