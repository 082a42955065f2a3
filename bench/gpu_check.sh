#!/usr/bin/env bash
# Everything this package checks on a GPU, in one budgeted run (~9 minutes), in the order of the GPU issues
# (27, 30): what failed or was never measured on the H200 run of 2026-12-04 first.
#
#   setup         env (card, driver, versions), install (pip install --no-deps -e ., checked by importing
#                 tofu_triton.kernels), wheels (.whl/*.whl: diffusers, tomesd)
#    1. tests     pytest on CUDA, the CUDA-specific files first, 16 workers; every failure is named the
#                 moment it happens (bench/pytest_failures.py) and kept in test_failures.txt, so a run cut
#                 by its limit still says what failed
#    2. export    bench/export_check.py: a patched ViT with the Triton kernels through torch.export +
#                 AOTInductor (failed on the H200: cuDNN attention's bias gradient)
#       compile   bench/throughput.py --exec compile: ViT-B r=16 under torch.compile at B = 1 (failed on the
#                 H200: InductorError) first, into OUTPUT_DIR/compile/b1/, then 256 into compile/b256/
#    3. tournament-vit  bench/tournament_vit.py --write-table: the ViT step's paths raced per batch; writes
#                 tofu_triton/tables/*.json
#    4. throughput  bench/throughput.py: ViT-B r=16 at B = 1, 8, 64, 256, CUDA graph + eager, fp16 (the
#                 targets); bench/host_profile.py --write-table (host time per call at B = 1 and the batches
#                 that ran host-bound: the tables' host_us, which eager callers weigh); then bf16 at B = 1
#                 and 256 from CUDA graphs into OUTPUT_DIR/bf16/
#    5. probe     bench/probe.py: proportional attention on every path (the attention tournament, --write-table)
#    6. tournament-sd  bench/tournament_sd.py --write-table: the SD step's paths raced
#    7. sd, dit   bench/throughput_sd.py (SDXL, SD 1.5) and bench/throughput_dit.py (Flux, SD3, PixArt),
#                 from CUDA graphs
#    8. san-*     compute-sanitizer memcheck, racecheck, synccheck on every kernel at one small shape
#                 (bench/determinism_check.py --small: the ViT step forward and backward, the SD step)
#    9. determinism  bench/determinism_check.py: each fused path three times, bitwise equal; in the SD half
#                 also vit-sl: ViT-S/16 and ViT-L/16 r=16 at B = 64 and 256 from CUDA graphs into vit_sl/
#   10. extra     bench: pytest bench/ (the microbenchmarks), with whatever the stages above left
#   11. summarize bench/summarize.py -> microbench.md/png and the target verdicts; tables copied into
#                 OUTPUT_DIR/tables/; everything packed into OUTPUT_DIR/gpu_check.tar.gz
#
# A stage whose script is not in this checkout is skipped with a line saying so, and its time goes to the
# extra stage.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]          # default bench/results/gpu
#   GPU_CHECK_BUDGET_S=580 bash bench/gpu_check.sh       # a longer run (one device call runs 600 s at most)
#   GPU_CHECK_SKIP_TESTS=1 bash bench/gpu_check.sh       # benchmarks only
#   GPU_CHECK_TESTS="tests/test_step.py" ...             # only these tests
#   GPU_CHECK_TEST_WORKERS=12 ...                        # pytest-xdist workers (default 16)
#   GPU_CHECK_EXPORT_MODEL=vit_base_patch16_224 ...      # export this model (default: export_check's tiny ViT)
#   GPU_CHECK_SKIP_INSTALL=1 ...                          # already installed
#   GPU_CHECK_SKIP_SD=1 ...                               # no Stable Diffusion stages (tournament, UNet step)
#   GPU_CHECK_SKIP_DIT=1 ...                              # no diffusion-transformer stage
#   GPU_CHECK_SKIP_SAN=1 ...                              # no compute-sanitizer
#   GPU_CHECK_SKIP_BENCH=1 ...                            # no microbenchmarks
#   GPU_CHECK_PART=vit GPU_CHECK_BUDGET_S=480 ...        # two calls: the ViT half (tests ... probe),
#   GPU_CHECK_PART=sd GPU_CHECK_BUDGET_S=320 ...         # then the SD half (bench/README.md)
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh /tmp/x   # print each stage's limit and command, run nothing
#   GPU_CHECK_DRY_RUN=full ...                           # the same, as if every stage used all of its limit
#
# Every stage runs under `timeout`, and the benchmark stages also get an internal budget, so no stage eats
# the others' time; the whole run ends by GPU_CHECK_BUDGET_S (default 540 s) after it starts. Files in
# OUTPUT_DIR: gpu_check.log, tests.log, test_failures.txt, export_check.json, compile/{b1,b256}/throughput.*,
# tournament outputs, throughput.{json,md,png}, host_profile.{json,md}, bf16/throughput.*, probe.{json,md},
# throughput_sd_<card>.{json,md}, throughput_dit_<card>.{json,md}, determinism.json, microbench.{jsonl,md,png},
# benchmark.json, tables/*.json (tofu_triton/tables after the tournaments), and all of them packed into
# gpu_check.tar.gz. A compact summary is printed last.
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
# A dry run's clock stands still at START: its plan must not depend on how fast a loaded machine runs it.
now() { if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then echo "$START"; else date +%s; fi; }
remaining() { echo $((DEADLINE - $(now) - SPENT)); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

stage() { # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ "$limit" != absent ] && [ -n "${OFF:-}" ]; then return 1; fi # not in this part of the plan (GPU_CHECK_PART)
  if [ "$limit" = absent ]; then # absent SCRIPT: a stage whose script this checkout does not have
    STAGES+=("$(printf '%-15s %-12s %5s' "$name" "not here" "-")")
    echo "=== [$name] skipped: $1 is not in this checkout" | tee -a "$LOG"
    return 1
  fi
  if [ "$limit" -lt 10 ]; then
    STAGES+=("$(printf '%-15s %-12s %5s' "$name" "no time left" "-")")
    echo "=== [$name] skipped: no time left" | tee -a "$LOG"
    return 1
  fi
  local t0 rc took verdict
  t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$LOG"
  if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    if [ "$GPU_CHECK_DRY_RUN" = full ]; then SPENT=$((SPENT + limit)); fi
    STAGES+=("$(printf '%-15s %-12s %5s' "$name" "dry run" "${limit}s")")
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
  STAGES+=("$(printf '%-15s %-12s %4ss' "$name" "$verdict" "$took")")
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
  stage install 45 bash -c "cd /tmp && { $PY -m pip install -q --no-deps --no-build-isolation -e '$PWD' \
    && $PY -c \"$IMPORT_CHECK\"; } || { echo 'editable install unusable; installing a copy'; \
    $PY -m pip install -q --no-deps --no-build-isolation '$PWD' && $PY -c \"$IMPORT_CHECK\"; }"
fi

# Packages the GPU machine lacks (diffusers and tomesd for the SD stages) can
# travel as wheels in .whl/ (bench/README.md says how to fetch them).
if compgen -G ".whl/*.whl" >/dev/null; then
  stage wheels 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/tofu_site .whl/*.whl && export PYTHONPATH="/tmp/tofu_site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The plan, in the order of the GPU issues: the tests, export and compile (both failed on the H200), the ViT
# tournament and the ViT-B targets, the attention probe, the SD tournament, the SD and DiT steps from CUDA
# graphs, the sanitizer, determinism. Each of these "kept" stages gets min(its cap, the time left less the
# caps of the kept stages still to come), so a slow stage cannot starve the ones after it. With the default
# 540 s budget and ~25 s of setup every kept stage gets its cap; time they leave goes to the microbenchmarks.
# Caps from the H200 run of 2026-12-04 (gpu_check.log there): 13 test files did not finish in 128 s on 12
# workers (~95 % done; 14 files on 16 workers here: ~100 s); export failed after 14 s (export_check says ~1
# minute when it works); torch.compile ~15 s per configuration (B = 1 first here: it failed there); ViT-B r=16
# fp16 ~1.8 s per configuration after ~7 s of start (24 here, then bf16 at B = 1 and 256); the probe's attention
# cases did not finish in 35 s (now budgeted, then its sync and launch probes); the SD step (eager + graph)
# 53 s; the Flux step alone ~40 s; sanitizer runs of sd_check --small 13-18 s each; determinism 29 s. The caps
# add up to 515 s: with ~25 s of setup, the 540 s budget. Not measured yet: the two tournaments (each gets
# what it is given through --budget-s).
script() { [ -f "$1" ] && echo "$1"; } # the script where this checkout has it, else nothing
HAS_SANITIZER=$(command -v compute-sanitizer >/dev/null && echo 1 || true)
# A dry run shows the plan of a GPU machine, which has the sanitizer.
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then HAS_SANITIZER=1; fi
T_VIT=$(script bench/tournament_vit.py); T_SD=$(script bench/tournament_sd.py)
on() { [ -z "$1" ] && echo "$2" || echo 0; } # on SKIP_VAR CAP: CAP, or 0 where the stage is switched off
# GPU_CHECK_PART splits the plan over two device calls, so the tournaments get the time a single 540 s call
# cannot give them all: "vit" (tests, export, compile, the ViT tournament and targets, the attention probe)
# then "sd" (the SD tournament, the SD and DiT steps, the sanitizer, determinism); "all" (the default) runs
# every stage in one call with smaller caps. part GROUP CAP_ALL CAP_PART: this stage's cap in this part.
PART=${GPU_CHECK_PART:-all}
case $PART in all | vit | sd) ;; *) echo "GPU_CHECK_PART must be all, vit or sd, got '$PART'" >&2; exit 2 ;; esac
part() { if [ "$PART" = all ]; then echo "$2"; elif [ "$PART" = "$1" ]; then echo "$3"; else echo 0; fi; }
C_TESTS=$(on "${GPU_CHECK_SKIP_TESTS:-}" "$(part vit 105 100)")
C_EXPORT=$(part vit 45 40); C_COMPILE=$(part vit 45 50)
C_TVIT=$([ -n "$T_VIT" ] && part vit 30 75 || echo 0)
C_VIT=$(part vit 70 115); C_PROBE=$(part vit 45 65)
C_TSD=$([ -n "$T_SD" ] && [ -z "${GPU_CHECK_SKIP_SD:-}" ] && part sd 25 90 || echo 0)
C_SD=$(on "${GPU_CHECK_SKIP_SD:-}" "$(part sd 30 40)"); C_DIT=$(on "${GPU_CHECK_SKIP_DIT:-}" "$(part sd 35 50)")
C_SAN=$([ -n "$HAS_SANITIZER" ] && [ -z "${GPU_CHECK_SKIP_SAN:-}" ] && part sd 15 15 || echo 0)
C_DET=$(part sd 30 30); C_VITSL=$(part sd 0 30); C_SUM=10
# The caps of the kept stages still to come (the summary's included); each kept stage takes its own out.
RESERVE=$((C_TESTS + C_EXPORT + C_COMPILE + C_TVIT + C_VIT + C_PROBE + C_TSD + C_SD + C_DIT + 3 * C_SAN + C_DET + C_VITSL \
  + C_SUM))
take() { # take CAP: LIMIT = min(CAP, time left - the caps of the kept stages after this one); OFF for CAP 0
  OFF=$([ "$1" -eq 0 ] && echo 1 || true)
  if [ -n "$OFF" ]; then LIMIT=0; return; fi
  RESERVE=$((RESERVE - $1))
  LIMIT=$(min "$1" $(($(remaining) - RESERVE)))
}
extra_limit() { # extra_limit CAP: what the kept stages left, before the summary; 0 (skipped) under 30 s
  local left
  left=$(min "$1" $(($(remaining) - RESERVE)))
  if [ "$left" -lt 30 ]; then echo 0; else echo "$left"; fi
}
budget() { # budget LIMIT START_S: the --budget-s of a script given LIMIT s (START_S for its start and last case)
  echo $(($1 > $2 ? $1 - $2 : 0))
}

# 1. The tests on CUDA: the files whose tests take a CUDA-only path first (CUDA graphs, the cuDNN attention,
# export on CUDA, dispatch by card), then the kernels, then the patches. pytest-xdist hands tests out in this
# order. The ahead-of-time compile check gives the same answer on any machine (CI runs it). Each failure is
# printed as `FAILED <id> (<phase>): <message>` when it happens and appended to test_failures.txt
# (bench/pytest_failures.py), and `tee -i` keeps the log going when the limit's SIGINT reaches pytest, so
# pytest's own -rfE summary of an interrupted run reaches the log too.
GPU_TESTS=${GPU_CHECK_TESTS:-tests/test_graphs.py tests/test_attention.py tests/test_export.py tests/test_dispatch.py \
tests/test_step.py tests/test_match.py tests/test_merge.py tests/test_partition.py tests/test_spatial_match.py \
tests/test_spatial_merge.py tests/test_api.py tests/test_patch_timm.py tests/test_patch_diffusers.py \
tests/test_patch_dit.py}
FAILURES="$RESULTS/test_failures.txt"
if [ "$C_TESTS" -gt 0 ]; then
  rm -f "$FAILURES"
  XDIST=()
  if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n "${GPU_CHECK_TEST_WORKERS:-16}"); fi
  take "$C_TESTS"
  stage tests "$LIMIT" bash -c "set -o pipefail; PYTHONPATH='$PWD/bench'\${PYTHONPATH:+:\$PYTHONPATH} $PY -m pytest \
    $GPU_TESTS -q -p no:cacheprovider -p pytest_failures --failures-file='$FAILURES' ${XDIST[*]} -rfE \
    --durations=15 --ignore=tests/test_aot_compile.py 2>&1 | tee -i '$RESULTS/tests.log'"
  echo "=== [tests] $( [ -s "$FAILURES" ] && grep -c '^[A-Z]' "$FAILURES" || echo 0) failed or errored, named in \
$FAILURES" | tee -a "$LOG"
  [ -s "$FAILURES" ] && grep '^[A-Z]' "$FAILURES" | tee -a "$LOG"
fi

# 2. Export (AOTInductor) and torch.compile of a patched ViT-B at B = 1 and 256.
take "$C_EXPORT"
stage export "$LIMIT" "$PY" bench/export_check.py --out "$RESULTS" ${GPU_CHECK_EXPORT_MODEL:+--model "$GPU_CHECK_EXPORT_MODEL"}
# B = 1 first (it failed there; throughput.py runs the largest batch first), B = 256 with what is left.
take "$C_COMPILE"
STAGE_END=$(($(date +%s) + LIMIT))
stage compile "$LIMIT" bash -c "$PY bench/throughput.py --models vit_b --batches 1 --r 16 --exec compile \
  --variants unpatched,tofu --budget-s $(budget "$LIMIT" 12) --out '$RESULTS/compile/b1'; rc=\$?; \
  left=\$(($STAGE_END - \$(date +%s) - 25)); $PY bench/throughput.py --models vit_b --batches 256 --r 16 \
  --exec compile --variants unpatched,tofu --budget-s \$((left > 0 ? left : 0)) --out '$RESULTS/compile/b256'; \
  exit \$rc"

# 3. The ViT tournament: which path of the step wins at each batch on this card (writes tofu_triton/tables/).
if [ -n "$T_VIT" ]; then
  take "$C_TVIT"
  stage tournament-vit "$LIMIT" "$PY" "$T_VIT" --out "$RESULTS" --budget-s "$(budget "$LIMIT" 15)" --write-table
elif [ "$PART" != sd ]; then
  stage tournament-vit absent bench/tournament_vit.py
fi

# 4. The ViT-B r=16 targets, every batch (the script runs B = 256 first), CUDA graph and eager, fp16; in the
# ViT half, the same eager forwards with every kernel chosen by device time alone (exec eager-device, 20 s at
# most: the A/B of eager dispatch weighing host time, docs/design.md §3.3, into eager_device/); the host profile
# (20 s at most), which writes the tables' host times with the host-bound batches of that run; then bf16 at
# B = 1 and 256 from CUDA graphs with what is left of the stage (GPU_CHECK_VIT_ARGS replaces the fp16 arguments).
take "$C_VIT"
VIT_ARGS=${GPU_CHECK_VIT_ARGS:---models vit_b --batches 1,8,64,256 --r 16 --exec graph,eager}
EAGER_DEVICE=true
if [ "$PART" = vit ]; then
  EAGER_DEVICE="timeout -s INT 20 $PY bench/throughput.py --models vit_b --batches 1,8,64 --r 16 --exec eager-device \
    --variants unpatched,tofu --budget-s 14 --out '$RESULTS/eager_device'"
fi
FP16_S=$(budget "$LIMIT" $([ "$PART" = vit ] && echo 66 || echo 46))
STAGE_END=$(($(date +%s) + LIMIT))
stage throughput "$LIMIT" bash -c "$PY bench/throughput.py $VIT_ARGS --budget-s $FP16_S --out '$RESULTS'; rc=\$?; \
  $EAGER_DEVICE; \
  timeout -s INT 20 $PY bench/host_profile.py --out '$RESULTS' --write-table --throughput '$RESULTS/throughput.json'; \
  left=\$(($STAGE_END - \$(date +%s) - 15)); $PY bench/throughput.py --models vit_b --batches 1,256 --r 16 \
  --exec graph --dtype bf16 --budget-s \$((left > 0 ? left : 0)) --out '$RESULTS/bf16'; exit \$rc"

# 5. The attention tournament (its own budget where the script takes one; --write-table where it writes one).
take "$C_PROBE"
PROBE_ARGS=()
# Its sync and launch probes and the table come after the attention cases: keep ~28 s for them.
if grep -q -- "--budget-s" bench/probe.py; then PROBE_ARGS+=(--budget-s "$(budget "$LIMIT" 28)"); fi
if grep -q -- "--write-table" bench/probe.py; then PROBE_ARGS+=(--write-table); fi
stage probe "$LIMIT" "$PY" bench/probe.py --out "$RESULTS" "${PROBE_ARGS[@]}"

# 6. The SD tournament.
if [ -z "${GPU_CHECK_SKIP_SD:-}" ]; then
  if [ -n "$T_SD" ]; then
    take "$C_TSD"
    stage tournament-sd "$LIMIT" "$PY" "$T_SD" --out "$RESULTS" --budget-s "$(budget "$LIMIT" 15)" --write-table
  elif [ "$PART" != vit ]; then
    stage tournament-sd absent bench/tournament_sd.py
  fi
fi

# 7. One SD UNet step (SDXL first: the goal is judged at its size) and one diffusion-transformer step (Flux
# first, then SD3 and PixArt, never measured), from CUDA graphs (the eager rows are host-bound noise).
if [ "$C_SD" -gt 0 ]; then
  take "$C_SD"
  stage sd "$LIMIT" "$PY" bench/throughput_sd.py --models sdxl,sd15 --execs graph \
    --budget-s "$(budget "$LIMIT" 15)" --out "$RESULTS"
fi
if [ "$C_DIT" -gt 0 ]; then
  take "$C_DIT"
  stage dit "$LIMIT" "$PY" bench/throughput_dit.py --models flux-dev,sd3-medium,pixart-sigma --dtypes bf16 \
    --batches 1 --execs graph --budget-s "$(budget "$LIMIT" 25)" --out "$RESULTS"
fi

# 8. compute-sanitizer on every kernel at one small shape: the ViT step (forward and the merge backward) and
# the SD step (partition, scores, select, merge, unmerge), through determinism_check --small.
if [ "$C_SAN" -gt 0 ]; then
  for tool in memcheck racecheck synccheck; do
    take "$C_SAN"
    stage "san-$tool" "$LIMIT" compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" bench/determinism_check.py \
      --small --runs 2 --cases vit_step_mlerp,sd_step
  done
fi

# 9. Determinism at full size.
take "$C_DET"
stage determinism "$LIMIT" "$PY" bench/determinism_check.py --out "$RESULTS"

# 9b. ViT-S/16 and ViT-L/16 r=16 at B = 64 and 256 from CUDA graphs (issue 28's goal: >= 95 % of their FLOP
# ratios), in the SD half only: the ViT half has no time left for them.
if [ "$C_VITSL" -gt 0 ]; then
  take "$C_VITSL"
  stage vit-sl "$LIMIT" "$PY" bench/throughput.py --models vit_s,vit_l --batches 64,256 --r 16 --exec graph \
    --variants unpatched,tofu --budget-s "$(budget "$LIMIT" 12)" --out "$RESULTS/vit_sl"
fi

# 10. The microbenchmarks, with whatever the kept stages left (pytest stops starting cases 30 s before its
# limit so it can write benchmark.json; the CPU smoke tests of the scripts are left out).
rm -f "$RESULTS/microbench.jsonl" "$RESULTS/benchmark.json"
if [ -z "${GPU_CHECK_SKIP_BENCH:-}" ]; then
  BENCH_LIMIT=$(extra_limit 220)
  stage bench "$BENCH_LIMIT" "$PY" -m pytest bench/ -q -p no:cacheprovider \
    -k "not smoke and not sd_check and not determinism_check and not summarize and not gpu_check_plan \
and not pytest_failures" \
    --tofu-budget-s=$((BENCH_LIMIT - 30)) --tofu-jsonl="$RESULTS/microbench.jsonl" \
    --benchmark-json="$RESULTS/benchmark.json" --benchmark-columns=median,rounds --benchmark-sort=name
fi

# 11. The verdicts; the tables the tournaments wrote travel in the tarball (commit them from there).
SUMMARY_FILE=$(mktemp)
take "$C_SUM"
stage summarize "$LIMIT" bash -c "$PY bench/summarize.py --jsonl '$RESULTS/microbench.jsonl' \
  --benchmark-json '$RESULTS/benchmark.json' --throughput '$RESULTS/throughput.json' --out '$RESULTS' \
  | tee '$SUMMARY_FILE'"
if [ -z "${GPU_CHECK_DRY_RUN:-}" ] && compgen -G "tofu_triton/tables/*.json" >/dev/null; then
  mkdir -p "$RESULTS/tables" && cp tofu_triton/tables/*.json "$RESULTS/tables/"
fi

# Written to a file first: grepping the log while the summary is being appended to it would find the summary.
SUMMARY_OUT=$(mktemp)
{
  echo
  echo "================ gpu_check summary ($(($(date +%s) - START)) s, results in $RESULTS) ================"
  grep -m1 -A1 "^name, driver" "$LOG" | tail -1
  grep -m1 "^torch .* triton" "$LOG"
  printf '%s\n' "${STAGES[@]}"
  if [ -s "$FAILURES" ]; then
    echo "tests that failed or errored ($(grep -c '^[A-Z]' "$FAILURES"), in $FAILURES):"
    grep '^[A-Z]' "$FAILURES" | head -n 40
  fi
  grep -E "[0-9]+ (passed|failed|skipped|error)" "$RESULTS/tests.log" 2>/dev/null | tail -n 1
  grep -E "^(sync|launches|attention B=(64|256) +N=197 |export check)" "$LOG"
  grep -E "compile .*failed: " "$LOG" | head -n 5
  grep -E "^target ViT-B" "$LOG"
  grep -E "^target SD " "$LOG"
  grep -E "^target DiT" "$LOG"
  grep -E "^(tournament|winner)" "$LOG" | head -n 20
  grep -E "ERROR SUMMARY" "$LOG"
  grep -E "^determinism (PASSED|FAILED)|\"ok\": false" "$LOG"
  if [ -d "$RESULTS/tables" ]; then
    echo "tables (commit them into tofu_triton/tables/): $(ls "$RESULTS/tables" | tr '\n' ' ')"
  fi
  cat "$SUMMARY_FILE"
} >"$SUMMARY_OUT"
cat "$SUMMARY_OUT" >>"$LOG"
cat "$SUMMARY_OUT"
rm -f "$SUMMARY_FILE" "$SUMMARY_OUT"
tar czf "$RESULTS/gpu_check.tar.gz" -C "$RESULTS" --exclude=gpu_check.tar.gz . 2>/dev/null || true
