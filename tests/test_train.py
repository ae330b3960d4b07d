"""The trainer end to end on a tiny random model: scopes, step-0 invariants, resume after
kill -9, export, bad input, and the reference store."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab import config as C
from dpolab.cli import main
from dpolab.distributed import Distributed
from dpolab.errors import UserError
from dpolab.train import epoch_order, final_metrics, lr_at, train

REPO = Path(__file__).resolve().parent.parent
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone"]


def write_pairs(path: Path, n: int = 24) -> Path:
    """Standard-format pairs in two groups; the chosen answer repeats the prompt's word."""
    rows = []
    for i in range(n):
        w, other = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        rows.append({"prompt": f"Say {w} {i}:", "chosen": f" {w} {w}.",
                     "rejected": f" {other} and {other} again.", "group": "ab"[i % 2]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tiny_dir, data, out, *overrides):
    raw = C.apply_overrides({"model": {"name": str(tiny_dir)}, "data": {"path": str(data)},
                             "out": str(out)},
                            ["train.batch_size=4", "train.max_steps=6", "train.lr=0.01",
                             "train.warmup_steps=1", "train.progress=false",
                             "train.eval_batch_size=8", "data.max_length=48",
                             "train.did_samples=0", "train.report=false",
                             "data.max_prompt_length=16", *overrides])
    return C.build_config(raw)


def test_schedule_and_order_are_pure():
    """Warmup reaches the peak at step warmup-1; cosine ends at 0; the epoch order is a
    permutation that depends only on (seed, epoch), not on the global RNG a resumed process
    starts with, and global_batches covers every example once per epoch."""
    from dpolab.train import global_batches

    assert lr_at(0, peak=1.0, warmup=4, total=10, schedule="cosine") == 0.25
    assert lr_at(3, peak=1.0, warmup=4, total=10, schedule="cosine") == 1.0
    # halfway through the cosine part (step 7 of 4..10): 0.5 * (1 + cos(pi / 2)) = 0.5
    assert lr_at(7, peak=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_at(10, peak=1.0, warmup=4, total=10, schedule="cosine") == pytest.approx(0.0)
    assert lr_at(7, peak=1.0, warmup=0, total=10, schedule="constant") == 1.0
    torch.manual_seed(0)
    first = epoch_order(10, seed=1, epoch=2)
    torch.manual_seed(12345)
    torch.rand(7)  # another process, another global RNG state
    assert epoch_order(10, seed=1, epoch=2) == first
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert epoch_order(10, seed=1, epoch=3) != first
    batches = list(global_batches(10, seed=1, epochs=2, global_batch=4))
    assert [(e, len(b)) for e, b in batches] == [(0, 4), (0, 4), (0, 2), (1, 4), (1, 4), (1, 2)]
    assert [i for e, b in batches if e == 1 for i in b] == epoch_order(10, seed=1, epoch=1)


@pytest.mark.parametrize("scope", ["last_layer", "lora", "full"])
def test_scopes_train_and_export(scope, tiny_dir, tmp_path, cache):
    """Each scope: step 0 is at the reference (loss ln 2, accuracy 1/2 by ties), training
    raises the train reward accuracy, and the exported folder loads with from_pretrained and
    reproduces the trained policy's log-probs."""
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl")
    extra = ["train.lora_targets=[q_proj, v_proj]", "train.lora_r=4"] if scope == "lora" else []
    cfg = cfg_for(tiny_dir, data, tmp_path / "run", f"train.scope={scope}",
                  "train.max_steps=12", "train.report=true", "train.did_samples=3",
                  "train.did_prompts=2", "train.did_max_new_tokens=6", *extra)
    run = train(cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert rows[0]["eval/rewards/accuracies"] == 0.5  # every pair a tie before training
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "loss/dpo", "grad_norm", "lr",
            "tokens_per_s"} <= set(steps[0])
    assert final_metrics(run)["train_eval/rewards/accuracies"] > 0.7
    assert steps[-1]["loss"] < steps[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    # The export is the trained policy: its summed log-probs of the training pairs average to
    # the last evaluation's (made after the last update), which training moved away from the
    # reference's (step 0) by far more than the tolerance.
    exported = _mean_pair_logps(model, run / "model", cfg)
    last = final_metrics(run)
    for i, side in enumerate(("chosen", "rejected")):
        key = f"train_eval/logps/{side}"
        assert exported[i] == pytest.approx(last[key], abs=1e-4)
        assert abs(last[key] - rows[0][key]) > 1e-2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["train_eval/rewards/margins"] > 0
    # Monte Carlo estimates from 2 prompts x 3 samples: only their presence is checked here
    # (dpolab.theory.did tests the estimator's convergence).
    assert math.isfinite(summary["after"]["eval/did/kl"])
    assert summary["after"]["eval/did/entropy"] > 0
    assert (run / "report.html").exists() and list((run / "report").glob("*.png"))


def _mean_pair_logps(model, tokenizer_dir, cfg) -> tuple[float, float]:
    """Mean summed log-probs (chosen, rejected) of `cfg`'s training pairs under `model`,
    through dpolab's pair forward, the way evaluation scores them."""
    from dpolab.models import body_and_head, load_tokenizer
    from dpolab.policy import make_forward
    from dpolab.splits import load_split_rows
    from dpolab.tokenize import tokenize_rows

    tokenizer = load_tokenizer(str(tokenizer_dir))
    rows, _ = load_split_rows(cfg)
    examples = tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length,
                             max_prompt_length=cfg.data.max_prompt_length,
                             truncation=cfg.data.truncation).examples
    body, head = body_and_head(model)
    forward = make_forward("shared_prompt", body, head, pad_id=tokenizer.pad_token_id,
                           chunk_size=cfg.train.logps_chunk, device=torch.device("cpu"),
                           autocast=False, dtype=model.dtype)
    with torch.no_grad():
        pc, pr = forward(examples).sums()
    return pc.mean().item(), pr.mean().item()


def test_exported_last_layer_keeps_embeddings(tiny_dir, tmp_path, cache):
    """last_layer unties a tied head: the export has the trained head and the original input
    embeddings."""
    from transformers import AutoModelForCausalLM

    data = write_pairs(tmp_path / "pairs.jsonl")
    run = train(cfg_for(tiny_dir, data, tmp_path / "run", "train.scope=last_layer"))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    new = AutoModelForCausalLM.from_pretrained(run / "model")
    torch.testing.assert_close(new.get_input_embeddings().weight,
                               base.get_input_embeddings().weight)
    assert not torch.equal(new.get_output_embeddings().weight,
                           base.get_output_embeddings().weight)


def test_reference_store_is_reused_and_checked(tiny_dir, tmp_path, cache, capsys):
    """A second run with the same model and data reuses the stored reference (no new file);
    a store without its checksum is computed again, and one whose checksum matches values
    the model does not give trips the step-0 check with a clear error."""
    from dpolab import reference

    data = write_pairs(tmp_path / "pairs.jsonl")
    train(cfg_for(tiny_dir, data, tmp_path / "a"))
    stored = sorted((cache / "reference").glob("*.safetensors"))
    assert len(stored) == 2  # train and held-out splits
    train(cfg_for(tiny_dir, data, tmp_path / "b"))
    assert sorted((cache / "reference").glob("*.safetensors")) == stored
    from safetensors.torch import save_file

    capsys.readouterr()
    for path in stored:
        t = load_file(str(path))
        save_file({"tokens": t["tokens"] - 1.0, "offsets": t["offsets"]}, str(path))
    train(cfg_for(tiny_dir, data, tmp_path / "c"))
    err = capsys.readouterr().err
    assert all(f"{p}: has no checksum" in err for p in stored)
    for path in stored:
        t = load_file(str(path))
        reference.save(reference.ReferenceLogps(t["tokens"] - 1.0, t["offsets"], "k"), path)
    with pytest.raises(UserError, match="step-0 check failed"):
        train(cfg_for(tiny_dir, data, tmp_path / "d"))


def test_losses_and_weights_from_config(tiny_dir, tmp_path, cache):
    """A weighted objective logs each term; IPO's step-0 loss is (1/(2 beta))^2."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = train(cfg_for(tiny_dir, data, tmp_path / "r1", "loss.weights={dpo: 1.0, sft: 0.1}",
                        "train.max_steps=2"))
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert first["loss"] == pytest.approx(first["loss/dpo"] + 0.1 * first["loss/sft"], rel=1e-6)
    run = train(cfg_for(tiny_dir, data, tmp_path / "r2", "loss.name=ipo", "loss.beta=0.5",
                        "train.max_steps=1"))
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1]
    assert first["loss/ipo"] == pytest.approx(1.0, abs=1e-4)  # (0 - 1/(2*0.5))^2


def test_auxdpo_trains_last_layer(tiny_dir, tmp_path, cache):
    """AuxDPO on the tiny model: the auxiliary rewards move, the loss falls, the deltas are
    checkpointed but not exported."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = train(cfg_for(tiny_dir, data, tmp_path / "aux", "loss.name=auxdpo",
                        "train.max_steps=10"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/auxdpo" in r]
    assert steps[0]["loss/auxdpo"] == pytest.approx(0.693147, abs=1e-4)
    assert steps[-1]["loss/auxdpo"] < steps[0]["loss/auxdpo"]
    ckpt = next((run / "checkpoints").glob("step-*"))
    delta = load_file(str(ckpt / "trainable.safetensors"))["auxdpo.delta"]
    assert delta.abs().sum() > 0
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        assert not any("auxdpo" in k for k in f.keys())


def test_auxdpo_exact_last_layer_head_gram(tiny_dir, tmp_path, cache):
    """last_layer exact mode: the Gram of A comes from the per-response gradients when they fit
    in loss.aux_max_gib and from the head's closed form when only that fits; both give the same
    spectrum in auxdpo.json; when neither fits the error names the sizes."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    aux = ["loss.name=auxdpo", "loss.aux_mode=exact", "train.max_steps=1"]
    spectra = {}
    for gib in ("1", "0.004"):
        run = train(cfg_for(tiny_dir, data, tmp_path / f"g{gib}", *aux, f"loss.aux_max_gib={gib}"))
        spectra[gib] = json.loads((run / "auxdpo.json").read_text())
    assert spectra["1"]["gram"] == "per-response gradients"
    assert spectra["0.004"]["gram"] == "head closed form"
    for key in ("responses", "rank", "null_dim"):
        assert spectra["1"][key] == spectra["0.004"][key]
    for key in ("eig_max", "eig_min"):
        assert spectra["0.004"][key] == pytest.approx(spectra["1"][key], rel=1e-4)
    with pytest.raises(UserError, match="completion tokens over a vocabulary of 512 need"):
        train(cfg_for(tiny_dir, data, tmp_path / "none", *aux, "loss.aux_max_gib=0.002"))


def test_auxdpo_gram_penalty_equals_closed_form(tiny_dir, tmp_path, cache):
    """last_layer: the batchwise penalty from the Gram matrix of per-response gradients
    equals the closed-form head penalty for the same delta."""
    from dpolab import session as S
    from dpolab.auxdpo import AuxRewards
    from dpolab.config import LossConfig
    from dpolab.losses import Objective

    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    cfg = cfg_for(tiny_dir, data, tmp_path / "g", "loss.name=auxdpo")
    (tmp_path / "g").mkdir()
    s = S.build(cfg, tmp_path / "g", Distributed())
    obj = Objective({"auxdpo": 1.0}, LossConfig())
    with_gram = AuxRewards.maybe(obj, s, cfg.loss)
    closed = AuxRewards(len(s.train), device="cpu", null_weight=1.0, amp_weight=0.0,
                        states=s.scope.head_states, examples=s.train,
                        head0=s.scope.reference_head)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        with_gram.delta.copy_(torch.randn(with_gram.delta.shape, generator=g))
        closed.delta.copy_(with_gram.delta)
    with_gram.amp_weight = 0.0
    idx = [0, 3, 5]
    a = with_gram.penalty(idx, n_global=3)
    b = closed.penalty(idx, n_global=3)
    assert a.item() == pytest.approx(b.item(), rel=1e-4)


def test_auxdpo_lora_soft_and_exact(tiny_dir, tmp_path, cache, capsys):
    """LoRA scope: soft mode trains; exact mode with more responses than LoRA parameters
    finds a nontrivial null space and keeps delta in it (A delta = 0); too little memory
    for A is a clear error."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=150)  # 300 responses: more than LoRA's parameters
    lora = ["train.scope=lora", "train.lora_r=1", "train.lora_targets=[q_proj]",
            "train.max_steps=3", "loss.name=auxdpo"]
    train(cfg_for(tiny_dir, write_pairs(tmp_path / "few.jsonl", n=20), tmp_path / "soft", *lora))
    run = train(cfg_for(tiny_dir, data, tmp_path / "exact", *lora, "loss.aux_mode=exact"))
    assert "the null space of A has dimension" in capsys.readouterr().out
    assert (run / "model" / "model.safetensors").exists()
    spectrum = json.loads((run / "auxdpo.json").read_text())
    assert spectrum["mode"] == "exact" and spectrum["responses"] % 2 == 0
    assert spectrum["null_dim"] > 0 and spectrum["rank"] + spectrum["null_dim"] == spectrum["responses"]
    with pytest.raises(UserError, match=r"MiB, above the 0.0 MiB allowed"):
        train(cfg_for(tiny_dir, data, tmp_path / "mem", *lora, "loss.aux_max_gib=0.00001"))


def _run_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "dpolab", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_killed_and_resumed(args, env, *, full: Path, killed: Path) -> None:
    """`dpolab train ARGS` run through into `full`; the same run into `killed`, killed with
    SIGKILL once its first checkpoint exists, then `--resume`d to the end."""
    ref = _run_cli([*args, "--out", str(full)], env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    run = _run_cli([*args, "--out", str(killed)], env)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert latest.exists()
    resumed = _run_cli(["--resume", str(killed)], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()


def test_resume_after_kill_equals_uninterrupted(tiny_dir, tmp_path, cache):
    """kill -9 after a checkpoint, then --resume: metrics.jsonl and the trained weights are
    bitwise those of an uninterrupted run with the same seed."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=40)
    env = {**os.environ, "DPOLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["--model", str(tiny_dir), "--data", str(data), "train.batch_size=2",
            "train.did_samples=0", "train.report=false",
            "train.max_steps=30", "train.save_every=3", "train.lr=0.01", "train.progress=false",
            "data.max_length=48", "data.max_prompt_length=16", "train.scope=full"]
    run_killed_and_resumed(args, env, full=tmp_path / "full", killed=tmp_path / "killed")
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items()  # noqa: E731
                           if k not in ("tokens_per_s", "elapsed_s")} for r in rows]
    assert strip(a) == strip(b)
    wa = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_data_stops_before_training(tiny_dir, tmp_path, cache, capsys):
    """A bad row: FILE:ROW: field message, exit code 2, no traceback, no run started;
    --skip-invalid drops it and trains."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "x", "chosen": "", "rejected": "y"}) + "\n")
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--out",
            str(tmp_path / "bad"), "train.max_steps=1", "train.progress=false",
            "train.did_samples=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:25: field 'chosen' is empty" in err and "Traceback" not in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    assert main([*args, "--skip-invalid", "data.max_length=48",
                 "data.max_prompt_length=16"]) == 0
    assert "skipped 1 invalid row" in capsys.readouterr().out


def test_existing_run_is_not_overwritten(tiny_dir, tmp_path, cache):
    data = write_pairs(tmp_path / "pairs.jsonl")
    train(cfg_for(tiny_dir, data, tmp_path / "r", "train.max_steps=1"))
    with pytest.raises(UserError, match="a run already exists there; use --resume"):
        train(cfg_for(tiny_dir, data, tmp_path / "r", "train.max_steps=1"))


def test_unflippable_pairs_listed_before_training(tiny_dir, tmp_path, cache):
    """unflippable.json lists exactly the pairs whose reference prefers the rejected response
    by more than log(3)/beta nats (beta = 2: 0.549 nats), recomputed here from a fresh
    reference pass, and the eval lines carry the fraction."""
    import numpy as np

    from dpolab import session as S

    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = cfg_for(tiny_dir, data, tmp_path / "u", "loss.beta=2.0", "train.max_steps=1")
    run = train(cfg)
    info = json.loads((run / "unflippable.json").read_text())
    (tmp_path / "v").mkdir()
    s = S.build(cfg, tmp_path / "v", Distributed())
    pc, pr = s.pair_stats("train").ref_chosen, s.pair_stats("train").ref_rejected
    expected = [f"{e.source}:{e.row}" for e, a, b in zip(s.train, pc, pr) if b - a > np.log(3) / 2.0]
    assert [x["where"] for x in info["train"]["list"]] == expected
    assert info["threshold_nats"] == pytest.approx(0.5493, abs=1e-4)
    first_eval = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first_eval["train_eval/unflippable/fraction"] == pytest.approx(
        len(expected) / len(s.train))


def test_make_adamw_is_fused_and_matches_the_loop():
    """make_adamw picks the fused AdamW for plain CPU parameters; three of its steps equal
    the per-parameter AdamW's within float32 round-off, weight decay and two groups included."""
    from dpolab.train import make_adamw

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(3)]
    out = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": ps[:1], "lr": 0.1, "weight_decay": 0.01},
                  {"params": ps[1:], "lr": 0.05, "weight_decay": 0.0}]
        opt = make_adamw(groups, lr=0.1) if fused else torch.optim.AdamW(groups, lr=0.1)
        assert opt.defaults.get("fused") == (True if fused else None)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        out.append([p.detach() for p in ps])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scope", ["full", "lora"])
def test_activation_checkpointing_gives_the_same_run(tiny_dir, tmp_path, cache, scope):
    """Recomputing each decoder block in backward changes no number: losses and gradient
    norms of 3 steps match the run that keeps all activations."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = [f"train.scope={scope}", "train.max_steps=3", "train.lora_targets=[q_proj, v_proj]"]
    runs = [train(cfg_for(tiny_dir, data, tmp_path / f"ac{flag}", *common,
                          f"train.activation_checkpointing={flag}"))
            for flag in ("false", "true")]
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()
             if '"grad_norm"' in x] for r in runs]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert a["grad_norm"] > 0


def test_activation_checkpointing_flag_wraps_the_trained_model(tiny_dir, tmp_path, cache):
    """train.activation_checkpointing=true wraps every decoder block of the model a session
    trains; the default leaves them alone."""
    from dpolab import session as S
    from dpolab.models import decoder_layers

    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    wrapped = {}
    for flag in ("false", "true"):
        cfg = cfg_for(tiny_dir, data, tmp_path / flag, "train.scope=full",
                      f"train.activation_checkpointing={flag}")
        (tmp_path / flag).mkdir()
        s = S.build(cfg, tmp_path / flag, Distributed())
        wrapped[flag] = [getattr(layer, "_dpolab_checkpointed", False)
                         for layer in decoder_layers(s.model)]
    assert wrapped["true"] and all(wrapped["true"])
    assert not any(wrapped["false"])


def test_cpu_reuse_memory_flag_reaches_the_allocator(tiny_dir, tmp_path, cache):
    """A CPU run applies dpolab.memory.reuse_freed_blocks unless train.cpu_reuse_memory=false
    (each in a fresh process: the setting is process-wide)."""
    import platform

    data = write_pairs(tmp_path / "pairs.jsonl", n=12)
    repo = Path(__file__).resolve().parent.parent
    out = {}
    for flag in ("false", "true"):
        code = (f"import sys; sys.path.insert(0, {str(repo)!r})\n"
                "from pathlib import Path\n"
                "from tests.test_train import cfg_for\n"
                "from dpolab import memory\n"
                "from dpolab.train import train\n"
                f"train(cfg_for(Path({str(tiny_dir)!r}), Path({str(data)!r}), "
                f"Path({str(tmp_path / flag)!r}), 'train.max_steps=1', "
                f"'train.cpu_reuse_memory={flag}'))\n"
                "print('APPLIED', memory._applied)\n")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "DPOLAB_CACHE": str(cache)}, timeout=300)
        assert run.returncode == 0, run.stderr
        out[flag] = run.stdout.split("APPLIED ", 1)[1].strip()
    assert out["false"] == "None"
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert "'applied': True" in out["true"]


def test_checkpoint_activations_wraps_every_block_once(tiny_dir):
    """Every decoder block is wrapped, a second call changes nothing, and without autograd
    the block runs as before (same output)."""
    from dpolab.models import checkpoint_activations, decoder_layers, load_model

    model = load_model(str(tiny_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
    n = checkpoint_activations(model)
    assert n == len(decoder_layers(model)) > 0
    assert checkpoint_activations(model) == n
    assert all(getattr(layer, "_dpolab_checkpointed", False) for layer in decoder_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    out = model(ids).logits.sum()
    out.backward()  # through the checkpointed blocks
    assert model.get_input_embeddings().weight.grad is not None


def test_reuse_freed_blocks_applies_once_on_glibc():
    """On glibc (Linux) the mallopt settings apply and a second call returns the same answer."""
    import platform

    from dpolab import memory

    first = memory.reuse_freed_blocks()
    assert memory.reuse_freed_blocks() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first["applied"] and first["mmap_threshold"] == 256 << 20
