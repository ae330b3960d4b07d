"""Tool-use rows end to end: the README's tool example and multi-call dialogues train from the
command line and from Python, `dpolab inspect` audits them, and duplicates are keyed by the
calls themselves.  The model is the tiny one with a Qwen2.5-style tool template."""

import json
import math
import re
from pathlib import Path

import pytest

import dpolab
from dpolab import audit
from dpolab.cli import main
from dpolab.data import parse_row
from dpolab.dedup import split_duplicates
from dpolab.tokenize import tokenize_pair

REPO = Path(__file__).resolve().parent.parent


def readme_tool_row() -> dict:
    """The JSON row of README.md's "Tools" paragraph, as written there."""
    section = (REPO / "README.md").read_text().split("**Tools.**", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


README_ROW = readme_tool_row()


def _call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _with_arguments(row: dict, arguments) -> dict:
    """`row` with the arguments of its first chosen tool call replaced."""
    chosen = [dict(m) for m in row["chosen"]]
    chosen[0]["tool_calls"] = [_call("weather", arguments)]
    return dict(row, chosen=chosen)


VARIANT = _with_arguments(README_ROW, {"city": "Lyon"})   # differs only in the call's arguments
TOOLS = [README_ROW["tools"][0],
         {"type": "function", "function": {"name": "time", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}}}}]
# Two calls in one assistant turn (one with arguments as a JSON string), two tool results,
# a tools column with two functions.
MULTI_ROW = {
    "prompt": [{"role": "user", "content": "Weather and time in Paris?"}],
    "chosen": [{"role": "assistant", "content": "Checking.",
                "tool_calls": [_call("weather", {"city": "Paris"}),
                               _call("time", '{"city": "Paris"}')]},
               {"role": "tool", "name": "weather", "content": "sunny"},
               {"role": "tool", "name": "time", "content": "noon"},
               {"role": "assistant", "content": "Sunny, noon."}],
    "rejected": [{"role": "assistant", "content": "No idea."}],
    "tools": TOOLS}
FAST = {"train.max_steps": 2, "train.batch_size": 2, "train.progress": False,
        "train.did_samples": 0, "train.report": False, "data.max_length": 500,
        "data.max_prompt_length": 400}


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory):
    """The tiny model with the tokenizer's tools variant (tiny.CHATML_TOOLS_TEMPLATE)."""
    from dpolab.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tools") / "model", tools=True)


@pytest.fixture(scope="module")
def tokenizer(tools_dir):
    from dpolab.models import load_tokenizer

    return load_tokenizer(str(tools_dir))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_readme_tool_example_trains_from_the_command_line(tools_dir, tmp_path, cache, capsys):
    """`dpolab train` on the README's tool row, a copy differing only in the call's arguments,
    and a two-call dialogue: exit 0, every row kept (none is a duplicate of another), step 0 at
    the reference (ln 2), and data.json counts the dialogue whose grouped tool results (one
    user turn closed after the last) made its renderings no chain of prefixes."""
    data = _write(tmp_path / "tools.jsonl", [README_ROW, VARIANT, MULTI_ROW])
    run = tmp_path / "run"
    assert main(["train", "--model", str(tools_dir), "--data", str(data), "--out", str(run),
                 *(f"{k}={str(v).lower()}" for k, v in FAST.items())]) == 0
    assert "Traceback" not in capsys.readouterr().err
    info = json.loads((run / "data.json").read_text())
    assert info["train"]["pairs"] + info["held_out"]["pairs"] == 3
    assert info["train"]["common_prefix"] + info["held_out"]["common_prefix"] == 1
    steps = _steps(run)
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_readme_tool_example_trains_through_the_trainer(tools_dir, tmp_path, cache):
    """dpolab.Trainer on the same rows in memory (the dialogue held out): trains 2 steps."""
    run = dpolab.Trainer(str(tools_dir), [README_ROW, VARIANT], eval_dataset=[MULTI_ROW],
                         out=str(tmp_path / "run"), **FAST).train()
    info = json.loads((run / "data.json").read_text())
    assert (info["train"]["pairs"], info["held_out"]["pairs"]) == (2, 1)
    assert (info["train"]["common_prefix"], info["held_out"]["common_prefix"]) == (0, 1)
    steps = _steps(run)
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_readme_tool_example_is_audited_by_inspect(tools_dir, tmp_path, cache, capsys):
    """`dpolab inspect` with the model: every row tokenizes (no row refused), the dialogue is
    listed as cut at the common prefix, no exact duplicate is found (the two rows that differ
    in one argument are listed as similar), every pair gets a reference margin; the table
    prints too."""
    data = _write(tmp_path / "tools.jsonl", [README_ROW, VARIANT, MULTI_ROW])
    assert main(["inspect", str(data), "--model", str(tools_dir), "--max-length", "500",
                 "--max-prompt-length", "400", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["rows"] == 3 and r["format"] == "conversational"
    assert r["prefix_problems"] == {"count": 0, "rows": []}
    assert r["common_prefix"] == {"count": 1, "rows": [f"{data}:3"]}
    assert r["duplicates"]["exact"]["count"] == 0
    assert [(p["a"], p["b"], p["reason"]) for p in r["duplicates"]["near"]["pairs"]] == [
        (f"{data}:1", f"{data}:2", "similar")]
    assert r["reference"]["pairs"] == 3
    assert all(math.isfinite(r["reference"]["margin"][k]) for k in ("min", "max"))
    assert main(["inspect", str(data), "--tokenizer", str(tools_dir), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "rows training refuses (chat template, encoding): 0" in text
    assert f"common token prefix (the prompt alone tokenizes differently): 1\n    {data}:3" in text


def test_tool_calls_are_part_of_the_duplicate_key():
    """A tool-call turn is keyed by its calls: two rows differing only in a call's arguments
    are not duplicates (nor equal after normalization: only similar), a copy is; arguments
    given as a JSON string instead of an object are a different row as loaded (a template may
    render them differently) but the same after normalization."""
    rows = [parse_row(r, source="t.jsonl", row=i + 1)[0] for i, r in enumerate(
        [README_ROW, VARIANT, README_ROW,
         _with_arguments(README_ROW, '{"city": "Paris"}')])]
    assert audit.message_text(rows[0].chosen[0]) == 'assistant: call weather {"city": "Paris"}'
    assert audit.message_text(rows[0].chosen[1]) == "tool (name=weather): sunny, 21 C"
    assert audit.exact_duplicates(rows) == [["t.jsonl:1", "t.jsonl:3"]]
    near = audit.near_duplicates(rows)
    assert [(p["a"], p["b"], p["reason"]) for p in near][:2] == [
        ("t.jsonl:1", "t.jsonl:4", "normalized"), ("t.jsonl:1", "t.jsonl:2", "similar")]
    assert near[1]["similarity"] < 1
    found = split_duplicates(rows[:1], rows[1:])
    assert [h for h, _ in found.removed] == ["t.jsonl:3"]
    assert [r.row for r in found.held_out] == [2, 4]


def test_multi_call_dialogue_scores_the_assistant_turns(tokenizer):
    """The two-call dialogue: scored are the assistant's text with both calls (up to its EOS)
    and the final answer; read only are the grouped tool results and the next turn's header.
    Its renderings are no chain of prefixes (the first result's turn closes only after the
    second), so it takes the common-prefix path, with the same pieces a chain would give."""
    row = parse_row(MULTI_ROW, source="t.jsonl", row=1)[0]
    ids = tokenize_pair(row, tokenizer)
    assert ids.common_prefix
    assert tokenizer.decode(ids.prompt).endswith(
        "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert '{"name": "time"' in tokenizer.decode(ids.prompt)      # the tools column rendered
    chosen, mask = ids.chosen
    scored = tokenizer.decode([t for t, m in zip(chosen, mask) if m])
    read = tokenizer.decode([t for t, m in zip(chosen, mask) if not m])
    assert scored == ('Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": '
                      '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "time", "arguments": '
                      '{"city": "Paris"}}\n</tool_call><|im_end|>Sunny, noon.<|im_end|>')
    assert read == ("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
                    "<tool_response>\nnoon\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids.rejected[0]) == "No idea.<|im_end|>" and ids.rejected[1] is None
