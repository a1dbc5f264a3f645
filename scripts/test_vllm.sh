#!/usr/bin/env bash
# The vLLM integration's tests: makes the vLLM environment if missing (scripts/vllm_env.sh),
# builds minlora for it, and runs pytest on tests/vllm_integration. Extra arguments go to pytest.
# scripts/test.sh runs this after the main suite.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/vllm_env.sh"
cd "$ROOT"
# -P: the current directory (this checkout, whose minlora/_C*.so belongs to the main
# environment) must not come before the minlora built for this environment.
exec python -P -m pytest tests/vllm_integration "$@"
