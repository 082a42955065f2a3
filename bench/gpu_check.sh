#!/usr/bin/env bash
# The whole GPU protocol for one lent GPU, in about 8 minutes:
#
#   1. env         card, driver, torch/triton/timm versions
#   2. install     pip install --no-deps -e .   (offline: no build isolation first)
#   3. tests       pytest tests/ -x -q          (the CUDA test suite)
#   4. bench       pytest bench/ (scope "gpu", time-budgeted) -> benchmark.json, microbench.jsonl
#   5. throughput  bench/throughput.py --quick (ViT-B r=16, time-budgeted)
#   6. summarize   bench/summarize.py -> microbench.md/png, verdict on every target
#
# Output goes to $OUT when set (the device tool copies it back: at most 8
# files, which is exactly what this writes), else bench/results/:
#   gpu_check.log microbench.jsonl benchmark.json microbench.md microbench.png
#   throughput.json throughput.md throughput.png
#
# Every stage runs under `timeout` and the two benchmark stages also get an
# internal budget, so no stage can eat the others' time; the whole run stops
# by GPU_CHECK_BUDGET_S (default 470 s) after it starts. A compact summary is
# printed last.
#
#   bash bench/gpu_check.sh
#   GPU_CHECK_BUDGET_S=900 bash bench/gpu_check.sh      # a longer lease
#   GPU_CHECK_SKIP_TESTS=1 bash bench/gpu_check.sh      # benchmarks only
#   GPU_CHECK_SKIP_INSTALL=1 ...                         # already installed
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python}"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-470}))
STAGES=()

remaining() { echo $((DEADLINE - $(date +%s))); }

stage() { # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    STAGES+=("$(printf '%-11s %-12s %5s' "$name" "no time left" "-")")
    echo "=== [$name] skipped: no time left" | tee -a "$LOG"
    return 1
  fi
  local t0 rc took verdict
  t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$LOG"
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
  case $rc in
    0) verdict=ok ;;
    124 | 137) verdict="TIMED OUT" ;;
    *) verdict="rc=$rc" ;;
  esac
  STAGES+=("$(printf '%-11s %-12s %4ss' "$name" "$verdict" "$took")")
  echo "=== [$name] $verdict in ${took}s" | tee -a "$LOG"
  return $rc
}

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import torch, triton, timm; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"triton\", triton.__version__, \"timm\", timm.__version__, \"device\", torch.cuda.get_device_name())'"

if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  stage install 60 bash -c "$PY -m pip install --no-deps --no-build-isolation -e . \
    || $PY -m pip install --no-deps -e ."
fi

if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
  # Whatever the tests leave, the benchmarks still get at least ~3.5 minutes.
  # The ahead-of-time compile check is the same on any machine and CI runs it;
  # here it would only spend the budget.
  stage tests "$(min 150 $(($(remaining) - 220)))" "$PY" -m pytest tests/ -q -p no:cacheprovider --maxfail=10 \
    --ignore=tests/test_aot_compile.py
fi

# Leave 100 s for throughput + summary; pytest itself stops starting cases 30 s
# before its limit so it can write benchmark.json.
rm -f "$RESULTS/microbench.jsonl" "$RESULTS/benchmark.json"
BENCH_LIMIT=$(min 420 $(($(remaining) - 100)))
stage bench "$BENCH_LIMIT" "$PY" -m pytest bench/ -q -p no:cacheprovider -k "not throughput_cpu_smoke" \
  --tofu-budget-s=$((BENCH_LIMIT - 30)) --tofu-jsonl="$RESULTS/microbench.jsonl" \
  --benchmark-json="$RESULTS/benchmark.json" --benchmark-columns=median,rounds --benchmark-sort=name

TP_LIMIT=$(min 300 $(($(remaining) - 20)))
stage throughput "$TP_LIMIT" "$PY" bench/throughput.py --quick --budget-s $((TP_LIMIT - 35)) --out "$RESULTS"

SUMMARY_FILE=$(mktemp)
stage summarize 30 bash -c "$PY bench/summarize.py --jsonl '$RESULTS/microbench.jsonl' \
  --benchmark-json '$RESULTS/benchmark.json' --throughput '$RESULTS/throughput.json' --out '$RESULTS' \
  | tee '$SUMMARY_FILE'"

{
  echo
  echo "================ gpu_check summary ($(($(date +%s) - START)) s, results in $RESULTS) ================"
  grep -m1 -A1 "^name, driver" "$LOG" | tail -1
  grep -m1 "^torch .* triton" "$LOG"
  printf '%s\n' "${STAGES[@]}"
  grep -E "^[0-9]+ (passed|failed)|^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|error)" "$LOG" | tail -n 6
  grep -E "^target ViT-B" "$LOG"
  cat "$SUMMARY_FILE"
} | tee -a "$LOG"
rm -f "$SUMMARY_FILE"
