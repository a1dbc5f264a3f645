#!/usr/bin/env bash
# The GPU validation in two stages, each one device call (a 15-minute lease holds both):
#   scripts/gpu_check.sh OUTDIR correct   build minlora._C (sm_80 + sm_90a + compute_90 PTX,
#                                         all cores), then pytest -m cuda over every test file
#                                         that carries the cuda marker
#   scripts/gpu_check.sh OUTDIR perf      compute-sanitizer memcheck + racecheck on a small
#                                         forward and backward of every kernel path, then the
#                                         benchmarks (bench ops decode / prefill / backward,
#                                         bench model --device cuda)
#   scripts/gpu_check.sh --plan STAGE     prints the stage's steps and limits, checks they fit
# Each stage has a budget (GPU_CHECK_BUDGET_S, default below) and every step a limit; the
# limits of a stage add up to at most its budget (checked before anything runs), and a step
# gets what is left of the budget less the limits of the steps after it: about its own limit
# while the steps before it kept to theirs, more when they finished early.  perf reuses the
# extension built by correct (the same warm machine, or minlora/_C*.so carried back from
# correct's OUTDIR); without one it builds first and its budget grows by the build steps' limits.
# Everything is written under OUTDIR as it happens (each step's output is appended to its log
# while it runs), so a run killed by the call's limit still returns its logs; OUTDIR/<stage>.json
# is rewritten after every step ("status": "running" until the stage ends) and
# scripts/gpu_summary.py merges the stage files into summary.json / summary.md.
# At most 8 files land in OUTDIR (a device call returns no more).
# Environment: PYTHON (default python3), GPU_CARRY_DIR (what scripts/prepare_gpu_carry.sh packed;
# default .gpu_carry), CUTLASS_DIR, MAX_JOBS, GPU_CHECK_COMMIT (the commit,
# where the copy has no .git), GPU_CHECK_DRY_RUN=1 (print each step's command instead of running
# it; GPU_CHECK_DRY_FAIL="step ..." makes those steps fail), GPU_CHECK_BUDGET_S.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SUMMARY="$ROOT/scripts/gpu_summary.py"
CARRY=${GPU_CARRY_DIR:-$ROOT/.gpu_carry}
# What the CUDA tests and benchmarks import besides minlora; the device image has all but the
# carried wheels (google-re2).
DEVICE_IMPORTS="torch numpy transformers peft safetensors re2 hypothesis pytest_timeout tqdm"

# ---- the plan: step:limit_seconds, in the order they run -----------------------------------
# The build is about 45 s with 16 cores (its longest unit, the CPU kernels, takes 40 s on one).
BUILD_STEPS=(headers:10 build:120 import:15)
PLAN_correct=(info:10 deps:20 "${BUILD_STEPS[@]}" tests:115 keep_build:5 collect:5)
PLAN_perf=(info:10 deps:20 reuse:10 memcheck:50 racecheck:50 bench_decode:45 bench_prefill:35 bench_backward:35
  bench_model:40 collect:5)
declare -A BUDGET=([correct]=300 [perf]=300)
CALL_LIMIT_S=570  # a device call runs 600 s at most; what is left covers the start of the script

usage() { echo "usage: $0 OUTDIR correct|perf   or   $0 --plan correct|perf" >&2; exit 2; }

# plan_of STAGE [with_build]: the stage's step:limit list (perf with the build steps first).
plan_of() {
  local -n plan="PLAN_$1"
  if [ "$1" = perf ] && [ "${2:-}" = with_build ]; then
    echo "${plan[*]:0:3} ${BUILD_STEPS[*]} ${plan[*]:3}"
  else
    echo "${plan[*]}"
  fi
}
sum_limits() { local total=0 item; for item in $1; do total=$((total + ${item##*:})); done; echo "$total"; }
budget_of() {  # budget_of STAGE [with_build]
  local b=${GPU_CHECK_BUDGET_S:-${BUDGET[$1]}}
  if [ "$1" = perf ] && [ "${2:-}" = with_build ] && [ -z "${GPU_CHECK_BUDGET_S:-}" ]; then
    b=$((b + $(sum_limits "${BUILD_STEPS[*]}")))
  fi
  echo "$b"
}
check_plan() {  # check_plan STAGE [with_build]: exit 3 unless the limits fit the budget
  local plan total budget
  plan=$(plan_of "$@")
  total=$(sum_limits "$plan")
  budget=$(budget_of "$@")
  if [ "$total" -gt "$budget" ]; then
    echo "gpu_check: stage $1${2:+ ($2)}: step limits add up to ${total}s, over the ${budget}s budget" >&2
    exit 3
  fi
  if [ "$budget" -gt "$CALL_LIMIT_S" ]; then
    echo "gpu_check: stage $1${2:+ ($2)}: budget ${budget}s is over one device call (${CALL_LIMIT_S}s)" >&2
    exit 3
  fi
}
print_plan() {
  local variant item
  for variant in "" with_build; do
    [ -n "$variant" ] && [ "$1" != perf ] && continue
    check_plan "$1" $variant
    echo "stage $1${variant:+ $variant} budget $(budget_of "$1" $variant) total $(sum_limits "$(plan_of "$1" $variant)")"
    for item in $(plan_of "$1" $variant); do echo "step ${item%%:*} ${item##*:}"; done
  done
}

[ $# -ge 1 ] || usage
if [ "$1" = --plan ]; then
  [ $# -eq 2 ] && [ -n "${BUDGET[$2]:-}" ] || usage
  print_plan "$2"
  exit 0
fi
[ $# -eq 2 ] && [ -n "${BUDGET[$2]:-}" ] || usage
STAGE=$2
check_plan "$STAGE"
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$ROOT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DRY=${GPU_CHECK_DRY_RUN:-0}
START=$(date +%s)
VARIANT=""
STEPS_TSV="$WORK/steps.tsv"
: >"$STEPS_TSV"
LOG="$OUT/$STAGE.log"
# perf's files fill the 8 a device call returns (bench_ops.json and bench_model.json among
# them), so a build there logs into perf.log.
BUILD_LOG="$OUT/build.log"
[ "$STAGE" = perf ] && BUILD_LOG=$LOG
: >"$LOG"

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_check $STAGE +$(elapsed)s] $*" | tee -a "$LOG"; }
limits_after() {  # limits_after STEP: the limits of the steps after it in the current plan
  local item total=0 seen=0
  for item in $(plan_of "$STAGE" $VARIANT); do
    [ "$seen" = 1 ] && total=$((total + ${item##*:}))
    [ "${item%%:*}" = "$1" ] && seen=1
  done
  echo "$total"
}
limit_of() {  # limit_of STEP: its limit in the current plan
  local item
  for item in $(plan_of "$STAGE" $VARIANT); do
    [ "${item%%:*}" = "$1" ] && { echo "${item##*:}"; return 0; }
  done
  echo "gpu_check: step $1 is not in the plan of stage $STAGE" >&2
  exit 4
}
write_stage() {  # write_stage running|done
  "$PY" "$SUMMARY" stage --stage "$STAGE" --state "$1" --steps "$STEPS_TSV" --budget "$(budget_of "$STAGE" $VARIANT)" \
    --elapsed "$(elapsed)" --info "$WORK/info.txt" --junit "$WORK/junit.xml" --out "$OUT/$STAGE.json" \
    ${GPU_CHECK_COMMIT:+--commit "$GPU_CHECK_COMMIT"} >>"$LOG" 2>&1
}
record() {  # record STEP RC SECONDS STATUS
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$(limit_of "$1")" "$2" "$3" "$4" >>"$STEPS_TSV"
  write_stage running
}
# run_step STEP LOGFILE cmd...: runs cmd under what is left of the budget less the later steps' limits,
# appending its output to LOGFILE as it goes; sets STEP_RC and leaves the output in $WORK/STEP.out.
run_step() {
  local name=$1 logf=$2
  shift 2
  local limit
  limit=$(($(budget_of "$STAGE" $VARIANT) - $(elapsed) - $(limits_after "$name")))
  if [ "$limit" -lt 1 ]; then
    log "$name: not started, the stage budget is spent"
    STEP_RC=no_time
    record "$name" no_time 0 no_time
    return 0
  fi
  log "$name: start (limit ${limit}s): $*"
  echo "==== $name: $*" >>"$logf"
  local t0 rc status
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    echo "[dry run] $*" | tee -a "$logf" >"$WORK/$name.out"
    rc=0
    [[ " ${GPU_CHECK_DRY_FAIL:-} " == *" $name "* ]] && rc=1
  else
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$logf" >"$WORK/$name.out"
    rc=${PIPESTATUS[0]}
  fi
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  if declare -F "classify_$name" >/dev/null; then status=$("classify_$name" "$rc" "$status"); fi
  STEP_RC=$rc
  log "$name: $status (rc=$rc) in $(($(date +%s) - t0))s"
  record "$name" "$rc" "$(($(date +%s) - t0))" "$status"
}
# skip STEP WHY: records a step that was not run (e.g. after a failed build).
skip() { log "$1: skipped ($2)"; record "$1" skipped 0 skipped; }

# ---- steps ----------------------------------------------------------------------------------
step_info() {
  run_step info "$LOG" bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    '"$PY"' -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)"
    nvcc --version | tail -n 2; compute-sanitizer --version 2>&1 | head -n 2; echo "cores $(nproc)"'
  if [ "$DRY" = 1 ]; then
    echo "gpu_name=dry run" >"$WORK/info.txt"
  else
    echo "gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" >"$WORK/info.txt"
  fi
  if [ -n "${GPU_CHECK_COMMIT:-}" ]; then
    echo "commit=$GPU_CHECK_COMMIT" >>"$WORK/info.txt"
  else
    echo "commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)" >>"$WORK/info.txt"
  fi
}

# deps: the carried wheels into a folder of their own on PYTHONPATH, then every module the
# tests import must import (scripts/gpu_deps.py).
step_deps() {
  local site="$WORK/site" wheel args=()
  for wheel in "$CARRY"/wheels/*.whl; do [ -f "$wheel" ] && args+=(--wheel "$wheel"); done
  export PYTHONPATH="$ROOT:$site${PYTHONPATH#"$ROOT"}"
  # shellcheck disable=SC2086
  run_step deps "$LOG" "$PY" "$ROOT/scripts/gpu_deps.py" --target "$site" "${args[@]}" $DEVICE_IMPORTS
}

build_steps() {  # headers, build, import; returns 0 when the extension imports with CUDA kernels
  local built=1
  if [ -z "${CUTLASS_DIR:-}" ] && [ -f "$CARRY/cutlass-headers.tar.gz" ]; then
    mkdir -p "$WORK/cutlass"
    run_step headers "$BUILD_LOG" tar -xzf "$CARRY/cutlass-headers.tar.gz" -C "$WORK/cutlass"
    [ "$STEP_RC" = 0 ] && export CUTLASS_DIR="$WORK/cutlass"
  elif [ -n "${CUTLASS_DIR:-}" ]; then
    log "headers: CUTLASS_DIR=$CUTLASS_DIR"
    record headers 0 0 not_needed
  else
    # Without headers the grouped path is not built and its tests fail: the stage fails.
    log "no CUTLASS headers in $CARRY: run scripts/prepare_gpu_carry.sh here and carry .gpu_carry"
    record headers missing 0 fail
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # Three targets per CUDA file (sm_80, sm_90a, compute_90 PTX): one nvcc thread each.
  export MINLORA_NVCC_THREADS=${MINLORA_NVCC_THREADS:-3}
  export MINLORA_CUDA_ARCHS=${MINLORA_CUDA_ARCHS:-80;90a}
  run_step build "$BUILD_LOG" "$PY" setup.py build_ext --inplace
  if [ "$STEP_RC" = 0 ]; then
    run_step import "$BUILD_LOG" "$PY" -c 'import torch, minlora, minlora._C as c
assert c.cuda_built(), "minlora._C was built without its CUDA kernels"
assert torch.cuda.is_available(), "torch sees no GPU"
print("minlora._C imports; CUDA kernels built; GPU:", torch.cuda.get_device_name(0))'
    [ "$STEP_RC" = 0 ] && built=0
  else
    skip import "build failed"
  fi
  return $built
}

stage_correct() {
  step_info
  step_deps
  if build_steps; then
    local files
    # Every test file that carries the cuda marker (the ops, patch and pool tests, and any added later).
    files=$(grep -rl --include='test_*.py' "mark\.cuda" tests | sort | tr '\n' ' ')
    # No -x: one failing test must not hide the others' results.  A GPU fault, which would fail
    # every later test of the process, skips them instead, naming the test (tests/helpers/cuda_guard.py).
    # -v: a test name per line as it finishes, so a run killed at its limit shows where it hung.
    run_step tests "$OUT/pytest.log" "$PY" -m pytest -m cuda -rfE -v -p no:cacheprovider --timeout 60 \
      --junitxml "$WORK/junit.xml" $files
    run_step keep_build "$LOG" bash -c "cp minlora/_C*.so '$OUT/' && ls -l '$OUT'/_C*.so"
  else
    skip tests "no build"
    skip keep_build "no build"
  fi
}

# sanitize TOOL: compute-sanitizer TOOL over scripts/gpu_sanitize_case.py; "unsupported" where
# the tool is missing or refuses the device, never a failure of the stage.
sanitize() {
  local tool=$1
  if [ "$DRY" != 1 ] && ! command -v compute-sanitizer >/dev/null; then
    log "$tool: unsupported (no compute-sanitizer on PATH)"
    record "$tool" missing 0 unsupported
    return 0
  fi
  local env_vars=() case_args=(cuda)
  if [ "$tool" = memcheck ]; then
    # Without the caching allocator every tensor is its own allocation, so memcheck sees a read
    # past a tensor even where torch owns the memory next to it.
    env_vars=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  else
    # racecheck tracks shared memory only (the allocator does not matter) and is the slowest tool.
    case_args+=(--light)
  fi
  run_step "$tool" "$OUT/sanitizer.log" env "${env_vars[@]}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    --kernel-name kns=minlora "$PY" scripts/gpu_sanitize_case.py "${case_args[@]}"
}
# A sanitizer that refuses the device (gVisor: "Device not supported", then error 999) before
# any case ran is "unsupported", whatever its exit code (the refused first allocation may count
# as one of its errors, exit code 9).  A timeout, an error found once cases ran, or any other
# failure is a failure.
classify_sanitizer() {  # classify_sanitizer TOOL RC STATUS
  if [ "$2" != 0 ] && [ "$2" != 124 ] && [ "$2" != 137 ] && ! grep -q "cases pass" "$WORK/$1.out" &&
    grep -qiE "device not supported|not supported on this|error 999|CUDA_ERROR_UNKNOWN" "$WORK/$1.out"; then
    echo unsupported
  else
    echo "$3"
  fi
}
classify_memcheck() { classify_sanitizer memcheck "$@"; }
classify_racecheck() { classify_sanitizer racecheck "$@"; }

bench_ops() {  # bench_ops STEP args...: one `minlora bench ops` run, merged into OUTDIR/bench_ops.json
  local name=$1
  shift
  run_step "$name" "$OUT/bench.log" "$PY" -m minlora bench ops --device cuda --dtype bfloat16 --preset llama3-8b \
    --no-progress --repeats 20 --json-out "$WORK/ops_$name.json" "$@"
  if [ "$DRY" != 1 ] && [ -f "$WORK/ops_$name.json" ]; then
    "$PY" "$SUMMARY" merge-bench --out "$OUT/bench_ops.json" "$WORK"/ops_*.json >>"$LOG" 2>&1
  fi
}

reusable_build() {  # whether minlora/ holds an extension that imports with its CUDA kernels
  if [ "$DRY" = 1 ]; then
    [[ " ${GPU_CHECK_DRY_FAIL:-} " != *" reuse "* ]]
    return
  fi
  "$PY" -c 'import torch, minlora._C as c, sys; sys.exit(0 if c.cuda_built() and torch.cuda.is_available() else 1)' \
    >>"$LOG" 2>&1
}

stage_perf() {
  step_info
  step_deps
  if reusable_build; then
    log "reuse: the extension in minlora/ imports with its CUDA kernels"
    record reuse 0 0 pass
  else
    log "reuse: no usable extension in minlora/; building first (budget $(budget_of perf with_build)s)"
    VARIANT=with_build
    check_plan perf with_build
    record reuse 1 0 rebuilt
    if ! build_steps; then
      local step
      for step in memcheck racecheck bench_decode bench_prefill bench_backward bench_model; do skip "$step" "no build"; done
      return 0
    fi
  fi
  sanitize memcheck
  sanitize racecheck
  bench_ops bench_decode --proj q down --ranks 16 --adapters 64 256 --tokens-per-adapter 1
  bench_ops bench_prefill --proj q down --ranks 16 --adapters 4 --tokens-per-adapter 512
  bench_ops bench_backward --proj q --ranks 16 --adapters 64 --tokens-per-adapter 128 --backward
  if [ "$DRY" = 1 ] || "$PY" -m minlora bench model --help 2>/dev/null | grep -q -- "--device"; then
    # 256 requests of one token over 256 distinct adapters: the decode step the target names
    # (no PEFT: building PEFT with 256 adapters alone takes minutes).
    run_step bench_model "$OUT/bench.log" "$PY" -m minlora bench model --device cuda --dtype bfloat16 --no-peft --no-progress \
      --adapters 256 --batch 256 --tokens 1 \
      --json-out "$OUT/bench_model.json"
  else
    log "bench_model: unsupported (minlora bench model takes no --device)"
    record bench_model missing 0 unsupported
  fi
}

log "stage $STAGE: budget $(budget_of "$STAGE")s; plan: $(plan_of "$STAGE")${DRY:+ (dry run: $DRY)}"
: >"$WORK/info.txt"
write_stage running
"stage_$STAGE"
write_stage done
# collect (the plan's last limit): the summary of the stage files in OUTDIR, real in a dry run too.
timeout "$(limit_of collect)" "$PY" "$SUMMARY" summarize --out "$OUT/summary.json" --markdown "$OUT/summary.md" \
  "$OUT" >>"$LOG" 2>&1 || log "collect: the summary failed; see $STAGE.log"
cat "$OUT/summary.md" 2>/dev/null
log "stage $STAGE done in $(elapsed)s: $(ls "$OUT" | tr '\n' ' ')"
"$PY" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["status"] == "pass" else 1)' "$OUT/$STAGE.json"
