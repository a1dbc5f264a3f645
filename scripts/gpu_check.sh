#!/usr/bin/env bash
# The whole GPU validation in one go, on a machine with one GPU and no internet:
#   scripts/gpu_check.sh OUTDIR
# 1. builds minlora._C in place with that machine's python3 / torch / nvcc and all cores
#    (CUTLASS headers: $CUTLASS_DIR, the nvidia-cutlass wheel if installed, or
#    .gpu_carry/cutlass-headers.tar.gz made by scripts/prepare_gpu_carry.sh);
# 2. runs the CUDA tests (pytest -m cuda);
# 3. runs compute-sanitizer memcheck and racecheck on a small forward + backward of every path;
# 4. runs the GPU benchmarks (minlora bench ops: decode, prefill, backward; bf16, Llama-3-8B);
# 5. writes into OUTDIR at most 8 files: gpu_check.log, build.log, pytest.log, sanitizer.log,
#    bench.log, bench.json, summary.json (everything in one JSON, with the GPU targets
#    checked) and summary.md (a short table).
# Budget: under 8 minutes on an H200 with 16 cores (GPU_CHECK_BUDGET_S, default 470 s);
# each step gets what is left, later steps are skipped, not started, when time runs out.
# Environment: PYTHON (default python3), MINLORA_CUDA_ARCHS (default 90a here: the sm_80
# path is compiled for the device's own arch), GPU_CHECK_SKIP="tests sanitizer bench" to skip steps.
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SKIP=${GPU_CHECK_SKIP:-}
WORK=$(mktemp -d)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET - $(elapsed))); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/gpu_check.log"; }
# step NAME SECONDS: status of a step, for the summary (name=rc seconds)
declare -A RC DUR
run_step() {  # run_step NAME MAX_SECONDS LOGFILE cmd...
  local name=$1 max=$2 logf=$3
  shift 3
  local budget
  budget=$(left)
  local word
  for word in $SKIP; do
    if [[ "$name" == "$word"* ]]; then log "$name: skipped (GPU_CHECK_SKIP)"; RC[$name]=skipped; return 0; fi
  done
  if [ "$budget" -lt 20 ]; then log "$name: skipped, ${budget}s left"; RC[$name]=no_time; return 0; fi
  [ "$max" -gt "$budget" ] && max=$budget
  log "$name: start (limit ${max}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$max" "$@" >>"$logf" 2>&1
  local rc=$?
  DUR[$name]=$(($(date +%s) - t0))
  RC[$name]=$rc
  log "$name: rc=$rc in ${DUR[$name]}s"
  return 0
}

: >"$OUT/gpu_check.log"
log "repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1
  nvcc --version 2>&1 | tail -n 2
  echo "cores $(nproc)"
} | tee -a "$OUT/gpu_check.log"

# ---- 1. build -------------------------------------------------------------------------
if [ -z "${CUTLASS_DIR:-}" ] && ! "$PY" -c 'import cutlass_library' 2>/dev/null; then
  if [ -f "$ROOT/.gpu_carry/cutlass-headers.tar.gz" ]; then
    mkdir -p "$WORK/cutlass"
    tar -xzf "$ROOT/.gpu_carry/cutlass-headers.tar.gz" -C "$WORK/cutlass"
    export CUTLASS_DIR="$WORK/cutlass"
    log "CUTLASS headers from .gpu_carry/cutlass-headers.tar.gz"
  else
    log "WARNING: no CUTLASS headers (run scripts/prepare_gpu_carry.sh and carry .gpu_carry): the grouped path is not built"
  fi
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MINLORA_NVCC_THREADS=${MINLORA_NVCC_THREADS:-1}
export MINLORA_CUDA_ARCHS=${MINLORA_CUDA_ARCHS:-90a}
: >"$OUT/build.log"
run_step build 200 "$OUT/build.log" "$PY" setup.py build_ext --inplace
if [ "${RC[build]}" != 0 ]; then
  log "build failed; see build.log"
elif ! "$PY" -c 'import minlora' >>"$OUT/build.log" 2>&1; then
  log "the built extension does not import; see build.log"
  RC[build]=import_failed
fi

# ---- 2. CUDA tests --------------------------------------------------------------------
: >"$OUT/pytest.log"
if [ "${RC[build]}" = 0 ]; then
  # --maxfail: a kernel fault poisons the CUDA context and fails every test after it.
  run_step tests 130 "$OUT/pytest.log" "$PY" -m pytest -m cuda tests/test_ops_cuda.py tests/test_ops.py tests/test_ops_safety.py -q \
    -p no:cacheprovider --timeout 120 --maxfail 40 --junitxml "$WORK/junit.xml"
fi

# ---- 3. compute-sanitizer -------------------------------------------------------------
cat >"$WORK/sanitize_case.py" <<'PYEOF'
# A small forward + backward through every kernel path (run under compute-sanitizer).
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
import minlora
from lora_cases import make_case, mixed_ranks
weights = [20, 1, 10, 1, 1, 5, 1, 10, 0.5, 1, 3, 1]
for mode in ("gather", "grouped", "auto", "fallback"):
    os.environ["MINLORA_CUDA_KERNELS"] = mode
    for dtype, (i, o) in ((torch.bfloat16, (64, 40)), (torch.float16, (72, 24)), (torch.float32, (33, 17))):
        c = make_case(160, i, o, mixed_ranks(), dtype, slot_weights=weights).to("cuda")
        plan = minlora.build_plan(c.token_slot, c.ranks.shape[0])
        y = minlora.lora(*c.args(), plan=plan)
        minlora.ops.lora_add_(y, *c.args())
        g = torch.randn_like(y)
        minlora.ops.lora_backward(g, *c.args(), plan=plan)
        minlora.ops.lora_backward(g, *c.args())
        torch.cuda.synchronize()
print("sanitize case done")
PYEOF
: >"$OUT/sanitizer.log"
if [ "${RC[build]}" = 0 ] && command -v compute-sanitizer >/dev/null; then
  FILTER=()
  if compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name"; then FILTER=(--kernel-name kns=minlora); fi
  # Without the caching allocator each tensor is its own allocation, so memcheck sees
  # reads past a tensor even when the neighbouring memory belongs to torch.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck; do
    echo "==== $tool" >>"$OUT/sanitizer.log"
    run_step "sanitizer_$tool" 75 "$OUT/sanitizer.log" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "${FILTER[@]}" "$PY" "$WORK/sanitize_case.py"
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
else
  log "sanitizer: skipped (no build or no compute-sanitizer)"
fi

# ---- 4. benchmarks --------------------------------------------------------------------
: >"$OUT/bench.log"
bench() {  # bench NAME SECONDS args...
  local name=$1 max=$2
  shift 2
  echo "==== $name: minlora bench ops $*" >>"$OUT/bench.log"
  run_step "bench_$name" "$max" "$OUT/bench.log" "$PY" -m minlora bench ops --device cuda --dtype bfloat16 \
    --no-progress --repeats 10 --json-out "$WORK/bench_$name.json" "$@"
}
if [ "${RC[build]}" = 0 ]; then
  bench decode_r16 70 --proj q k down --ranks 16 --adapters 1 8 64 256 1024 --tokens-per-adapter 1
  bench prefill 50 --proj q down --ranks 16 --adapters 4 --tokens-per-adapter 64 512 2048
  bench backward 30 --proj q --ranks 16 --adapters 64 --tokens-per-adapter 128 --backward
  bench fwd_64x128 25 --proj q --ranks 16 --adapters 64 --tokens-per-adapter 128
  bench decode_r8_r64 40 --proj q --ranks 8 64 --adapters 64 256 1024 --tokens-per-adapter 1
  bench prefill_r8_r64 30 --proj q --ranks 8 64 --adapters 4 --tokens-per-adapter 512
fi

# ---- 5. summary -----------------------------------------------------------------------
STEPS=""
for k in "${!RC[@]}"; do STEPS+="$k=${RC[$k]}:${DUR[$k]:-0} "; done
GPU_CHECK_STEPS="$STEPS" GPU_CHECK_WORK="$WORK" GPU_CHECK_OUT="$OUT" GPU_CHECK_ELAPSED="$(elapsed)" "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import datetime, glob, json, os, re, subprocess
import xml.etree.ElementTree as ET

work, out = os.environ["GPU_CHECK_WORK"], os.environ["GPU_CHECK_OUT"]
steps = {}
for item in os.environ["GPU_CHECK_STEPS"].split():
    name, rest = item.split("=", 1)
    rc, sec = rest.rsplit(":", 1)
    steps[name] = {"rc": rc, "seconds": int(sec)}
summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "steps": steps, "elapsed_s": int(os.environ["GPU_CHECK_ELAPSED"])}
try:
    summary["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
except Exception:
    summary["commit"] = None
try:
    import torch
    summary["gpu"] = torch.cuda.get_device_name(0)
    summary["torch"] = torch.__version__
except Exception as exc:  # noqa: BLE001
    summary["gpu"] = f"unknown ({exc})"

# Tests: the junit file of the pytest run.
for name in ("junit.xml",):
    path = os.path.join(work, name)
    if os.path.exists(path):
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        summary["tests"]["failed"] = failed[:50]
        summary["tests"]["file"] = name
        break

# Sanitizer: the error summary lines.
san = open(os.path.join(out, "sanitizer.log"), errors="replace").read() if os.path.exists(os.path.join(out, "sanitizer.log")) else ""
summary["sanitizer"] = {
    "summaries": re.findall(r"=+ (?:ERROR SUMMARY|RACECHECK SUMMARY)[^\n]*", san),
    "memcheck_rc": steps.get("sanitizer_memcheck", {}).get("rc"),
    "racecheck_rc": steps.get("sanitizer_racecheck", {}).get("rc"),
}

# Benchmarks: every row, merged into bench.json, and the GPU targets.
rows, machine = [], None
for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
    data = json.load(open(path))
    machine = data.get("machine", machine)
    for r in data["results"]:
        r["run"] = os.path.basename(path)[6:-5]
        rows.append(r)
json.dump({"machine": machine, "commit": summary["commit"], "date": summary["date"], "results": rows},
          open(os.path.join(out, "bench.json"), "w"), indent=1)

def cfg(r, k):
    return r["config"][k]

targets = []
def target(name, ok, detail):
    targets.append({"target": name, "pass": bool(ok) if ok is not None else None, "detail": detail})

dec = [r for r in rows if cfg(r, "tokens_per_adapter") == 1 and not cfg(r, "backward")]
# Bandwidth targets are judged on the op with the step's plan prebuilt (frac_copy_op: a model
# builds the plan once per step for all layers); frac_copy (plan build included) is shown too.
big = [r for r in dec if cfg(r, "rank") == 16 and cfg(r, "adapters") >= 256 and r.get("frac_copy") is not None]
target("decode >=256 rank-16 adapters: >= 70% of copy bandwidth",
       all(r["frac_copy_op"] >= 0.7 for r in big) if big else None,
       [(cfg(r, "label"), cfg(r, "adapters"), round(r["frac_copy_op"], 3), round(r["frac_copy"], 3)) for r in big])
d64 = [r for r in dec if cfg(r, "adapters") == 64 and cfg(r, "rank") == 16]
target("decode 64 adapters: >= 10x loop and >= 2x gather+bmm",
       all((r.get("x_loop") or 0) >= 10 and (r.get("x_gather_bmm") or 0) >= 2 for r in d64) if d64 else None,
       [(cfg(r, "label"), round(r.get("x_loop") or 0, 2), round(r.get("x_gather_bmm") or 0, 2)) for r in d64])
pre = [r for r in rows if cfg(r, "tokens_per_adapter") >= 512 and not cfg(r, "backward") and r.get("frac_copy") is not None]
target("prefill segments >= 512: >= 50% of copy bandwidth",
       all(r["frac_copy_op"] >= 0.5 for r in pre) if pre else None,
       [(cfg(r, "label"), cfg(r, "rank"), cfg(r, "tokens_per_adapter"), round(r["frac_copy_op"], 3),
         round(r["frac_copy"], 3)) for r in pre])
fb = [r for r in rows if cfg(r, "backward") and cfg(r, "adapters") == 64 and cfg(r, "tokens_per_adapter") == 128]
fw = [r for r in rows if not cfg(r, "backward") and cfg(r, "adapters") == 64 and cfg(r, "tokens_per_adapter") == 128
      and cfg(r, "rank") == 16 and cfg(r, "label") == "llama3-8b.q"]
if fb and fw:
    ratio = (fb[0]["op_us"] - fw[0]["op_us"]) / fw[0]["op_us"]
    target("backward 64x128: <= 3x the forward", ratio <= 3,
           {"forward_us": fw[0]["op_us"], "forward_backward_us": fb[0]["op_us"], "backward_over_forward": round(ratio, 2)})
else:
    target("backward 64x128: <= 3x the forward", None, "not measured")
summary["targets"] = targets
summary["pass"] = (steps.get("build", {}).get("rc") == "0"
                   and summary.get("tests", {}).get("failures", 1) == 0 and summary.get("tests", {}).get("errors", 1) == 0
                   and summary["sanitizer"]["memcheck_rc"] == "0" and summary["sanitizer"]["racecheck_rc"] == "0")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)

# The short table.
lines = [f"# minlora GPU check: {summary.get('gpu')} · {summary['date']} · commit {str(summary['commit'])[:10]}", "",
         f"build/tests/sanitizer pass: **{summary['pass']}** · tests: {summary.get('tests')}", "",
         "minlora µs includes building the plan; op µs is the op with the step's plan prebuilt.", "",
         "| shape | r | adapters | tok/ad | bwd | minlora µs | op µs | x loop | x gather+bmm | x grouped_mm | x simple | frac copy | frac copy (op) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
def f(v, n=2):
    return "–" if v is None else (f"{v:.{n}f}" if isinstance(v, float) else str(v))
for r in rows:
    lines.append(f"| {cfg(r,'label')} | {cfg(r,'rank')} | {cfg(r,'adapters')} | {cfg(r,'tokens_per_adapter')} | "
                 f"{'y' if cfg(r,'backward') else ''} | {f(r.get('minlora_us'),1)} | {f(r.get('op_us'),1)} | {f(r.get('x_loop'))} | "
                 f"{f(r.get('x_gather_bmm'))} | {f(r.get('x_grouped_mm'))} | {f(r.get('x_simple'))} | {f(r.get('frac_copy'))} | "
                 f"{f(r.get('frac_copy_op'))} |")
lines += ["", "| target | pass | detail |", "|---|---|---|"]
for t in targets:
    lines.append(f"| {t['target']} | {t['pass']} | {t['detail']} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print(json.dumps({k: summary[k] for k in ("pass", "steps", "tests", "sanitizer") if k in summary}, indent=1))
for t in targets:
    print("target:", t["target"], "->", t["pass"])
PYEOF
log "done in $(elapsed)s; files: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
