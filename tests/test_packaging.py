"""pyproject.toml declares what minlora needs, and requirements.txt (the development
environment scripts/env.sh makes) holds all of it."""
from __future__ import annotations

import importlib
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ('psycopg[binary]>=3' -> 'psycopg')."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_requirements_txt_holds_every_declared_dependency():
    project = _project()
    declared = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in project["project"]["optional-dependencies"].values():
        declared += [r for r in extra if _name(r) != "minlora"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        env = {_name(line) for line in f if line.strip() and not line.lstrip().startswith("#")}
    missing = sorted({_name(r) for r in declared} - env)
    assert not missing, f"requirements.txt lacks {missing}"


def test_extras_and_console_script():
    project = _project()["project"]
    assert {_name(r) for r in project["dependencies"]} == {"torch", "numpy", "safetensors"}
    extras = project["optional-dependencies"]
    assert {"hf", "registry", "postgres", "bench", "test", "serve", "vllm"} <= set(extras)
    assert {"transformers", "peft"} <= {_name(r) for r in extras["hf"]}
    assert {"sqlalchemy", "alembic", "fsspec"} <= {_name(r) for r in extras["registry"]}
    module, _, function = project["scripts"]["minlora"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    # The version has one home, the package (setuptools reads it from there).
    assert project["dynamic"] == ["version"]
    assert _project()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "minlora.__version__"}
