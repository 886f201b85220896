#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): versions, the test suite on the GPU backend (tests/kernels
# included: our Pallas kernels lowered for real), the generation benchmark (1B and 3B shapes, bf16, random weights)
# against HF transformers on the same GPU, and the attention-kernel sweep (ours vs cuDNN vs XLA, time-bounded).
#
#   device run:  bash experiments/gpu_check.sh          (carry: .whl; results land in $OUT)
#   dry run here: PYTHON=.venv/bin/python SKIP_WHEELS=1 OUT=/tmp/gpu_out MODELS=tiny-text KERNELS_ARGS=--smoke \
#                 bash experiments/gpu_check.sh
#
# The GPU image has JAX/flax/orbax/torch/transformers but no package registry: the missing test extras travel as
# wheels in .whl (llama-models and its pure-Python needs, fairscale, gguf). The SmolLM2 GGUF fixture (94 MB) and the
# notebook stack cannot travel, so those tests skip there, by name (LLAMA32_JAX_SKIP_MISSING_FIXTURES=1).
# Each step has its own time limit, so one failure or hang still leaves the other results.
# Build .whl here first (ignored by git; cp312 manylinux wheels, no dependencies resolved):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     llama-models==0.3.0 gguf pydantic pydantic-core annotated-types typing-inspection typing_extensions termcolor
#   pip wheel --no-deps fairscale==0.4.13 -w .whl        # fairscale ships as an sdist only
set -u
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to a results folder}
MODELS=${MODELS:-"Llama-3.2-1B Llama-3.2-3B"}
BATCH=${BATCH:-1,64}
# bench_kernels shapes: the targets first (flash d=128 at 8K; cross at batch 8 x 4 images), so the budget covers them
KERNELS_ARGS=${KERNELS_ARGS:-"--head_dims=128,64 --seq_lens=8192,2048,32768 --bwd_seq_lens=8192 --decode_batches=1,64
  --decode_lens=32768,131072 --cross_batches=8,1 --cross_images=4 --cross_text=2048,128,1 --repeats=5"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
t0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step versions
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import jax, flax, orbax.checkpoint as ocp, torch, transformers, numpy
print("jax", jax.__version__, "flax", flax.__version__, "orbax", ocp.__version__, "torch", torch.__version__,
      "transformers", transformers.__version__, "numpy", numpy.__version__)
print("devices", jax.devices(), "backend", jax.default_backend())
EOF

step "test suite (GPU backend)"
# -v (and no -q, which would cancel it) writes one line per test as it ends, so the log names every result even
# when the time limit stops the run before pytest's summary; --timeout stops a single hung test.
LLAMA32_JAX_SKIP_MISSING_FIXTURES=1 timeout "${TEST_TIMEOUT:-280}" $PY -m pytest -v -n "${WORKERS:-14}" \
  -p no:cacheprovider -p no:benchmark -rfEs --tb=short --timeout=150 "${TESTS:-tests}" \
  2>&1 | tee "$OUT/pytest.log" | grep -E "FAILED|ERROR|passed|failed|Error" | tail -150
echo "pytest exit ${PIPESTATUS[0]}"

for m in $MODELS; do
  step "bench_generate $m"
  timeout "${BENCH_TIMEOUT:-150}" $PY -m experiments.bench_generate --model="$m" --dtype=bfloat16 --batch="$BATCH" \
    --prompt_len=512 --n1=16 --n2=80 --repeats=2 --bandwidth_gbs=4800 --peak_gflops=989000 \
    --out="$OUT/bench_generate_${m}_bfloat16_gpu.json" 2>&1 | tee "$OUT/bench_generate_$m.log" | grep -v "^W0\|^I0"
  echo "bench exit ${PIPESTATUS[0]}"
done

step "bench_kernels (attention: ours vs cuDNN vs XLA)"
# --max_seconds stops starting new shapes; the JSON is rewritten after each section, so the outer timeout keeps them
timeout "${KERNELS_TIMEOUT:-180}" $PY -m experiments.bench_kernels --max_seconds="${KERNELS_SECONDS:-150}" \
  $KERNELS_ARGS --out="$OUT/bench_kernels_gpu.json" 2>&1 | tee "$OUT/bench_kernels.log" | grep -v "^W0\|^I0"
echo "bench_kernels exit ${PIPESTATUS[0]}"
step done
