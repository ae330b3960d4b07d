"""Conversational data beyond one turn: tool calls, the tools column, chat_template_kwargs,
and preference over a whole dialogue (only the assistant turns after the divergence scored)."""

from __future__ import annotations

import json

import pytest
import torch

from dpolab.data import DataError, load_rows, parse_row, write_jsonl
from dpolab.models import body_and_head
from dpolab.head_cache import CachedHeadForward
from dpolab.policy import BodyForward, SharedPromptForward, shared_prompt_batch
from dpolab.reference import hash_examples
from dpolab.tiny import tiny_model, tiny_tokenizer
from dpolab.tokenize import PairExample, collate_pairs, tokenize_rows

# ChatML plus: a system line for a `style` template variable, a system line listing the tools,
# and assistant tool calls rendered as <call>NAME ARGS</call>.
TOOLS_TEMPLATE = (
    "{% if style is defined %}<|im_start|>system\nstyle={{ style }}<|im_end|>\n{% endif %}"
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_calls is defined and m.tool_calls %}{% for c in m.tool_calls %}"
    "<call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TOOLS = [{"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object",
                                      "properties": {"city": {"type": "string"}}}}}]


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _call(name="weather", arguments=None):
    return {"type": "function", "function": {"name": name,
                                             "arguments": arguments or {"city": "Paris"}}}


TOOL_ROW = {"prompt": [_user("Weather in Paris?")],
            "chosen": [{"role": "assistant", "tool_calls": [_call()]},
                       {"role": "tool", "name": "weather", "content": "sunny"},
                       _bot("It is sunny.")],
            "rejected": [_bot("I do not know.")],
            "tools": json.dumps(TOOLS)}          # TRL also accepts the list as a JSON string

# Two dialogues that diverge at the first answer; the second user turn is the same text.
DIALOGUE = {"chosen": [_user("Hi"), _bot("Hello!"), _user("2+2?"), _bot("4")],
            "rejected": [_user("Hi"), _bot("Go away."), _user("2+2?"), _bot("5")]}


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny byte-level BPE with ChatML specials (eos <|im_end|> = 1, pad = 2)."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tool_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def _row(record, row=1):
    return parse_row(record, source="m.jsonl", row=row)[0]


def _split(tokenizer, ids, mask):
    """(decoded scored tokens, decoded read-only tokens)."""
    mask = mask if mask is not None else [True] * len(ids)
    return (tokenizer.decode([i for i, m in zip(ids, mask) if m]),
            tokenizer.decode([i for i, m in zip(ids, mask) if not m]))


# ------------------------------------------------------------------------------ tools
def test_tools_and_tool_calls_reach_the_template(tool_tokenizer):
    """The tools column renders in the prompt; the assistant's tool call and final answer are
    scored (each up to its EOS), the tool result, the "\\n" after each EOS and the second
    assistant header are read only."""
    out = tokenize_rows([_row(TOOL_ROW)], tool_tokenizer, max_length=200, max_prompt_length=100)
    ex = out.examples[0]
    assert tool_tokenizer.decode(ex.prompt_ids) == (
        "<|im_start|>system\ntools: weather<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert _split(tool_tokenizer, ex.chosen_ids, ex.chosen_mask) == (
        '<call>weather {"city": "Paris"}</call><|im_end|>It is sunny.<|im_end|>',
        "\n<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n")
    # The mask is one bool per token; the read-only run is contiguous here.
    assert len(ex.chosen_mask) == len(ex.chosen_ids)
    first_off = ex.chosen_mask.index(False)
    assert tool_tokenizer.decode(ex.chosen_ids[:first_off]).endswith("<|im_end|>")
    # A single-turn completion is scored whole: no mask.
    assert ex.rejected_mask is None
    assert tool_tokenizer.decode(ex.rejected_ids) == "I do not know.<|im_end|>"


def test_chat_template_kwargs_from_config_and_row(tool_tokenizer):
    """Config kwargs reach the template; a row's chat_template_kwargs column wins a shared key."""
    record = {"prompt": [_user("Hi")], "chosen": [_bot("Hello!")], "rejected": [_bot("No.")]}
    plain, cfg, row_wins = (
        tokenize_rows([_row(r)], tool_tokenizer, max_length=64, max_prompt_length=48,
                      chat_template_kwargs=kw).examples[0]
        for r, kw in ((record, None), (record, {"style": "terse"}),
                      (dict(record, chat_template_kwargs={"style": "long"}), {"style": "terse"})))
    assert tool_tokenizer.decode(plain.prompt_ids).startswith("<|im_start|>user\nHi")
    assert tool_tokenizer.decode(cfg.prompt_ids).startswith(
        "<|im_start|>system\nstyle=terse<|im_end|>\n<|im_start|>user\nHi")
    assert tool_tokenizer.decode(row_wins.prompt_ids).startswith(
        "<|im_start|>system\nstyle=long<|im_end|>\n")
    assert plain.chosen_ids == cfg.chosen_ids == row_wins.chosen_ids


def test_tool_columns_round_trip_through_jsonl(tmp_path):
    """write_jsonl then load_rows keeps tools (decoded from its JSON string) and the kwargs."""
    record = dict(TOOL_ROW, chat_template_kwargs={"style": "terse"}, source_id=3)
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n")
    rows = load_rows(path).rows
    assert rows[0].tools == TOOLS and rows[0].chat_template_kwargs == {"style": "terse"}
    assert rows[0].meta == {"source_id": 3}
    again = load_rows(write_jsonl(rows, tmp_path / "b.jsonl")).rows
    keys = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "meta")
    assert [getattr(again[0], k) for k in keys] == [getattr(rows[0], k) for k in keys]


def test_table_nulls_are_absent_keys(tool_tokenizer):
    """From a datasets.Dataset every message has every key of its column (null where absent);
    the rows read back equal the JSON ones, so the template sees the same messages."""
    import datasets

    plain = {"prompt": [_user("Hi")], "chosen": [_bot("Hello!")], "rejected": [_bot("No.")]}
    records = [dict(TOOL_ROW, tools=TOOLS), dict(plain, tools=None)]
    table = datasets.Dataset.from_list(records)
    assert table[1]["chosen"][0]["tool_calls"] is None          # the null a table adds
    from_table = load_rows(table).rows
    from_json = [_row(r, row=i + 1) for i, r in enumerate(records)]
    for a, b in zip(from_table, from_json):
        assert (a.prompt, a.chosen, a.rejected, a.tools) == (b.prompt, b.chosen, b.rejected,
                                                             b.tools)


def _with(message_index, **changes):
    """TOOL_ROW with its chosen[message_index] updated."""
    chosen = [dict(m) for m in TOOL_ROW["chosen"]]
    chosen[message_index].update(changes)
    return dict(TOOL_ROW, chosen=chosen)


BAD_ROWS = [
    (_with(0, tool_calls=[_call(arguments="{city: Paris}")]),
     "field 'chosen[0].tool_calls[0]' 'arguments' is a string but not valid JSON: Expecting "
     "property name enclosed in double quotes (column 2)"),
    (_with(0, tool_calls=[_call(arguments=[1, 2])]),
     "field 'chosen[0].tool_calls[0]' 'arguments' must be a JSON object, got list"),
    (_with(0, tool_calls=[{"type": "function", "function": {"arguments": {}}}]),
     "field 'chosen[0].tool_calls[0]' has no function 'name' (a non-empty string)"),
    (_with(0, tool_calls=[{"type": "function", "function": {"name": "weather"}}]),
     "field 'chosen[0].tool_calls[0]' has no 'arguments' (use {} for none)"),
    (_with(0, tool_calls=[dict(_call(), type="retrieval")]),
     "field 'chosen[0].tool_calls[0]' has type 'retrieval'; valid: 'function'"),
    (_with(0, tool_calls=[]),
     "field 'chosen[0].tool_calls' must be a non-empty list of tool calls, got an empty list"),
    (_with(0, tool_calls="weather(Paris)"),
     "field 'chosen[0].tool_calls' must be a non-empty list of tool calls, got str"),
    (_with(1, tool_calls=[_call()]),
     "field 'chosen[1]' has 'tool_calls' but role 'tool'; only assistant messages make tool "
     "calls"),
    (_with(2, content=None),
     "field 'chosen[2]' has no 'content'"),
    (dict(TOOL_ROW, tools="[{"),
     "field 'tools' is a string but not valid JSON: Expecting property name enclosed in "
     "double quotes (column 3)"),
    (dict(TOOL_ROW, tools=[{"type": "function"}]),
     "field 'tools[0]' must be a function schema {'type': 'function', 'function': "
     "{'name': ..., 'parameters': ...}}, got {\"type\": \"function\"}"),
    (dict(TOOL_ROW, chat_template_kwargs=["style"]),
     "field 'chat_template_kwargs' must be an object of template variables, got list"),
    (dict(TOOL_ROW, chat_template_kwargs={"add_generation_prompt": False}),
     "field 'chat_template_kwargs' may not set add_generation_prompt: dpolab sets the others "
     "itself"),
    # dialogues that share no prompt
    ({"chosen": [_user("Hi"), _bot("Hello!")], "rejected": [_user("Yo"), _bot("Hey")]},
     "fields 'chosen' and 'rejected' share no leading message, so there is no prompt; give a "
     "'prompt' column"),
    # a divergence (at the second user turn) with no assistant turn after it
    ({"chosen": [_user("Hi"), _bot("Hello!"), _user("2+2?")],
      "rejected": [_user("Hi"), _bot("Hello!"), _user("3+3?")]},
     "field 'chosen' must end with an assistant message, got role 'user'; no assistant turn "
     "follows the point where chosen and rejected diverge (chosen[2]), so there is nothing to "
     "prefer"),
    # one dialogue is the other's prefix plus more: nothing of its own after the shared part
    ({"chosen": [_user("Hi"), _bot("Hello!")],
      "rejected": [_user("Hi"), _bot("Hello!"), _user("More?"), _bot("No.")]},
     "field 'chosen' has no message after the part it shares with the other completion (its "
     "first 2 messages)"),
]


@pytest.mark.parametrize("record,message", BAD_ROWS)
def test_bad_chat_row_names_file_row_and_field(tmp_path, record, message):
    """A bad row on line 2 stops loading with exactly 'FILE:2: <what is wrong>'."""
    first = TOOL_ROW if "prompt" in record else DIALOGUE
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == f"{path}:2: {message}"


def test_tool_columns_on_string_rows_are_an_error():
    """String rows get no chat template, so a tools column there would be silently unused."""
    with pytest.raises(DataError) as err:
        parse_row({"prompt": "p", "chosen": "a", "rejected": "b", "tools": TOOLS},
                  source="s.jsonl", row=4)
    assert str(err.value) == ("s.jsonl:4: field 'tools' needs conversational rows (lists of "
                              "messages): string rows are not rendered with the chat template")


# --------------------------------------------------------------------- multi-turn preference
def test_shared_leading_turns_join_the_prompt():
    """Explicit prompt, completions sharing their first two turns: those turns move to the
    prompt, as in the implicit format; the completions start where the dialogues diverge."""
    row = _row({"prompt": [_user("Hi")],
                "chosen": [_bot("Hello!"), _user("2+2?"), _bot("4")],
                "rejected": [_bot("Hello!"), _user("2+2?"), _bot("5")]})
    assert row.prompt == [_user("Hi"), _bot("Hello!"), _user("2+2?")]
    assert (row.chosen, row.rejected) == ([_bot("4")], [_bot("5")])
    implicit = _row(DIALOGUE)
    assert implicit.prompt == [_user("Hi")]
    assert implicit.chosen == [_bot("Hello!"), _user("2+2?"), _bot("4")]


def test_dialogue_log_probs_token_by_token(tokenizer):
    """Two dialogues diverging at the first answer: the completion is [answer, user turn,
    answer].  Every pair forward (two rows, shared prompt, cached last-layer states) gives,
    for each scored token, exactly log_softmax(logits)[t - 1, token t] of one plain forward
    over the full sequence prompt + completion, and nothing for the user turn, its header and
    the "\\n" after each EOS; sums and token counts are over the scored tokens only."""
    ex = tokenize_rows([_row(DIALOGUE)], tokenizer, max_length=96,
                       max_prompt_length=48).examples[0]
    assert tokenizer.decode(ex.prompt_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _split(tokenizer, ex.chosen_ids, ex.chosen_mask) == (
        "Hello!<|im_end|>4<|im_end|>", "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert _split(tokenizer, ex.rejected_ids, ex.rejected_mask) == (
        "Go away.<|im_end|>5<|im_end|>", "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")

    model = tiny_model(vocab_size=len(tokenizer))
    expected = []   # (chosen per-token list, rejected per-token list), by hand
    for ids, mask in ((ex.chosen_ids, ex.chosen_mask), (ex.rejected_ids, ex.rejected_mask)):
        seq = ex.prompt_ids + ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)  # (T, V)
        P = len(ex.prompt_ids)
        # token j of the completion sits at position P + j and is predicted at P + j - 1
        expected.append([logp[P + j - 1, ids[j]].item() for j in range(len(ids)) if mask[j]])
    n_chosen, n_rejected = sum(ex.chosen_mask), sum(ex.rejected_mask)
    assert [len(e) for e in expected] == [n_chosen, n_rejected]
    assert n_chosen < len(ex.chosen_ids) and n_rejected < len(ex.rejected_ids)

    body, head = body_and_head(model)
    kw = dict(pad_id=tokenizer.pad_token_id, chunk_size=8, device=torch.device("cpu"),
              autocast=False)
    two_rows = BodyForward(body, lambda: head, **kw)
    shared = SharedPromptForward(body, lambda: head, dtype=torch.float32, **kw)
    cached = CachedHeadForward(lambda: head, chunk_size=8, device=torch.device("cpu"))
    cached.fill(two_rows.hidden, [ex], split="train", batch_size=1)
    with torch.no_grad():
        flats = {"two_rows": two_rows([ex]), "shared_prompt": shared([ex]),
                 "cached": cached([ex], split="train")}
    for name, flat in flats.items():
        chosen, rejected = flat.split()
        torch.testing.assert_close(chosen[0], torch.tensor(expected[0]), atol=1e-5, rtol=1e-5,
                                   msg=f"{name}: chosen")
        torch.testing.assert_close(rejected[0], torch.tensor(expected[1]), atol=1e-5, rtol=1e-5,
                                   msg=f"{name}: rejected")
        assert flat.counts_list() == [n_chosen, n_rejected], name
        sc, sr = flat.sums()
        assert sc.item() == pytest.approx(sum(expected[0]), abs=1e-4)
        assert sr.item() == pytest.approx(sum(expected[1]), abs=1e-4)


def test_collate_and_shared_batch_skip_unscored_positions():
    """Hand-built pair: prompt [5, 6], chosen [7, 8, 9, 10] with mask (T, F, F, T), rejected
    [11] unmasked.  Two rows: loss_mask marks position 1 (predicts 7) and 4 (predicts 10) only;
    the shared-prompt row gathers the same two states, then the rejected one at position 1."""
    ex = PairExample([5, 6], [7, 8, 9, 10], [11], None, 0, 1, "s",
                     chosen_mask=(True, False, False, True))
    batch = collate_pairs([ex], pad_id=0)
    assert batch.loss_mask.tolist() == [[False, True, False, False, True, False],
                                        [False, True, False, False, False, False]]
    assert batch.labels[batch.loss_mask].tolist() == [7, 10, 11]
    assert batch.n_completion_tokens == 3
    _, _, _, gather, labels, seg = shared_prompt_batch([ex], pad_id=0, dtype=torch.float32)
    # row [5, 6, 7, 8, 9, 10, 11]: 7 predicted at 1, 10 at 4, rejected 11 at 1 (prompt end)
    assert gather.tolist() == [1, 4, 1] and labels.tolist() == [7, 10, 11]
    assert seg.tolist() == [0, 0, 1]


def test_reference_hash_sees_the_masks():
    """Same ids, different masks: different hashes (a stored reference covers the scored
    tokens); without masks the hash is the one of the ids alone, as before masks existed."""
    a = PairExample([5], [7, 8], [9], None, 0, 1, "s")
    b = PairExample([5], [7, 8], [9], None, 0, 1, "s", chosen_mask=(True, False))
    assert hash_examples([a]) != hash_examples([b])
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([[5], [7, 8], [9]]).encode())
    assert hash_examples([a]) == h.hexdigest()


def test_truncation_cuts_masks_and_drops_pairs_left_unscored(tokenizer):
    """Dialogues diverging at a user turn: each completion starts with read-only tokens.  Cut
    short enough, a completion keeps no scored token: the pair is dropped and counted as
    unscored, not kept with a zero log-prob.  A longer cut keeps masks of the cut length."""
    record = {"chosen": [_user("Hi"), _bot("Hello!"), _user("2+2?"), _bot("4")],
              "rejected": [_user("Hi"), _bot("Hello!"), _user("3+3?"), _bot("6")]}
    row = _row(record, row=5)
    full = tokenize_rows([row], tokenizer, max_length=200, max_prompt_length=100).examples[0]
    first_scored = full.chosen_mask.index(True)
    assert first_scored > 0 and not any(full.chosen_mask[:first_scored])
    P = len(full.prompt_ids)
    out = tokenize_rows([row, _row(DIALOGUE, row=6)], tokenizer, max_length=P + first_scored,
                        max_prompt_length=P)
    assert out.dropped == ["m.jsonl:5"]
    assert (out.dropped_unscored, out.dropped_identical) == (1, 0)
    kept = out.examples[0]
    assert kept.row == 6 and len(kept.chosen_mask) == len(kept.chosen_ids)
    longer = tokenize_rows([row], tokenizer, max_length=P + first_scored + 1,
                           max_prompt_length=P).examples[0]
    assert longer.chosen_mask == full.chosen_mask[:first_scored + 1]
    with pytest.raises(DataError, match="no scored assistant token"):
        tokenize_rows([row], tokenizer, max_length=P + first_scored, max_prompt_length=P)


def test_single_turn_rows_have_no_masks(tokenizer):
    """The completion of a one-turn row is scored whole (mask None), with the same ids as the
    plain rendering: template(prompt + answer) after template(prompt, generation prompt)."""
    row = _row({"prompt": [_user("Hi")], "chosen": [_bot("Hello!")], "rejected": [_bot("No.")]})
    ex = tokenize_rows([row], tokenizer, max_length=64, max_prompt_length=48).examples[0]
    assert ex.chosen_mask is None and ex.rejected_mask is None
    assert ex.chosen_ids == tokenizer("Hello!", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


def test_template_that_cannot_render_a_row_names_it(tokenizer):
    """Plain ChatML reads message['content'], which a tool-call turn does not have: the
    template's own error comes back as a FILE:ROW error, not a traceback."""
    with pytest.raises(DataError) as err:
        tokenize_rows([_row(TOOL_ROW, row=3)], tokenizer, max_length=200, max_prompt_length=100)
    assert str(err.value).startswith("m.jsonl:3: the chat template cannot render this row (2 "
                                      "messages, without the generation prompt): UndefinedError")
