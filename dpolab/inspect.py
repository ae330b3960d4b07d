"""`dpolab inspect DATA [--model M]`: audit a preference data set before training on it.

Reports rows, groups, skipped rows, token lengths, what truncation cuts or makes identical,
duplicates, rows training would refuse (no chat template, a template that renders the prompt's
messages differently once an answer follows, text the tokenizer cannot encode), rows whose
prompt is cut at the longest common token prefix (dpolab.common_prefix), and with a model the
reference margins, the pairs the reference makes unflippable and each pair's CHES (dpolab.ches).  The computations are in :mod:`dpolab.audit`; this module
loads things, runs the reference pass and prints.

The reference pass goes through the trainer's own path (:func:`dpolab.splits.load_split_rows`
and :func:`dpolab.reference.reference_for`) with the same seed, split and truncation, so the
reference log-probs it stores are the ones a later ``dpolab train`` with those settings loads
instead of computing them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dpolab import audit
from dpolab.errors import UserError
from dpolab.models import stay_offline
from dpolab.config import DTYPES, DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig

USAGE = """dpolab inspect DATA [--model M] [--tokenizer T|none] [--max-length N]
                      [--max-prompt-length N] [--beta B] [--skip-invalid] [--json]
                      [--json-out FILE] [options]"""
DEFAULT_DATA = "default"  # DATA that names the embedded default set (train + held-out rows)


def parse(argv: list[str]) -> argparse.Namespace:
    d, t = DataConfig(), TrainConfig()
    p = argparse.ArgumentParser(prog="dpolab inspect", usage=USAGE, description=(
        "Audit a preference data set: rows and groups, invalid rows, token lengths, what "
        "truncation cuts or makes identical, duplicates, chat-template problems; with --model "
        "also the reference margins and the pairs the reference makes unflippable."))
    p.add_argument("data", help=f"JSONL, JSON or Parquet file, or {DEFAULT_DATA!r} for the "
                   "embedded multi-value data")
    p.add_argument("--model", help="also run the reference model over every pair: a local "
                   "folder, a .gguf file, a hub name or smollm2-135m-instruct")
    p.add_argument("--tokenizer", help="tokenizer for the length checks (default: the model's, "
                   "else the default model's); 'none' skips the token checks")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help=f"prompt + completion tokens kept (default {d.max_length})")
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length,
                   help=f"prompt tokens kept (default {d.max_prompt_length})")
    p.add_argument("--truncation", default=d.truncation, choices=("keep_end", "keep_start"),
                   help=f"which end of a long prompt is kept (default {d.truncation})")
    p.add_argument("--beta", type=float, default=LossConfig().beta,
                   help=f"DPO beta for the unflippable check (default {LossConfig().beta})")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop and count bad rows instead of stopping at the first")
    p.add_argument("--similarity", type=float, default=0.9,
                   help="character 4-gram Jaccard index that makes two rows of a group near "
                   "duplicates (default 0.9)")
    p.add_argument("--show", type=int, default=5, help="rows listed per finding (default 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON, no table")
    p.add_argument("--json-out", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--seed", type=int, default=t.seed,
                   help=f"seed of the held-out split, as in train (default {t.seed})")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help=f"held-out share of DATA, as in train (default {d.eval_fraction})")
    p.add_argument("--full", action="store_true", help="default data: every pair, not a sample")
    p.add_argument("--batch-size", type=int, default=t.eval_batch_size,
                   help=f"pairs per reference forward (default {t.eval_batch_size})")
    p.add_argument("--device", default=t.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=ModelConfig().dtype, choices=DTYPES)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument("--online", action="store_true", help="allow fetching a model from a hub")
    return p.parse_args(argv)


def run_config(a: argparse.Namespace) -> RunConfig:
    """The training config whose data and reference this audit describes."""
    d = DataConfig()
    data = replace(d, path="" if a.data == DEFAULT_DATA else a.data, max_length=a.max_length,
                   max_prompt_length=a.max_prompt_length, truncation=a.truncation,
                   skip_invalid=a.skip_invalid, eval_fraction=a.eval_fraction,
                   per_group=0 if a.full else d.per_group,
                   eval_per_group=0 if a.full else d.eval_per_group)
    cfg = RunConfig(model=replace(ModelConfig(), **({"name": a.model} if a.model else {}),
                                  dtype=a.dtype),
                    data=data, loss=replace(LossConfig(), beta=a.beta),
                    train=replace(TrainConfig(), seed=a.seed, eval_batch_size=a.batch_size,
                                  device=a.device, progress=not a.no_progress))
    checks = [(a.max_length > 0 and a.max_prompt_length > 0,
               "--max-length and --max-prompt-length must be positive"),
              (a.max_prompt_length < a.max_length, "--max-prompt-length must be < --max-length"),
              (a.beta > 0, "--beta must be > 0"),
              (0 < a.similarity <= 1, "--similarity must lie in (0, 1]"),
              (0 < a.eval_fraction < 1, "--eval-fraction must lie in (0, 1)"),
              (a.show >= 0, "--show must be >= 0"), (a.batch_size >= 1, "--batch-size must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return cfg


def cli_main(argv: list[str]) -> int:
    a = parse(argv)
    stay_offline(a.online)
    cfg = run_config(a)
    report = inspect(cfg, data=a.data, tokenizer_name=a.tokenizer, model=a.model,
                     similarity=a.similarity)
    if a.json_out:
        try:
            Path(a.json_out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        except OSError as err:
            raise UserError(f"{a.json_out}: cannot write: {err.strerror or err}") from None
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report, show=a.show))
    return 0


# ------------------------------------------------------------------------------- the audit
def load_data(cfg: RunConfig, data: str) -> tuple[list, list[str], str]:
    """(rows, skipped messages, format) of DATA; the default set is train + held-out rows."""
    if data == DEFAULT_DATA:
        from dpolab.rho_data import default_rows

        d = cfg.data
        train, held = default_rows(seed=cfg.train.seed, per_group=d.per_group or None,
                                   held_out_per_group=d.eval_per_group or None)
        return train + held, [], "conversational"
    from dpolab.data import load_rows

    loaded = load_rows(data, skip_invalid=cfg.data.skip_invalid)
    return list(loaded.rows), list(loaded.skipped), loaded.format


def inspect(cfg: RunConfig, *, data: str, tokenizer_name: str | None = None,
            model: str | None = None, similarity: float = 0.9) -> dict[str, Any]:
    """The whole audit as a JSON-ready dict (see :func:`render` for its reading)."""
    rows, skipped, fmt = load_data(cfg, data)
    report: dict[str, Any] = {
        "data": data, "format": fmt, "rows": len(rows),
        "skipped": {"count": len(skipped), "rows": skipped},
        "groups": audit.group_sizes(rows),
        "duplicates": _duplicates(rows, similarity=similarity)}
    tokenizer, name, note = _tokenizer(tokenizer_name, model, cfg)
    report["tokenizer"] = {"name": name, "note": note}
    report.update(token_lengths=None, truncation=None, prefix_problems=None, common_prefix=None)
    if tokenizer is not None:
        report.update(_token_checks(rows, tokenizer, cfg))
    report["reference"] = reference_pass(cfg) if model else None
    return report


def _duplicates(rows: list, *, similarity: float) -> dict[str, Any]:
    exact = audit.exact_duplicates(rows)
    near = audit.near_duplicates(rows, threshold=similarity)
    same = audit.identical_after_normalization(rows)
    contra = audit.contradictions(rows)
    return {"exact": {"count": sum(len(c) - 1 for c in exact), "clusters": exact},
            "near": {"count": len(near), "pairs": near},
            "identical_after_normalization": {"count": len(same), "rows": same},
            "contradictions": {"count": len(contra), "pairs": contra}}


def _tokenizer(name: str | None, model: str | None, cfg: RunConfig):
    """(tokenizer or None, its name, a note when there is none)."""
    from dpolab.models import DEFAULT_MODEL, load_tokenizer

    if name == "none":
        return None, None, "token checks skipped (--tokenizer none)"
    name = name or model
    if name:
        return load_tokenizer(name, trust_remote_code=cfg.model.trust_remote_code), name, None
    try:
        # The first use converts the embedded model once (~20 s); its notice goes to stderr
        # so that --json output stays clean.
        with redirect_stdout(sys.stderr):
            return load_tokenizer(DEFAULT_MODEL), DEFAULT_MODEL, None
    except UserError as err:
        return None, None, (f"token checks skipped: the default tokenizer is unavailable "
                            f"({err}); pass --tokenizer or --model")


def _token_checks(rows: list, tokenizer: Any, cfg: RunConfig) -> dict[str, Any]:
    """The token sections of the report: lengths, truncation, prefix problems."""
    from dpolab.progress import Progress

    d = cfg.data
    bar = Progress(len(rows), "tokenize", enabled=cfg.train.progress and len(rows) > 2000)
    lengths = audit.token_lengths(rows, tokenizer, progress=bar.update)
    bar.close()
    cut = audit.truncation_report(rows, lengths, tokenizer, max_length=d.max_length,
                                  max_prompt_length=d.max_prompt_length,
                                  truncation=d.truncation)
    return {
        "token_lengths": {f: audit.quantiles(getattr(lengths, f)) for f in audit.FIELDS},
        "truncation": {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length,
                       "truncation": d.truncation,
                       **{k: {"count": len(v), "rows": v} for k, v in cut.items()}},
        "prefix_problems": {"count": len(lengths.problems), "rows": lengths.problems},
        "common_prefix": {"count": len(lengths.common_prefix), "rows": lengths.common_prefix}}


# ----------------------------------------------------------------------- the reference pass
def reference_pass(cfg: RunConfig) -> dict[str, Any]:
    """Reference margins of every pair that survives tokenization, through the trainer's
    data split and reference store (see the module doc).  Rows whose chat-template rendering
    fails the prefix check (training refuses them; the report lists them) are left out."""
    import torch

    from dpolab import ches, forward_check, reference
    from dpolab.data import DataError
    from dpolab.distributed import Distributed
    from dpolab.models import body_and_head, load_configured, load_tokenizer
    from dpolab.policy import body_autocast, make_forward
    from dpolab.session import tokenize_split, weights_key
    from dpolab.splits import load_split_rows

    tc, d = cfg.train, cfg.data
    cuda = torch.cuda.is_available() and tc.device != "cpu"
    if tc.device == "cuda" and not cuda:
        raise UserError("--device cuda but no CUDA device is available")
    dist = Distributed(device=torch.device("cuda" if cuda else "cpu"))
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    model = load_configured(cfg.model, device=dist.device)
    model_hash = weights_key(model)   # the store's key, as train makes it
    with redirect_stdout(sys.stderr):     # load_split_rows reports skipped rows on stdout
        splits = load_split_rows(cfg)
    from dpolab.dedup import dedupe_split  # as train does, so the stored reference is shared

    try:
        splits = dedupe_split(*splits, say=None)
    except UserError:  # nothing held out after it: the audit still scores what there is
        pass
    tokenized = {}
    for split, rows in zip(("train", "held_out"), splits):
        rows = [rows[i] for i in audit.token_lengths(rows, tokenizer).index]
        try:
            tokenized[split] = tokenize_split(rows, tokenizer, d).examples if rows else []
        except DataError:    # every pair made identical by truncation: nothing to score
            tokenized[split] = []
    everything = tokenized["train"] + tokenized["held_out"]
    if not everything:
        return {"model": cfg.model.name, "pairs": 0, "pair_forward": None,
                **audit.margin_report([], [], np.zeros(0), np.zeros(0), beta=cfg.loss.beta)}
    # the trainer's pair forward, checked on this model as train checks it
    # (dpolab.forward_check), so the stored reference is its own
    choice = forward_check.choose_for_run(cfg, model, everything,
                                          pad_id=tokenizer.pad_token_id, dist=dist)
    body, head = body_and_head(model)
    forward = make_forward(choice.name, body, head, pad_id=tokenizer.pad_token_id,
                           chunk_size=tc.logps_chunk, device=dist.device,
                           autocast=body_autocast(model.dtype, dist.device, tc.bf16_autocast),
                           dtype=model.dtype)
    wheres, groups, chosen, rejected, similar = [], [], [], [], []
    for split, examples in tokenized.items():
        if not examples:
            continue
        similar.append(ches.pair_ches(forward.hidden, examples, batch_size=tc.eval_batch_size))
        ref = reference.reference_for(model_hash, forward, examples, cfg, dist, split)
        c, r = ref.sums()                                    # (N,) float64 each
        wheres += [f"{ex.source}:{ex.row}" for ex in examples]
        groups += [ex.group for ex in examples]
        chosen.append(c.numpy())
        rejected.append(r.numpy())
    rc = np.concatenate(chosen) if chosen else np.zeros(0)
    rr = np.concatenate(rejected) if rejected else np.zeros(0)
    return {"model": cfg.model.name, "pairs": len(wheres), "pair_forward": choice.record(),
            **audit.margin_report(wheres, groups, rc, rr, beta=cfg.loss.beta),
            "ches": ches.report(wheres, groups, *(np.concatenate(v) for v in zip(*similar)))}


# --------------------------------------------------------------------------------- printing
def render(report: dict[str, Any], *, show: int = 5) -> str:
    """The report as terminal text: one section per check, FILE:ROW lists cut at `show`."""
    out = [f"{report['data']}: {report['rows']} rows, format {report['format']}, "
           f"{report['skipped']['count']} invalid rows skipped"]
    out += [f"  {m}" for m in report["skipped"]["rows"][:show]]
    out += ["", _table(["group", "rows"], [[g, n] for g, n in report["groups"].items()])]
    out += ["", *_token_section(report, show)]
    out += ["", *_duplicate_section(report["duplicates"], show)]
    if report["reference"] is not None:
        out += ["", *_reference_section(report["reference"], show)]
    return "\n".join(out)


def _token_section(report: dict, show: int) -> list[str]:
    tok = report["tokenizer"]
    if report["token_lengths"] is None:
        return [tok["note"]]
    stats = ["min", "median", "p90", "max", "mean"]
    lines = [f"token lengths (tokenizer {tok['name']}, untruncated)",
             _table(["field", *stats], [[f, *(report["token_lengths"][f].get(s, "") for s in
                                              stats)] for f in audit.FIELDS])]
    t = report["truncation"]
    lines += ["", f"truncation at max_length={t['max_length']}, max_prompt_length="
              f"{t['max_prompt_length']} ({t['truncation']})"]
    for key, label in (("prompt_cut", "prompts cut"), ("completion_cut", "completions cut"),
                       ("made_identical", "made identical (dropped)")):
        lines += _finding(label, t[key]["count"], t[key]["rows"], show)
    p = report["prefix_problems"]
    lines += _finding("rows training refuses (chat template, encoding)", p["count"], p["rows"], show)
    c = report["common_prefix"]
    lines += _finding("prompts cut at the longest common token prefix (the prompt alone "
                      "tokenizes differently)", c["count"], c["rows"], show)
    return lines


def _duplicate_section(dup: dict, show: int) -> list[str]:
    lines = ["duplicates"]
    lines += _finding("exact (extra copies)", dup["exact"]["count"],
                      [" = ".join(c) for c in dup["exact"]["clusters"]], show)
    lines += _finding("near", dup["near"]["count"],
                      [f"{p['a']} ~ {p['b']} ({p['reason']}, {p['similarity']:.3f})"
                       for p in dup["near"]["pairs"]], show)
    same = dup["identical_after_normalization"]
    lines += _finding("chosen = rejected after normalization", same["count"], same["rows"], show)
    con = dup["contradictions"]
    lines += _finding("contradictions (chosen/rejected swapped)", con["count"],
                      [f"{p['a']} <> {p['b']}" for p in con["pairs"]], show)
    return lines


def _reference_section(ref: dict, show: int) -> list[str]:
    stats = ["n", "min", "median", "p90", "max", "mean", "negative_fraction", "unflippable"]
    rows = [["(all)", *(ref["margin"].get(s, "") for s in stats[:-1]), len(ref["unflippable"])]]
    rows += [[g, *(v.get(s, "") for s in stats)] for g, v in ref["groups"].items()]
    lines = []
    if ref.get("pair_forward"):
        fwd = ref["pair_forward"]
        lines += [f"pair forward: {fwd['forward']} ({fwd['reason']}; checked on "
                  f"{fwd['pairs_checked']} pairs)", ""]
    lines += [f"reference margins, model {ref['model']}: log pi_ref(chosen) - log pi_ref(rejected)"
              f" (summed log-probs, nats) over {ref['pairs']} pairs",
              _table(["group", *stats], rows), ""]
    stuck = ref["unflippable"]
    lines += _finding(f"unflippable at beta={ref['beta']:g} (reference prefers rejected by "
                      f"> log(3)/beta = {ref['threshold']:.2f} nats)", len(stuck),
                      [f"{u['where']}  margin {u['margin']:.2f}  group {u['group']}"
                       for u in stuck], show)
    return lines + _ches_section(ref.get("ches"), show)


def _ches_section(c: dict | None, show: int) -> list[str]:
    """CHES (dpolab.ches): how alike each pair's responses look to the reference; the paper
    expects the highest to lose the most chosen likelihood under DPO."""
    if not c or not c["ches"].get("n"):
        return []
    stats = ["n", "p10", "median", "p90", "mean"]
    rows = [["(all)", *(c["ches"].get(s, "") for s in stats),
             *(c["ln_ches"].get(s, "") for s in stats[1:])]]
    rows += [[g, *(v["ches"].get(s, "") for s in stats), *(v["ln_ches"].get(s, "")
                                                           for s in stats[1:])]
             for g, v in c["groups"].items()]
    return ["", "CHES (Razin et al. 2025): similarity of chosen and rejected in the reference's "
            "hidden states; higher = DPO more likely to lower the chosen response's likelihood",
            _table(["group", *stats, *(f"ln_{s}" for s in stats[1:])], rows), "",
            *_finding("highest CHES", len(c["highest"]),
                      [f"{h['where']}  CHES {h['ches']:.4g}  LN-CHES {h['ln_ches']:.4g}  group "
                       f"{h['group']}" for h in c["highest"]], show)]


def _finding(label: str, count: int, items: list[str], show: int) -> list[str]:
    more = f"  (+{count - show} more)" if count > show else ""
    return [f"  {label}: {count}{more}", *(f"    {item}" for item in items[:show])]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
        return str(v)

    cells = [header] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(r, widths))) for r in cells)
