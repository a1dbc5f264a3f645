#!/usr/bin/env bash
# Run here, before a run on the device machine: packs what that machine lacks into the
# ignored folder .gpu_carry/, which the run names in `carry`:
#   .gpu_carry/cutlass-headers.tar.gz   CUTLASS + CuTe headers (include/, tools/util/include/)
#                                       from $CUTLASS_DIR or the nvidia-cutlass wheel (~4 MB).
#   .gpu_carry/wheels/*.whl             the packages the CUDA tests import that the device image
#                                       lacks (google-re2, which minlora.formats needs), for its
#                                       Python 3.12, at the versions this environment has.
# The device machine has its own torch, Python, nvcc and ninja (and transformers, peft,
# safetensors, hypothesis, pytest-timeout); scripts/gpu_check.sh installs the wheels, unpacks
# the headers and builds there.
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
# The device's interpreter (Python 3.12, x86-64 manylinux), not this one, decides the wheel's tags.
DEVICE_PYTHON_VERSION=${DEVICE_PYTHON_VERSION:-3.12}
DEVICE_MISSING=(google-re2)
rm -rf .gpu_carry/wheels
mkdir -p .gpu_carry/wheels
for dist in "${DEVICE_MISSING[@]}"; do
  version=$("$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$dist")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_carry/wheels "$dist==$version"
done
du -sh .gpu_carry/cutlass-headers.tar.gz .gpu_carry/wheels/*.whl
echo "carry: .gpu_carry   (then: scripts/gpu_check.sh \$OUT correct, and scripts/gpu_check.sh \$OUT perf)"
