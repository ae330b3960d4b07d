"""Rows whose prompt ends where it is found (dpolab.common_prefix): chat templates whose
generation prompt is not a prefix of the rendered conversation, templates that rewrite earlier
turns, and implicit prompts in string rows, against hand-decoded values and TRL 1.16's own
preprocessing."""

import json
import os
from types import SimpleNamespace

import pytest

import dpolab
from dpolab import common_prefix
from dpolab.chat import render_pair
from dpolab.cli import main
from dpolab.data import DataError, parse_row, split_shared_text
from dpolab.tiny import tiny_model, tiny_tokenizer
from dpolab.tokenize import tokenize_pair, tokenize_rows
from tests.test_data import _bot, _user

# DeepSeek-V3.1's pattern: the generation prompt opens "<think>", a rendered final answer starts
# with "</think>" (the two share the text "<", not a token).
DEEPSEEK = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
            "{% if m.role == 'assistant' %}{{ '</think>' }}{% endif %}"
            "{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>' }}{% endif %}")
# DeepSeek-R1's pattern: the generation prompt adds "<think>\n"; a rendered turn drops its
# reasoning block, so the turn has none.
DEEPSEEK_R1 = ("{% for m in messages %}{% set c = m.content %}"
               "{% if m.role == 'assistant' and '</think>' in c %}"
               "{% set c = c.split('</think>')[-1] %}{% endif %}"
               "{{ '<|im_start|>' + m.role + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}"
               "{% endif %}")
# Nemotron 3 / Qwen3's pattern: assistant turns before the last user turn lose their reasoning
# ("<think></think>" + answer), a turn without reasoning renders an empty block, and the
# generation prompt opens "<think>\n".
NEMOTRON = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{%- for m in messages %}{%- set c = m.content %}"
    "{%- if m.role == 'assistant' %}"
    "{%- if '</think>' in c and loop.index0 < ns.last_user %}"
    "{%- set c = '<think></think>' + c.split('</think>')[-1] %}"
    "{%- elif '<think>' not in c %}{% set c = '<think></think>' + c %}{% endif %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + c + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


def _tokenizer(template=None):
    """The tiny tokenizer with <think>, </think> (and the tool tags) as single tokens."""
    tok = tiny_tokenizer(tools=True)
    if template:
        tok.chat_template = template
    return tok


def _row(record, row=1):
    return parse_row(record, source="t.jsonl", row=row)[0]


def _decoded(tok, completion):
    """(scored text, read-only text) of a (ids, mask) completion."""
    ids, mask = completion
    mask = mask or [True] * len(ids)
    return (tok.decode([t for t, m in zip(ids, mask) if m]),
            tok.decode([t for t, m in zip(ids, mask) if not m]))


CAPITAL = {"prompt": [_user("Capital of France?")], "chosen": [_bot("Paris")],
           "rejected": [_bot("Berlin")]}


# ------------------------------------------------------------------------------ templates
def test_deepseek_v31_cut_in_token_ids_not_text():
    """Generation prompt "...assistant\\n<think>", turn "...assistant\\n</think>Paris": the
    prompt is cut after "assistant\\n" and the completion is "</think>Paris<|im_end|>", whole
    tokens of the rendered conversation.  The longest common *text* prefix ends inside the
    "</think>" token ("...\\n<"): its tokens are no prefix of the conversation's tokens."""
    tok = _tokenizer(DEEPSEEK)
    ids = tokenize_pair(_row(CAPITAL), tok)
    assert ids.common_prefix
    assert tok.decode(ids.prompt) == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert _decoded(tok, ids.chosen) == ("</think>Paris<|im_end|>", "")
    assert _decoded(tok, ids.rejected) == ("</think>Berlin<|im_end|>", "")
    prompt_text = tok.apply_chat_template(CAPITAL["prompt"], tokenize=False,
                                          add_generation_prompt=True)
    full_text = tok.apply_chat_template(CAPITAL["prompt"] + CAPITAL["chosen"], tokenize=False)
    text_cut = os.path.commonprefix([prompt_text, full_text])
    assert text_cut.endswith("assistant\n<")
    full = tok(full_text, add_special_tokens=False)["input_ids"]
    cut = tok(text_cut, add_special_tokens=False)["input_ids"]
    assert full[:len(cut)] != cut
    # every token of the rendered conversation is in place, the completion's once
    assert ids.prompt + ids.chosen[0] == full[:len(full) - 1]       # less the "\n" after EOS


def test_deepseek_r1_generation_prompt_adds_think():
    """Generation prompt "...assistant\\n<think>\\n", turn without it (the template drops the
    turn's reasoning): cut after "assistant\\n"; the answer is the completion."""
    tok = _tokenizer(DEEPSEEK_R1)
    row = _row(dict(CAPITAL, chosen=[_bot("<think>France's capital.</think>Paris")]))
    ids = tokenize_pair(row, tok)
    assert ids.common_prefix
    assert tok.decode(ids.prompt).endswith("<|im_start|>assistant\n")
    assert _decoded(tok, ids.chosen) == ("Paris<|im_end|>", "")


def test_nemotron_style_single_turn():
    """An earlier turn's reasoning is stripped in every rendering (it precedes the last user
    turn), so the prompt agrees up to the generation prompt "<think>\\n".  Chosen carries its
    reasoning (the generation prompt is a prefix of its rendering), rejected has none
    ("<think></think>Berlin"): both are cut after "<think>", the smaller common prefix."""
    tok = _tokenizer(NEMOTRON)
    row = _row({"prompt": [_user("Hi"), _bot("<think>greet</think>Hello!"), _user("Capital?")],
                "chosen": [_bot("<think>\nIt is Paris.\n</think>Paris")],
                "rejected": [_bot("Berlin")]})
    ids = tokenize_pair(row, tok)
    assert ids.common_prefix
    assert tok.decode(ids.prompt) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think></think>Hello!<|im_end|>\n"
        "<|im_start|>user\nCapital?<|im_end|>\n<|im_start|>assistant\n<think>")
    assert _decoded(tok, ids.chosen) == ("\nIt is Paris.\n</think>Paris<|im_end|>", "")
    assert _decoded(tok, ids.rejected) == ("</think>Berlin<|im_end|>", "")


def test_nemotron_style_dialogue_rewrites_the_earlier_turn():
    """Dialogues diverging at the first answer, under a template that strips the reasoning of
    an assistant turn once a user turn follows it: chosen's first answer renders with its
    reasoning alone and without it inside the dialogue.  Scored are the turns as the whole
    conversation shows them, each up to its end-of-turn token; the user turn, the next
    header and its "<think>" are read only."""
    tok = _tokenizer(NEMOTRON)
    row = _row({"chosen": [_user("Hi"), _bot("<think>greet</think>Hello!"), _user("2+2?"),
                           _bot("4")],
                "rejected": [_user("Hi"), _bot("Go away."), _user("2+2?"), _bot("5")]})
    ids = tokenize_pair(row, tok)
    assert ids.common_prefix
    assert tok.decode(ids.prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>"
    read = "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>"
    assert _decoded(tok, ids.chosen) == ("</think>Hello!<|im_end|></think>4<|im_end|>", read)
    assert _decoded(tok, ids.rejected) == ("</think>Go away.<|im_end|></think>5<|im_end|>", read)


CHAINED = [  # rows whose renderings extend one another under the template given with them
    (None, {"chosen": [_user("Hi"), _bot("Hello!"), _user("2+2?"), _bot("4")],
            "rejected": [_user("Hi"), _bot("Go away."), _user("2+2?"), _bot("5")]}),
    (None, {"prompt": [_user("Hi")], "chosen": [_user("Really?"), _bot("Yes.")],
            "rejected": [_user("Sure?"), _bot("No.")]}),
    (None, CAPITAL),
    ("tools", None),        # the README's tool example (tests/test_tools.py)
]


@pytest.mark.parametrize("template,record", CHAINED)
def test_common_prefix_path_equals_turn_by_turn_where_both_apply(template, record):
    """On rows whose renderings chain (ChatML, the tool template), the common-prefix path gives
    the ids and scored masks of the turn-by-turn path: the two cut the same conversation."""
    if template == "tools":
        from tests.test_tools import README_ROW
        tok, record = tiny_tokenizer(tools=True), README_ROW
    else:
        tok = tiny_tokenizer()
    row = _row(record)
    turn_by_turn = tokenize_pair(row, tok)
    assert not turn_by_turn.common_prefix
    prompt, chosen, rejected = common_prefix.conversation_pair(render_pair(row, tok), tok)
    assert (prompt, chosen, rejected) == (turn_by_turn.prompt, turn_by_turn.chosen,
                                          turn_by_turn.rejected)


def test_counted_in_data_json_and_inspect(tmp_path, cache, capsys):
    """Rows that took the common-prefix path are counted per split in RUN/data.json and
    listed by `dpolab inspect`; training on them starts at the reference (ln 2)."""
    tok = _tokenizer(DEEPSEEK)
    rows = [{"prompt": [_user(f"Say {w}.")], "chosen": [_bot(f"{w} {w}.")],
             "rejected": [_bot(f"no {i}.")]} for i, w in enumerate(["cat", "dog", "sun", "tree",
                                                                    "moon", "red"])]
    run = dpolab.Trainer(tiny_model(vocab_size=len(tok)), rows[:4], tokenizer=tok,
                         eval_dataset=rows[4:], out=str(tmp_path / "run"),
                         **{"train.max_steps": 1, "train.progress": False,
                            "train.did_samples": 0, "train.report": False,
                            "data.max_length": 64, "data.max_prompt_length": 32}).train()
    info = json.loads((run / "data.json").read_text())
    assert (info["train"]["common_prefix"], info["held_out"]["common_prefix"]) == (4, 2)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[1])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    tok.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()  # training's own lines (the pair forward it chose) are not the report
    assert main(["inspect", str(data), "--tokenizer", str(tmp_path / "tok"), "--json",
                 "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["common_prefix"]["count"] == 6 and report["prefix_problems"]["count"] == 0


@pytest.mark.parametrize("template,record", [
    (DEEPSEEK, CAPITAL), (DEEPSEEK_R1, dict(CAPITAL, chosen=[_bot("<think>x</think>Paris")])),
    (NEMOTRON, {"prompt": [_user("Hi"), _bot("<think>greet</think>Hello!"), _user("Capital?")],
                "chosen": [_bot("<think>\nIt is Paris.\n</think>Paris")],
                "rejected": [_bot("Berlin")]})])
def test_template_rows_equal_trl_preprocessing(template, record):
    """TRL 1.16's DPOTrainer tokenization of the same conversational row with the same
    tokenizer gives the same prompt ids; its completions equal dpolab's up to the template's
    text after the final EOS (the "\\n" after "<|im_end|>"), which dpolab drops."""
    tok = _tokenizer(template)
    ours = tokenize_pair(_row(record), tok)
    theirs = _trl_tokenized([record], tok)[0]
    assert ours.prompt == theirs["prompt_ids"]
    eos = tok.eos_token_id
    assert ours.chosen[0] == common_prefix.end_with_eos(theirs["chosen_ids"], eos)
    assert ours.rejected[0] == common_prefix.end_with_eos(theirs["rejected_ids"], eos)


def _trl_tokenized(records: list[dict], tok) -> list[dict]:
    """TRL's own preprocessing (DPOTrainer._prepare_dataset: prompt extraction, EOS, tokenization)
    run on a stand-in trainer that holds only what it reads."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from datasets import Dataset

    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    out = trl_dpo.DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok),
                                              Dataset.from_list(records), tok, args, "t")
    return list(out)


# ------------------------------------------------------------------------ implicit strings
@pytest.mark.parametrize("chosen,rejected,expected", [
    # first difference at "t"/"a" after a space: the space starts both completions
    ("The cat sees the red ball.", "The cat sees a long letter.",
     ("The cat sees", " the red ball.", " a long letter.")),
    # inside a word: the prompt ends inside it
    ("The cat sees", "The cat seeks", ("The cat see", "s", "ks")),
    # one is the start of the other: the last shared character stays in both
    ("The teacher reads", "The teacher reads with care.",
     ("The teacher read", "s", "s with care.")),
    # no shared start: no prompt
    ("Yes.", "No.", ("", "Yes.", "No.")),
    # no shared start and chosen ending with a space (TRL would cut at -1): no prompt
    ("a ", "b", ("", "a ", "b")),
])
def test_split_shared_text_by_hand(chosen, rejected, expected):
    """TRL's extract_prompt rule for strings, case by case."""
    assert split_shared_text(chosen, rejected) == expected
    row = _row({"chosen": chosen, "rejected": rejected})
    assert (row.prompt, row.chosen, row.rejected) == expected and row.implicit_prompt


IMPLICIT = [{"chosen": "The cat sees the red ball today.", "rejected": "The cat sees a long letter."},
            {"chosen": "My friend helps the old man", "rejected": "My friend helps the old dog"},
            {"chosen": "The teacher reads", "rejected": "The teacher reads with care."},
            {"chosen": "The cat sees", "rejected": "The cat seeks"},
            {"chosen": "Answer: yes", "rejected": "Answer: no"}]


def test_implicit_string_rows_by_hand():
    """Tokenized whole and cut in token ids: where the found prompt ends inside a token
    ("The cat see|s"), the prompt is the tokens before it and both completions start with
    the whole word; elsewhere the prompt is the shared text's own tokens.  Either way
    prompt + completion are the tokens of the text (plus EOS)."""
    tok = tiny_tokenizer()
    eos = tok.eos_token_id
    for record, (prompt, chosen, rejected, cut) in zip(IMPLICIT[::3], [
            ("The cat sees", " the red ball today.", " a long letter.", False),
            ("The cat", " sees", " seeks", True)]):
        ids = tokenize_pair(_row(record), tok)
        assert [tok.decode(x) for x in (ids.prompt, ids.chosen[0][:-1], ids.rejected[0][:-1])] == [
            prompt, chosen, rejected]
        assert ids.common_prefix == cut and ids.chosen[0][-1] == ids.rejected[0][-1] == eos
        whole = tok(record["chosen"])["input_ids"]
        assert ids.prompt + ids.chosen[0] == whole + [eos]


def test_implicit_string_rows_equal_trl_preprocessing():
    """dpolab's prompt, chosen and rejected ids of implicit-prompt string rows equal TRL 1.16's
    own preprocessing (extract_prompt, EOS, tokenization) with the same tokenizer, so per-token
    means, the SFT term and logps/* read the same tokens."""
    tok = tiny_tokenizer()
    theirs = _trl_tokenized(IMPLICIT, tok)
    out = tokenize_rows([_row(r, i + 1) for i, r in enumerate(IMPLICIT)], tok, max_length=64,
                        max_prompt_length=32)
    assert len(out.examples) == len(theirs) == 5
    for ex, t in zip(out.examples, theirs):
        assert (ex.prompt_ids, ex.chosen_ids, ex.rejected_ids) == (
            t["prompt_ids"], t["chosen_ids"], t["rejected_ids"])
    assert out.common_prefix == 1      # "The cat see|s": the prompt's " see" token left out


def test_implicit_conversational_prompt_equals_trl_extract_prompt():
    """Dialogues that differ within their common length: the prompt is the messages they share
    at their start, as trl.data_utils.extract_prompt finds it.  (When one dialogue is the start
    of the other, TRL keeps their last shared message in both completions; dpolab refuses
    the row, tests/test_chat_data.py.)"""
    trl_data = pytest.importorskip("trl.data_utils")
    for record in CHAINED[0][1], {"chosen": [_user("Hi"), _bot("A")],
                                  "rejected": [_user("Hi"), _bot("B"), _user("C"), _bot("D")]}:
        row = _row(record)
        assert trl_data.extract_prompt(record) == {"prompt": row.prompt, "chosen": row.chosen,
                                                   "rejected": row.rejected}


def test_prompt_difference_before_the_generation_prompt_is_refused():
    """A template that renders the prompt's own last message differently once an answer
    follows would put prompt text into the completion: refused, naming row and divergence."""
    tok = _tokenizer("{% for m in messages %}{{ m.role + ': ' + m.content }}"
                     "{% if loop.last and m.role == 'user' %}{{ ' (last)' }}{% endif %}"
                     "{{ '<|im_end|>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(DataError, match=r"^t\.jsonl:1: the chat template's rendering of the "
                                        r"prompt is not a prefix .* before its generation prompt"):
        tokenize_pair(_row(CAPITAL), tok)
