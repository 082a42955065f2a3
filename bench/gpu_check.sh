#!/usr/bin/env bash
# Everything this package checks on a GPU, in one budgeted run (~9 minutes), most important first:
#
#   1. env         card, driver, torch/triton/timm/transformers versions
#   2. install     pip install --no-deps --no-build-isolation -e .  (works offline), checked by importing
#                  tofu_triton.kernels; falls back to a non-editable install
#   3. tests       pytest on CUDA of the test files that cover what changed since the suite last ran on a GPU
#                  (GPU_CHECK_TESTS="tests/" for all of it), 12 workers
#   4. sdcheck     bench/sd_check.py: the SD step's kernels on the GPU (select repeated against the reference at
#                  N = 4096/16384/65536, the step's values, per-kernel times); then, when compute-sanitizer is
#                  there, its memcheck and synccheck on one small case (GPU_CHECK_SKIP_SDCHECK=1 drops the stage)
#   5. sd          bench/throughput_sd.py: one Stable Diffusion UNet step (SDXL 1024 px, then SD 1.5 512 px, B=2,
#                  fp16), unpatched vs tomesd vs ToMe / ToFu at ratio 0.5, eager and CUDA graph (needs diffusers;
#                  tomesd for its rows)
#   6. export      bench/export_check.py: a patched ViT with the Triton kernels through torch.export + AOTInductor
#   7. determinism bench/determinism_check.py: the ViT step, the SD step, a patched ViT-B and SD 1.5 UNet, each
#                  run three times, bitwise equal
#   8. throughput  bench/throughput.py: ViT-B r=16 fp16 at B = 1, 8, 64, 256, CUDA graph and eager (the targets of
#                  the one-launch step), then ViT-S/L and r=8 as the budget allows (GPU_CHECK_VIT_ARGS replaces the
#                  arguments)
#   9. probe       bench/probe.py: proportional attention on every path (mask, cudnn, channel, flex) against SDPA
#                  without a bias, host-sync check, launches per block and host enqueue time at B = 1
#  10. extras, with the time the stages above leave: throughput-x (bf16 and torch.compile at B = 1 and 256 into
#                  OUTPUT_DIR/extra/), dit (bench/throughput_dit.py: one diffusion transformer step, Flux first,
#                  then SD3, PixArt; unpatched vs ToFu vs ToDo, eager and CUDA graph; GPU_CHECK_SKIP_DIT=1 drops
#                  it), bench (pytest bench/, scope "gpu", time-budgeted -> benchmark.json, microbench.jsonl)
#  11. summarize   bench/summarize.py -> microbench.md/png, a verdict on every target
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]          # default bench/results/gpu
#   GPU_CHECK_BUDGET_S=580 bash bench/gpu_check.sh       # a longer run (one device call runs 600 s at most)
#   GPU_CHECK_SKIP_TESTS=1 bash bench/gpu_check.sh       # benchmarks only
#   GPU_CHECK_TESTS="tests/test_step.py" ...             # only these tests
#   GPU_CHECK_SKIP_INSTALL=1 ...                          # already installed
#   GPU_CHECK_SKIP_SD=1 ...                               # no Stable Diffusion stage (its time goes to the others)
#   GPU_CHECK_SKIP_DIT=1 ...                              # no diffusion-transformer stage
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh /tmp/x   # print each stage's limit and command, run nothing
#   GPU_CHECK_DRY_RUN=full ...                           # the same, as if every stage used all of its limit
#
# Every stage runs under `timeout`, and the benchmark stages also get an
# internal budget, so no stage eats the others' time; the whole run ends by
# GPU_CHECK_BUDGET_S (default 540 s) after it starts. Files in OUTPUT_DIR:
# gpu_check.log, tests.log, microbench.{jsonl,md,png}, benchmark.json,
# sd_check.{json,md}, probe.{json,md}, export_check.json, determinism.json, throughput_sd_<card>.{json,md},
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

SPENT=0  # a dry run's pretend time: GPU_CHECK_DRY_RUN=full has every stage use all of its limit
remaining() { echo $((DEADLINE - $(date +%s) - SPENT)); }
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
    if [ "$GPU_CHECK_DRY_RUN" = full ]; then SPENT=$((SPENT + limit)); fi
    STAGES+=("$(printf '%-11s %-12s %5s' "$name" "dry run" "${limit}s")")
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

# The plan, most important first: the tests of what has never run on a GPU, the
# Stable Diffusion kernels (+ compute-sanitizer), the SD UNet step, export,
# determinism, the ViT-B targets, the attention paths. Each of these "kept"
# stages gets min(its cap, the time left less the caps of the kept stages still
# to come), so a slow stage cannot starve the ones after it; with the default
# 540 s budget (~45 s of setup) every kept stage gets its cap. Time the kept
# stages leave over goes to the extras at the end (bf16 and compile, the
# diffusion transformers, the microbenchmarks), which run only with what is left.
# Caps are estimates for an H100-class card, not measured yet for the stages
# marked *: tests 120 (the changed files, -n 12), sdcheck* 45, each sanitizer* 25,
# sd* 80, export 40, determinism* 30, throughput 70 (ViT-B r=16 first), probe 35.
HAS_SANITIZER=$(command -v compute-sanitizer >/dev/null && echo 1 || true)
cap() { # cap NAME CAP: CAP, or 0 where the stage is switched off
  case $1 in
    tests) [ -z "${GPU_CHECK_SKIP_TESTS:-}" ] && echo "$2" || echo 0 ;;
    sdcheck) [ -z "${GPU_CHECK_SKIP_SDCHECK:-}" ] && echo "$2" || echo 0 ;;
    san) [ -z "${GPU_CHECK_SKIP_SDCHECK:-}" ] && [ -n "$HAS_SANITIZER" ] && echo "$2" || echo 0 ;;
    sd) [ -z "${GPU_CHECK_SKIP_SD:-}" ] && echo "$2" || echo 0 ;;
    *) echo "$2" ;;
  esac
}
C_TESTS=$(cap tests 120); C_SDCHECK=$(cap sdcheck 45); C_SAN=$(cap san 25); C_SD=$(cap sd 80)
C_EXPORT=40; C_DET=30; C_VIT=70; C_PROBE=35; C_SUM=20
# The caps of the kept stages still to come (the summary's included); each kept stage takes its own out.
RESERVE=$((C_TESTS + C_SDCHECK + 2 * C_SAN + C_SD + C_EXPORT + C_DET + C_VIT + C_PROBE + C_SUM))
take() { # take CAP: LIMIT = min(CAP, time left - the caps of the kept stages after this one)
  RESERVE=$((RESERVE - $1))
  LIMIT=$(min "$1" $(($(remaining) - RESERVE)))
}
extra_limit() { # extra_limit CAP: what the kept stages left, before the summary; 0 (skipped) under 30 s
  local left
  left=$(min "$1" $(($(remaining) - RESERVE)))
  if [ "$left" -lt 30 ]; then echo 0; else echo "$left"; fi
}

# The test files that cover what has changed since the suite last ran on a GPU
# (GPU_CHECK_TESTS=tests/ runs it all, ~4 minutes with 12 workers). The
# ahead-of-time compile check gives the same answer on any machine (CI runs it).
GPU_TESTS=${GPU_CHECK_TESTS:-tests/test_step.py tests/test_attention.py tests/test_graphs.py tests/test_api.py \
tests/test_partition.py tests/test_spatial_match.py tests/test_spatial_merge.py tests/test_patch_diffusers.py \
tests/test_patch_dit.py tests/test_export.py tests/test_match.py tests/test_merge.py tests/test_patch_timm.py}
if [ "$C_TESTS" -gt 0 ]; then
  XDIST=()
  if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n 12); fi
  take "$C_TESTS"
  stage tests "$LIMIT" bash -c "set -o pipefail; $PY -m pytest $GPU_TESTS -q -p no:cacheprovider ${XDIST[*]} -rfE \
    --durations=10 --ignore=tests/test_aot_compile.py 2>&1 | tee '$RESULTS/tests.log'"
fi

if [ "$C_SDCHECK" -gt 0 ]; then
  take "$C_SDCHECK"
  stage sdcheck "$LIMIT" "$PY" bench/sd_check.py --out "$RESULTS"
fi
if [ "$C_SAN" -gt 0 ]; then
  take "$C_SAN"
  stage san-memcheck "$LIMIT" compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" bench/sd_check.py --small
  take "$C_SAN"
  stage san-synccheck "$LIMIT" compute-sanitizer --tool synccheck --error-exitcode 3 "$PY" bench/sd_check.py --small
fi

# SDXL first (the goal is judged at its size), eager and from CUDA graphs; SD 1.5 is not started with less
# than 35 s of the stage left.
if [ "$C_SD" -gt 0 ]; then
  take "$C_SD"
  stage sd "$LIMIT" "$PY" bench/throughput_sd.py --models sdxl,sd15 --execs eager,graph \
    --budget-s $((LIMIT > 35 ? LIMIT - 35 : 0)) --out "$RESULTS"
fi

take "$C_EXPORT"
stage export "$LIMIT" "$PY" bench/export_check.py --out "$RESULTS"

take "$C_DET"
stage determinism "$LIMIT" "$PY" bench/determinism_check.py \
  --out "$RESULTS"

# ViT-B r=16 fp16 first (the targets), every batch, CUDA graph then eager; the rest of the sweep (ViT-S/L, r=8)
# with what is left of the stage (GPU_CHECK_VIT_ARGS replaces the arguments).
take "$C_VIT"
TP_LIMIT=$LIMIT
VIT_ARGS=${GPU_CHECK_VIT_ARGS:---models vit_b,vit_s,vit_l --batches 1,8,64,256 --r 16,8 --exec graph,eager}
# shellcheck disable=SC2086
stage throughput "$TP_LIMIT" "$PY" bench/throughput.py $VIT_ARGS --budget-s $((TP_LIMIT > 35 ? TP_LIMIT - 35 : 0)) \
  --out "$RESULTS"

take "$C_PROBE"
stage probe "$LIMIT" "$PY" bench/probe.py --out "$RESULTS"

# The extras, with whatever the kept stages left: bf16 and torch.compile (compile time reported, not timed)
# at the two ends of the batch range, one diffusion-transformer step, the microbenchmarks.
X_LIMIT=$(extra_limit 150)
stage throughput-x "$X_LIMIT" bash -c "$PY bench/throughput.py --models vit_b --batches 1,256 --r 16 --exec graph \
  --dtype bf16 --budget-s $((X_LIMIT / 3)) --out '$RESULTS/extra/bf16' && $PY bench/throughput.py --models vit_b \
  --batches 1,256 --r 16 --exec compile --variants unpatched,tofu --budget-s $((X_LIMIT / 2)) --out '$RESULTS/extra/compile'"

if [ -z "${GPU_CHECK_SKIP_DIT:-}" ]; then
  DIT_LIMIT=$(extra_limit 300)
  stage dit "$DIT_LIMIT" "$PY" bench/throughput_dit.py --budget-s $((DIT_LIMIT > 90 ? DIT_LIMIT - 90 : 0)) \
    --out "$RESULTS"
fi

# pytest stops starting cases 30 s before its limit so it can write benchmark.json; the CPU smoke tests of the
# scripts are left out.
rm -f "$RESULTS/microbench.jsonl" "$RESULTS/benchmark.json"
BENCH_LIMIT=$(extra_limit 220)
stage bench "$BENCH_LIMIT" "$PY" -m pytest bench/ -q -p no:cacheprovider \
  -k "not throughput_cpu_smoke and not throughput_sd_smoke and not throughput_dit_smoke and not sd_check \
and not determinism_check and not summarize" \
  --tofu-budget-s=$((BENCH_LIMIT - 30)) --tofu-jsonl="$RESULTS/microbench.jsonl" \
  --benchmark-json="$RESULTS/benchmark.json" --benchmark-columns=median,rounds --benchmark-sort=name

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
  grep -E "^determinism (PASSED|FAILED)|\"ok\": false" "$LOG"
  cat "$SUMMARY_FILE"
} | tee -a "$LOG"
rm -f "$SUMMARY_FILE"
tar czf "$RESULTS/gpu_check.tar.gz" -C "$RESULTS" --exclude=gpu_check.tar.gz . 2>/dev/null || true
