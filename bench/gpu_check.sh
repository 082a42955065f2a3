#!/usr/bin/env bash
# Everything this package checks on a GPU, in one budgeted run (~9 minutes):
#
#   1. env         card, driver, torch/triton/timm/transformers versions
#   2. install     pip install --no-deps --no-build-isolation -e .  (works offline), checked by importing
#                  tofu_triton.kernels; falls back to a non-editable install
#   3. tests       pytest tests/ on CUDA (in parallel when pytest-xdist is there)
#   4. sdcheck     bench/sd_check.py: the SD step's kernels on the GPU (select repeated against the reference at
#                  N = 4096/16384/65536, the step's values, per-kernel times); then, when compute-sanitizer is
#                  there, its memcheck and synccheck on one small case (GPU_CHECK_SKIP_SDCHECK=1 drops the stage)
#   5. bench       pytest bench/ (scope "gpu", time-budgeted) -> benchmark.json, microbench.jsonl
#   6. probe       bench/probe.py: proportional attention on every path (mask, cudnn, channel, flex) against SDPA
#                  without a bias, host-sync check, launches per block and host enqueue time at B = 1
#   7. export      bench/export_check.py: a patched ViT with the Triton kernels through torch.export + AOTInductor
#   8. sd          bench/throughput_sd.py: one Stable Diffusion UNet step (SD 1.5 512 px, SDXL 1024 px, B=2, fp16),
#                  unpatched vs tomesd vs ToMe / ToFu at ratio 0.5 (needs diffusers; tomesd for its rows)
#      dit         bench/throughput_dit.py: one diffusion transformer step (Flux first, then SD3, PixArt; 1024 px,
#                  B=1/2, bf16/fp16), unpatched vs ToFu 0.3/0.5 vs ToDo, eager and CUDA graph (needs diffusers;
#                  GPU_CHECK_SKIP_DIT=1 drops it; ~4 minutes, not yet measured)
#   9. throughput  bench/throughput.py: ViT-B r=16 fp16 at B = 1, 8, 64, 256, CUDA graph and eager (the targets of
#                  the one-launch step), then ViT-S/L and r=8 as the budget allows (GPU_CHECK_VIT_ARGS replaces the
#                  arguments); throughput-x: bf16 and torch.compile at B = 1 and 256 into OUTPUT_DIR/extra/
#  10. summarize   bench/summarize.py -> microbench.md/png, a verdict on every target
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]          # default bench/results/gpu
#   GPU_CHECK_BUDGET_S=900 bash bench/gpu_check.sh       # a longer run
#   GPU_CHECK_SKIP_TESTS=1 bash bench/gpu_check.sh       # benchmarks only
#   GPU_CHECK_TESTS="tests/test_step.py" ...             # only these tests
#   GPU_CHECK_SKIP_INSTALL=1 ...                          # already installed
#   GPU_CHECK_SKIP_SD=1 ...                               # no Stable Diffusion stage (its time goes to the others)
#   GPU_CHECK_SKIP_DIT=1 ...                              # no diffusion-transformer stage
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh /tmp/x   # print each stage's limit and command, run nothing
#
# Every stage runs under `timeout`, and the benchmark stages also get an
# internal budget, so no stage eats the others' time; the whole run ends by
# GPU_CHECK_BUDGET_S (default 540 s) after it starts. Files in OUTPUT_DIR:
# gpu_check.log, tests.log, microbench.{jsonl,md,png}, benchmark.json,
# sd_check.{json,md}, probe.{json,md}, export_check.json, throughput_sd_<card>.{json,md},
# throughput_dit_<card>.{json,md}, throughput.{json,md,png}, extra/{bf16,compile}/throughput.*,
# and all of them packed into gpu_check.tar.gz. A compact summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS="${1:-bench/results/gpu}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-540}))
STAGES=()
export PYTHONUNBUFFERED=1

remaining() { echo $((DEADLINE - $(date +%s))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

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
  if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    STAGES+=("$(printf '%-11s %-12s %5s' "$name" "dry run" "-")")
    return 0
  fi
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

stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import torch, triton, timm, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"triton\", triton.__version__, \"timm\", timm.__version__, \"numpy\", numpy.__version__, \
  \"device\", torch.cuda.get_device_name())'; \
  $PY -c 'import transformers; print(\"transformers\", transformers.__version__)' || true"

# An egg-link install made by an old pip without PEP 517 loses the
# package_dir mapping (kernels/ -> tofu_triton.kernels): check the import,
# not pip's exit code.
IMPORT_CHECK="import tofu_triton.kernels.step, tofu_triton.patch; print('import ok', tofu_triton.__file__)"
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  stage install 90 bash -c "cd /tmp && { $PY -m pip install -q --no-deps --no-build-isolation -e '$PWD' \
    && $PY -c \"$IMPORT_CHECK\"; } || { echo 'editable install unusable; installing a copy'; \
    $PY -m pip install -q --no-deps --no-build-isolation '$PWD' && $PY -c \"$IMPORT_CHECK\"; }"
fi

# Packages the GPU machine lacks (diffusers and tomesd for the SD stages) can
# travel as wheels in .whl/ (bench/README.md says how to fetch them).
if compgen -G ".whl/*.whl" >/dev/null; then
  stage wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tofu_site .whl/*.whl && export PYTHONPATH="/tmp/tofu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ -z "${GPU_CHECK_SKIP_TESTS:-}" ]; then
  # The stages after the tests get at least ~5.5 minutes whatever the tests
  # leave (on an H200 the whole suite takes ~3 minutes with 12 workers; skip it
  # with GPU_CHECK_SKIP_TESTS=1 where it has passed on that card already). The
  # ahead-of-time compile check gives the same answer on any machine (CI runs it).
  XDIST=()
  if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n 12); fi
  # shellcheck disable=SC2086
  stage tests "$(min 180 $(($(remaining) - 330)))" bash -c "set -o pipefail; $PY -m pytest ${GPU_CHECK_TESTS:-tests/} \
    -q -p no:cacheprovider ${XDIST[*]} -rfE --durations=10 --ignore=tests/test_aot_compile.py 2>&1 \
    | tee '$RESULTS/tests.log'"
fi

# Leave ~230 s for probe + export + throughput + summary, and SD_RESERVE more for
# the Stable Diffusion stage (estimated ~40 s on an H100-class card, not yet
# measured: two UNet builds and ~140 forwards each); pytest itself stops starting cases 30 s before its limit
# so it can write benchmark.json. The CPU smoke tests of the scripts are left out.
SD_RESERVE=60
if [ -n "${GPU_CHECK_SKIP_SD:-}" ]; then SD_RESERVE=0; fi
if [ -z "${GPU_CHECK_SKIP_SDCHECK:-}" ]; then
  stage sdcheck "$(min 60 $(($(remaining) - 330 - SD_RESERVE)))" "$PY" bench/sd_check.py --out "$RESULTS"
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck synccheck; do
      stage "san-$tool" "$(min 40 $(($(remaining) - 330 - SD_RESERVE)))" compute-sanitizer --tool "$tool" \
        --error-exitcode 3 "$PY" bench/sd_check.py --small
    done
  fi
fi

rm -f "$RESULTS/microbench.jsonl" "$RESULTS/benchmark.json"
BENCH_LIMIT=$(min 220 $(($(remaining) - 230 - SD_RESERVE)))
stage bench "$BENCH_LIMIT" "$PY" -m pytest bench/ -q -p no:cacheprovider \
  -k "not throughput_cpu_smoke and not throughput_sd_smoke and not throughput_dit_smoke and not sd_check" \
  --tofu-budget-s=$((BENCH_LIMIT - 30)) --tofu-jsonl="$RESULTS/microbench.jsonl" \
  --benchmark-json="$RESULTS/benchmark.json" --benchmark-columns=median,rounds --benchmark-sort=name

stage probe "$(min 60 $(($(remaining) - 170 - SD_RESERVE)))" "$PY" bench/probe.py --out "$RESULTS"

stage export "$(min 90 $(($(remaining) - 110 - SD_RESERVE)))" "$PY" bench/export_check.py --out "$RESULTS"

# Up to 90 s, leaving the throughput stage its ~110 s; SDXL (the slower model)
# is not started with less than 45 s of the stage left.
if [ -z "${GPU_CHECK_SKIP_SD:-}" ]; then
  SD_LIMIT=$(min 90 $(($(remaining) - 110)))
  stage sd "$SD_LIMIT" "$PY" bench/throughput_sd.py --budget-s $((SD_LIMIT > 45 ? SD_LIMIT - 45 : 0)) \
    --out "$RESULTS"
fi

# ViT-B r=16 fp16 first (the targets), every batch, CUDA graph then eager; with time left, the rest of the sweep.
if [ -z "${GPU_CHECK_SKIP_DIT:-}" ]; then
  DIT_LIMIT=$(min 300 $(($(remaining) - 190)))
  stage dit "$DIT_LIMIT" "$PY" bench/throughput_dit.py --budget-s $((DIT_LIMIT > 90 ? DIT_LIMIT - 90 : 0)) \
    --out "$RESULTS"
fi

TP_LIMIT=$(min 300 $(($(remaining) - 80)))
VIT_ARGS=${GPU_CHECK_VIT_ARGS:---models vit_b,vit_s,vit_l --batches 1,8,64,256 --r 16,8 --exec graph,eager}
# shellcheck disable=SC2086
stage throughput "$TP_LIMIT" "$PY" bench/throughput.py $VIT_ARGS --budget-s $((TP_LIMIT > 35 ? TP_LIMIT - 35 : 0)) \
  --out "$RESULTS"
# bf16, and torch.compile (compile time reported, not timed), at the two ends of the batch range.
X_LIMIT=$(min 150 $(($(remaining) - 25)))
stage throughput-x "$X_LIMIT" bash -c "$PY bench/throughput.py --models vit_b --batches 1,256 --r 16 --exec graph \
  --dtype bf16 --budget-s $((X_LIMIT / 3)) --out '$RESULTS/extra/bf16' && $PY bench/throughput.py --models vit_b \
  --batches 1,256 --r 16 --exec compile --variants unpatched,tofu --budget-s $((X_LIMIT / 2)) --out '$RESULTS/extra/compile'"

SUMMARY_FILE=$(mktemp)
stage summarize 20 bash -c "$PY bench/summarize.py --jsonl '$RESULTS/microbench.jsonl' \
  --benchmark-json '$RESULTS/benchmark.json' --throughput '$RESULTS/throughput.json' --out '$RESULTS' \
  | tee '$SUMMARY_FILE'"

{
  echo
  echo "================ gpu_check summary ($(($(date +%s) - START)) s, results in $RESULTS) ================"
  grep -m1 -A1 "^name, driver" "$LOG" | tail -1
  grep -m1 "^torch .* triton" "$LOG"
  printf '%s\n' "${STAGES[@]}"
  grep -E "^(FAILED|ERROR) " "$LOG" | head -n 15
  grep -E "[0-9]+ (passed|failed|skipped|error)" "$LOG" | tail -n 3
  grep -E "^(sync|launches|attention B=(64|256) +N=197 |export check)" "$LOG"
  grep -E "^target ViT-B" "$LOG"
  grep -E "^target SD " "$LOG"
  grep -E "^target DiT" "$LOG"
  grep -E "^sd_check (PASSED|FAILED)|ERROR SUMMARY" "$LOG"
  cat "$SUMMARY_FILE"
} | tee -a "$LOG"
rm -f "$SUMMARY_FILE"
tar czf "$RESULTS/gpu_check.tar.gz" -C "$RESULTS" --exclude=gpu_check.tar.gz . 2>/dev/null || true
