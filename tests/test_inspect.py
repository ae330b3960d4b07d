"""`dpolab inspect`: the audit's findings on hand-built data, the reference pass on a tiny
model, and the command's errors and JSON output."""

import json
import math
from pathlib import Path

import pytest
import torch

from dpolab import audit
from dpolab.cli import main
from dpolab.data import PreferenceRow, load_rows
from dpolab.tokenize import tokenize_row, tokenize_rows

LONG = ("The committee met on a rainy morning to review the budget for the coming year, "
        "weighing repairs to the old bridge against a new library wing and longer hours "
        "for the public pool, and agreed to publish every figure before the vote.")


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from dpolab.models import load_tokenizer

    return load_tokenizer(str(tiny_dir))


def run_json(capsys, *args) -> dict:
    assert main(["inspect", *map(str, args), "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------ pure pieces
def test_quantiles_by_hand():
    """Linear interpolation between order statistics: position q (n - 1) of the sorted data."""
    q = audit.quantiles(range(1, 11))     # 1..10
    # median at position 0.5 * 9 = 4.5: (5 + 6) / 2; p90 at 0.9 * 9 = 8.1: 9 + 0.1 * (10 - 9)
    assert q == {"n": 10, "min": 1.0, "median": 5.5, "p90": pytest.approx(9.1), "max": 10.0,
                 "mean": 5.5}
    assert audit.quantiles([]) == {"n": 0}
    assert audit.quantiles([7])["p90"] == 7.0     # one value: every quantile is that value


def test_ngram_jaccard_by_hand():
    """{ab, bc, cd} vs {ab, bc, ce}: 2 shared of 4 distinct bigrams -> 0.5; a text shorter
    than n is its own single gram; identical sets -> 1."""
    a, b = audit.ngrams("abcd", n=2), audit.ngrams("abce", n=2)
    assert a == {"ab", "bc", "cd"}
    assert audit.jaccard(a, b) == 2 / 4
    assert audit.ngrams("ab", n=4) == {"ab"}
    assert audit.jaccard(a, set(a)) == 1.0


def _row(i: int, prompt: str, chosen: str, rejected: str, group: str | None = "g"):
    return PreferenceRow(prompt, chosen, rejected, group, "f.jsonl", i)


def test_near_copies_found_at_either_end_with_window_one():
    """Sorted neighbourhood with window 1: a near copy that differs only at its start sorts
    next to its original by reversed text, one that differs only at its end by text; both are
    found among 30 unrelated rows, and nothing else is reported."""
    rows = [_row(i + 1, f"Item {i}: {chr(97 + i % 26) * 3} {i * 7919 % 1000}.", " yes", " no")
            for i in range(30)]
    rows.append(_row(31, LONG, " A yes.", " A no."))
    rows.append(_row(32, "X" + LONG[1:], " A yes.", " A no."))      # first character changed
    rows.append(_row(33, LONG[:-1] + "!", " A yes.", " A no."))     # last character changed
    found = audit.near_duplicates(rows, threshold=0.9, window=1)
    pairs = {(p["a"], p["b"]) for p in found}
    assert ("f.jsonl:31", "f.jsonl:32") in pairs and ("f.jsonl:31", "f.jsonl:33") in pairs
    assert all(p["reason"] == "similar" and 0.9 <= p["similarity"] < 1 for p in found)
    assert all(int(a.split(":")[1]) > 30 for a, _ in pairs)
    # the same rows in different groups are never compared by n-grams
    apart = rows[:31] + [_row(32, "X" + LONG[1:], " A yes.", " A no.", group="other")]
    assert audit.near_duplicates(apart, threshold=0.9, window=1) == []


def test_prefix_problem_listed(tokenizer):
    """A chat template that renders the last message differently makes the prompt's rendering
    no prefix of prompt + completion: that row is listed, the others still get lengths."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                         "{% if loop.last and m['role'] == 'user' %}{{ ' (last)' }}{% endif %}"
                         "{{ '<|im_end|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    user = [{"role": "user", "content": "Hello there."}]
    bad = _row(1, user, [{"role": "assistant", "content": "Hi."}],
               [{"role": "assistant", "content": "Go away."}])
    lengths = audit.token_lengths([bad], tok)
    assert lengths.index == [] and len(lengths.problems) == 1
    assert lengths.problems[0].startswith("f.jsonl:1: the chat template's rendering")
    good = audit.token_lengths([bad], tokenizer)     # ChatML has the prefix property
    assert good.index == [0] and good.problems == []


# ------------------------------------------------------------------------- the command
DUP_ROWS = [
    {"prompt": "Name a colour.", "chosen": " Red.", "rejected": " Loud.", "group": "a"},      # 1
    {"prompt": "Name an animal.", "chosen": " A cat.", "rejected": " A chair.", "group": "a"},  # 2
    {"prompt": "Name a colour.", "chosen": " Red.", "rejected": " Loud.", "group": "a"},      # 3 = 1
    {"prompt": "name an  ANIMAL.", "chosen": " a cat.", "rejected": " A chair.", "group": "a"},  # 4 ~ 2
    {"prompt": LONG, "chosen": " The pool.", "rejected": " Nothing.", "group": "b"},          # 5
    {"prompt": "T" + LONG[1:].replace("rainy", "rainx"), "chosen": " The pool.",
     "rejected": " Nothing.", "group": "b"},                                                  # 6 ~ 5
    {"prompt": "Name an animal.", "chosen": " A chair.", "rejected": " A cat.", "group": "a"},  # 7 <> 2
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " hi!", "group": "b"},               # 8
    {"prompt": "Count.", "chosen": " 1 2 3", "rejected": " 3 2 1"},                          # 9
]


def test_groups_and_duplicates_reported(tmp_path, capsys, tiny_dir):
    """Group sizes (largest first, ungrouped as '(none)'), the exact copy, the near copies
    (case/whitespace, and two changed letters in a long row of the same group), chosen equal
    to rejected up to case, and the swapped pair."""
    data = write(tmp_path / "d.jsonl", DUP_ROWS)
    r = run_json(capsys, data, "--tokenizer", tiny_dir)
    f = f"{data}:"
    assert r["rows"] == 9 and r["format"] == "standard" and r["skipped"]["count"] == 0
    assert list(r["groups"].items()) == [("a", 5), ("b", 3), ("(none)", 1)]
    dup = r["duplicates"]
    assert dup["exact"] == {"count": 1, "clusters": [[f + "1", f + "3"]]}
    near = [(p["a"], p["b"], p["reason"]) for p in dup["near"]["pairs"]]
    assert near == [(f + "2", f + "4", "normalized"), (f + "5", f + "6", "similar")]
    assert 0.9 <= dup["near"]["pairs"][1]["similarity"] < 1
    assert dup["identical_after_normalization"] == {"count": 1, "rows": [f + "8"]}
    assert dup["contradictions"] == {"count": 1, "pairs": [{"a": f + "2", "b": f + "7"}]}
    assert r["reference"] is None and r["prefix_problems"] == {"count": 0, "rows": []}
    # the same as a table: the findings name their rows
    assert main(["inspect", str(data), "--tokenizer", str(tiny_dir), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"exact (extra copies): 1\n    {f}1 = {f}3" in text
    assert f"{f}5 ~ {f}6 (similar," in text


def test_truncation_reported(tmp_path, capsys, tiny_dir, tokenizer):
    """At max_length=24, max_prompt_length=6: a pair whose completions differ only after 30
    shared tokens is cut and made identical; a long prompt is cut; a short pair is untouched.
    The counts agree with tokenize_rows, which training uses."""
    shared = " the cat sees the red ball today and the dog reads a long letter with care" * 2
    rows = [{"prompt": "Hi.", "chosen": shared + " yes.", "rejected": shared + " no."},
            {"prompt": "Hi.", "chosen": " Red.", "rejected": " Blue."},
            {"prompt": LONG, "chosen": " Red.", "rejected": " Blue."}]
    data = write(tmp_path / "t.jsonl", rows)
    loaded = load_rows(data).rows
    ids = [tokenize_row(row, tokenizer) for row in loaded]
    # preconditions the findings rest on: row 1's completions share more than 24 tokens,
    # rows 1-2 have prompts of <= 6 tokens, row 3's prompt is longer than 6
    assert ids[0][1][:24] == ids[0][2][:24]
    assert len(ids[0][0]) <= 6 and len(ids[1][0]) <= 6 and len(ids[2][0]) > 6
    r = run_json(capsys, data, "--tokenizer", tiny_dir, "--max-length", 24,
                 "--max-prompt-length", 6)
    t, f = r["truncation"], f"{data}:"
    assert t["made_identical"] == {"count": 1, "rows": [f + "1"]}
    assert t["completion_cut"] == {"count": 1, "rows": [f + "1"]}
    assert t["prompt_cut"] == {"count": 1, "rows": [f + "3"]}
    ref = tokenize_rows(loaded, tokenizer, max_length=24, max_prompt_length=6)
    assert (ref.dropped_identical, ref.truncated_completion, ref.truncated_prompt) == (1, 1, 1)
    # untruncated lengths: the prompt field's max is row 3's prompt
    assert r["token_lengths"]["prompt"]["max"] == len(ids[2][0])
    assert r["token_lengths"]["chosen"]["n"] == 3


def test_bad_row_is_an_error_unless_skipped(tmp_path, capsys, tiny_dir):
    """The first bad row stops the command with FILE:ROW: field ... and exit 2; with
    --skip-invalid it is counted and listed, and the other rows are audited."""
    rows = DUP_ROWS[:2] + [{"prompt": "Q?", "rejected": " r"}] + DUP_ROWS[4:5]
    data = write(tmp_path / "bad.jsonl", rows)
    assert main(["inspect", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dpolab inspect: error: {data}:3: field 'chosen' is missing"
    r = run_json(capsys, data, "--skip-invalid", "--tokenizer", "none")
    assert r["skipped"] == {"count": 1, "rows": [f"{data}:3: field 'chosen' is missing"]}
    assert r["rows"] == 3 and r["token_lengths"] is None
    assert r["tokenizer"]["note"].startswith("token checks skipped")


@pytest.mark.parametrize("args, message", [
    (["--max-length", "8", "--max-prompt-length", "8"], "--max-prompt-length must be <"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--similarity", "1.5"], "--similarity must lie in (0, 1]"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    data = write(tmp_path / "d.jsonl", DUP_ROWS)
    assert main(["inspect", str(data), "--tokenizer", "none", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def _summed_logps(model, ids: list[int], n_prompt: int) -> float:
    """sum_t log p(ids[t] | ids[:t]) over completion positions t >= n_prompt, straight from
    the model's full logits (an independent path from the chunked log-probs)."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
    return float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))


def test_unflippable_pair_listed_with_reference_margins(tmp_path, capsys, tiny_dir, tokenizer,
                                                        cache):
    """A pair whose chosen completion is ~50 tokens of rare characters and whose rejected is
    two words: the reference prefers the rejected by far more than log(3)/beta nats, so it is
    listed with its margin; pairs of similar-length completions are not.  The margins equal
    summed log-probs computed from the model's full logits."""
    from dpolab.models import load_model

    odd = " zq#xv@kj" * 6
    rows = [{"prompt": f"Say {w}.", "chosen": f" {w} {w}.", "rejected": f" {v} {v}.",
             "group": g} for w, v, g in [("cat", "dog", "a"), ("ball", "door", "a"),
                                         ("light", "field", "b"), ("letter", "story", "b")]]
    rows.insert(2, {"prompt": "Say ok.", "chosen": odd, "rejected": " ok ok.", "group": "b"})
    data = write(tmp_path / "u.jsonl", rows)
    r = run_json(capsys, data, "--model", tiny_dir, "--beta", 0.1)
    ref = r["reference"]
    assert ref["pairs"] == 5 and ref["beta"] == 0.1
    assert ref["threshold"] == pytest.approx(math.log(3) / 0.1)   # 1.0986 / 0.1 = 10.986

    model = load_model(str(tiny_dir))
    margins = {}
    for row in load_rows(data).rows:
        p, c, rj = tokenize_row(row, tokenizer)
        margins[f"{data}:{row.row}"] = (_summed_logps(model, p + c, len(p))
                                        - _summed_logps(model, p + rj, len(p)))
    stuck = {w for w, m in margins.items() if -m > math.log(3) / 0.1}
    assert stuck == {f"{data}:3"}           # the built pair, and only it, by direct computation
    assert [u["where"] for u in ref["unflippable"]] == [f"{data}:3"]
    assert ref["unflippable"][0]["group"] == "b"
    assert ref["unflippable"][0]["margin"] == pytest.approx(margins[f"{data}:3"], abs=1e-3)
    assert ref["margin"]["min"] == pytest.approx(min(margins.values()), abs=1e-3)
    assert ref["margin"]["negative_fraction"] == pytest.approx(
        sum(m < 0 for m in margins.values()) / 5)
    assert ref["groups"]["b"]["n"] == 3 and ref["groups"]["b"]["unflippable"] == 1
    assert ref["groups"]["a"]["unflippable"] == 0
    # with beta large enough the threshold log(3)/beta falls below every reversed margin;
    # the reference pass uses the model's tokenizer even when the token checks are off
    big = run_json(capsys, data, "--model", tiny_dir, "--beta", 1e6, "--tokenizer", "none")
    assert big["token_lengths"] is None
    assert len(big["reference"]["unflippable"]) == sum(m < -math.log(3) / 1e6
                                                       for m in margins.values())


def test_reference_store_is_shared_with_train(tmp_path, capsys, tiny_dir, cache, monkeypatch):
    """inspect --model stores the reference log-probs under the trainer's key (same split,
    truncation and weights), so a later train run with those settings computes none; and
    --json-out writes the same report that --json prints."""
    from dpolab import config as C
    from dpolab import reference
    from dpolab.train import train

    rows = [{"prompt": f"Say {w} {i}.", "chosen": f" {w} {w}.", "rejected": f" no {i}.",
             "group": "ab"[i % 2]} for i, w in enumerate(["cat", "dog", "sun", "tree"] * 3)]
    data = write(tmp_path / "s.jsonl", rows)
    out = tmp_path / "report.json"
    r = run_json(capsys, data, "--model", tiny_dir, "--max-length", 48,
                 "--max-prompt-length", 16, "--json-out", out)
    assert json.loads(out.read_text()) == r
    stored = sorted((cache / "reference").glob("*.safetensors"))
    assert len(stored) == 2 and r["reference"]["pairs"] == 12   # train and held-out splits

    def no_compute(*args, **kwargs):
        raise AssertionError("train computed a reference that inspect had stored")

    monkeypatch.setattr(reference, "assemble", no_compute)  # what every computed store passes
    cfg = C.build_config(C.apply_overrides(
        {"model": {"name": str(tiny_dir)}, "data": {"path": str(data)},
         "out": str(tmp_path / "run")},
        ["train.max_steps=1", "train.progress=false", "train.did_samples=0",
         "data.max_length=48", "data.max_prompt_length=16"]))
    train(cfg)
    assert sorted((cache / "reference").glob("*.safetensors")) == stored


def test_ches_per_pair_with_a_model(tmp_path, capsys, tiny_dir, tokenizer, cache):
    """inspect --model reports CHES (dpolab.ches) for every pair: the highest-CHES list holds
    each pair once, highest first, with the value the paper's formula gives from the model's
    own hidden_states[-1] (states predicting each completion token, summed, float64), and the
    text report has the CHES table."""
    from dpolab.models import load_model

    rows = [{"prompt": f"Say {w}.", "chosen": f" {w} {w}.", "rejected": f" {v}.",
             "group": g} for w, v, g in [("cat", "dog", "a"), ("ball", "door is red", "a"),
                                         ("light", "light", "b"), ("letter", "story", "b")]]
    data = write(tmp_path / "c.jsonl", rows)
    r = run_json(capsys, data, "--model", tiny_dir)
    model = load_model(str(tiny_dir))
    want = {}
    with torch.no_grad():
        for row in load_rows(data).rows:
            p, c, rj = tokenize_row(row, tokenizer)
            s = [model(input_ids=torch.tensor([p + y]), output_hidden_states=True)
                 .hidden_states[-1][0, len(p) - 1:len(p) + len(y) - 1].double().sum(0)
                 for y in (c, rj)]
            want[f"{data}:{row.row}"] = float(s[0] @ s[1] - s[0] @ s[0])
    got = r["reference"]["ches"]["highest"]
    assert sorted(h["where"] for h in got) == sorted(want)
    assert [h["ches"] for h in got] == sorted((h["ches"] for h in got), reverse=True)
    for h in got:
        assert h["ches"] == pytest.approx(want[h["where"]], rel=1e-4, abs=1e-3)
    assert r["reference"]["ches"]["groups"]["a"]["ches"]["n"] == 2
    assert main(["inspect", str(data), "--model", str(tiny_dir), "--no-progress"]) == 0
    assert "highest CHES: 4" in capsys.readouterr().out
