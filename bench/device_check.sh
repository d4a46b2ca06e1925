#!/usr/bin/env bash
# The one script to run on a lent GPU machine, from the repository root:
#
#     OUT=/some/dir bash bench/device_check.sh
#
# 1. the test suite on CUDA (compiled Triton, no interpreter): RLKERNELS_TEST_DEVICE=cuda pytest tests
# 2. the GPU benchmark: grpo (dapo) fwd+bwd, every provider, qwen2.5-7b LM head, 16k tokens, bf16
# 3. the GPU benchmark of the log-prob ops (logprobs, logits) at the same shape, without torch.compile
#
# Everything lands flat in $OUT (default ./device-out), 8 files at most, each name carrying the GPU's name:
#   summary-<gpu>.txt              GPU, driver, versions, and each step's exit status and seconds
#   tests-<gpu>.log                pytest output
#   bench-grpo-<gpu>.{log,json,png}     table, rows, plot
#   bench-logprobs-<gpu>.{log,json,png}
# Each step runs under `timeout` and the script goes on when one fails; the limits add up to under 8 minutes
# (150 + 180 + 100 s, plus up to 10 s each to kill a step that ignores SIGTERM). It never resets or reconfigures
# the GPU. Exit status: 0 when every step passed, else 1.
set -u

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works whether or not the package is pip-installed here
unset TRITON_INTERPRET                                   # compiled Triton kernels, not the CPU interpreter
PY="${PYTHON:-python}"

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
GPU_NAME="${GPU_NAME:-unknown-gpu}"
TAG="$(printf '%s' "$GPU_NAME" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/^-*//; s/-*$//')"
SUMMARY="$OUT/summary-$TAG.txt"

{
  echo "device_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "gpu: $GPU_NAME"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 | head -n3
  "$PY" - <<'EOF' 2>&1
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:  # report, do not fail: the steps below say what breaks
    tv = f"not importable ({exc})"
import rlkernels
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), triton {tv}, "
      f"rlkernels {rlkernels.__version__}")
print("backends on cuda:", rlkernels.available_backends(torch.device("cuda")) if torch.cuda.is_available()
      else "CUDA not available")
EOF
  echo
} > "$SUMMARY"

FAILED=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME-$TAG.log, record status
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name-$TAG.log" 2>&1
  local rc=$?
  [ "$rc" -eq 124 ] && echo "(timed out after $limit s)" >> "$OUT/$name-$TAG.log"
  [ "$rc" -ne 0 ] && FAILED=1
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" >> "$SUMMARY"
}

# the engine suites on CUDA (the CLI, trainer and native tests are CPU-only and already run by CI)
step tests 150 env RLKERNELS_TEST_DEVICE=cuda "$PY" -m pytest -q -ra -p no:cacheprovider \
     tests/test_logprobs.py tests/test_loss.py tests/test_memory.py tests/test_triton.py tests/test_compile.py \
     tests/test_hypothesis.py

BENCH=("$PY" -m rlkernels.bench --device cuda --shape qwen2.5-7b --tokens 16384 --dtype bfloat16 --no-progress
       --timeout 100)  # per provider: a stuck one (compile, last) cannot eat the whole step
step bench-grpo 180 "${BENCH[@]}" --op grpo --preset dapo --mode full --provider all \
     --json "$OUT/bench-grpo-$TAG.json" --plot "$OUT/bench-grpo-$TAG.png"
step bench-logprobs 100 "${BENCH[@]}" --op logprobs,logits --mode full \
     --json "$OUT/bench-logprobs-$TAG.json" --plot "$OUT/bench-logprobs-$TAG.png"

echo "total $SECONDS s" >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
