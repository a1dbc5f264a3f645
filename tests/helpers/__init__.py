"""What the tests share: case builders, fixtures' building blocks and paths (no tests here).

The test folders import it as `helpers` (pytest puts tests/ on sys.path: pyproject's
`pythonpath`); a subprocess a test starts finds it through `pythonpath()`.

    cases      random LoRA op cases (minlora.bench.cases) and the op tolerances
    pool       adapters and step checks for the pool tests; pool_scenarios runs one risky
               pool scenario in its own process
    patching   tiny HF models and PEFT adapters for the patch, formats and serve tests
    readme     the README's code blocks
    registry   registry adapters, the throwaway PostgreSQL server, worker processes;
               registry_worker holds the workers' bodies
    serve      models, keys and servers for the service tests
    train      trainers, batches and PEFT twins for the training tests
"""
from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def pythonpath(*extra: str | os.PathLike) -> str:
    """A PYTHONPATH for a subprocess: this checkout (minlora), tests/ (helpers), `extra`,
    then the caller's PYTHONPATH."""
    parts = [str(REPO), str(TESTS), *map(str, extra), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)
