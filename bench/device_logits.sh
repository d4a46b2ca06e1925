#!/usr/bin/env bash
# A short GPU check of the logits op's host path (106 s on an H100, 2026-11-27), for a device call with little
# time left; bench/device_check.sh is the whole run.
#
#     OUT=/some/dir bash bench/device_logits.sh
#
#   bench     rlkernels-bench, the logits op fwd+bwd at the qwen2.5-7b shape (16k tokens, bf16), rlkernels-triton only
#   tests     the Triton engine's suites on CUDA (test_launch, test_logprobs, test_triton), stopping at the first failure
#   host      bench/host_profile.py: host microseconds per step, launch times, GPU gaps, an unprofiled call cut by
#             CUDA events around each kernel, (N, V) and (B, T, V), same-process baselines (Triton's launch path,
#             the checks read before the launch)
#   tune      bench/gpu_tune.py --only logits: GB/s by the byte model, value checks on and off and read before or
#             after the launch, GPU timelines
# Each step under `timeout`; the results land in $OUT (summary.txt, log.txt, logits.json, tests.log, host/,
# tune.json).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export RLKERNELS_DISABLE_NATIVE=1
PY="${PYTHON:-python}"
XDIST="$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")"
SUMMARY="$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$SUMMARY" 2>&1
run() {  # run NAME LIMIT COMMAND...
  local name="$1" limit="$2" start=$SECONDS
  shift 2
  echo "=== $name" >> "$OUT/log.txt"
  timeout --kill-after=5 "$limit" "$@" >> "$OUT/log.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" >> "$SUMMARY"
}
run bench 45 "$PY" -m rlkernels.bench --device cuda --shape qwen2.5-7b --tokens 16384 --dtype bfloat16 --no-progress \
  --warmup 2 --repeat 5 --timeout 40 --op logits --mode full --provider rlkernels-triton --json "$OUT/logits.json"
run tests 90 env RLKERNELS_TEST_DEVICE=cuda "$PY" -m pytest -q -x -ra -p no:cacheprovider $XDIST \
  tests/test_launch.py tests/test_logprobs.py tests/test_triton.py
tail -n 3 "$OUT/log.txt" >> "$SUMMARY"
run host 40 env PYTHONUNBUFFERED=1 "$PY" bench/host_profile.py --out "$OUT/host"  # --traces: 5 more files
run tune 45 env PYTHONUNBUFFERED=1 "$PY" bench/gpu_tune.py --only logits --json "$OUT/tune.json"
cat "$SUMMARY"
