"""dpolab on a CUDA device: the chunked head against a float64 CPU reference, the packed
shared-prompt forward (FlexAttention) against two rows per pair, training in full (bf16
autocast) and LoRA scopes with the step-0 invariant, and kill-and-resume. Skipped without CUDA.

Tolerances, and why:
- float32 on CUDA: matmuls may use TF32 inside Triton kernels (FlexAttention), relative error
  near 3e-4, so log-probs of magnitude ~6 agree to 5e-3;
- bf16: 8 significant bits, each logit off by up to 2^-8 |z|: with |z| < 4, a log-prob is off
  by at most ~2 x 4 x 2^-8 = 0.03 (the same bound as tests/test_logps_autocast.py on CPU);
- resume: CUDA reductions (atomics in backward) are not bitwise reproducible, so a resumed run
  matches the uninterrupted one to 1e-3 in every logged loss and 1e-3 (absolute, plus 1e-2
  relative) in every weight, instead of bitwise as on CPU.
"""

import json
import math
import os

import pytest
import torch

from dpolab import packing
from dpolab.logps import Head, label_logps
from dpolab.models import body_and_head
from dpolab.policy import BodyForward, SharedPromptForward, packed_states
from dpolab.tiny import tiny_model
from dpolab.tokenize import PairExample
from dpolab.train import train
from tests.test_train import cfg_for, run_killed_and_resumed, write_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def examples(n_pairs: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 150, (n_pairs, 3), generator=g).tolist()
    t = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    return [PairExample(t(p), t(c), t(r), None, i, i + 1, "x") for i, (p, c, r) in enumerate(lens)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 0.03)])
def test_chunked_logps_cuda_equal_float64_cpu(dtype, tol):
    """Chunked log-probs and their gradients on CUDA (states in `dtype`, float32 master head)
    equal float64 on the CPU of the same (rounded) inputs within `tol` (module docstring)."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 3000, 64, 5000
    h = (torch.randn(N, D, generator=g) * 0.2).to(dtype)
    w = torch.randn(V, D, generator=g) * 0.2
    y = torch.randint(0, V, (N,), generator=g)
    hc, wc = h.to(CUDA).requires_grad_(True), w.to(CUDA).requires_grad_(True)
    out = label_logps(hc, Head(wc), y.to(CUDA), chunk_size=1024)
    w_used = w.to(dtype) if dtype == torch.bfloat16 else w  # the head's matmul dtype
    h64 = h.double().requires_grad_(True)
    w64 = w_used.double().requires_grad_(True)
    z = h64 @ w64.T
    assert z.abs().max() < 4
    ref = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(out.double().cpu(), ref, atol=tol, rtol=0)
    gh, gw = torch.autograd.grad(out.sum(), [hc, wc])
    rh, rw = torch.autograd.grad(ref.sum(), [h64, w64])
    assert (gh.double().cpu() - rh).abs().max() <= tol * rh.abs().max()
    assert (gw.double().cpu() - rw).abs().max() <= tol * rw.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_forward_equals_two_rows_cuda(arch):
    """float32 on CUDA: SharedPromptForward takes the packed FlexAttention path (the model is
    switched to it), and its per-token log-probs and gradients equal two rows per pair."""
    model = tiny_model(vocab_size=512, arch=arch).to(CUDA).eval()
    body, head = body_and_head(model)
    kw = dict(pad_id=2, chunk_size=256, device=CUDA, autocast=False)
    ex = examples()
    two = BodyForward(body, lambda: head, **kw)(ex)
    packed = SharedPromptForward(body, lambda: head, dtype=torch.float32, **kw)(ex)
    assert model.config._attn_implementation == packing.ATTENTION
    assert torch.equal(packed.seg, two.seg)
    torch.testing.assert_close(packed.tokens, two.tokens, atol=5e-3, rtol=0)
    params = list(model.parameters())
    ga = torch.autograd.grad(two.tokens.sum(), params, allow_unused=True)
    gb = torch.autograd.grad(packed.tokens.sum(), params, allow_unused=True)
    for a, b in zip(ga, gb):
        if a is not None:
            assert (a - b).abs().max() <= 5e-3 * a.abs().max()


def test_packed_forward_bf16_autocast_and_neighbours_cuda():
    """Under bf16 autocast the packed forward equals two rows to 0.1 (bf16 rounding through
    the layers and the head: a few times the head's own 0.03 bound), and a
    pair's summed log-probs are the same alone and among other pairs (blocks on tile
    boundaries) up to float32 matmul rounding: within 5e-4 nats, half the step-0 invariant's
    1e-3, which the reference (computed in other batches) must meet."""
    model = tiny_model(vocab_size=512, arch="qwen2").to(CUDA).eval()
    body, head = body_and_head(model)
    kw = dict(pad_id=2, chunk_size=256, device=CUDA, autocast=True)
    ex = examples(seed=1)
    with torch.no_grad():
        two = BodyForward(body, lambda: head, **kw)(ex)
        packed = SharedPromptForward(body, lambda: head, dtype=torch.float32, **kw)(ex)
        torch.testing.assert_close(packed.tokens, two.tokens, atol=0.1, rtol=0)
        h, y, seg, _ = packed_states(body, ex, pad_id=2, device=CUDA, autocast=False)
        h1, y1, _, _ = packed_states(body, ex[3:4], pad_id=2, device=CUDA, autocast=False)
        mine = (seg == 3) | (seg == len(ex) + 3)
        a, b = label_logps(h[mine], head, y[mine]), label_logps(h1, head, y1)
    assert abs(float(a.double().sum() - b.double().sum())) < 5e-4


@pytest.mark.parametrize("scope", ["full", "lora"])
def test_train_on_cuda(scope, tiny_dir, tmp_path, cache):
    """A tiny run on CUDA (full: bf16 autocast over float32 weights; lora): the step-0
    invariant holds (training checks it; the first loss is ln 2 within its 1e-3) and
    training lowers the loss."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    extra = ["train.lora_targets=[q_proj, v_proj]", "train.lora_r=4"] if scope == "lora" else []
    run = train(cfg_for(tiny_dir, data, tmp_path / "run", f"train.scope={scope}",
                        "train.device=cuda", "train.bf16_autocast=true", "train.max_steps=12",
                        *extra))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2.0)) < 1e-3
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_resume_on_cuda_matches_uninterrupted(tiny_dir, tmp_path, cache):
    """kill -9 after a checkpoint, then --resume, on CUDA: every logged loss within 1e-3 of
    the uninterrupted run's and the weights within 1e-3 + 1e-2 relative (module docstring)."""
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    env = {**os.environ, "DPOLAB_CACHE": str(cache)}
    args = ["--model", str(tiny_dir), "--data", str(data), "train.batch_size=2",
            "train.did_samples=0", "train.report=false", "train.device=cuda",
            "train.max_steps=16", "train.save_every=4", "train.lr=0.01", "train.progress=false",
            "data.max_length=48", "data.max_prompt_length=16", "train.scope=full"]
    run_killed_and_resumed(args, env, full=tmp_path / "full", killed=tmp_path / "killed")
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "full"), read(tmp_path / "killed")
    assert [r.get("step") for r in a] == [r.get("step") for r in b]
    for ra, rb in zip(a, b):
        if "loss" in ra:
            assert abs(ra["loss"] - rb["loss"]) < 1e-3, (ra["step"], ra["loss"], rb["loss"])
    wa = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-3, rtol=1e-2)
