#!/usr/bin/env bash
# The CPU op's cost alone and beside a process that keeps one core busy, one after the other,
# with the same arguments: a serving process is never alone on its machine, so the loaded
# figures are the ones that matter.
#   scripts/bench_under_load.sh OUTDIR [extra `minlora bench ops` arguments]
# Writes OUTDIR/alone.json and OUTDIR/loaded.json (`minlora bench ops --json-out`) and prints
# both tables.  Default workload: Llama-3-8B q_proj, 32 rank-16 adapters, decode (1 token per
# adapter) and prefill (128 tokens per adapter).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [bench ops arguments]" >&2; exit 2; }
OUT=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
mkdir -p "$OUT"
ARGS=(--device cpu --proj q --ranks 16 --adapters 32 --tokens-per-adapter 1 128 --no-progress)
[ $# -gt 0 ] && ARGS+=("$@")

echo "== alone"
python -m minlora bench ops "${ARGS[@]}" --json-out "$OUT/alone.json"

echo "== beside a process that burns one core"
python -c 'while True: pass' &
BURNER=$!
trap 'kill "$BURNER" 2>/dev/null || true' EXIT
python -m minlora bench ops "${ARGS[@]}" --json-out "$OUT/loaded.json"
