"""Several processes (torchrun) train as one: PyTorch's DDP and FSDP2 over gloo on the CPU
give the steps of one process on the same global batch; the reference store and the cached
body states computed data-parallel equal those of one process; the NCCL path on a GPU."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import write_pairs


def _env(cache: Path) -> dict:
    return {**os.environ, "DPOLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], env: dict, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """subprocess.run in a process group of its own: on a timeout the whole group (torchrun
    and its workers) is killed, so no worker outlives the test holding memory and cores."""
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _train(args: list[str], *, cache: Path, nproc: int | None = None):
    """`dpolab train` in a fresh process, or under torchrun with `nproc` processes."""
    launch = [sys.executable, "-m", "dpolab", "train"]
    if nproc is not None:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={nproc}", "-m", "dpolab", "train"]
    r = _run([*launch, *args], _env(cache))
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _steps(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


def _common(tiny_dir, data, *extra) -> list[str]:
    return ["--model", str(tiny_dir), "--data", str(data), "train.lr=0.01",
            "train.progress=false", "data.max_length=48", "data.max_prompt_length=16",
            "train.did_samples=0", "train.report=false", "train.eval_batch_size=5", *extra]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_take_the_steps_of_one(grad_accum, tiny_dir, tmp_path):
    """2 processes x batch 2 (DDP, and FSDP2 with every weight sharded) give the per-step
    losses of 1 process x batch 4 to float32 rounding (2e-6 relative), with and without
    gradient accumulation, the same gradient norms and exported weights. 21 training pairs make the last batch of the epoch
    short (1 pair of 4; 5 of 8), so one rank runs a stand-in micro-batch there."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=23)  # 2 held out, 21 train
    common = _common(tiny_dir, data, "train.scope=full", f"train.grad_accum={grad_accum}",
                     f"train.max_steps={6 // grad_accum}")
    _train([*common, "train.batch_size=4", "--out", str(tmp_path / "one")],
           cache=tmp_path / "cache1")
    w0 = load_file(str(tiny_dir / "model.safetensors"))
    wa = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    one = _steps(tmp_path / "one")
    assert len(one) == 6 // grad_accum
    for mode in ("ddp", "fsdp2"):
        out = tmp_path / mode
        _train([*common, "train.batch_size=2", f"train.distributed={mode}", "--out", str(out)],
               cache=tmp_path / f"cache-{mode}", nproc=2)
        two = _steps(out)
        for a, b in zip(one, two, strict=True):
            # float32 losses of weights that differ by summation-order noise (the ranks'
            # gradients are summed in another order), which Adam amplifies step by step: a
            # few float32 ulps of the loss by step 6 (1.2e-6 at a loss of 4.1 on an Intel
            # Xeon); a wrong batch, pair or weight moves the loss by orders more.
            assert a["loss"] == pytest.approx(b["loss"], rel=2e-6, abs=1e-6), (
                mode, a["step"], a["loss"], b["loss"])
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        # Adam divides each update by the root of that element's squared-gradient average,
        # so a near-zero gradient turns summation-order noise into a visible step: weights
        # are compared to 1% of one lr-sized step, and must have moved by far more.
        wb = load_file(str(out / "model" / "model.safetensors"))
        assert set(wa) == set(wb)
        moved = 0.0
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)
            moved = max(moved, (wa[k].float() - w0[k].float()).abs().max().item())
        assert moved > 5e-3


@pytest.mark.parametrize("scope,extra", [
    ("lora", ["train.max_steps=2", "train.lora_targets=[q_proj, v_proj]"]),
    ("last_layer", ["train.max_steps=6", "loss.name=auxdpo"])])
def test_stores_computed_by_two_processes_equal_one(scope, extra, tiny_dir, tmp_path):
    """The reference store (and for last_layer the cached body states) computed by 2 ranks,
    each scoring a share of the batches, is bitwise the one 1 process writes: the batches do
    not depend on the world size. Both ranks hold the whole store (they train the same steps
    as one process without reading each other's files; last_layer with AuxDPO, whose
    per-pair offsets are trained outside the engine, through the short last batch), and a
    later run on 1 process finds the 2-process store and computes nothing."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=23)
    common = _common(tiny_dir, data, f"train.scope={scope}", *extra)
    _train([*common, "train.batch_size=4", "--out", str(tmp_path / "one")],
           cache=tmp_path / "cache1")
    _train([*common, "train.batch_size=2", "--out", str(tmp_path / "two")],
           cache=tmp_path / "cache2", nproc=2)
    files = lambda c: sorted(p.relative_to(c) for p in c.rglob("*.safetensors"))  # noqa: E731
    one, two = files(tmp_path / "cache1"), files(tmp_path / "cache2")
    kinds = {p.parts[0] for p in one}
    assert kinds == ({"reference", "states"} if scope == "last_layer" else {"reference"})
    assert one == two and len(one) == 2 * len(kinds)  # train and held-out per kind
    for rel in one:
        assert (tmp_path / "cache1" / rel).read_bytes() == (tmp_path / "cache2" / rel).read_bytes()
    for a, b in zip(_steps(tmp_path / "one"), _steps(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    # Reuse across world sizes: the 1-process run over the 2-process cache writes nothing new.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache2").rglob("*.safetensors")}
    _train([*common, "train.batch_size=4", "--out", str(tmp_path / "again")],
           cache=tmp_path / "cache2")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache2").rglob("*.safetensors")} \
        == before


def test_fsdp2_checkpoint_resume(tiny_dir, tmp_path):
    """FSDP2 checkpoints gather the sharded weights and optimizer state and re-shard them on
    resume: 2 steps, checkpoint, 2 more steps equals 4 uninterrupted steps (constant lr), and
    so does the same resume by an optimizer holding the parameters in another order (each
    shape's in reverse, tests/reordered_train.py): the state follows parameter names."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    env = {**os.environ, "DPOLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = lambda *a: _run([*torchrun, "-m", "dpolab", "train", *a], env)  # noqa: E731
    common = ["--model", str(tiny_dir), "--data", str(data), "train.lr=0.01",
              "train.progress=false", "data.max_length=48", "data.max_prompt_length=16",
              "train.did_samples=0", "train.report=false", "train.scope=full",
              "train.distributed=fsdp2",
              "train.batch_size=2", "train.schedule=constant", "train.warmup_steps=0"]
    a = run(*common, "train.max_steps=4", "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    b = run(*common, "train.max_steps=2", "--out", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    cfg = tmp_path / "b" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 2", "max_steps: 4"))
    (tmp_path / "b" / "model").rename(tmp_path / "b" / "model-step2")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    r = run("--resume", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    script = Path(__file__).parent / "reordered_train.py"
    r = _run([*torchrun, str(script), "--resume", str(tmp_path / "c")], env)
    assert r.returncode == 0, r.stderr[-4000:]
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "b" / "model-step2" / "model.safetensors"))
    for resumed in ("b", "c"):
        wb = load_file(str(tmp_path / resumed / "model" / "model.safetensors"))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=f"{resumed} {k}")
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def one_rank_group(monkeypatch):
    """This process as rank 0 of a 1-process torchrun job (gloo), torn down after."""
    import torch.distributed as td

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)
    yield
    if td.is_initialized():
        td.destroy_process_group()


def test_torchrun_engines_are_pytorch_ddp_and_fsdp2(tiny_dir, one_rank_group):
    """Started by torchrun (even as its only process) the run joins a process group with the
    configured timeout, and the scope's forward trains as a DistributedDataParallel module
    whose gradient sync `sync_gradients` turns off and on again (DDP's no_sync); under FSDP2
    every parameter of the model, embeddings and head included, is a sharded DTensor (none
    is left replicated for a hand-made all-reduce)."""
    import torch.distributed as td
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from dpolab.distributed import Distributed
    from dpolab.models import body_and_head, load_model
    from dpolab.policy import SharedPromptForward

    dist = Distributed.from_env("cpu", timeout_s=123.0)
    assert dist.grouped and dist.world == 1 and td.get_backend() == "gloo"
    from torch.distributed.distributed_c10d import _get_default_group

    gloo = _get_default_group()._get_backend(torch.device("cpu"))
    assert gloo.options._timeout.total_seconds() == 123.0

    def engine(sharded):
        model = load_model(str(tiny_dir), dtype=torch.float32, device="cpu").requires_grad_(True)
        body, _ = body_and_head(model)
        fwd = SharedPromptForward(body, lambda: body_and_head(model)[1], pad_id=0, chunk_size=64,
                                  device=torch.device("cpu"), autocast=False, dtype=model.dtype)
        return model, dist.engine(model, fwd, sharded=sharded)

    _, ddp = engine(False)
    assert isinstance(ddp.wrapped, DistributedDataParallel)
    ddp.sync_gradients(False)
    assert not ddp.wrapped.require_backward_grad_sync  # what DDP's no_sync() sets
    ddp.sync_gradients(True)
    assert ddp.wrapped.require_backward_grad_sync
    model, fsdp = engine(True)
    assert isinstance(fsdp.wrapped, FSDPModule)
    params = dict(model.named_parameters())
    assert params and all(isinstance(p, DTensor) for p in params.values())
    assert "model.embed_tokens.weight" in params


def test_all_sum_runs_on_the_run_device(one_rank_group):
    """all_sum reduces a float64 tensor on the run's device (NCCL takes device tensors only)
    and returns the plain sums: 1 rank, so the values come back unchanged, as floats."""
    from dpolab.distributed import Distributed

    dist = Distributed.from_env("cpu", timeout_s=60.0)
    assert dist.all_sum([1.5, -2.25]) == [1.5, -2.25]
    assert dist.map_batches(lambda i: i * i, 3, same_count=True) == [0, 1, 4]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="NCCL needs a CUDA device"))])
def test_one_process_torchrun_equals_plain_run(device, tiny_dir, tmp_path):
    """A 1-process torchrun run joins a process group (gloo on the CPU, NCCL on a GPU) and
    goes through the engine (DDP, FSDP2), the metrics reduction, clipping, checkpoint,
    export and the DID probe with the reference loaded into the policy's place, taking the
    steps (and DID metrics) of the same run without torchrun."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=23)
    common = _common(tiny_dir, data, "train.scope=full", f"train.device={device}",
                     "train.bf16_autocast=false", "train.max_steps=3", "train.batch_size=4",
                     "train.grad_accum=2", "train.max_grad_norm=1.0",
                     "train.did_samples=2", "train.did_prompts=2", "train.did_max_new_tokens=4")
    _train([*common, "--out", str(tmp_path / "plain")], cache=tmp_path / "cache")
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())["after"]
    for mode in ("ddp", "fsdp2"):
        out = tmp_path / mode
        _train([*common, f"train.distributed={mode}", "--out", str(out)],
               cache=tmp_path / "cache", nproc=1)
        for a, b in zip(_steps(tmp_path / "plain"), _steps(out), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        after = json.loads((out / "summary.json").read_text())["after"]
        assert after["eval/did/kl"] == pytest.approx(plain["eval/did/kl"], abs=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA device")
def test_nccl_collectives_take_device_tensors(one_rank_group):
    """On a GPU the process group is NCCL, bound to this rank's device, and every collective
    the run uses (all_sum, gathering objects, clipping's norm reduction) runs there."""
    import torch.distributed as td

    from dpolab.distributed import Distributed
    from dpolab.sharding import clip_grad_norm

    dist = Distributed.from_env("auto", timeout_s=60.0)
    assert td.get_backend() == "nccl" and dist.device.type == "cuda"
    assert dist.all_sum([1.5, -2.25]) == [1.5, -2.25]
    out = dist.map_batches(lambda i: torch.tensor([i]), 2, same_count=True)
    assert [int(t) for t in out] == [0, 1]
    p = torch.nn.Parameter(torch.ones(4, device=dist.device))
    p.grad = torch.full((4,), 3.0, device=dist.device)  # norm sqrt(4 * 9) = 6
    assert clip_grad_norm([p], 3.0) == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 1.5, device=dist.device), atol=1e-5)
