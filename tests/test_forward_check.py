"""The isolation check (dpolab.forward_check): which pairs it scores, when a forward counts as
leaking, that it is deterministic, and that `dpolab inspect` reports what it chose."""

import json

import pytest
import torch

from dpolab import forward_check, tiny
from dpolab.forward_check import ROUNDING_FACTOR, Trial
from dpolab.threads import single_thread
from dpolab.tiny_archs import WINDOW
from dpolab.tokenize import PairExample

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def pair(p, c, r, i=0, seed=0):
    g = torch.Generator().manual_seed(seed + i)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return PairExample(t(p), t(c), t(r), None, i, i + 1, "x")


def test_check_pairs_are_the_longest_and_the_shortest():
    """Sequence lengths (prompt + longer completion) 7, 12, 3, 12, 5: n=3 takes the longest
    (the first 12, index 1: ties by order) and the two shortest (3 at index 2, 5 at 4)."""
    shapes = [(4, 3, 1), (2, 10, 1), (1, 1, 2), (6, 6, 5), (3, 2, 2)]
    ex = [pair(*s, i=i) for i, s in enumerate(shapes)]
    assert [e.index for e in forward_check.check_pairs(ex, 3)] == [1, 2, 4]
    assert [e.index for e in forward_check.check_pairs(ex[:1], 3)] == [0]


def test_leak_is_a_move_beyond_the_batch_rounding():
    """Rejected log-probs of the pairs whose chosen tokens changed must move at most
    ROUNDING_FACTOR (10) times as much as those of the untouched pairs of the batch: exactly
    0 when they do not move at all; any move when the untouched ones do not (deterministic
    kernels: a mask honoured exactly gives 0); 4e-7 beside 5e-8 (a mixture-of-experts batch's
    rounding) is no leak, 1e-5 beside 5e-8 is."""
    assert ROUNDING_FACTOR == 10.0
    assert not Trial("x", 0.0, 0.0, 0.0).leaks()
    assert Trial("x", 0.0, 1e-7, 0.0).leaks()
    assert not Trial("x", 0.0, 4e-7, 5e-8).leaks()
    assert Trial("x", 0.0, 1e-5, 5e-8).leaks()
    assert Trial("x", 1e-6, 0.0, 0.0).passed(1e-4) and not Trial("x", 2e-4, 0.0, 0.0).passed(1e-4)
    assert not Trial("x", None, None, None, "ValueError: no").passed(1.0)


def test_perturbed_changes_every_chosen_token_of_every_other_pair():
    """perturbed(every=2): pairs 0 and 2 get chosen tokens that all differ from the old ones,
    same lengths; pair 1 and every prompt and rejected completion are unchanged."""
    ex = [pair(3, 5, 4, i=i) for i in range(3)]
    out = forward_check.perturbed(ex, 512, every=2)
    for i, (a, b) in enumerate(zip(ex, out)):
        assert (a.prompt_ids, a.rejected_ids) == (b.prompt_ids, b.rejected_ids)
        assert len(a.chosen_ids) == len(b.chosen_ids)
        changed = [x != y for x, y in zip(a.chosen_ids, b.chosen_ids)]
        assert all(changed) if i % 2 == 0 else not any(changed)
        assert all(0 <= t < 512 for t in b.chosen_ids)


def test_the_longest_pair_decides_a_sliding_window():
    """Mistral with a window of WINDOW tokens: pairs that fit in it keep shared_prompt; one
    longer pair among them (checked because it is the longest) makes the check refuse
    shared_prompt for the 4D mask that drops the window, and take two_rows."""
    model = tiny.tiny_model(vocab_size=512, hidden_size=32, arch="mistral", seed=1)
    short = [pair(1, 2, 1, i=i) for i in range(5)]
    assert forward_check.choose("auto", model, short, pad_id=2, device=CPU).name == "shared_prompt"
    long = short + [pair(6, 8, 7, i=5)]
    choice = forward_check.choose("auto", model, long, pad_id=2, device=CPU)
    assert choice.name == "two_rows"
    assert choice.reason.startswith("not shared_prompt: its log-probs differ from the model's own")
    assert WINDOW < 6 + 8


def test_choice_is_deterministic_and_recorded():
    """The same model and pairs give the same record twice (seeded replacement tokens); on a
    hybrid (NemotronH: a Mamba-2 layer) the record says why shared_prompt was not taken and
    what each tried forward measured."""
    model = tiny.tiny_model(vocab_size=512, hidden_size=32, arch="nemotron_h", seed=1)
    ex = [pair(5, 6, 4, i=i) for i in range(4)]
    a = forward_check.choose("auto", model, ex, pad_id=2, device=CPU).record()
    b = forward_check.choose("auto", model, ex, pad_id=2, device=CPU).record()
    assert a == b
    assert a["forward"] == "two_rows" and a["requested"] == "auto"
    assert "rejected log-probs move by" in a["reason"]
    assert a["tried"]["shared_prompt"]["rejected_moved"] > 1e-3
    assert a["tried"]["shared_prompt"]["untouched_moved"] == 0.0
    assert a["tried"]["two_rows"]["rejected_moved"] == 0.0
    assert a["tried"]["two_rows"]["max_delta"] < 1e-5
    json.dumps(a)  # data.json takes it as it is


def test_inspect_reports_the_forward(tmp_path, cache, capsys):
    """`dpolab inspect DATA --model M` on a hybrid runs the same check and prints the forward
    its reference pass used (and puts it in the JSON report)."""
    from dpolab.cli import main

    folder = tiny.save_tiny(tmp_path / "m", arch="lfm2", hidden_size=32, seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i} about the cat?", "chosen": f"Yes {i}.",
                                        "rejected": "No."}) + "\n" for i in range(6)))
    out = tmp_path / "r.json"
    assert main(["inspect", str(data), "--model", str(folder), "--no-progress",
                 "--json-out", str(out)]) == 0
    assert "pair forward: two_rows (not shared_prompt: the rejected log-probs move by" in \
        capsys.readouterr().out
    assert json.loads(out.read_text())["reference"]["pair_forward"]["forward"] == "two_rows"
