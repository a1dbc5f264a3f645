#!/usr/bin/env bash
# `minlora bench vllm` in the vLLM environment (scripts/vllm_env.sh makes it when missing):
# minlora as vLLM's LoRA backend vs vLLM's own, the LoRA layer and end to end, side by side.
# Extra arguments go to `minlora bench vllm` (e.g. --part layer, --json-out out.json).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/vllm_env.sh"
cd "$ROOT"
exec python -P -m minlora bench vllm "$@"
