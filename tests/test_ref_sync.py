"""TR-DPO (loss.ref_sync): a hard sync is a restart from the synced weights as their own
reference; a soft sync's reference is the mixture and its store that model's log-probs; a run
killed after a sync resumes bitwise and checks the reference it reads back; bad values and
combinations that cannot sync are one line and exit 2."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.config import ModelConfig
from tests.test_reliability import TINY_ARGS, pair_rows, strip, write_jsonl
from tests.test_train import _run_cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model and 16 pairs, and a private store cache for the whole module."""
    from dpolab.tiny import save_tiny

    root = tmp_path_factory.mktemp("ref_sync")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOLAB_CACHE", str(root / "cache"))
        yield {"root": root, "tiny": save_tiny(root / "tiny", vocab_size=512, seed=0),
               "data": write_jsonl(root / "pairs.jsonl", pair_rows())}


def train_args(env, out, *extra, model=None):
    return ["train", "--model", str(model or env["tiny"]), "--data", str(env["data"]),
            "--out", str(out), *TINY_ARGS, *extra]


def _model(name, scope: str):
    """The model as a run of `scope` holds it before training (the head untied under
    last_layer), loaded from folder `name`."""
    from dpolab.models import load_configured
    from dpolab.scopes import untie_head

    model = load_configured(ModelConfig(name=str(name)), device="cpu")
    if scope == "last_layer":
        untie_head(model)
    return model


def _ckpt(run: Path, step: int) -> tuple[dict, dict]:
    path = run / "checkpoints" / f"step-{step:06d}"
    return (load_file(str(path / "trainable.safetensors")),
            json.loads((path / "state.json").read_text()))


# ------------------------------------------------------------------ bad values: one line
@pytest.mark.parametrize("extra, said", [
    (["loss.ref_sync={every: 0, alpha: 0.5}"],
     "loss.ref_sync.every = 0 is out of range: it must be an integer >= 1"),
    (["loss.ref_sync={every: 2, alpha: 0}"],
     "loss.ref_sync.alpha = 0 is out of range: it must be a finite number > 0 and <= 1"),
    (["loss.ref_sync={every: 2, alpha: 1.5}"], "loss.ref_sync.alpha = 1.5 is out of range"),
    (["loss.ref_sync={every: 2, tau: 3}"],
     "loss.ref_sync: keys every, tau given; it takes {} or {every: integer >= 1, alpha: "),
    (["loss.ref_sync={every: 2, alpha: 1}", "loss.name=simpo"],
     "loss.ref_sync: the loss simpo has no reference term"),
    (["loss.ref_sync={every: 2, alpha: 1}", "loss.name=auxdpo"],
     "loss.ref_sync: AuxDPO's null space is taken at the starting reference"),
    (["loss.ref_sync={every: 2, alpha: 1}", "train.scope=full", "train.distributed=fsdp2"],
     "loss.ref_sync needs train.distributed=ddp"),
])
def test_bad_ref_sync_exits_2_with_one_line(env, extra, said, capsys, tmp_path):
    """`every: 0`, `alpha: 0`, `alpha: 1.5`, an unknown key, a loss without a reference
    term, AuxDPO and fsdp2: exit 2, one line naming loss.ref_sync, no traceback, no run."""
    out = tmp_path / "bad"
    assert main(train_args(env, out, *extra)) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert said in lines[0], lines[0]
    assert not (out / "metrics.jsonl").exists()


def _stopped_at(run: Path, dest: Path, step: int) -> Path:
    """A copy of finished `run` as if it had stopped after its step-`step` checkpoint."""
    shutil.copytree(run, dest)
    for p in (dest / "checkpoints").iterdir():
        if p.name not in (f"step-{step:06d}", "latest"):
            shutil.rmtree(p)
    (dest / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    shutil.rmtree(dest / "model")
    (dest / "summary.json").unlink()
    cfg = dest / "config.yaml"
    cfg.write_text(cfg.read_text().replace(f"out: {run}\n", f"out: {dest}\n"))
    return dest


# ---------------------------------------------- a hard sync is a restart from its weights
def _restarted_from_step(env, run: Path, dest: Path, step: int, scope: str) -> Path:
    """A copy of `run` stopped at its step-`step` checkpoint whose model is now a folder of
    the step-`step` weights (so they are its own reference), the checkpoint's identity
    rewritten to that model's hash: resuming it continues the same optimizer state, data
    order and schedule against the step-`step` weights as reference."""
    from dpolab.session import weights_key

    _stopped_at(run, dest, step)
    tensors, state = _ckpt(dest, step)
    model = _model(env["tiny"], scope)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    folder = dest.parent / f"{dest.name}-weights"
    shutil.copytree(env["tiny"], folder)
    model.save_pretrained(folder)
    state["identity"]["model"] = weights_key(_model(folder, "full"))
    (dest / "checkpoints" / f"step-{step:06d}" / "state.json").write_text(json.dumps(state))
    cfg = dest / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(env["tiny"]), str(folder)))
    return dest


@pytest.mark.parametrize("scope", ["last_layer", "full"])
def test_hard_sync_equals_a_restart_from_the_synced_weights(env, scope):
    """ref_sync {every: 2, alpha: 1} over 4 steps trains steps 3 and 4 exactly as a run
    without sync resumed from its step-2 checkpoint with the step-2 weights as its model and
    reference: the same training lines (losses, rewards, log-probs, gradient norms), the
    same held-out evaluations and the same exported weights, to float rounding; and the step
    after the sync starts at the reference (loss ln 2)."""
    a, b = env["root"] / f"sync-{scope}", env["root"] / f"plain-{scope}"
    common = [f"train.scope={scope}", "train.max_steps=4", "train.save_every=2"]
    assert main(train_args(env, a, *common, "loss.ref_sync={every: 2, alpha: 1}")) == 0
    assert main(train_args(env, b, *common)) == 0
    restarted = _restarted_from_step(env, b, env["root"] / f"restart-{scope}", 2, scope)
    assert main(["train", "--resume", str(restarted)]) == 0
    after = lambda run: [r for r in strip(run / "metrics.jsonl") if r["step"] > 2]  # noqa: E731
    ra, rb = after(a), after(restarted)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb] and len(ra) == 4  # 2 steps, 2 evals
    for x, y in zip(ra, rb):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k)
    assert ra[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # the policy is its reference
    syncs = [r for r in strip(a / "metrics.jsonl") if "ref_sync/count" in r]
    assert syncs == [{"step": 2, "ref_sync/count": 1}]  # none after the last step
    wa = load_file(str(a / "model" / "model.safetensors"))
    wb = load_file(str(restarted / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------ a soft sync: the mixture and its own log-probs
def _own_sums(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    from dpolab.reference_model import own_logp

    return tuple(torch.tensor([own_logp(model, e.prompt_ids, getattr(e, f"{side}_ids"),
                                        getattr(e, f"{side}_mask", None), device="cpu")
                               for e in examples], dtype=torch.float64)
                 for side in ("chosen", "rejected"))


def _assert_store_is_the_models(run: Path, state: dict, model, cache: Path | None = None):
    """The store of each split of `run` under the reference hash that checkpoint `state`
    records holds the summed log-probs that `model`'s own forward gives every pair."""
    from dpolab import reference
    from dpolab.config import build_config, load_yaml
    from dpolab.dedup import dedupe_split
    from dpolab.models import load_tokenizer
    from dpolab.session import tokenize_split
    from dpolab.splits import load_split_rows
    from dpolab.threads import single_thread

    cfg = build_config(load_yaml(run / "config.yaml"))
    tokenizer = load_tokenizer(cfg.model.name)
    for split, rows in zip(("train", "held_out"), dedupe_split(*load_split_rows(cfg))):
        examples = tokenize_split(rows, tokenizer, cfg.data).examples  # as the run made them
        key = reference.store_key(state["reference"]["hash"],
                                  state["identity"]["data"][split]["hash"])
        stored = reference.load(reference.store_path(cache, key), key, examples) if cache else \
            reference.stored(key, examples)
        assert stored is not None and len(examples) == stored.n > 0, split
        with single_thread():  # a tiny model's forward: thread start-up would dominate
            want = _own_sums(model, examples)
        for got, ref in zip(stored.sums(), want):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scope", ["last_layer", "full", "lora"])
def test_soft_sync_reference_is_the_mixture_and_its_store_that_models(env, scope):
    """One sync with alpha 0.6 after step 2: the reference tensors the step-2 checkpoint
    keeps equal 0.6 * theta_2 + 0.4 * theta_0 computed here from the checkpoint's policy and
    the starting model (under lora the merged weights W + s B A of the target modules, s =
    lora_alpha / r = 16 / 8 = 2, with B = 0 at the start); and the store under the hash the
    checkpoint records holds, for every pair of both splits, the log-probs of a model with
    those weights scored by its own forward (full logits, log_softmax), within 1e-4 nats."""

    run = env["root"] / f"soft-{scope}"
    args = [f"train.scope={scope}", "train.max_steps=3", "train.save_every=2",
            "loss.ref_sync={every: 2, alpha: 0.6}", "train.lora_targets=[q_proj, v_proj]"]
    assert main(train_args(env, run, *args)) == 0
    tensors, state = _ckpt(run, 2)
    assert state["reference"]["syncs"] == 1 and state["reference"]["steps"] == [2]
    model = _model(env["tiny"], scope)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = {n[len("ref_sync."):]: t for n, t in tensors.items() if n.startswith("ref_sync.")}
    mixed = {}
    for name, ref in refs.items():
        if scope == "lora":  # base_model.model.<module>.weight: W + 2 B A
            module = name.removeprefix("base_model.model.").removesuffix(".weight")
            w0 = start[f"{module}.weight"]
            policy = w0 + 2.0 * (tensors[f"{module}.lora_B.default.weight"]
                                 @ tensors[f"{module}.lora_A.default.weight"])
            mixed[f"{module}.weight"] = 0.6 * policy + 0.4 * w0
        else:
            mixed[name] = 0.6 * tensors[name] + 0.4 * start[name]
        key = f"{module}.weight" if scope == "lora" else name
        torch.testing.assert_close(ref, mixed[key], rtol=0, atol=1e-6)
    assert len(refs) == {"last_layer": 1, "lora": 2 * 2}.get(scope, len(start))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in mixed.items():
            params[name].copy_(t)
    _assert_store_is_the_models(run, state, model)


# ----------------------------------------- kill -9 after a sync: the resume is bitwise
def test_kill_after_a_sync_resumes_bitwise(env, tmp_path):
    """Full scope, a sync every 3 steps with alpha 0.5 and a checkpoint every 3: killed with
    SIGKILL once its first checkpoint (written just after the first sync) exists, before it
    finished, then resumed: metrics.jsonl (the sync lines included) and the exported weights
    are bitwise those of the run uninterrupted."""
    from dpolab.threads import single_thread

    env_vars = {**os.environ, "DPOLAB_CACHE": str(env["root"] / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(env["tiny"]), "--data", str(env["data"]), *TINY_ARGS,
            "train.batch_size=2", "train.max_steps=15", "train.save_every=3",
            "train.scope=full", "loss.ref_sync={every: 3, alpha: 0.5}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    with single_thread():  # what OMP_NUM_THREADS=1 gives the subprocesses
        assert main(["train", *args, "--out", str(full)]) == 0
    run = _run_cli([*args, "--out", str(killed)], env_vars)
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 300
    while not latest.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert latest.exists() and not (killed / "model").exists()  # killed before the end
    resumed = _run_cli(["--resume", str(killed)], env_vars)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, b = strip(full / "metrics.jsonl"), strip(killed / "metrics.jsonl")
    assert a == b and [r["step"] for r in a if "ref_sync/count" in r] == [3, 6, 9, 12]
    wa = load_file(str(full / "model" / "model.safetensors"))
    wb = load_file(str(killed / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_reference_that_does_not_hash_as_recorded_is_refused(env, capsys):
    """A checkpoint whose reference tensors do not hash to the hash its state.json records
    (here the record edited): --resume exits 2 with one line naming the checkpoint."""
    run = env["root"] / "hash"
    assert main(train_args(env, run, "train.max_steps=3", "train.save_every=2",
                           "loss.ref_sync={every: 2, alpha: 0.5}")) == 0
    stopped = _stopped_at(run, env["root"] / "hash-edited", 2)
    state_file = stopped / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    kept, state["reference"]["hash"] = state["reference"]["hash"], "0" * 16
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", "--resume", str(stopped)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert (f"step-000002: the reference weights read back hash to {kept}, the checkpoint "
            f"recorded {'0' * 16}") in lines[0]


# --------------------------------------------------- from Python, and the report's marks
def test_python_route_syncs_and_the_report_marks_each_sync(env):
    """`dpolab.Trainer(..., **{"loss.ref_sync": {...}})` takes the field as the command line
    does: 5 steps syncing every 2 write a `ref_sync/count` line after steps 2 and 4 (none
    after the last), config.yaml keeps the field, and the run read back for the report has
    those syncs, each drawn as one vertical line at its step."""
    import yaml

    import dpolab
    from dpolab.htmlpage import subplots
    from dpolab.report_figures import _syncs
    from dpolab.rundir import load_run

    overrides = {"train.batch_size": 4, "train.progress": False, "train.did_samples": 0,
                 "train.report": False, "data.max_length": 48, "data.max_prompt_length": 16,
                 "train.max_steps": 5, "loss.ref_sync": {"every": 2, "alpha": 0.5}}
    run = dpolab.Trainer(str(env["tiny"]), str(env["data"]), out=str(env["root"] / "api"),
                         **overrides).train()
    lines = [r for r in strip(run / "metrics.jsonl") if "ref_sync/count" in r]
    assert lines == [{"step": 2, "ref_sync/count": 1}, {"step": 4, "ref_sync/count": 2}]
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["ref_sync"] == {
        "every": 2, "alpha": 0.5}
    r = load_run(run)
    assert r.syncs == (2, 4)
    _, ax = subplots()
    assert "reference synced" in _syncs(ax, r)
    assert [list(line.get_xdata()) for line in ax.lines] == [[2, 2], [4, 4]]


# ------------------------------------------------------ torchrun: the stores data-parallel
def test_two_processes_sync_data_parallel(env, tmp_path):
    """Under torchrun (2 processes x 2 pairs, DDP over gloo) a full-scope run syncing every
    2 steps with alpha 0.5 syncs after steps 2 and 4 (not 5, the last), and the store of the
    reference it keeps at step 4, computed data-parallel (each rank a share of the batches,
    every rank the whole), holds for every pair of both splits the log-probs of a model with
    the checkpoint's reference weights, scored here by its own forward, within 1e-4 nats."""
    from tests.test_distributed import _common, _train

    run = tmp_path / "two"
    _train([*_common(env["tiny"], env["data"], "train.scope=full", "train.max_steps=5",
                     "train.save_every=4", "loss.ref_sync={every: 2, alpha: 0.5}",
                     "train.batch_size=2", "--out", str(run))], cache=tmp_path / "c", nproc=2)
    assert [r for r in strip(run / "metrics.jsonl") if "ref_sync/count" in r] == [
        {"step": 2, "ref_sync/count": 1}, {"step": 4, "ref_sync/count": 2}]
    tensors, state = _ckpt(run, 4)
    model = _model(env["tiny"], "full")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name.startswith("ref_sync."):
                params[name[len("ref_sync."):]].copy_(t)
    _assert_store_is_the_models(run, state, model, cache=tmp_path / "c")


# ------------------------------------------------------------- an explicit reference
def test_explicit_reference_syncs_hard_and_refuses_a_mixture(env, tmp_path, capsys):
    """With model.reference set the starting reference is that model: a hard sync (alpha 1)
    replaces it by the policy, so the step after the sync starts at the reference (loss
    ln 2 = 0.693147); alpha < 1 would mix the policy into weights the run does not hold, and
    exits 2 with one line."""
    ref = tmp_path / "ref"
    shutil.copytree(env["tiny"], ref)
    common = ["train.max_steps=3", f"model.reference={ref}"]
    run = tmp_path / "hard"
    assert main(train_args(env, run, *common, "loss.ref_sync={every: 2, alpha: 1}")) == 0
    steps = [r for r in strip(run / "metrics.jsonl") if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[2]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    capsys.readouterr()
    assert main(train_args(env, tmp_path / "soft", *common,
                           "loss.ref_sync={every: 2, alpha: 0.5}")) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(err) == 1 and "loss.ref_sync with alpha < 1 mixes the policy into the " \
                             "explicit reference model's weights" in err[0]
