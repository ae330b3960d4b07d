"""Every causal-LM architecture dpolab builds tiny (dpolab.tiny, dpolab.tiny_archs): the
log-probs of every pair forward dpolab may pick equal the model's own forward of each sequence
alone, and three steps of `dpolab train` move every parameter; a forward that would not be
exact is refused, from the CLI with one line and exit code 2."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dpolab import forward_check, tiny, tiny_archs
from dpolab.cli import main
from dpolab.errors import UserError
from dpolab.models import body_and_head
from dpolab.policy import FORWARDS, make_forward
from dpolab.threads import single_thread
from dpolab.tokenize import PairExample

ARCHS = list(tiny.ARCHS) + list(tiny_archs.ARCHITECTURES)
# Hybrids: some layer is not attention and ignores the shared-prompt mask.
HYBRID = {"lfm2", "nemotron_h", "falcon_mamba", "mamba2", "jamba", "bamba",
          "granitemoehybrid", "falcon_h1", "qwen3_next"}
WINDOWED = {"mistral", "gemma2", "gemma3_text", "cohere2", "olmo3", "gpt_oss"}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a thread pool costs more than the arithmetic (10x on a busy machine)."""
    with single_thread():
        yield


def model_of(arch: str):
    hidden = 32 if arch in tiny_archs.ARCHITECTURES else 64
    return tiny.tiny_model(vocab_size=512, hidden_size=hidden, arch=arch, seed=1).eval()


def pairs(shapes=((5, 3, 4), (2, 6, 1), (7, 9, 2), (1, 1, 1), (9, 12, 11)), seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x") for i, (p, c, r) in enumerate(shapes)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_forward_dpolab_may_pick_is_exact(arch):
    """For each forward of FORWARDS: either the check accepts it on this model (then its
    per-token log-probs equal log_softmax(model(prompt + completion).logits) of each sequence
    alone, no padding, to 1e-5 in float32) or it refuses it with a UserError. `auto` picks the
    first accepted one: shared_prompt on attention models, not on hybrids (their mixers ignore
    its mask) nor on sliding windows shorter than the pairs (a 4D mask drops the window)."""
    model, ex = model_of(arch), pairs()
    body, head = body_and_head(model)
    kw = dict(pad_id=2, chunk_size=16, device=CPU, autocast=False, dtype=torch.float32)
    with torch.no_grad():
        own = forward_check.own_logps(model, ex, CPU)
        accepted = []
        for name in FORWARDS:
            try:
                forward_check.choose(name, model, ex, pad_id=2, device=CPU)
            except UserError as err:
                assert f"train.pair_forward={name} is not exact" in str(err)
                continue
            accepted.append(name)
            got = make_forward(name, body, head, **kw)(ex).tokens
            torch.testing.assert_close(got, own, atol=1e-5, rtol=0)
        auto = forward_check.choose("auto", model, ex, pad_id=2, device=CPU)
    assert accepted and auto.name == accepted[0]
    assert "per_sequence" in accepted
    exact_shared = arch not in HYBRID and arch not in WINDOWED
    assert (auto.name == "shared_prompt") == exact_shared


@pytest.mark.parametrize("arch", sorted(WINDOWED))
def test_window_longer_than_pairs_keeps_shared_prompt(arch):
    """Pairs whose sequences fit in the sliding window (WINDOW tokens): no layer's window
    cuts anything, so the shared-prompt forward is exact and kept."""
    short = pairs(shapes=((1, 2, 1), (2, 1, 2), (1, 1, 3)))
    assert max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))
               for e in short) <= tiny_archs.WINDOW
    choice = forward_check.choose("auto", model_of(arch), short, pad_id=2, device=CPU)
    assert choice.name == "shared_prompt"


ROWS = [{"prompt": f"Question {i}: does {w} help?", "chosen": f"Yes, {w} helps {i} times.",
         "rejected": f"No {w}."} for i, w in enumerate(
             ["the cat", "a dog", "my friend", "the river", "our team", "the model", "a bird"])]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def train_args(folder, data, out, *extra):
    return ["train", "--model", str(folder), "--data", str(data), "--out", str(out),
            "train.scope=full", "train.max_steps=3", "train.batch_size=2", "train.lr=1e-3",
            "train.eval_every=0", "train.did_samples=0", "train.report=false",
            "train.progress=false", "train.save_every=0", "data.eval_fraction=0.3", *extra]


@pytest.mark.parametrize("arch", ARCHS)
def test_three_steps_move_every_parameter(arch, data, tmp_path, cache, capsys):
    """`dpolab train` on the tiny model saved with its tokenizer, train.scope=full: the run
    says and records (data.json) which forward it used, the step-0 check passes (the stored
    reference is the policy's own), and after 3 steps every parameter of the exported model
    differs from the saved one."""
    hidden = 32 if arch in tiny_archs.ARCHITECTURES else 64
    folder = tiny.save_tiny(tmp_path / "model", arch=arch, hidden_size=hidden, seed=1)
    assert main(train_args(folder, data, tmp_path / "run")) == 0
    record = json.loads((tmp_path / "run" / "data.json").read_text())["pair_forward"]
    assert f"pair forward: {record['forward']} (" in capsys.readouterr().out
    assert (record["forward"] == "shared_prompt") == (arch not in HYBRID | WINDOWED)
    names = {n for n, _ in model_of(arch).named_parameters()}
    before = {k: v for k, v in _weights(folder).items() if k in names}
    after = _weights(tmp_path / "run" / "model")
    assert before and set(before) <= set(after)
    unmoved = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unmoved


def error_line(err: str) -> str:
    """The CLI's one error line (transformers' loading bars aside)."""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("dpolab train: error: ")
    return lines[0]


def _weights(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_explicit_shared_prompt_on_hybrid_is_refused(data, tmp_path, cache, capsys):
    """train.pair_forward=shared_prompt on a hybrid model (LFM2: a convolution layer) is
    refused before training: exit 2, one line naming the forward and why."""
    folder = tiny.save_tiny(tmp_path / "model", arch="lfm2", hidden_size=32, seed=1)
    capsys.readouterr()
    code = main(train_args(folder, data, tmp_path / "run", "train.pair_forward=shared_prompt"))
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert "train.pair_forward=shared_prompt is not exact on" in err
    assert "rejected log-probs move by" in err and "use train.pair_forward=auto" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_logit_transform_is_refused(data, tmp_path, cache, capsys, monkeypatch):
    """A model whose forward does something to its logits that dpolab's head does not (here:
    Cohere's logit_scale, with dpolab's table of scales emptied) is refused before training:
    exit 2, one line; with the table, the same model trains."""
    from dpolab import logps

    folder = tiny.save_tiny(tmp_path / "model", arch="cohere", hidden_size=32, seed=1)
    capsys.readouterr()
    monkeypatch.setattr(logps, "_LOGIT_SCALES", {})
    assert main(train_args(folder, data, tmp_path / "run")) == 2
    err = error_line(capsys.readouterr().err)
    assert "dpolab's output head does not reproduce the model's own logits" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert main(train_args(folder, data, tmp_path / "run2")) == 0