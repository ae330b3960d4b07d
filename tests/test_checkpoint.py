"""Checkpoints key the optimizer's state by parameter name (PyTorch's
torch.distributed.checkpoint.state_dict): it follows each parameter whatever order the
optimizer holds them in; AuxDPO's per-pair offsets, trained outside the model, resume
bitwise; a checkpoint that numbered parameters by position still resumes, said, or is
refused in one line where a position cannot be that parameter's."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpolab import checkpoint
from dpolab.cli import main
from tests.test_reliability import TINY_ARGS, strip, tiny_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_env(tmp_path_factory, "ckpt")


def train_args(env, out, *extra):
    return ["train", "--model", str(env["tiny"]), "--data", str(env["data"]), "--out", str(out),
            *TINY_ARGS, "train.max_steps=4", "train.save_every=2", *extra]


def from_step_2(run: Path, dest: Path) -> Path:
    """A copy of `run` whose step-4 checkpoint and exported model are gone: a resume
    continues from step 2 (saying the step-4 checkpoint is missing)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-000004")
    shutil.rmtree(dest / "model")
    return dest


def test_optimizer_state_follows_names_not_positions(tmp_path):
    """AdamW state saved from one optimizer loads into another holding the same parameters in
    reverse order: every parameter gets its own moments and step (bitwise), which a load by
    position would swap between the two same-shaped weights."""
    torch.manual_seed(0)
    named = {"a.weight": torch.nn.Parameter(torch.randn(3, 2)),
             "b.weight": torch.nn.Parameter(torch.randn(3, 2)),
             "b.bias": torch.nn.Parameter(torch.randn(3))}
    opt = torch.optim.AdamW(list(named.values()), lr=0.1)
    for _ in range(2):
        sum((p * torch.arange(p.numel()).view(p.shape)).sum() * (i + 1)
            for i, p in enumerate(named.values())).backward()
        opt.step()
        opt.zero_grad()
    run = tmp_path / "run"
    path = checkpoint.save(run, 2, named, opt, metrics="")
    other = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in named.items()}
    reordered = torch.optim.AdamW(list(other.values())[::-1], lr=0.1)
    checkpoint.restore((path, checkpoint.verify(path)[0]), other, reordered, run / "m.jsonl")
    for k in named:
        assert torch.equal(other[k], named[k])
        mine, theirs = opt.state[named[k]], reordered.state[other[k]]
        assert set(mine) == set(theirs) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(mine[s], theirs[s]) for s in mine)
    assert not torch.equal(opt.state[named["a.weight"]]["exp_avg"],
                           opt.state[named["b.weight"]]["exp_avg"])


def test_auxdpo_offsets_resume_bitwise(env, capsys):
    """AuxDPO's per-pair offsets live in the optimizer but outside the model: they and their
    AdamW state are saved under their name (auxdpo.delta), and a run resumed at step 2 ends
    with the metrics of the run that went through, bitwise."""
    out = env["root"] / "aux"
    assert main(train_args(env, out, "loss.name=auxdpo")) == 0
    saved = torch.load(out / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    assert "auxdpo.delta" in saved["state"]
    assert [g["params"] for g in saved["param_groups"]][1] == ["auxdpo.delta"]
    run = from_step_2(out, env["root"] / "aux-resumed")
    assert main(["train", "--resume", str(run)]) == 0
    assert strip(run / "metrics.jsonl") == strip(out / "metrics.jsonl")


def _numbered_by_position(ckpt: Path, edit=None) -> None:
    """Rewrite ckpt's optimizer.pt as checkpoints were written before names: parameters
    numbered by their position in the optimizer (then `edit` it), checksum re-recorded."""
    opt = ckpt / "optimizer.pt"
    sd = torch.load(opt, weights_only=True)
    pos = {n: i for i, n in enumerate(n for g in sd["param_groups"] for n in g["params"])}
    sd = {"state": {pos[n]: v for n, v in sd["state"].items()},
          "param_groups": [{**g, "params": [pos[n] for n in g["params"]]}
                           for g in sd["param_groups"]]}
    if edit:
        edit(sd)
    torch.save(sd, opt)
    state = json.loads((ckpt / "state.json").read_text())
    state["sha256"]["optimizer.pt"] = checkpoint.sha256(opt)
    (ckpt / "state.json").write_text(json.dumps(state))


def test_a_checkpoint_numbered_by_position_resumes_or_is_refused(env, capsys):
    """An optimizer.pt that numbers parameters by position (written before names were kept)
    is read in this run's parameter order, said once, and the run ends as the one that went
    through, bitwise; one whose state at a position has another shape than that parameter
    is refused in one line naming the checkpoint, and nothing is trained."""
    out = env["root"] / "base"
    assert main(train_args(env, out)) == 0
    run = from_step_2(out, env["root"] / "positional")
    _numbered_by_position(run / "checkpoints" / "step-000002")
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "optimizer state saved by position (an older checkpoint)" in err
    assert strip(run / "metrics.jsonl") == strip(out / "metrics.jsonl")

    bad = from_step_2(out, env["root"] / "positional-bad")
    before = (bad / "metrics.jsonl").read_text()

    def other_shape(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:, :3].clone()

    _numbered_by_position(bad / "checkpoints" / "step-000002", other_shape)
    assert main(["train", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err
    assert (f"{bad / 'checkpoints' / 'step-000002'}: optimizer.pt numbers parameters by "
            f"position (an older checkpoint) and its exp_avg at position 0 has shape") in lines[0]
    assert (bad / "metrics.jsonl").read_text() == before


def test_file_hashes_are_sha256_of_the_whole_file(tmp_path, monkeypatch):
    """Checkpoint checksums and the cache key of a user's GGUF file are sha256 over every
    byte of the file (10 MiB + 3 bytes: more than one read block of any reader), as
    hashlib.sha256 computes it from the bytes in memory."""
    import hashlib

    from dpolab import gguf_models

    data = bytes(range(256)) * (10 * 4096) + b"end"
    path = tmp_path / "weights.gguf"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert checkpoint.sha256(path) == expected
    made = []
    monkeypatch.setattr(gguf_models, "convert_gguf", lambda src, dest, **kw: made.append(dest))
    dest = gguf_models.gguf_folder(path, cache_dir=tmp_path / "cache", progress=False)
    assert dest.name == f"weights-{expected[:16]}" and made == [dest]
