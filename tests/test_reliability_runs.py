"""A resumed run is the run it continues or a one-line refusal; torchrun ranks agree before
their first collective; a model, tokenizer or data that cannot train stops before a run
directory exists or before training, with a message; a model given in memory ends trained;
SIGTERM and SIGHUP stop a run after its step with a checkpoint to resume from."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpolab
from dpolab import checkpoint
from dpolab.cli import main
from dpolab.errors import UserError
from tests.test_distributed import _common, _env, _run, _steps
from tests.test_reliability import TINY_ARGS, pair_rows, strip, tiny_env, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from tiny_env(tmp_path_factory, "runs")


def train_args(env, out, *extra, model=None, data=None):
    return ["train", "--model", str(model or env["tiny"]), "--data", str(data or env["data"]),
            "--out", str(out), *TINY_ARGS, *extra]


@pytest.fixture(scope="module")
def base_run(env):
    """4 steps, a checkpoint every 2 (step-000002 and step-000004 kept), run through."""
    out = env["root"] / "base"
    assert main(train_args(env, out, "train.max_steps=4", "train.save_every=2")) == 0
    return out


def stopped_at_step_2(base_run: Path, dest: Path) -> Path:
    """A copy of the base run as if it had stopped after its step-2 checkpoint (its later
    metrics lines were written, as they are when a run dies after step 3)."""
    shutil.copytree(base_run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-000004")
    shutil.rmtree(dest / "model")
    (dest / "checkpoints" / "latest").write_text("step-000002")
    (dest / "summary.json").unlink()
    cfg = dest / "config.yaml"  # where it is now, as a resume records it
    cfg.write_text(cfg.read_text().replace(f"out: {base_run}\n", f"out: {dest}\n"))
    return dest


# ------------------------------------------------------------- 3. resume: the same run
def _other_model(env, run: Path) -> None:
    """The run's config now names a copy of its model with one weight changed by 1%."""
    folder = run.parent / f"{run.name}-model"
    shutil.copytree(env["tiny"], folder)
    w = load_file(str(folder / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] * 1.01
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(env["tiny"]), str(folder)))


def _appended_rows(env, run: Path) -> None:
    """The run's data file gains a row (as a file that grows between start and resume)."""
    data = run.parent / f"{run.name}-pairs.jsonl"
    write_jsonl(data, pair_rows(17))
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(env["data"]), str(data)))


def _two_processes(env, run: Path) -> None:
    """The checkpoint says it was written by 2 torchrun processes of 4 pairs each."""
    state_file = run / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["identity"].update(world=2, global_batch=8)
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize("change, message", [
    (_other_model, "the model's starting weights differ (hash "),
    (_appended_rows, "the training data differ (14 pairs with token-id hash "),
    (_two_processes, "the global batch differs (8 = 2 process(es) x 4 pairs x 1 "
                     "micro-batch(es) when the run started, 4 = 1 process(es) x 4 pairs x 1 "
                     "micro-batch(es) now); resume it on 2 process(es)"),
])
def test_resume_refuses_a_run_that_is_not_the_one_checkpointed(env, base_run, change, message,
                                                               capsys):
    """Changed starting weights, rows appended to the data file, or another number of
    processes (another global batch): --resume exits 2 with one line naming the change, and
    leaves the run directory's files as they were."""
    run = stopped_at_step_2(base_run, env["root"] / f"changed-{change.__name__}")
    change(env, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dpolab train: error: {run}: cannot resume: this is not the "
                               f"run that was checkpointed: ")
    assert message in lines[0]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before


@pytest.mark.parametrize("damage, said", [
    ("cut", "has only 3 of them"), ("deleted", "is missing"), ("edited", "differs from them")])
def test_a_cut_or_lost_metrics_file_is_restored_from_the_checkpoint(env, base_run, damage,
                                                                    said, capsys):
    """The step-2 checkpoint saw 5 lines (evaluations at steps 0, 1 and 2, training steps 1
    and 2); metrics.jsonl cut to 3 lines, deleted, or with a changed line before the
    checkpoint: the resume says so and restores the checkpoint's own copy of those lines, so the run
    ends with the uninterrupted run's metrics.jsonl (not a shorter or different one)."""
    run = stopped_at_step_2(base_run, env["root"] / f"metrics-{damage}")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    if damage == "cut":
        path.write_text("".join(lines[:3]))
    elif damage == "deleted":
        path.unlink()
    else:
        path.write_text("".join([lines[0].replace('"step": 0', '"step": 7'), *lines[1:]]))
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert (f"{path}: the checkpoint recorded 5 line(s); the file {said}: restored from the "
            f"checkpoint's copy") in err
    assert strip(path) == strip(base_run / "metrics.jsonl")


# ---------------------------------------------------- 2. a model from memory ends trained
def test_a_model_given_in_memory_ends_trained_after_the_did_probe(env, tmp_path):
    """Full scope with the DID probe on: the probe scores against the starting weights, put
    in the model's place, and then puts the trained weights back: after train() the caller's
    model equals the exported RUN/model tensor for tensor, and differs from where it began.
    The probe's numbers are measured (a positive KL; the same as the run from the folder:
    tests/test_api.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["tiny"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    run = dpolab.Trainer(model, pair_rows(12), out=str(tmp_path / "run"),
                         **{"train.scope": "full", "train.batch_size": 4, "train.max_steps": 3,
                            "train.lr": 0.01, "train.progress": False, "train.report": False,
                            "train.did_samples": 2, "train.did_prompts": 2,
                            "train.did_max_new_tokens": 4, "data.max_length": 48,
                            "data.max_prompt_length": 16}).train()
    exported = load_file(str(run / "model" / "model.safetensors"))
    now = model.state_dict()
    assert exported and all(torch.equal(now[k], v) for k, v in exported.items())
    assert any(not torch.equal(now[k], start[k]) for k in exported)
    after = json.loads((run / "summary.json").read_text())["after"]
    assert after["eval/did/kl"] > 0


# ------------------------------------------------------------ 7. objects that cannot train
def _bert():
    import transformers as tf

    return tf.BertModel(tf.BertConfig(vocab_size=512, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32))


def _on_meta():
    from dpolab.tiny import tiny_model

    with torch.device("meta"):
        return tiny_model(vocab_size=512)


def _no_eos():
    from dpolab.tiny import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=512)
    tok.eos_token = None
    tok.pad_token = None
    return tok


@pytest.mark.parametrize("model, tokenizer, message", [
    (lambda: 123, None, "model: expected a model name or folder, or a loaded causal LM (a "
                        "transformers PreTrainedModel or a peft model of one), got int"),
    (_bert, "tiny", "model: BertModel is not a causal language model (no output head that "
                    "generates text); load it with AutoModelForCausalLM"),
    (_on_meta, "tiny", "model: its weights are not loaded (model.embed_tokens.weight is on "
                       "the meta device)"),
    ("tiny", _no_eos, "tokenizer: it has no eos token"),
    ("small", "tiny", "tokenizer: token id 511 ('"),
    ("tiny", lambda: {"eos": 1}, "tokenizer: expected a transformers tokenizer (or its "
                                 "folder), got dict"),
])
def test_objects_that_cannot_train_are_refused_before_a_run_directory(env, tmp_path, model,
                                                                      tokenizer, message):
    """Trainer(...) refuses, with a UserError naming what is wrong and before any run
    directory exists: a non-model, a model without a generating head, weights on the meta
    device, a tokenizer without an eos token, a tokenizer whose ids pass the embedding (512
    ids into 64 rows), a tokenizer that is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.tiny import tiny_model

    made = {"tiny": lambda: AutoModelForCausalLM.from_pretrained(env["tiny"]),
            "small": lambda: tiny_model(vocab_size=64)}
    model = made.get(model, model)()
    tok = AutoTokenizer.from_pretrained(env["tiny"]) if tokenizer == "tiny" else (
        tokenizer() if tokenizer else None)
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        dpolab.Trainer(model, pair_rows(8), tokenizer=tok, out=str(out)).train()
    assert str(err.value).startswith(message), str(err.value)
    assert not out.exists()


def test_a_model_folder_that_cannot_train_leaves_no_run_directory(env, capsys):
    """From the command line: a folder whose tokenizer has ids past the model's embedding
    (512 ids, 256 rows), and a folder holding a model that is not a causal LM, exit 2 with
    one line before the run directory exists."""
    from transformers import T5Config

    from dpolab.tiny import tiny_model, tiny_tokenizer

    small = env["root"] / "small-vocab"
    tiny_model(vocab_size=256).save_pretrained(small)
    tiny_tokenizer(vocab_size=512).save_pretrained(small)
    out = env["root"] / "out-small"
    assert main(train_args(env, out, "train.max_steps=1", model=small)) == 2
    err = capsys.readouterr().err
    assert "dpolab train: error: tokenizer: token id 511 (" in err
    assert f"does not fit the model's 256 embedding rows (vocab_size in {small}/config.json)" \
        in err
    assert not out.exists()
    t5 = env["root"] / "t5"
    shutil.copytree(small, t5)
    T5Config(vocab_size=512, d_model=16, d_kv=8, d_ff=32, num_layers=1,
             num_heads=2).save_pretrained(t5)
    assert main(train_args(env, out, "train.max_steps=1", model=t5)) == 2
    assert (f"model {str(t5)!r}: a 't5' model is not a causal language model "
            f"(AutoModelForCausalLM cannot load it)") in capsys.readouterr().err
    assert not out.exists()


# -------------------------------------------------------------------------- 8. the data
def _shared_prefix_rows(n_long: int, group: str) -> list[dict]:
    """`n_long` pairs whose chosen and rejected agree on their first ~60 tokens, so that
    cutting them to 48 makes them identical, in group `group`; then 16 pairs in groups 'a'
    and 'b' that differ at once."""
    common = " the same words again" * 12
    return [{"prompt": f"Tell {i}:", "chosen": f"{common} yes {i}.", "rejected": f"{common} no.",
             "group": group} for i in range(n_long)] + pair_rows(16)


def test_truncation_that_drops_pairs_is_said_and_stops_when_a_group_is_gone(env, capsys):
    """One such pair in group 'a' (of 9): training says how many pairs truncation dropped,
    per group, and trains; 8 in a group 'long' of their own: exit 2 naming the group gone
    and the settings to change."""
    held = write_jsonl(env["root"] / "held.jsonl", pair_rows(20)[16:])
    data = write_jsonl(env["root"] / "trunc-some.jsonl", _shared_prefix_rows(1, "a"))
    out = env["root"] / "out-trunc-some"
    assert main(train_args(env, out, "train.max_steps=1", f"data.eval_path={held}",
                           data=data)) == 0
    assert ("data: truncation to data.max_length=48 (prompts to data.max_prompt_length=16) "
            "dropped 1 of 17 training pairs (a 1 of 9): chosen and rejected became identical "
            "or kept no scored token") in capsys.readouterr().out
    data = write_jsonl(env["root"] / "trunc-group.jsonl", _shared_prefix_rows(8, "long"))
    assert main(train_args(env, env["root"] / "out-trunc", "train.max_steps=1",
                           f"data.eval_path={held}", data=data)) == 2
    err = capsys.readouterr().err
    assert ("dropped 8 of 24 training pairs (long 8 of 8): chosen and rejected became "
            "identical or kept no scored token; that loses group(s) long entirely. Raise "
            "data.max_length, or lower data.max_prompt_length") in err, err


def test_losing_more_than_half_of_a_split_stops_the_run():
    """Of 10 pairs in one group: 5 dropped (50%) is said, 6 dropped (60% > MOST = 50%)
    stops the run; a split of pairs without groups lists no groups."""
    from types import SimpleNamespace as NS

    from dpolab.datachecks import truncation

    cfg = NS(max_length=48, max_prompt_length=16)
    rows = {"train": [NS(group="g")] * 10, "held_out": [NS(group=None)] * 4}
    said = []
    for kept, ok in ((5, True), (6, False)):
        tok = {"train": NS(examples=[NS(group="g")] * (10 - kept)),
               "held_out": NS(examples=[NS(group=None)] * 3)}
        if ok:
            truncation(rows, tok, cfg, say=said.append)
        else:
            with pytest.raises(UserError, match=r"dropped 6 of 10 training pairs \(g 6 of "
                                                r"10\).*that loses more than 50% of the split"):
                truncation(rows, tok, cfg, say=said.append)
    assert said[0].startswith("data: truncation to data.max_length=48 (prompts to "
                              "data.max_prompt_length=16) dropped 5 of 10 training pairs (g 5 "
                              "of 10): ")
    assert said[1].startswith("data: truncation to data.max_length=48 (prompts to "
                              "data.max_prompt_length=16) dropped 1 of 4 held-out pairs: ")


def test_group_names_with_a_slash_are_kept(env, capsys):
    """Groups 'values/honesty' and 'b': metrics keep the names as given, the run reads them
    back as two groups, and the summary table has a row of numbers for each."""
    rows = pair_rows()
    for r in rows:
        r["group"] = "values/honesty" if r["group"] == "a" else "b"
    data = write_jsonl(env["root"] / "slash.jsonl", rows)
    out = env["root"] / "out-slash"
    assert main(train_args(env, out, "train.max_steps=1", "data.eval_fraction=0.5",
                           data=data)) == 0
    from dpolab.rundir import load_run

    assert load_run(out).groups == ["b", "values/honesty"]
    table = capsys.readouterr().out
    row = next(x for x in table.splitlines() if x.startswith("values/honesty"))
    assert "nan" not in row and len(row.split()) == 6


def test_group_weights_that_train_nothing_are_refused(env, capsys):
    """data.group_weights={a: 0, b: 0} weighs every training pair 0: exit 2, not a run of
    zero gradients."""
    out = env["root"] / "out-zero"
    assert main(train_args(env, out, "train.max_steps=1", "data.group_weights={a: 0, b: 0}")) == 2
    assert ("config data.group_weights gives every training pair weight 0 (a: 0, b: 0); "
            "nothing would train") in capsys.readouterr().err


# ---------------------------------------------------------------------------- signals
def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpolab", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _signal_mid_run(args: list[str], env: dict, metrics: Path, sig: int, after: int):
    """Start `dpolab ARGS`, send `sig` once `after` more training steps are in `metrics`;
    returns (exit code, stderr)."""
    start = len(_steps(metrics.parent)) if metrics.exists() else 0
    p = _spawn(args, env)
    try:
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(_steps(metrics.parent)) >= start + after:
                p.send_signal(sig)
                break
            time.sleep(0.02)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, err


def test_sigterm_and_sighup_stop_after_the_step_with_a_checkpoint(env, tmp_path, monkeypatch,
                                                                capsys):
    """SIGTERM sent to a run mid-way: exit 143, one line naming the checkpoint of the step
    reached (none would exist otherwise: train.save_every=0) and how to resume. Resumed (in
    this process), SIGHUP during step 12: exit 129 likewise, checkpoint step 12. Resumed again
    to the end, metrics.jsonl equals the uninterrupted run's."""
    from dpolab import train

    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    run, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    rc, err = _signal_mid_run(train_args(env, run, "train.max_steps=24", "train.save_every=0"),
                              _env(tmp_path / "cache"), metrics, signal.SIGTERM, after=2)
    assert rc == 143, err[-3000:]
    step = _steps(run)[-1]["step"]
    saved = run / "checkpoints" / f"step-{step:06d}"
    assert (f"dpolab train: stopped by SIGTERM after step {step} of 24; checkpoint {saved}; "
            f"continue with: dpolab train --resume {run}") in err, err[-3000:]
    assert checkpoint.step_dirs(run / "checkpoints") == [saved]
    assert step < 12 and "Traceback" not in err
    real = train.lr_at

    def lr_at(i, **kw):  # step i counts from 0: this is step 12
        if i == 11:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(i, **kw)

    monkeypatch.setattr(train, "lr_at", lr_at)
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal (not nohup)
    try:
        assert main(["train", "--resume", str(run)]) == 129
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # the handler is gone again
    finally:
        signal.signal(signal.SIGHUP, before)
    assert (f"dpolab train: stopped by SIGHUP after step 12 of 24; checkpoint "
            f"{run / 'checkpoints' / 'step-000012'}; continue with: dpolab train --resume "
            f"{run}") in capsys.readouterr().err
    monkeypatch.setattr(train, "lr_at", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert main(train_args(env, tmp_path / "full", "train.max_steps=24",
                           "train.save_every=0")) == 0
    assert strip(metrics) == strip(tmp_path / "full" / "metrics.jsonl")


# ---------------------------------------------------------------------- 4. torchrun ranks
RANK_WRAPPER = """
import os, sys
rank = os.environ["RANK"]
# Each rank as on a machine of its own: its own $DPOLAB_CACHE (local rank 0 writes it) and,
# where RANKDIR_<rank> is set, its own working directory (a relative data path then names
# another file on each rank).
os.environ["LOCAL_RANK"] = "0"
os.environ["DPOLAB_CACHE"] = os.environ["DPOLAB_CACHE"] + "-rank" + rank
if os.environ.get("RANKDIR_" + rank):
    os.chdir(os.environ["RANKDIR_" + rank])
args = sys.argv[1:]
if os.environ.get("SIGTERM_RANK") == rank:  # this rank alone is sent SIGTERM during step 3
    import signal
    from dpolab import train
    real = train.lr_at
    def lr_at(step, **kw):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, **kw)
    train.lr_at = lr_at
from dpolab.cli import main
sys.exit(main(args))
"""


def _torchrun(tmp_path, args, extra_env) -> subprocess.CompletedProcess:
    wrapper = tmp_path / "rank_wrapper.py"
    wrapper.write_text(RANK_WRAPPER)
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", str(wrapper), "train", *args],
                {**_env(tmp_path / "cache"), **extra_env}, timeout=240)


def test_torchrun_ranks_with_other_data_stop_with_one_line(env, tmp_path):
    """The same data path holds other rows on rank 1's machine: every rank exits 2 with the
    same line naming rank 1 and what differs, at once (no collective left waiting for the
    timeout, no gloo traceback)."""
    for rank, n in ((0, 16), (1, 18)):
        (tmp_path / f"rank{rank}").mkdir()
        write_jsonl(tmp_path / f"rank{rank}" / "pairs.jsonl", pair_rows(n))
    args = _common(env["tiny"], "pairs.jsonl", "train.max_steps=2", "train.batch_size=2",
                   "train.dist_timeout_s=60", "--out", str(tmp_path / "run"))
    r = _torchrun(tmp_path, args, {"RANKDIR_0": str(tmp_path / "rank0"),
                                   "RANKDIR_1": str(tmp_path / "rank1")})
    line = ("dpolab train: error: rank 1 differs from rank 0 in its held-out data, training "
            "data (hash ")
    assert r.stderr.count(line) == 2, r.stderr[-4000:]
    assert "every rank must start with the same config, model and data files" in r.stderr
    assert "gloo" not in r.stderr.lower() and "KeyError" not in r.stderr
    assert r.stderr.count("exitcode  : 2") + r.stderr.count("exitcode: 2") >= 1, r.stderr[-3000:]


def test_torchrun_warm_and_cold_ranks_and_sigterm_on_one_rank(env, tmp_path, monkeypatch,
                                                                capsys):
    """Rank 0's cache holds the reference store and the cached body states (a 1-process run
    filled it), rank 1's is empty: the ranks compute both together, rank 1 stores them
    bitwise equal to rank 0's, and they train the 1-process run's steps. SIGTERM reaching
    rank 1 alone during step 3 stops both ranks after it (exit 143), with one checkpoint
    at step 3; a resume on 1 process is refused (another global batch), and a resume on 2
    processes ends with the losses of the uninterrupted 1-process run."""
    common = _common(env["tiny"], env["data"], "train.max_steps=6", "train.save_every=0",
                     "train.dist_timeout_s=60")
    cache0 = Path(str(tmp_path / "cache") + "-rank0")
    monkeypatch.setenv("DPOLAB_CACHE", str(cache0))
    assert main(["train", *common, "train.batch_size=4", "--out", str(tmp_path / "one")]) == 0
    r = _torchrun(tmp_path, [*common, "train.batch_size=2", "--out", str(tmp_path / "two")],
                  {"SIGTERM_RANK": "1"})
    assert r.returncode != 0 and r.stderr.count("exitcode  : 143") + r.stderr.count(
        "exitcode: 143") >= 1, r.stderr[-4000:]
    saved = tmp_path / "two" / "checkpoints" / "step-000003"
    assert f"stopped by SIGTERM after step 3 of 6; checkpoint {saved}" in r.stderr
    assert [p.name for p in saved.parent.glob("step-*")] == ["step-000003"]
    cache1 = Path(str(tmp_path / "cache") + "-rank1")
    files = lambda c: sorted(p.relative_to(c) for p in c.rglob("*.safetensors"))  # noqa: E731
    assert files(cache0) == files(cache1) and {p.parts[0] for p in files(cache1)} == {
        "reference", "states"}
    for rel in files(cache0):
        assert (cache0 / rel).read_bytes() == (cache1 / rel).read_bytes()
    assert main(["train", "--resume", str(tmp_path / "two")]) == 2
    assert ("the global batch differs (4 = 2 process(es) x 2 pairs x 1 micro-batch(es) when "
            "the run started, 2 = 1 process(es) x 2 pairs x 1 micro-batch(es) now); resume it "
            "on 2 process(es)") in capsys.readouterr().err
    again = _torchrun(tmp_path, ["--resume", str(tmp_path / "two")], {})
    assert again.returncode == 0, again.stderr[-4000:]
    for a, b in zip(_steps(tmp_path / "one"), _steps(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])
