# Prints the Python of the environment holding the newest tinker SDK, making it once when missing.
#
# tinker 0.38 cannot share an environment with the 0.22 pin of the main one; it needs no torch
# (about 350 MB). It lives under the user's cache folder, keyed by requirements-tinker-latest.txt
# and the Python version, so every clone shares it:
#   ${MINLORA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minlora}/tinker-latest-<key>
# Set MINLORA_PYTHON to choose the interpreter (default python3).
set -euo pipefail

_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${MINLORA_PYTHON:-python3}
_cache=${MINLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minlora}
_key=$( { cat "$_root/requirements-tinker-latest.txt"; "$_py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
_venv=$_cache/tinker-latest-$_key
mkdir -p "$_cache"
(
  flock 9  # one creator at a time; others wait, then find it complete
  if [ ! -f "$_venv/.complete" ]; then
    echo "minlora: creating the newest-tinker environment $_venv (first run only)" >&2
    rm -rf "$_venv"
    "$_py" -m venv "$_venv"
    if ! { "$_venv/bin/pip" install -r "$_root/requirements-tinker-latest.txt" &&
           "$_venv/bin/python" -c 'import tinker; print("tinker", tinker.__version__)'; } >"$_venv.log" 2>&1; then
      tail -n 40 "$_venv.log" >&2
      echo "minlora: making the newest-tinker environment failed (log: $_venv.log)" >&2
      exit 1
    fi
    touch "$_venv/.complete"
  fi
) 9>"$_venv.lock"
echo "$_venv/bin/python"
