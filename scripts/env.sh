# Source this file: it makes (once) and activates minlora's Python environment, then builds
# the extension minlora._C in place when its sources changed.
#
# The environment (torch and friends, about 5 GB) lives under the user's cache folder,
# keyed by requirements.txt and the Python version, so every clone shares it:
#   ${MINLORA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minlora}/venv-<key>
# Set MINLORA_PYTHON to choose the interpreter (default python3).
set -euo pipefail

MINLORA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${MINLORA_PYTHON:-python3}
_cache=${MINLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minlora}
_key=$( { cat "$MINLORA_ROOT/requirements.txt"; "$_py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
MINLORA_VENV=$_cache/venv-$_key
mkdir -p "$_cache"

(
  # One creator at a time; others wait, then find it complete.
  flock 9
  if [ ! -f "$MINLORA_VENV/.complete" ]; then
    echo "minlora: creating the environment $MINLORA_VENV (first run only; torch is large)" >&2
    rm -rf "$MINLORA_VENV"
    "$_py" -m venv "$MINLORA_VENV"
    if ! "$MINLORA_VENV/bin/pip" install -r "$MINLORA_ROOT/requirements.txt" >"$MINLORA_VENV.log" 2>&1; then
      tail -n 40 "$MINLORA_VENV.log" >&2
      echo "minlora: installing requirements.txt failed (log: $MINLORA_VENV.log)" >&2
      exit 1
    fi
    touch "$MINLORA_VENV/.complete"
  fi
) 9>"$MINLORA_VENV.lock"

# shellcheck disable=SC1091
source "$MINLORA_VENV/bin/activate"
export PYTHONPATH="$MINLORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Build minlora._C in place (ninja makes it incremental).
mkdir -p "$MINLORA_ROOT/build"
(
  cd "$MINLORA_ROOT"
  flock 8
  python setup.py -q build_ext --inplace >"$MINLORA_ROOT/build/build_ext.log" 2>&1 || {
    cat "$MINLORA_ROOT/build/build_ext.log" >&2
    echo "minlora: building the extension failed (log above)" >&2
    exit 1
  }
) 8>"$MINLORA_ROOT/.build.lock"
set +euo pipefail
