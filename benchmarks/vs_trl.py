"""dpolab vs TRL's DPOTrainer on the same model, tokens, loss, optimizer and precision.

    python benchmarks/vs_trl.py --preset tiny|smollm2|qwen0.5b|long [--warmup 2 --steps 5]

Each system runs in its own child process (benchmarks/_vs_trl_child.py), one after the other:
dpolab (reference computed once and stored), TRL with `precompute_ref_log_probs=True`, and TRL
with the reference model in memory. Same settings everywhere: full fine-tuning, sigmoid DPO
with beta 0.1 on summed completion log-probs, AdamW (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no
weight decay), constant schedule without warmup, gradient norm clipped to 1, dropout off,
float32 weights (bf16 autocast on CUDA), no activation (gradient) checkpointing (TRL's default
is on; pass --trl-grad-checkpointing to keep it).

The training set is exactly one batch, so every step of every system sees the same pairs:
the step-1 losses must agree (to 1e-4), and later losses show whether the updates agree too.

tokens/s has one definition for both systems: the tokens TRL puts through the model, i.e.
pairs/s x (prompt + chosen + prompt + rejected); dpolab's default shared-prompt forward
computes the prompt once per pair, so it processes fewer tokens than it is credited with here.
Seconds per step: the median over the timed steps, after `--warmup` steps.
processed_tokens_per_s counts the tokens each system does put through the model (dpolab: pairs
x (prompt + chosen + rejected)); on CUDA, mfu = 6 x parameters x processed_tokens_per_s /
PEAK_FLOPS (the H100's dense bf16 rate; attention's own FLOPs are not counted).
Peak memory: CUDA `max_memory_allocated`, or on CPU the child's peak RSS (VmHWM: the whole
process, loading and reference computation included) and the peak RSS sampled during the steps.
A system that runs out of CUDA memory gets a row with "oom": true instead of numbers; a TRL
child that dies otherwise, a row with "failed": true and the end of its output.
Appends one JSON line per system to benchmarks/results/vs_trl.jsonl, naming the card, driver
and torch / transformers / TRL / datasets versions.

The CUDA presets (qwen0.5b, long) need no model files: a random-init Qwen2.5-0.5B-shaped model
(weights do not change a step's cost) and a byte-level BPE tokenizer trained in code
(dpolab.tiny.tiny_tokenizer), whose ids are valid in Qwen's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vs_trl.jsonl"
CHILD = HERE / "_vs_trl_child.py"

# pairs, prompt tokens, completion tokens (EOS included), warm-up and timed steps, CUDA
PRESETS = {
    "tiny": dict(batch=4, prompt_len=32, completion_len=32, warmup=1, steps=3, cuda=False),
    "smollm2": dict(batch=2, prompt_len=64, completion_len=64, warmup=2, steps=5, cuda=False),
    "qwen0.5b": dict(batch=8, prompt_len=256, completion_len=256, warmup=2, steps=8, cuda=True),
    "long": dict(batch=8, prompt_len=2048, completion_len=1024, warmup=1, steps=3, cuda=True),
}
PEAK_FLOPS = 800e12  # dense bf16 FLOP/s of one H100 SXM (measured ~798e12 on a matrix product)
SYSTEMS = (("dpolab", "stored"), ("trl", "precompute"), ("trl", "in_memory"))
_WORDS = ("the cat dog bird river house answer question model letter story field light door "
          "apple garden teacher friend machine reply summary morning quiet honest green long "
          "short first better small old young open red careful simple clear kind helps reads "
          "writes finds carries learns chooses explains follows remembers prefers sees").split()


# ------------------------------------------------------------------------------------ data
def fill_text(tokenizer, n_tokens: int, *, rng: random.Random, first: str) -> str:
    """Text of exactly `n_tokens` tokens: `first` then " word"s drawn by `rng`.

    Byte-level BPE splits text before each space-led word, so a text's token count is the sum
    of its words' counts and a text that starts with a space does not merge with what precedes
    it: prompt + completion tokenizes to prompt tokens + completion tokens, as TRL (which
    tokenizes them together) and dpolab (separately) both need. " a" (one token) fills the end.
    """
    words, count = [first], len(tokenizer(first, add_special_tokens=False)["input_ids"])
    while count < n_tokens:
        w = " " + rng.choice(_WORDS)
        k = len(tokenizer(w, add_special_tokens=False)["input_ids"])
        if count + k > n_tokens:
            w, k = " a", 1
        words.append(w)
        count += k
    return "".join(words)


def make_pairs(tokenizer, *, n: int, prompt_len: int, completion_len: int, seed: int) -> list[dict]:
    """`n` standard-format pairs: prompt of `prompt_len` tokens, completions of
    `completion_len` tokens including the EOS both systems append."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = fill_text(tokenizer, prompt_len, rng=rng, first=f"Question {i}:")
        chosen, rejected = (fill_text(tokenizer, completion_len - 1, rng=rng, first=" Answer")
                            for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------- models
def prepare_model(preset: str, work: Path, *, seed: int, small: bool = False) -> str:
    """A local model folder for the preset (random-init models are written to `work`);
    `small`: the CUDA presets' Qwen2 family at a tiny width and depth (script checks)."""
    from dpolab.models import resolve_model_path

    if preset == "tiny":
        from dpolab.tiny import save_tiny

        return str(save_tiny(work / "model", vocab_size=512, seed=seed))
    if preset == "smollm2":
        return resolve_model_path("smollm2-135m-instruct")
    return str(save_qwen_shape(work / "model", seed=seed, small=small))


def save_qwen_shape(dir: Path, *, seed: int, small: bool = False) -> Path:
    """Qwen2.5-0.5B-shaped random init (seeded, caller's RNG restored), with a tokenizer built
    in code (its ids, < 1024, are valid in the 151936-token vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.tiny import qwen_shape_config, tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab_size=1024, seed=seed)
    config = qwen_shape_config()
    if small:  # same family, vocabulary and head; 2 narrow layers
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           layer_types=["full_attention"] * 2))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return dir


# ---------------------------------------------------------------------------------- running
def run_child(spec: dict, work: Path) -> dict:
    name = f"{spec['system']}-{spec['ref_mode']}"
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps({**spec, "work": str(work / name)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(work / name / "hf_datasets")}
    if not spec["cuda"]:
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(CHILD), str(spec_path), str(out_path)],
                          env=env, capture_output=True, text=True, cwd=str(HERE.parent))
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{tail}")
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    out = json.loads(out_path.read_text())
    out["child_wall_s"] = time.monotonic() - t0
    return out


def summarize(out: dict, *, tokens_per_step: int, processed_per_step: int, n_params: int,
              cuda: bool) -> dict:
    """The numbers a row of the table shows."""
    if out.get("oom") or out.get("failed"):
        return {"oom": bool(out.get("oom")), "failed": bool(out.get("failed")),
                "error": out["error"], "peak_mib": out.get("cuda_peak_mib"),
                "child_wall_s": out["child_wall_s"]}
    timed = out["step_seconds"][-out["n_timed"]:]
    s = statistics.median(timed)
    peak = out["steps_cuda_peak_mib"] if cuda else out["steps_peak_rss_mib"]
    processed = processed_per_step / s
    return {"s_per_step": s, "tokens_per_s": tokens_per_step / s,
            "processed_tokens_per_s": processed, "processed_tokens_per_step": processed_per_step,
            "n_params": n_params,
            "mfu": 6 * n_params * processed / PEAK_FLOPS if cuda else None,
            "peak_mib": out["cuda_peak_mib"] if cuda else out["peak_rss_mib"],
            "steps_peak_mib": peak, "loss_step1": out["losses"][0], "losses": out["losses"],
            "logps_chosen_step1": out["logps_chosen"][0], "step_seconds": timed,
            "threads": out["threads"], "child_wall_s": out["child_wall_s"]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch CUDA runtime: a CPU machine
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "driver": gpu_driver(),
            "host": platform.node(), "python": platform.python_version()}


def gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def count_params(model_dir: str) -> int:
    """Parameters of the model (tied weights once), counted on the meta device: no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def compare_tokens(outs: dict) -> str:
    """Both systems must train on the same token ids (pair order may differ)."""
    ref = sorted(map(json.dumps, outs["dpolab-stored"]["first_batch"]))
    for name, out in outs.items():
        if sorted(map(json.dumps, out["first_batch"])) != ref:
            return f"DIFFERENT token ids: dpolab vs {name}"
    fb = outs["dpolab-stored"]["first_batch"]
    lens = [(len(p), len(c), len(r)) for p, c, r in fb]
    return f"same token ids in all systems; (prompt, chosen, rejected) tokens per pair: {lens}"


def print_table(rows: dict, *, cuda: bool) -> None:
    mem = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(f"{'system':24s} {'s/step':>8s} {'tokens/s':>9s} {'processed':>9s} {'MFU':>6s} "
          f"{mem + ' (all)':>19s} {'(steps)':>8s} {'loss step 1':>12s} {'loss last':>10s}")
    for name, r in rows.items():
        if r.get("oom") or r.get("failed"):
            what = "out of CUDA memory" if r.get("oom") else "failed"
            print(f"{name:24s} {what} ({r['error'][-120:]!r})")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        print(f"{name:24s} {r['s_per_step']:8.3f} {r['tokens_per_s']:9.0f} "
              f"{r['processed_tokens_per_s']:9.0f} {mfu:>6s} {r['peak_mib']:19.0f} "
              f"{r['steps_peak_mib']:8.0f} {r['loss_step1']:12.6f} {r['losses'][-1]:10.6f}")


def ratios(rows: dict) -> dict:
    """dpolab / TRL for each TRL reference mode: tokens/s, peak memory (all), (steps)."""
    d = rows["dpolab"]
    return {trl: {"tokens_per_s": d["tokens_per_s"] / r["tokens_per_s"],
                  "peak_mem": d["peak_mib"] / r["peak_mib"],
                  "steps_peak_mem": d["steps_peak_mib"] / r["steps_peak_mib"],
                  "loss_step1_abs_diff": abs(d["loss_step1"] - r["loss_step1"]),
                  "loss_last_abs_diff": abs(d["losses"][-1] - r["losses"][-1])}
            for trl, r in rows.items()
            if trl != "dpolab" and not (r.get("oom") or r.get("failed"))}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, help="pairs per step (default: the preset's)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default: the preset's)")
    p.add_argument("--completion-len", type=int, help="completion tokens incl. EOS")
    p.add_argument("--warmup", type=int, help="untimed steps first (>= 1)")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--systems", default="dpolab-stored,trl-precompute,trl-in_memory",
                   help="comma-separated subset of the three systems")
    p.add_argument("--trl-grad-checkpointing", action="store_true",
                   help="keep TRL's default gradient checkpointing (off: like dpolab)")
    p.add_argument("--dpolab-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dpolab config override, e.g. train.cpu_mmap_threshold_mib=0 "
                        "(repeatable; recorded in the results)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSONL file to append to")
    p.add_argument("--small-model", action="store_true",
                   help="CUDA presets: a 2-layer, 64-wide model of the same family and vocabulary "
                        "(checks the script; its numbers are not the preset's)")
    p.add_argument("--cpu", action="store_true",
                   help="run a CUDA preset on the CPU (checks the script, e.g. with small --batch "
                        "and lengths; its numbers are not the preset's)")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.cuda = PRESETS[a.preset]["cuda"] and not a.cpu
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the first step is never timed)")
    known = {f"{s}-{m}" for s, m in SYSTEMS}
    a.systems = [s for s in a.systems.split(",") if s]
    if "dpolab-stored" not in a.systems or set(a.systems) - known:
        p.error(f"--systems must include dpolab-stored; valid: {', '.join(sorted(known))}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.cuda:
        import torch

        if not torch.cuda.is_available():
            print(f"preset {a.preset} needs a CUDA device and none is available; "
                  f"run --preset tiny or --preset smollm2 on CPU", file=sys.stderr)
            return 2
    from dpolab.models import load_tokenizer

    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        work = Path(tmp)
        model = prepare_model(a.preset, work, seed=a.seed, small=a.small_model)
        tokenizer = load_tokenizer(model)
        kw = dict(prompt_len=a.prompt_len, completion_len=a.completion_len)
        train = write_jsonl(make_pairs(tokenizer, n=a.batch, seed=a.seed, **kw), work / "train.jsonl")
        held = write_jsonl(make_pairs(tokenizer, n=2, seed=a.seed + 1, **kw), work / "eval.jsonl")
        spec = dict(model=model, train=str(train), eval=str(held), batch=a.batch,
                    warmup=a.warmup, steps=a.steps, lr=a.lr, beta=a.beta,
                    max_grad_norm=a.max_grad_norm, seed=a.seed, cuda=a.cuda,
                    trl_grad_checkpointing=a.trl_grad_checkpointing,
                    dpolab_overrides=list(a.dpolab_set), **kw)
        n_params = count_params(model)
        outs = {}
        for system, mode in SYSTEMS:
            if f"{system}-{mode}" in a.systems:
                print(f"running {system} ({mode} reference) ...", flush=True)
                try:
                    outs[f"{system}-{mode}"] = run_child(
                        {**spec, "system": system, "ref_mode": mode}, work)
                except RuntimeError as e:  # a TRL child that dies is a row; dpolab's is fatal
                    if system == "dpolab":
                        raise
                    print(e, file=sys.stderr)
                    outs[f"{system}-{mode}"] = {"failed": True, "error": str(e)[-600:],
                                                "child_wall_s": None}
    load_after = loadavg()
    if outs["dpolab-stored"].get("oom"):
        print(f"dpolab ran out of CUDA memory: {outs['dpolab-stored']['error']}", file=sys.stderr)
        return 1
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in outs["dpolab-stored"]["first_batch"])
    shared = sum(len(p) + len(c) + len(r) for p, c, r in outs["dpolab-stored"]["first_batch"])
    outs = {k: v if "first_batch" in v else {**v, "first_batch": outs["dpolab-stored"]["first_batch"]}
            for k, v in outs.items()}  # an OOM or failed row has no batch: the check skips it
    print(compare_tokens(outs))
    print(f"tokens per step (pairs x (2 prompt + chosen + rejected), both systems): {tokens}")
    rows = {}
    for name, out in outs.items():
        out["n_timed"] = a.steps
        rows["dpolab" if name.startswith("dpolab") else name] = summarize(
            out, tokens_per_step=tokens, cuda=a.cuda, n_params=n_params,
            processed_per_step=shared if name.startswith("dpolab") else tokens)
    print_table(rows, cuda=a.cuda)
    rat = ratios(rows)
    d = rows["dpolab"]
    if d["mfu"] is not None:
        print(f"dpolab MFU on the tokens it processes: {100 * d['mfu']:.1f}% "
              f"(6 x {n_params:,} parameters x {d['processed_tokens_per_s']:.0f} tokens/s "
              f"/ {PEAK_FLOPS:.0e} FLOP/s)")
    for trl, r in rat.items():
        agree = "agree" if r["loss_step1_abs_diff"] <= 1e-4 else "DISAGREE"
        print(f"dpolab / {trl}: tokens/s x{r['tokens_per_s']:.2f}, peak memory x{r['peak_mem']:.2f} "
              f"(steps x{r['steps_peak_mem']:.2f}); step-1 losses {agree} "
              f"(|diff| {r['loss_step1_abs_diff']:.1e}), last {r['loss_last_abs_diff']:.1e}")
    print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cores")
    settings = {k: v for k, v in vars(a).items() if k not in ("results", "systems")}
    common = {"benchmark": "vs_trl", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine(), "preset": a.preset, "settings": settings,
              "tokens_per_step": tokens, "token_check": compare_tokens(outs),
              "loadavg_before": load_before, "loadavg_after": load_after,
              "load_high": max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1),
              "versions": versions()}
    a.results.parent.mkdir(parents=True, exist_ok=True)
    with a.results.open("a") as f:
        for name, r in rows.items():
            f.write(json.dumps({**common, "system": name, **r,
                                "ratios": rat if name == "dpolab" else None}) + "\n")
    return 0


def versions() -> dict:
    from importlib.metadata import version

    from importlib.metadata import PackageNotFoundError

    def v(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    import torch

    return {**{p: v(p) for p in ("torch", "transformers", "trl", "datasets", "pyarrow")},
            "cuda": torch.version.cuda}


if __name__ == "__main__":
    sys.exit(main())
