"""Loading, validation, tokenization and collation of preference data (dpolab.data)."""

from __future__ import annotations

import json

import pytest
import torch

from dpolab.errors import UserError
from dpolab.data import DataError, PreferenceRow, load_rows, parse_row, write_jsonl
from dpolab.tokenize import PairExample, collate_pairs, tokenize_rows

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


STANDARD = [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "group": "math"},
            {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Berlin",
             "source_id": 17}]
IMPLICIT = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Water is wet.", "rejected": "Water is dry."}]
CONVERSATIONAL = [
    {"prompt": [_user("Hi")], "chosen": [_bot("Hello!")], "rejected": [_bot("Go away.")]},
    {"prompt": [{"role": "system", "content": "Be brief."}, _user("Hi"), _bot("Hello!"),
                _user("Capital of France?")],
     "chosen": [_bot("Paris")], "rejected": [_bot("Berlin")], "group": "factual"}]
IMPLICIT_CONVERSATIONAL = [
    {"chosen": [_user("Hi"), _bot("Hello!")], "rejected": [_user("Hi"), _bot("Go away.")]},
    {"chosen": [_user("Hi"), _bot("Hello!"), _user("2+2?"), _bot("4")],
     "rejected": [_user("Hi"), _bot("Hello!"), _user("2+2?"), _bot("5")]}]
CASES = {"standard": STANDARD, "implicit": IMPLICIT, "conversational": CONVERSATIONAL,
         "implicit_conversational": IMPLICIT_CONVERSATIONAL}


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (vocab 512) with a ChatML-like template; trains in well under 1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = "The capital of France is Paris. Hello user, assistant and system. 2+2 is 4."
    tok.train_from_iterator([text] * 20, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|pad|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "json_data":
        path.write_text(json.dumps({"data": records}))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _source(tmp_path, records, kind):
    if kind == "dataset":
        import datasets
        return datasets.Dataset.from_list(records)
    ext = {"json_data": "json"}.get(kind, kind)
    return _write(tmp_path / f"pairs.{ext}", records, kind)


# ------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("kind", ["jsonl", "json", "json_data", "parquet", "dataset"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_every_format_loads_from_every_source(tmp_path, kind, fmt):
    """Each TRL format, from each source, gives the same rows with the right prompt split."""
    records = CASES[fmt]
    if kind in ("parquet", "dataset"):   # a table needs the same columns in every row
        records = [dict(r, group=r.get("group")) for r in records]
        if fmt == "standard":
            records = [dict(r, source_id=r.get("source_id")) for r in records]
    loaded = load_rows(_source(tmp_path, records, kind))
    assert loaded.format == fmt and loaded.skipped == []
    assert [r.row for r in loaded.rows] == [1, 2]
    expected_source = "<dataset>" if kind == "dataset" else str(tmp_path / (
        "pairs." + {"json_data": "json"}.get(kind, kind)))
    assert loaded.rows[0].source == expected_source
    second = loaded.rows[1]
    if fmt == "standard":
        assert (second.prompt, second.chosen, second.rejected) == (
            "Capital of France?", "Paris", "Berlin")
        assert second.meta == {"source_id": 17} and loaded.rows[0].group == "math"
    elif fmt == "implicit":
        # TRL's rule: the shared text up to the first difference, less its final space
        assert (second.prompt, second.chosen, second.rejected) == ("Water is", " wet.", " dry.")
        assert second.implicit_prompt
    elif fmt == "conversational":
        assert len(second.prompt) == 4 and second.chosen == [_bot("Paris")]
        assert second.group == "factual"
    else:   # the prompt is the common leading messages, the completion the final turn
        assert second.prompt == [_user("Hi"), _bot("Hello!"), _user("2+2?")]
        assert (second.chosen, second.rejected) == ([_bot("4")], [_bot("5")])


@pytest.mark.parametrize("fmt", list(CASES))
def test_write_jsonl_round_trips(tmp_path, fmt):
    """write_jsonl then load_rows gives back the same prompt/chosen/rejected/group/meta, and an
    implicit prompt stays implicit (written back into both completions)."""
    rows = load_rows(_write(tmp_path / "a.jsonl", CASES[fmt], "jsonl")).rows
    again = load_rows(write_jsonl(rows, tmp_path / "b.jsonl"))
    keys = ("prompt", "chosen", "rejected", "group", "meta", "implicit_prompt")
    assert [[getattr(r, k) for k in keys] for r in again.rows] == [
        [getattr(r, k) for k in keys] for r in rows]
    assert again.format == fmt


# ----------------------------------------------------------------------------- bad input
BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, "field 'chosen' is missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "field 'rejected' must be a string, got int"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"},
     "field 'chosen' must be a string or a list of messages, got int"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "field 'rejected' is missing"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "group": 4},
     "field 'group' must be a non-empty string, got int"),
    ([1, 2], "a row must be a JSON object, got list"),
    ({"prompt": [_user("q")], "chosen": [{"role": "bot", "content": "a"}],
      "rejected": [_bot("b")]},
     "field 'chosen[0]' has role 'bot'; valid: system, user, assistant, tool"),
    ({"prompt": [{"role": "user"}], "chosen": [_bot("a")], "rejected": [_bot("b")]},
     "field 'prompt[0]' has no 'content'"),
    ({"prompt": [_user("q")], "chosen": [_bot("a")], "rejected": []},
     "field 'rejected' is empty"),
    ({"prompt": [_user("q")], "chosen": [_bot("a")], "rejected": [_user("b")]},
     "field 'rejected' must end with an assistant message, got role 'user'; no assistant "
     "turn follows the point where chosen and rejected diverge (rejected[0]), so there is "
     "nothing to prefer"),
    ({"prompt": "q", "chosen": [_bot("a")], "rejected": [_bot("b")]},
     "field 'prompt' must be a list of messages, got str"),
    ({"chosen": [_user("x"), _bot("a")], "rejected": [_user("y"), _bot("b")]},
     "fields 'chosen' and 'rejected' share no leading message, so there is no prompt; "
     "give a 'prompt' column"),
]


@pytest.mark.parametrize("record,message", BAD_ROWS)
def test_bad_row_names_file_row_and_field(tmp_path, record, message):
    """A bad row on line 2 stops loading with exactly 'FILE:2: <what is wrong>'."""
    lists = isinstance(record, dict) and any(isinstance(v, list) for v in record.values())
    first = (STANDARD if not lists else CONVERSATIONAL if "prompt" in record
             else IMPLICIT_CONVERSATIONAL)[0]   # a valid first row of the same format
    path = _write(tmp_path / "pairs.jsonl", [first, record], "jsonl")
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}:2: {message}"
    assert isinstance(err.value, UserError)


def test_invalid_json_line_and_mixed_formats(tmp_path):
    """Line numbers count every line (blank ones too); mixing strings and messages is an error."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n\n{oops\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: not valid JSON: Expecting property "
                                        r"name enclosed in double quotes \(column 2\)$"):
        load_rows(path)
    _write(path, [STANDARD[0], CONVERSATIONAL[0]], "jsonl")
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == (f"{path}:2: field 'chosen' must be a string like the earlier rows "
                              "(formats cannot be mixed), got list")
    _write(path, [STANDARD[0], IMPLICIT[0]], "jsonl")
    with pytest.raises(DataError, match=r":2: field 'prompt' is missing$"):
        load_rows(path)
    _write(path, [IMPLICIT[0], STANDARD[0]], "jsonl")
    with pytest.raises(DataError, match=r":2: field 'prompt' is present but earlier rows"):
        load_rows(path)


def test_unreadable_sources(tmp_path):
    """Missing file, unknown extension, broken JSON document: 'FILE: ...', even when skipping."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_rows(missing, skip_invalid=True)
    assert str(err.value) == f"{missing}: no such file"
    csv = tmp_path / "pairs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DataError) as err:
        load_rows(csv, skip_invalid=True)
    assert str(err.value) == f"{csv}: unknown extension '.csv'; valid: .jsonl, .json, .parquet"
    broken = tmp_path / "pairs.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match=r"pairs\.json: not valid JSON: .*line 1, column 3"):
        load_rows(broken, skip_invalid=True)
    bad_parquet = tmp_path / "pairs.parquet"
    bad_parquet.write_text("not parquet")
    with pytest.raises(DataError, match=r"pairs\.parquet: cannot be read as Parquet"):
        load_rows(bad_parquet)


def test_skip_invalid_counts_dropped_rows_and_empty_result_raises(tmp_path):
    """3 good + 2 bad rows -> 3 rows kept, the 2 messages in order; all bad -> an error."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps(STANDARD[0]), "{bad", json.dumps(STANDARD[1]),
                               json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}),
                               json.dumps(STANDARD[0])]))
    loaded = load_rows(path, skip_invalid=True)
    assert [r.row for r in loaded.rows] == [1, 3, 5]
    assert len(loaded.skipped) == 2
    assert loaded.skipped[0].startswith(f"{path}:2: not valid JSON")
    assert loaded.skipped[1] == f"{path}:4: chosen and rejected are identical"
    path.write_text("{bad\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl: no valid preference rows \(1 invalid"):
        load_rows(path, skip_invalid=True)
    path.write_text("\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl: no valid preference rows$"):
        load_rows(path)


# ---------------------------------------------------------------------------- tokenization
def _row(prompt, chosen, rejected, group=None, row=1):
    return parse_row({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      **({"group": group} if group else {})}, source="t.jsonl", row=row)[0]


def test_conversational_ids_follow_the_template(tokenizer):
    """prompt ids = template(prompt, generation prompt); completion = the rest, up to EOS.

    The template renders the completion as "Paris<|im_end|>\\n"; the "\\n" after the EOS is
    dropped so the completion ends with exactly one EOS."""
    row = _row([_user("Hi")], [_bot("Paris")], [_bot("Berlin")])
    ex = tokenize_rows([row], tokenizer, max_length=64, max_prompt_length=32).examples[0]
    prompt_text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ex.prompt_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert ex.chosen_ids == tokenizer("Paris", add_special_tokens=False)["input_ids"] + [eos]
    assert tokenizer.decode(ex.rejected_ids) == "Berlin<|im_end|>"


def test_string_rows_are_plain_text_with_eos(tokenizer):
    """Strings skip the template; an empty (implicit) prompt becomes one EOS token, because
    this tokenizer has no BOS and the first completion token needs a position before it."""
    eos = tokenizer.eos_token_id
    std = tokenize_rows([_row("2+2 is", " 4", " 5")], tokenizer, max_length=32,
                        max_prompt_length=16).examples[0]
    assert tokenizer.decode(std.prompt_ids) == "2+2 is"
    assert std.chosen_ids[-1] == eos and tokenizer.decode(std.chosen_ids[:-1]) == " 4"
    implicit = parse_row({"chosen": "Paris", "rejected": "Berlin"}, source="t", row=1)[0]
    ex = tokenize_rows([implicit], tokenizer, max_length=32, max_prompt_length=16).examples[0]
    assert ex.prompt_ids == [eos]


def test_prompt_prefix_check_names_row_and_divergence(tokenizer):
    """A template that renders the last user turn differently once an answer follows it is
    caught, with the row and the characters around the first difference: the difference lies
    before the generation prompt, so no cut keeps the prompt's text out of the completion."""
    bad = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer,
                              eos_token="<|im_end|>", pad_token="<|pad|>")
    bad.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last and m['role'] == 'user' %} (last){% endif %}"
                         "{% if not loop.last %} | {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %} | assistant:{% endif %}")
    row = _row([_user("Hi")], [_bot("Paris")], [_bot("Berlin")], row=7)
    with pytest.raises(DataError) as err:
        tokenize_rows([row], bad, max_length=64, max_prompt_length=32)
    # "user: Hi (last) | assistant:" vs "user: Hi | assistant: Paris": differ at character 9.
    assert str(err.value) == (
        "t.jsonl:7: the chat template's rendering of the prompt is not a prefix of its "
        "rendering of prompt + completion before its generation prompt (the template renders "
        "the earlier messages differently once an answer follows, so no cut keeps them out of "
        "the completion); they diverge at character 9: prompt ...'user: Hi (last) | "
        "assistant:' vs full ...'user: Hi | assistant: Paris'")


def test_truncation_keeps_prompt_end_or_start_and_fits_max_length(tokenizer):
    """Prompt of P tokens cut to 4 (end or start kept); completions cut to max_length - 4."""
    prompt = "The capital of France is Paris. The capital of France is"
    full = tokenizer(prompt)["input_ids"]
    row = _row(prompt, " Paris. Hello user.", " Berlin, hello system.")
    for mode, kept in (("keep_end", full[-4:]), ("keep_start", full[:4])):
        out = tokenize_rows([row], tokenizer, max_length=7, max_prompt_length=4,
                            truncation=mode)
        ex = out.examples[0]
        assert ex.prompt_ids == kept
        assert len(ex.chosen_ids) == len(ex.rejected_ids) == 7 - 4
        assert (out.truncated_prompt, out.truncated_completion, out.dropped_identical) == (
            1, 1, 0)
    with pytest.raises(DataError, match="truncation 'middle' is unknown"):
        tokenize_rows([row], tokenizer, max_length=7, max_prompt_length=4, truncation="middle")
    with pytest.raises(DataError, match=r"need 0 < max_prompt_length \(8\) < max_length \(8\)"):
        tokenize_rows([row], tokenizer, max_length=8, max_prompt_length=8)


def test_pairs_identical_after_truncation_are_dropped_and_counted(tokenizer):
    """Completions differing only after the cut carry no preference: dropped, counted, named;
    if every pair is dropped that is an error rather than an empty data set."""
    same_start = _row("Hi", " The capital of France is Paris.",
                      " The capital of France is Berlin.", row=3)
    differ = _row("Hi", " Paris", " Berlin", group="g", row=4)
    out = tokenize_rows([same_start, differ], tokenizer, max_length=4, max_prompt_length=1)
    assert out.dropped_identical == 1 and out.dropped == ["t.jsonl:3"]
    assert [(e.index, e.row, e.group) for e in out.examples] == [(1, 4, "g")]
    assert out.groups == ["g"] and out.truncated_completion == 2
    with pytest.raises(DataError, match="all 1 pairs have identical chosen and rejected"):
        tokenize_rows([same_start], tokenizer, max_length=4, max_prompt_length=1)


# ------------------------------------------------------------------------------- collation
def test_collate_shapes_labels_and_masks():
    """Hand-built pairs: prompt [5, 6] + chosen [7, 8, 9] / rejected [10]; prompt [11] +
    chosen [12] / rejected [13, 14].  Lengths 5, 2, 3, 3 -> T = 5, padded to 8 with pad 0."""
    exs = [PairExample([5, 6], [7, 8, 9], [10], "b", 0, 1, "s"),
           PairExample([11], [12], [13, 14], None, 3, 4, "s")]
    batch = collate_pairs(exs, pad_id=0, pad_to_multiple_of=8, groups=["a", "b"])
    assert batch.input_ids.shape == batch.labels.shape == (4, 8)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [11, 12, 0, 0, 0, 0, 0, 0],
                                        [5, 6, 10, 0, 0, 0, 0, 0], [11, 13, 14, 0, 0, 0, 0, 0]]
    assert batch.attention_mask.sum(1).tolist() == [5, 2, 3, 3]
    assert batch.labels[0].tolist() == [6, 7, 8, 9, 0, 0, 0, 0]
    # The mask starts at the last prompt position and covers one position per completion token.
    assert batch.loss_mask.sum(1).tolist() == [3, 1, 1, 2]
    assert batch.loss_mask[0].tolist() == [False, True, True, True, False, False, False, False]
    completions = [[7, 8, 9], [12], [10], [13, 14]]
    for b, ids in enumerate(completions):
        assert batch.labels[b][batch.loss_mask[b]].tolist() == ids
    assert batch.group_ids.tolist() == [1, -1] and batch.indices.tolist() == [0, 3]
    assert batch.loss_mask.dtype == torch.bool and batch.labels.dtype == torch.long
    assert (batch.n_pairs, batch.n_tokens, batch.n_completion_tokens) == (2, 13, 7)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_collate_after_tokenize_masks_exactly_the_completions(tokenizer):
    """End to end: under loss_mask the labels are the completion ids of each pair."""
    rows = load_rows_from(CONVERSATIONAL)
    out = tokenize_rows(rows, tokenizer, max_length=64, max_prompt_length=48)
    batch = collate_pairs(out.examples, pad_id=tokenizer.pad_token_id, groups=out.groups)
    comps = [e.chosen_ids for e in out.examples] + [e.rejected_ids for e in out.examples]
    assert batch.loss_mask.sum(1).tolist() == [len(c) for c in comps]
    for b, ids in enumerate(comps):
        assert batch.labels[b][batch.loss_mask[b]].tolist() == ids
    assert batch.group_ids.tolist() == [-1, 0]   # groups == ["factual"]


def load_rows_from(records) -> list[PreferenceRow]:
    return [parse_row(r, source="mem", row=i + 1)[0] for i, r in enumerate(records)]


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    """pyarrow is an optional extra: a Parquet file without it is a one-line DataError naming
    the file and the extra to install, not an ImportError traceback."""
    import sys

    path = _write(tmp_path / "pairs.parquet", CASES["standard"], "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(DataError, match=r"pairs\.parquet: reading Parquet needs pyarrow.*"
                                        r"dpolab\[parquet\]"):
        load_rows(path)
