"""The misspecified bandit on a real model: DPO vs AuxDPO with one preference group dominant.

The bandit of :mod:`dpolab.theory.bandit` shows that DPO's optimum is a projection of the true
reward onto the implicit-reward manifold weighted by the pair counts n_ij (arXiv 2510.20413,
Prop. 1): when one kind of comparison dominates, it decides where a low-capacity policy lands
and the rare comparisons can be learned backwards. AuxDPO adds per-response rewards delta in
N(A_theta0) (Sec. 4.2) so the fit no longer has to trade the groups against each other.

Here the "responses" are the chat pairs of the embedded multi-value data
(:mod:`dpolab.rho_data`), the counts are per value group, and the policy class is a trained
subset of a real model's parameters:

    last_layer   the output head only (body states cached once; AuxDPO's soft null-space
                 penalty ||A_B delta_B||^2 in closed form,
                 :func:`dpolab.auxdpo.head_gradient_penalty`)
    lora         rank-r adapters on q_proj, v_proj (AuxDPO accumulates the per-response
                 gradients of the reference once into G = A^T A before training: one backward
                 per response, about one epoch of extra cost)

Defaults. Groups refusal (dominant), overrefusal, factual: the three with the shortest pairs
(about 130, 130 and 110 tokens for prompt plus both replies). refusal and overrefusal pull in
opposite directions on the same surface feature (refusal sentences are chosen in one and
rejected in the other), which is the situation of the bandit's pairs (3,1) and (1,2): the
dominant comparison moves a shared direction that the minority one needs the other way.
Counts 30 / 3 / 3 training pairs (10x), 8 held-out pairs per group, beta 0.1, batch 6,
12 steps (2 epochs), lr 1e-4 (last_layer) and 1e-3 (lora, r = 2, alpha = 16), AuxDPO in soft
mode with the trainer's defaults (aux_lr 0.05, lambda_null 1, lambda_amp 0.01). DPO and AuxDPO
of one scope share seed, data order, steps and lr; nothing is tuned toward an outcome.

Metrics (held-out, from the run's evaluation lines; ties count half): accuracy = share of pairs
with implicit-reward margin h > 0 (0.5 for every group before training, where h = 0), margin =
beta * h, preference = share of pairs where the policy itself gives the chosen reply the higher
log-probability (before training: the reference's own preference).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

LOSSES = {"DPO": "dpo", "AuxDPO": "auxdpo"}  # display name -> dpolab.losses term
SCOPES = ("last_layer", "lora")
METRICS = ("accuracy", "margin", "preference")


@dataclass(frozen=True)
class RealSetting:
    """One real-model run of the imbalanced experiment; defaults are the documented ones."""

    model: str = "smollm2-135m-instruct"  # model name or folder (dpolab.models)
    groups: tuple[str, ...] = ("refusal", "overrefusal", "factual")  # first = dominant
    counts: tuple[int, ...] = (30, 3, 3)  # training pairs per group, in `groups` order
    eval_per_group: int = 8  # held-out pairs per group (equal for all groups)
    seed: int = 0  # split order, data order, LoRA initialisation
    beta: float = 0.1  # DPO / AuxDPO inverse temperature
    steps: int = 12  # optimizer steps per run (12 = 2 epochs of 36 pairs at batch 6)
    batch_size: int = 6  # pairs per step
    lr_last_layer: float = 1e-4  # peak lr of the head (cosine after 2 warmup steps)
    lr_lora: float = 1e-3  # peak lr of the LoRA adapters
    lora_r: int = 2  # LoRA rank
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # LoRA target modules
    scopes: tuple[str, ...] = SCOPES  # which scopes to run
    aux_lr: float = 0.05  # AuxDPO: learning rate of delta
    aux_null_weight: float = 1.0  # AuxDPO: lambda_null
    aux_amp_weight: float = 0.01  # AuxDPO: lambda_amp
    max_length: int = 512  # prompt + completion tokens (the trainer's default)


def check_real_setting(s: RealSetting) -> None:
    """Raise ValueError naming the first bad field."""
    if len(s.groups) < 2 or len(set(s.groups)) != len(s.groups):
        raise ValueError(f"groups: need at least 2 distinct groups, got {list(s.groups)}")
    if len(s.counts) != len(s.groups):
        raise ValueError(f"counts: need one count per group ({len(s.groups)}), got "
                         f"{len(s.counts)}")
    if any(c < 1 for c in s.counts):
        raise ValueError(f"counts must be >= 1, got {list(s.counts)}")
    unknown = sorted(set(s.scopes) - set(SCOPES))
    if not s.scopes or unknown:
        raise ValueError(f"scopes: unknown {unknown or '(none given)'}; valid: {', '.join(SCOPES)}")
    for name in ("eval_per_group", "steps", "batch_size", "lora_r"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(s, name)}")
    for name in ("beta", "lr_last_layer", "lr_lora", "aux_lr"):
        if not getattr(s, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(s, name)}")


# ----------------------------------------------------------------------------------------
# Data: an imbalanced training split and a balanced held-out split


def _content_key(row) -> str:
    """The pair's text: rows with the same prompt and replies are one pair (duplicates across
    source files must not land on both sides of the split)."""
    return json.dumps([row.prompt, row.chosen, row.rejected], sort_keys=True)


def _order_key(seed: int, row) -> bytes:
    # sha256 of (seed, content): the order is fixed across Python runs and independent of
    # the file order, so a different count takes a prefix of the same order.
    return hashlib.sha256(f"{seed}:{_content_key(row)}".encode()).digest()


def imbalanced_split(rows: Sequence, *, counts: Mapping[str, int], eval_per_group: int,
                     seed: int) -> tuple[list, list]:
    """(train, held_out): counts[g] training pairs and eval_per_group held-out pairs of every
    group g, no pair (same prompt and replies) on both sides.

    Each group's rows are ordered by sha256(seed, content); the first eval_per_group distinct
    pairs are held out, the next counts[g] train. Raises ValueError when a group has too few.
    """
    train, held = [], []
    for group, n_train in counts.items():
        mine = sorted((r for r in rows if r.group == group), key=lambda r: _order_key(seed, r))
        seen, distinct = set(), []
        for r in mine:
            key = _content_key(r)
            if key not in seen:
                seen.add(key)
                distinct.append(r)
        need = eval_per_group + n_train
        if len(distinct) < need:
            raise ValueError(f"group {group!r} has {len(distinct)} distinct pairs; "
                             f"{eval_per_group} held-out + {n_train} training need {need}")
        held += distinct[:eval_per_group]
        train += distinct[eval_per_group:need]
    return train, held


def default_pool(groups: Sequence[str]) -> list:
    """Every pair of the named groups of the embedded default data."""
    from dpolab.rho_data import group_rows

    return [r for g in groups for r in group_rows(g)]


# ----------------------------------------------------------------------------------------
# Runs


def run_overrides(s: RealSetting, *, loss: str, scope: str) -> list[str]:
    """The trainer's `section.key=value` overrides for one (loss, scope) run: everything but
    the loss name is shared by DPO and AuxDPO."""
    lr = s.lr_last_layer if scope == "last_layer" else s.lr_lora
    out = [f"model.name={s.model}", f"loss.name={loss}", f"loss.beta={s.beta}",
           f"loss.aux_lr={s.aux_lr}", f"loss.aux_null_weight={s.aux_null_weight}",
           f"loss.aux_amp_weight={s.aux_amp_weight}", "loss.aux_mode=soft",
           f"train.scope={scope}", f"train.lr={lr}",
           f"train.max_steps={s.steps}", f"train.batch_size={s.batch_size}",
           "train.warmup_steps=2", "train.schedule=cosine", f"train.seed={s.seed}",
           "train.eval_every=0", "train.save_every=0", "train.did_samples=0",
           "train.progress=false", "train.report=false", f"data.max_length={s.max_length}",
           f"data.max_prompt_length={min(256, s.max_length // 2)}"]
    if scope == "lora":
        out += [f"train.lora_r={s.lora_r}",
                f"train.lora_targets=[{', '.join(s.lora_targets)}]",
                "train.export_merged=false"]
    return out


def group_metrics(row: Mapping[str, float], groups: Sequence[str], *,
                  prefix: str = "eval/") -> dict[str, dict[str, float]]:
    """{group: {accuracy, margin, preference}} from one evaluation line of metrics.jsonl."""
    return {g: {m: float(row[f"{prefix}groups/{g}/{m}"]) for m in METRICS} for g in groups}


def run_one(s: RealSetting, *, loss: str, scope: str, train_path: Path, eval_path: Path,
            out: Path, train_groups: Sequence[str | None] = (),
            keep_weights: bool = False) -> dict:
    """Train one (loss, scope) run and read back the held-out per-group metrics before
    (step 0) and after training, the training-set accuracy after, and the wall time.
    The exported weights and checkpoints are deleted unless keep_weights (they are GBs)."""
    from dpolab.config import apply_overrides, build_config
    from dpolab.rundir import read_metrics
    from dpolab.train import final_metrics, train

    raw = apply_overrides({"data": {"path": str(train_path), "eval_path": str(eval_path)},
                           "out": str(out)}, run_overrides(s, loss=LOSSES[loss], scope=scope))
    t0 = time.monotonic()
    run_dir = train(build_config(raw, source="misspecification --real"))
    wall = time.monotonic() - t0
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/rewards/accuracies" in r]
    before, after = evals[0], final_metrics(run_dir)
    delta = final_delta(run_dir) if LOSSES[loss] == "auxdpo" else None
    spectrum_path = run_dir / "auxdpo.json"  # rank of A over the training responses
    spectrum = json.loads(spectrum_path.read_text()) if spectrum_path.exists() else None
    if not keep_weights:
        for heavy in ("model", "checkpoints"):
            shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return {"loss": loss, "scope": scope, "wall_s": wall, "run_dir": str(run_dir),
            "before": group_metrics(before, s.groups), "after": group_metrics(after, s.groups),
            "train_after": group_metrics(after, s.groups, prefix="train_eval/"),
            "eval_accuracy_after": float(after["eval/rewards/accuracies"]),
            "delta": None if delta is None else delta_summary(delta, train_groups, beta=s.beta),
            "null_space": spectrum}


def final_delta(run_dir: Path):
    """AuxDPO's auxiliary rewards (2n,) = [chosen..., rejected...] from the last checkpoint."""
    from safetensors import safe_open

    ckpt = sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]
    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        return f.get_tensor("auxdpo.delta").double()


def delta_summary(delta, groups: Sequence[str | None], *, beta: float) -> dict:
    """How far AuxDPO used its auxiliary rewards: rms of delta, and per training group the
    mean of beta * (delta_c - delta_r), the part of the AuxDPO margin that delta supplies
    (auxdpo_loss: -log sigma(beta * (h + delta_c - delta_r))). groups: the group of each
    training pair in delta's order; per-group values only when their number matches."""
    n = delta.shape[0] // 2
    out = {"rms": float(delta.pow(2).mean().sqrt()) if n else 0.0, "by_group": {}}
    if len(groups) == n:
        diff = (beta * (delta[:n] - delta[n:])).tolist()
        for g in dict.fromkeys(groups):
            vals = [d for d, gg in zip(diff, groups) if gg == g]
            out["by_group"][g] = sum(vals) / len(vals)
    return out


def dominance_gap(run: dict, groups: Sequence[str]) -> dict[str, float]:
    """Held-out accuracy after training: dominant group minus the mean of the minority
    groups; and the change in the policy's own preference, dominant minus minority mean."""
    dom, minor = groups[0], groups[1:]
    acc = {g: run["after"][g]["accuracy"] for g in groups}
    shift = {g: run["after"][g]["preference"] - run["before"][g]["preference"] for g in groups}
    return {"accuracy_gap": acc[dom] - sum(acc[g] for g in minor) / len(minor),
            "preference_shift_gap": shift[dom] - sum(shift[g] for g in minor) / len(minor)}


def run_experiment(s: RealSetting, out: Path, *, rows: Sequence | None = None,
                   log=print) -> dict:
    """Split, write train.jsonl / held_out.jsonl under out, and run every scope x {DPO, AuxDPO};
    rows default to the embedded data of s.groups. Returns the `real` part of results.json."""
    from dpolab.data import write_jsonl

    check_real_setting(s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = default_pool(s.groups) if rows is None else rows
    train_rows, held = imbalanced_split(rows, counts=dict(zip(s.groups, s.counts)),
                                        eval_per_group=s.eval_per_group, seed=s.seed)
    train_path = write_jsonl(train_rows, out / "train.jsonl")
    eval_path = write_jsonl(held, out / "held_out.jsonl")
    t0 = time.monotonic()
    runs = []
    for scope in s.scopes:
        for loss in LOSSES:
            run = run_one(s, loss=loss, scope=scope, train_path=train_path, eval_path=eval_path,
                          out=out / f"{scope}-{LOSSES[loss]}",
                          train_groups=[r.group for r in train_rows])
            run.update(dominance_gap(run, s.groups))
            runs.append(run)
            log(f"real: {scope} {loss}: {run['wall_s']:.0f} s, held-out accuracy "
                + ", ".join(f"{g} {run['after'][g]['accuracy']:.3f}" for g in s.groups))
    return {"setting": asdict(s), "dominant": s.groups[0],
            "train_pairs": {g: sum(r.group == g for r in train_rows) for g in s.groups},
            "held_out_pairs": {g: sum(r.group == g for r in held) for g in s.groups},
            "runs": runs, "wall_s": time.monotonic() - t0}


# ----------------------------------------------------------------------------------------
# Tables and the report section


def table_rows(real: dict) -> list[dict]:
    """One row per (scope, loss, group): held-out metrics before and after, train accuracy."""
    out = []
    for run in real["runs"]:
        for g in real["setting"]["groups"]:
            b, a = run["before"][g], run["after"][g]
            out.append({"scope": run["scope"], "loss": run["loss"],
                        "group": g + (" (dominant)" if g == real["dominant"] else ""),
                        "train_pairs": real["train_pairs"][g],
                        "acc_before": b["accuracy"], "acc_after": a["accuracy"],
                        "margin_after": a["margin"], "pref_before": b["preference"],
                        "pref_after": a["preference"],
                        "train_acc_after": run["train_after"][g]["accuracy"]})
    return out


def format_real_table(real: dict) -> str:
    head = (f"{'scope':<11}{'loss':<7}{'group':<22}{'n_train':>7}{'acc0':>7}{'acc':>7}"
            f"{'margin':>9}{'pref0':>7}{'pref':>7}{'train_acc':>10}")
    lines = [head, "-" * len(head)]
    for r in table_rows(real):
        lines.append(f"{r['scope']:<11}{r['loss']:<7}{r['group']:<22}{r['train_pairs']:>7}"
                     f"{r['acc_before']:>7.3f}{r['acc_after']:>7.3f}{r['margin_after']:>9.4f}"
                     f"{r['pref_before']:>7.3f}{r['pref_after']:>7.3f}"
                     f"{r['train_acc_after']:>10.3f}")
    lines.append("")
    lines.append("dominant minus minority mean (held-out, after): accuracy gap | "
                 "preference-shift gap | wall | AuxDPO: rms delta, mean beta*(delta_c-delta_r)")
    for run in real["runs"]:
        d = run.get("delta")
        aux = "" if not d else f"  {d['rms']:.4f}  " + ", ".join(
            f"{g} {v:+.4f}" for g, v in d["by_group"].items())
        lines.append(f"  {run['scope']:<11}{run['loss']:<7}{run['accuracy_gap']:>+8.3f}"
                     f"{run['preference_shift_gap']:>+10.3f}{run['wall_s']:>8.0f} s{aux}")
    spectra = [(r["scope"], r["null_space"]) for r in real["runs"] if r.get("null_space")]
    if spectra:
        lines.append("")
        lines.append("AuxDPO's room: A = d log pi_theta0 / d theta over the training responses")
        for scope, sp in spectra:
            lines.append(f"  {scope:<11}rank {sp['rank']} of {sp['responses']} responses, "
                         f"null space dimension {sp['null_dim']}; eigenvalues of A^T A "
                         f"{sp['eig_min']:.3g} .. {sp['eig_max']:.3g}; soft-penalty floor "
                         f"lambda_null * eig_min = {sp['soft_floor']:.3g}")
    return "\n".join(lines)


def null_space_note(real: dict) -> str:
    """One paragraph on what the rank of A allows AuxDPO, from the runs' auxdpo.json."""
    spectra = [(r["scope"], r["null_space"]) for r in real["runs"] if r.get("null_space")]
    if not spectra:
        return ""
    parts = [f"{scope}: rank {sp['rank']} of {sp['responses']} responses, null space "
             f"dimension {sp['null_dim']}, smallest eigenvalue of A^T A {sp['eig_min']:.3g} "
             f"(largest {sp['eig_max']:.3g})" for scope, sp in spectra]
    return ("AuxDPO's delta may only move inside N(A), A = d log pi_theta0 / d theta over the "
            "training responses. " + "; ".join(parts) + ". A null space of dimension 0 leaves "
            "delta no direction the penalty does not charge for: the soft penalty costs at "
            "least lambda_null * eig_min * ||delta||^2, and where that floor is large next to "
            "the preference loss's pull on delta (at most beta per pair) AuxDPO stays at DPO's "
            "solution. The bandit's gain needs a policy class with fewer directions than "
            "responses.")


def report_blocks(real: dict) -> list[str]:
    """The report.html section of the real-model experiment (htmlpage fragments)."""
    from dpolab import htmlpage

    s = real["setting"]
    counts = ", ".join(f"{g} {n}" for g, n in real["train_pairs"].items())
    gaps = [{"scope": r["scope"], "loss": r["loss"], "accuracy_gap": r["accuracy_gap"],
             "preference_shift_gap": r["preference_shift_gap"], "wall_s": r["wall_s"],
             "delta_rms": r["delta"]["rms"] if r.get("delta") else "",
             "beta_delta_margin": r["delta"]["by_group"] if r.get("delta") else ""}
            for r in real["runs"]]
    return [
        htmlpage.heading("Real model: one value group made dominant"),
        htmlpage.para(
            f"Model {s['model']}; training pairs per group: {counts} (dominant: "
            f"{real['dominant']}); {s['eval_per_group']} held-out pairs per group. "
            f"beta = {s['beta']:g}, {s['steps']} steps of {s['batch_size']} pairs, seed "
            f"{s['seed']}, lr {s['lr_last_layer']:g} (last_layer) / {s['lr_lora']:g} (LoRA r = "
            f"{s['lora_r']} on {', '.join(s['lora_targets'])}); AuxDPO soft mode, aux_lr "
            f"{s['aux_lr']:g}, lambda_null {s['aux_null_weight']:g}, lambda_amp "
            f"{s['aux_amp_weight']:g}. DPO and AuxDPO of a scope share seed, data order, steps "
            "and lr."),
        htmlpage.para(
            "acc: held-out share of pairs with implicit-reward margin > 0 (ties half; 0.5 "
            "before training); margin: mean beta * h; pref: share where the policy itself "
            "gives the chosen reply the higher log-probability (before: the reference's); "
            "train_acc: the same accuracy on the training pairs."),
        htmlpage.table(table_rows(real)),
        htmlpage.para("Dominant group minus the mean of the minority groups, after training. "
                      "delta_rms / beta_delta_margin: how much AuxDPO's auxiliary rewards "
                      "moved, and their mean share beta * (delta_c - delta_r) of the training "
                      "margin per group."),
        htmlpage.table(gaps),
        *([htmlpage.para(null_space_note(real))] if null_space_note(real) else []),
    ]


# ----------------------------------------------------------------------------------------
# Command line: the --real flags of `dpolab reproduce misspecification`

_FLAGS = ("real_steps", "real_groups", "real_counts", "real_eval", "real_scopes", "real_model",
          "real_seed")


def add_real_arguments(parser) -> None:
    """Add --real and its options to an argparse parser (defaults: RealSetting's)."""
    d = RealSetting()
    parser.add_argument("--real", action="store_true",
                        help="also run DPO vs AuxDPO on a real model with one value group "
                             "dominant (results under 'real' in results.json)")
    parser.add_argument("--real-steps", type=int, help=f"optimizer steps per run ({d.steps})")
    parser.add_argument("--real-groups", help="value groups, dominant first "
                                              f"({','.join(d.groups)})")
    parser.add_argument("--real-counts", help="training pairs per group "
                                              f"({','.join(map(str, d.counts))})")
    parser.add_argument("--real-eval", type=int,
                        help=f"held-out pairs per group ({d.eval_per_group})")
    parser.add_argument("--real-scopes", help=f"scopes to run ({','.join(d.scopes)})")
    parser.add_argument("--real-model", help=f"model name or folder ({d.model})")
    parser.add_argument("--real-seed", type=int, help=f"seed ({d.seed})")


def _csv(text: str, flag: str) -> tuple[str, ...]:
    from dpolab.errors import UserError

    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise UserError(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def real_setting_from_args(args) -> RealSetting | None:
    """The RealSetting the parsed flags ask for, None without --real; UserError (one line)
    for a bad value or a --real-* option given without --real."""
    from dpolab.errors import UserError
    from dpolab.rho_data import GROUPS

    given = [f"--{f.replace('_', '-')}" for f in _FLAGS if getattr(args, f) is not None]
    if not args.real:
        if given:
            raise UserError(f"{', '.join(given)} only apply with --real")
        return None
    s = RealSetting()
    kw: dict = {}
    if args.real_groups is not None:
        kw["groups"] = _csv(args.real_groups, "--real-groups")
        unknown = [g for g in kw["groups"] if g not in GROUPS]
        if unknown:
            raise UserError(f"--real-groups: unknown group(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(GROUPS)}")
        if args.real_counts is None:  # dominant keeps its count, every other group the minority one
            kw["counts"] = (s.counts[0],) + (s.counts[1],) * (len(kw["groups"]) - 1)
    if args.real_counts is not None:
        try:
            kw["counts"] = tuple(int(x) for x in _csv(args.real_counts, "--real-counts"))
        except ValueError:
            raise UserError(f"--real-counts: expected integers a,b,c, got "
                            f"{args.real_counts!r}") from None
    if args.real_scopes is not None:
        kw["scopes"] = _csv(args.real_scopes, "--real-scopes")
    for flag, field in (("real_steps", "steps"), ("real_eval", "eval_per_group"),
                        ("real_model", "model"), ("real_seed", "seed")):
        if getattr(args, flag) is not None:
            kw[field] = getattr(args, flag)
    s = replace(s, **kw)
    try:
        check_real_setting(s)
    except ValueError as err:
        raise UserError(f"--real: {err}") from None
    return s
