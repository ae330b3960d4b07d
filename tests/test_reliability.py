"""Nothing lost, nothing silent: the run directory belongs to one process, checkpoints are
verified and fall back, non-finite steps are never applied, and every bad model folder,
template, text, config value and metrics file is an exit-2 message naming the place."""

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab import checkpoint
from dpolab import config as C
from dpolab.cli import main
from dpolab.errors import UserError

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]
TINY_ARGS = ["train.batch_size=4", "train.lr=0.01", "train.warmup_steps=1",
             "train.progress=false", "train.eval_batch_size=8", "train.did_samples=0",
             "train.report=false", "data.max_length=48", "data.max_prompt_length=16"]


def pair_rows(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        w, other = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append({"prompt": f"Say {w} {i}:", "chosen": f" {w} {w}.",
                     "rejected": f" {other} and {other} again.", "group": "ab"[i % 2]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_env(tmp_path_factory, name: str):
    """A tiny model and data, and a private reference cache for the whole module."""
    from dpolab.tiny import save_tiny

    root = tmp_path_factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(root / "cache"))
        yield {"root": root, "tiny": save_tiny(root / "tiny", vocab_size=512, seed=0),
               "data": write_jsonl(root / "pairs.jsonl", pair_rows())}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_env(tmp_path_factory, "rel")


def train_args(env, out, *extra):
    return ["train", "--model", str(env["tiny"]), "--data", str(env["data"]), "--out", str(out),
            *TINY_ARGS, *extra]


def strip(path: Path) -> list[dict]:
    """metrics.jsonl without the timing fields, which differ between runs."""
    return [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "elapsed_s")}
            for r in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(env):
    """4 steps, a checkpoint every 2, two kept: step-000002 and step-000004."""
    out = env["root"] / "base"
    assert main(train_args(env, out, "train.max_steps=4", "train.save_every=2")) == 0
    return out


# ------------------------------------------------------------------------ run directory
def test_a_held_run_directory_refuses_a_second_run_until_its_holder_dies(env, capsys):
    """While another process holds the run directory, a new run into it and a resume of it
    stop at once (exit 2) naming the directory and the holder's pid, and write nothing;
    after the holder is killed with SIGKILL the kernel has dropped its lock and a run
    proceeds."""
    out = env["root"] / "held"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(env, out, "train.max_steps=1")) == 2
        err = capsys.readouterr().err
        assert f"{out}: the run directory is in use by process {holder.pid}" in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
        (out / "config.yaml").write_text(f"model: {{name: {env['tiny']}}}\nout: {out}\n")  # a run to resume
        assert main(["train", "--resume", str(out)]) == 2
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    (out / "config.yaml").unlink()
    assert main(train_args(env, out, "train.max_steps=1")) == 0


def test_resume_follows_the_directory_given_not_the_recorded_out(env, base_run):
    """A run directory moved elsewhere resumes where it now is: nothing is recreated at the
    old path, and its config.yaml then records the new place."""
    moved = env["root"] / "moved"
    shutil.copytree(base_run, env["root"] / "was")
    (env["root"] / "was").rename(moved)
    assert main(["train", "--resume", str(moved)]) == 0
    assert not (env["root"] / "was").exists()
    assert C.load_yaml(moved / "config.yaml")["out"] == str(moved)
    assert strip(moved / "metrics.jsonl") == strip(base_run / "metrics.jsonl")


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("bad_step, expected", [(3, "step-000002"), (1, None)])
def test_a_non_finite_gradient_norm_is_never_applied_or_saved(env, monkeypatch, bad_step,
                                                              expected):
    """A NaN gradient norm at step k (counted from 1, as metrics.jsonl counts) stops the run
    before optimizer.step: no checkpoint of step k exists, the newest one (k-1, saved every
    step) holds finite tensors, and the message names it, or says truthfully that none has
    been saved yet."""
    from dpolab import train as train_mod

    real, calls = train_mod.clip, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return float("nan") if len(calls) == bad_step else norm

    monkeypatch.setattr(train_mod, "clip", clip)
    out = env["root"] / f"nan{bad_step}"
    cfg = C.build_config(C.apply_overrides(
        {"model": {"name": str(env["tiny"])}, "data": {"path": str(env["data"])}, "out": str(out)},
        [*TINY_ARGS, "train.max_steps=4", "train.save_every=1"]))
    from dpolab.train import train

    with pytest.raises(UserError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith(f"step {bad_step}: the gradient norm is nan (not finite); stopped "
                          "before applying this step")
    assert not (out / "checkpoints" / f"step-{bad_step:06d}").exists()
    if expected is None:
        assert f"No checkpoint has been saved in {out} yet" in msg
        assert not (out / "checkpoints").exists()
    else:
        assert f"The last checkpoint is {out / 'checkpoints' / expected}" in msg
        tensors = load_file(str(out / "checkpoints" / expected / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())


def test_the_newest_k_checkpoints_are_kept(env):
    """train.keep_checkpoints=3 with a checkpoint every step of 5: steps 3, 4, 5 remain, and
    each records the sha256 of its three files (metrics.jsonl's lines so far among them)."""
    out = env["root"] / "keep3"
    assert main(train_args(env, out, "train.max_steps=5", "train.save_every=1",
                           "train.keep_checkpoints=3")) == 0
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000003", "step-000004", "step-000005"]
    state = json.loads((out / "checkpoints" / "step-000005" / "state.json").read_text())
    assert set(state["sha256"]) == {"trainable.safetensors", "optimizer.pt", "metrics.jsonl"}
    assert C.TrainConfig().keep_checkpoints == 2


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # tensor data, after the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated tensors": (lambda d: (d / "trainable.safetensors").write_bytes(
        (d / "trainable.safetensors").read_bytes()[:100]),
        "trainable.safetensors does not match its recorded sha256"),
    "empty tensors": (lambda d: (d / "trainable.safetensors").write_bytes(b""),
                      "trainable.safetensors does not match its recorded sha256"),
    "flipped tensor bytes": (lambda d: _flip_bytes(d / "trainable.safetensors"),
                             "trainable.safetensors does not match its recorded sha256"),
    "garbage optimizer": (lambda d: (d / "optimizer.pt").write_bytes(b"not a pickle"),
                          "optimizer.pt does not match its recorded sha256"),
    "bad state.json": (lambda d: (d / "state.json").write_text("{step: 4"),
                       "state.json is damaged"),
    "no state.json": (lambda d: (d / "state.json").unlink(), "no state.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(env, base_run, damage,
                                                                   capsys):
    """Resume skips a damaged newest checkpoint with a message naming it and why, loads the
    one before (step 2), and ends with the metrics of the uninterrupted run, bitwise."""
    run = env["root"] / f"damaged-{damage.replace(' ', '-')}"
    shutil.copytree(base_run, run)
    shutil.rmtree(run / "model")
    do, why = DAMAGES[damage]
    do(run / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'step-000004'}: skipped, {why}" in err
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} (step 2) instead" in err
    assert strip(run / "metrics.jsonl") == strip(base_run / "metrics.jsonl")
    assert checkpoint.verify(run / "checkpoints" / "step-000004")[0]["step"] == 4


def test_a_latest_pointer_to_a_missing_step_falls_back_with_a_message(env, base_run, capsys):
    """`latest` names step-000004, which is gone: the resume says so and continues from
    step-000002 to the metrics of the uninterrupted run."""
    run = env["root"] / "pointer-missing"
    shutil.copytree(base_run, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints' / 'step-000004'}: the checkpoint that " in err
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} (step 2) instead" in err
    assert strip(run / "metrics.jsonl") == strip(base_run / "metrics.jsonl")


@pytest.mark.parametrize("damage", ["latest names a missing step", "every checkpoint damaged"])
def test_a_run_that_cannot_resume_says_so(env, base_run, damage, capsys):
    """Checkpoints were expected but none is intact: exit 2 with a message, no traceback,
    and no silent restart from step 0 (metrics.jsonl untouched)."""
    run = env["root"] / f"noresume-{damage.split()[0]}"
    shutil.copytree(base_run, run)
    before = (run / "metrics.jsonl").read_text()
    for d in (run / "checkpoints").glob("step-*"):
        if damage.startswith("latest"):
            shutil.rmtree(d)
        else:
            (d / "optimizer.pt").write_bytes(b"")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run}: cannot resume: no intact checkpoint" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------- model folders
def _model_folder(env, kind: str) -> Path:
    folder = env["root"] / f"model-{kind}"
    if kind == "empty":
        folder.mkdir()
    elif kind == "config-only":
        folder.mkdir()
        shutil.copy(env["tiny"] / "config.json", folder)
    else:
        shutil.copytree(env["tiny"], folder)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes({"truncated": data[:len(data) // 2],
                             "header-not-json": data[:8] + b"x" + data[9:]}.get(
                                 kind, b"\xff" * 8 + data[8:]))
    return folder


@pytest.mark.parametrize("kind, what", [
    ("empty", "the model folder is empty"),
    ("config-only", "no tokenizer files"),
    ("truncated", "model.safetensors: truncated safetensors file"),
    ("corrupt", "model.safetensors: damaged safetensors file"),
    ("header-not-json", "model.safetensors: damaged safetensors file: its header is not valid JSON"),
])
def test_a_bad_model_folder_is_a_clear_error(env, kind, what, capsys):
    """Exit 2 naming the folder (or its weights file) and what is wrong, no traceback."""
    folder = _model_folder(env, kind)
    args = train_args(env, env["root"] / f"out-{kind}", "train.max_steps=1")
    args[2] = str(folder)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{folder}" in err and what in err and "Traceback" not in err


# ------------------------------------------------------------------- templates and text
def test_conversational_data_without_a_chat_template(env, capsys):
    """A tokenizer with no chat template: train stops at FILE:ROW naming the problem; inspect
    reports every row under the rows training refuses."""
    folder = env["root"] / "no-template"
    shutil.copytree(env["tiny"], folder)
    (folder / "chat_template.jinja").unlink()
    conv = write_jsonl(env["root"] / "conv.jsonl", [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in pair_rows(4)])
    args = train_args(env, env["root"] / "out-conv", "train.max_steps=1")
    args[2], args[4] = str(folder), str(conv)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(str(conv)) + r":\d: the row is conversational \(lists of "
                     r"messages\) but the tokenizer .* has no chat template", err), err
    assert main(["inspect", str(conv), "--tokenizer", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prefix_problems"]["count"] == 4
    assert "no chat template" in report["prefix_problems"]["rows"][0]


def test_text_the_tokenizer_cannot_encode(env, capsys):
    """A lone UTF-16 surrogate (legal in a JSON string, not in UTF-8): FILE:ROW: field."""
    rows = pair_rows()
    rows[4]["chosen"] = " red \ud800 red."
    data = env["root"] / "surrogate.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json escapes it: \ud800
    args = train_args(env, env["root"] / "out-sur", "train.max_steps=1")
    args[4] = str(data)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (f"{data}:5: field 'chosen': character 6 is U+D800, a lone UTF-16 surrogate"
            in err), err


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (["loss.beta=0"], "loss.beta = 0.0 is out of range: it must be a finite number > 0"),
    (["loss.name=ipo", "loss.beta=0"], "loss.beta = 0.0 is out of range: it must be a finite number > 0"),
    (["loss.beta=.inf"], "loss.beta = inf is out of range"),
    (["train.lr=inf"], "train.lr = inf is out of range"),
    (["train.max_grad_norm=.nan"], "train.max_grad_norm = nan is out of range"),
    (["loss.weights.dpo=.inf"], "loss.weights.dpo = inf is out of range: it must be a finite number >= 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints = 0 is out of range"),
])
def test_config_numbers_the_math_cannot_use(overrides, message):
    """beta must be > 0 (at 0 DPO's gradient is 0 and IPO divides by it) and every number
    finite: each is a UserError before any model is loaded."""
    with pytest.raises(UserError, match=r"config( loss)?: " + re.escape(message)):
        C.build_config(C.apply_overrides({}, overrides))


def test_a_section_given_as_a_list_with_an_override(tmp_path, capsys):
    """`train: [..]` in YAML plus train.lr=... (or --data into `data: [..]`): exit 2 naming
    the section, not a TypeError."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  - lr\ndata:\n  - x\n")
    with pytest.raises(UserError, match="c.yaml: train: expected a mapping of key: value, "
                                        "got list"):
        C.apply_overrides(C.load_yaml(cfg), ["train.lr=0.1"], source=str(cfg))
    assert main(["train", "--config", str(cfg), "--data", "x.jsonl"]) == 2
    assert f"{cfg}: data: expected a mapping" in capsys.readouterr().err


# ------------------------------------------------------------------------------- reports
def test_damaged_metrics_files_name_the_line(tmp_path):
    """A binary metrics.jsonl and a non-object JSON line mid-file: UserError FILE:LINE; a cut
    last line (a run killed mid-write) is still left out."""
    from dpolab.rundir import read_metrics

    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"step": 1}\n\x89PNG\r\n\x1a\n\xff\xfe\n')
    with pytest.raises(UserError, match=f"{binary}:2: not text"):
        read_metrics(binary)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('{"step": 1}\n5\n{"step": 2}\n{"step": 3, "lo')
    with pytest.raises(UserError, match=f"{scalar}:2: expected a JSON object, got int"):
        read_metrics(scalar)
    scalar.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(scalar) == [{"step": 1}, {"step": 2}]


# ---------------------------------------------------------------------------- duplicates
def test_held_out_copies_of_training_pairs_are_removed_and_counted():
    """Rows 1 and 3 are equal (one extra training copy); held-out row 5 copies row 1 and is
    removed, row 6 is new and kept; a held-out split made only of copies is an error, not an
    empty evaluation."""
    from dpolab.data import PreferenceRow
    from dpolab.dedup import dedupe_split, split_duplicates

    def row(n, p, c, r):
        return PreferenceRow(p, c, r, None, "d.jsonl", n)

    train = [row(1, "p", "a", "b"), row(2, "q", "a", "b"), row(3, "p", "a", "b")]
    held = [row(5, "p", "a", "b"), row(6, "p", "b", "a")]
    found = split_duplicates(train, held)
    assert [r.row for r in found.held_out] == [6]
    assert found.removed == [("d.jsonl:5", "d.jsonl:1")]
    assert (found.train_copies, found.held_out_copies) == (2 - 1, 0)
    with pytest.raises(UserError, match="no held-out pairs: all 1 are copies of training "
                                        "pairs \\(e.g. d.jsonl:5 = d.jsonl:1\\)"):
        dedupe_split(train, held[:1], say=None)


def test_training_reports_duplicates_and_keeps_them_out_of_held_out(env, capsys):
    """Data whose first 8 rows appear twice, split 70/30: train prints how many duplicates
    it found and how many held-out copies it removed; the held-out pairs it evaluates on
    (data.json) are the split minus those copies."""
    rows = pair_rows()
    data = write_jsonl(env["root"] / "dups.jsonl", rows + rows[:8])
    out = env["root"] / "out-dups"
    args = train_args(env, out, "train.max_steps=1", "data.eval_fraction=0.3")
    args[4] = str(data)
    assert main(args) == 0
    said = capsys.readouterr().out
    held_n = round(0.3 * 24)
    removed = int(said.split("data: removed ")[1].split()[0])
    assert removed >= 1 and "identical to a training pair" in said
    assert json.loads((out / "data.json").read_text())["held_out"]["pairs"] == held_n - removed
