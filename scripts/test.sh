#!/usr/bin/env bash
# The test command: makes the environment if missing, builds minlora (CPU and, where the
# toolkit and torch allow, the CUDA kernels for sm_80 and sm_90a), starts what the tests
# need, and runs pytest.  Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
source "$ROOT/scripts/env.sh"
cd "$ROOT"
# A real PostgreSQL server for the registry tests (installed when missing; the tests start it).
bash "$ROOT/scripts/postgres.sh"
python -m minlora.build_info
exec python -m pytest "$@"
