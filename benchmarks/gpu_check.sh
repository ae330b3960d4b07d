#!/usr/bin/env bash
# dpolab's GPU check, for a fresh CUDA machine (Python 3.12, torch + transformers installed,
# no TRL, no datasets, no network): the GPU tests, the qwen0.5b side by side with TRL (dpolab,
# TRL precomputing the reference, TRL with the reference model in memory; same precision:
# float32 master weights + bf16 autocast; same token ids) and the long-context row
# (8 x (2048 prompt + 1024 + 1024); dpolab and TRL-precompute, activation checkpointing on
# both sides; TRL's out-of-memory, if any, is recorded as a row). About 8 minutes on one H100.
#
# Rows are appended to benchmarks/results/vs_trl.jsonl (each names the card, driver and the
# torch / transformers / TRL / datasets / pyarrow / CUDA versions); the test log, the tables and
# a copy of the rows go to $OUT (default: benchmarks/results/gpu_check/).
#
# Preparing the wheels (once, on a machine with PyPI; nothing here is committed: /.whl/ is in
# .gitignore). TRL and datasets with the two pure-Python packages of datasets' that
# the GPU image lacks; everything else they import (accelerate, pandas, pyarrow, xxhash,
# fsspec, huggingface-hub, ...) is in the image. No torch wheel. About 1.8 MB in all:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# datasets 5.2 wants pyarrow >= 24; the script prints the image's pyarrow. If it is older, add
# pyarrow==26.0.1 to the list (55 MB: the carry stays under its 64 MiB limit, just).
#
# The one device call (from the repository root; .whl is carried, the rest is the work tree):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Stages have their own time limits (tests 210 s, qwen0.5b 200 s, long 170 s), so a slow one
# cannot eat the others. Afterwards, append the returned $OUT/vs_trl_rows.jsonl to
# benchmarks/results/vs_trl.jsonl here and quote $OUT/pytest.txt, qwen0.5b.txt and long.txt.
#
# Check the script's own logic on a CPU machine first (no wheels installed, tiny shapes, rows
# to a scratch file, not to benchmarks/results/):
#   PYTHONPATH=$PWD bash benchmarks/gpu_check.sh --dry-run

set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/benchmarks/results/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/steps.log"; }

if [ "$DRY" = 1 ]; then
    RESULTS=$OUT/vs_trl_dry_run.jsonl
    QWEN=(--preset qwen0.5b --cpu --small-model --batch 2 --prompt-len 32 --completion-len 32
          --warmup 1 --steps 2)
    LONG=(--preset long --cpu --small-model --batch 2 --prompt-len 64 --completion-len 32
          --warmup 1 --steps 1)
else
    RESULTS=$PWD/benchmarks/results/vs_trl.jsonl
    QWEN=(--preset qwen0.5b)
    LONG=(--preset long)
    if ls .whl/*.whl >/dev/null 2>&1; then
        stamp "installing $(ls .whl | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || { stamp "wheel install failed"; exit 1; }
        export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        stamp "no .whl folder: TRL must already be installed"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

stamp "environment"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$PY" - <<'EOF'
import importlib.metadata as m, platform, torch
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return None
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print({p: v(p) for p in ("transformers", "trl", "datasets", "pyarrow", "dill", "multiprocess",
                         "accelerate", "peft", "pandas", "triton")})
EOF
} 2>&1 | tee "$OUT/env.txt"

# 1. GPU tests (skipped, and so quick, without CUDA), the CPU tests of the packed layout, and
#    the NCCL runs of the distributed engines (a 1-process torchrun with NCCL equals a plain run).
stamp "pytest"
timeout 210 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_packing.py \
    tests/test_logps_autocast.py "tests/test_distributed.py::test_nccl_collectives_take_device_tensors" \
    "tests/test_distributed.py::test_one_process_torchrun_equals_plain_run[cuda]" \
    2>&1 | tail -40 | tee "$OUT/pytest.txt"
stamp "pytest exit ${PIPESTATUS[0]}"

# 2. qwen0.5b: the three systems side by side.
stamp "vs_trl ${QWEN[*]}"
timeout 200 "$PY" benchmarks/vs_trl.py "${QWEN[@]}" --results "$RESULTS" 2>&1 \
    | grep -v "Writing model shards" | tee "$OUT/qwen0.5b.txt"
stamp "qwen0.5b exit ${PIPESTATUS[0]}"

# 3. Long context: dpolab and TRL-precompute (TRL in memory holds one more model and the same
#    (2B, T, V) logits), activation checkpointing on both sides.
stamp "vs_trl ${LONG[*]}"
timeout 170 "$PY" benchmarks/vs_trl.py "${LONG[@]}" --systems dpolab-stored,trl-precompute \
    --dpolab-set train.activation_checkpointing=true --trl-grad-checkpointing \
    --results "$RESULTS" 2>&1 | grep -v "Writing model shards" | tee "$OUT/long.txt"
stamp "long exit ${PIPESTATUS[0]}"

[ "$RESULTS" != "$OUT/vs_trl_dry_run.jsonl" ] && tail -n 5 "$RESULTS" > "$OUT/vs_trl_rows.jsonl"
stamp "done; files in $OUT"
