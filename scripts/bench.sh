#!/usr/bin/env bash
# The main job: a short CPU benchmark of the LoRA op against the baselines, side by side.
# Extra arguments go to `minlora bench ops`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec python -m minlora bench ops --device cpu "$@"
