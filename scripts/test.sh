#!/usr/bin/env bash
# The test command: makes the environment if missing, builds minlora (CPU and, where the
# toolkit and torch allow, the CUDA kernels for sm_80 and sm_90a), starts what the tests
# need, and runs pytest.  Extra arguments go to pytest.
# Without arguments it then runs the vLLM integration's tests in their own environment
# (scripts/test_vllm.sh; MINLORA_VLLM_TESTS=0 skips them).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# A real PostgreSQL server for the registry tests (installed when missing; the tests start it).
bash "$ROOT/scripts/postgres.sh"
# The newest tinker SDK's environment, for the protocol tests of newer clients.
MINLORA_TINKER_LATEST_PYTHON=${MINLORA_TINKER_LATEST_PYTHON:-$(bash "$ROOT/scripts/tinker_latest_env.sh")}
export MINLORA_TINKER_LATEST_PYTHON
python -m minlora.build_info
if [ $# -gt 0 ] || [ "${MINLORA_VLLM_TESTS:-1}" = "0" ]; then
  exec python -m pytest "$@"
fi
status=0
python -m pytest || status=$?
# Out of the main environment: the vLLM tests' interpreter, torch and minlora build are their own.
deactivate
unset PYTHONPATH
bash "$ROOT/scripts/test_vllm.sh" || status=$?
exit $status
