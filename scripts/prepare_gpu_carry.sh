#!/usr/bin/env bash
# Run here, before a run on the device machine: packs what that machine lacks into the
# ignored folder .gpu_carry/, which the run names in `carry`:
#   .gpu_carry/cutlass-headers.tar.gz   CUTLASS + CuTe headers (include/, tools/util/include/)
#                                       from $CUTLASS_DIR or the nvidia-cutlass wheel (~4 MB).
# The device machine has its own torch, Python, nvcc and ninja; scripts/gpu_check.sh
# unpacks the headers and builds there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
if [ -z "${CUTLASS_DIR:-}" ] && [ -f "$ROOT/scripts/env.sh" ] && ! "$PY" -c 'import cutlass_library' 2>/dev/null; then
  # The project's environment has the nvidia-cutlass wheel.
  # shellcheck disable=SC1091
  source "$ROOT/scripts/env.sh"
  PY=python
fi
SRC=${CUTLASS_DIR:-$("$PY" -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')}
[ -f "$SRC/include/cutlass/cutlass.h" ] || { echo "no CUTLASS headers under $SRC" >&2; exit 1; }
mkdir -p .gpu_carry
tar -C "$SRC" -czf .gpu_carry/cutlass-headers.tar.gz include tools/util/include
du -sh .gpu_carry/cutlass-headers.tar.gz
echo "carry: .gpu_carry   (then: scripts/gpu_check.sh \$OUT correct, and scripts/gpu_check.sh \$OUT perf)"
