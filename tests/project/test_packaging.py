"""pyproject.toml declares what minlora needs, and requirements.txt (the development
environment scripts/env.sh makes) holds all of it."""
from __future__ import annotations

import importlib
import os
import re
import tomllib

from helpers import REPO


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line ('psycopg[binary]>=3' -> 'psycopg')."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


# Extras whose packages live in an environment of their own, with their own requirements file
# (vLLM pins a torch of its own: scripts/vllm_env.sh makes that environment).
SEPARATE_ENVIRONMENTS = {"vllm": "requirements-vllm.txt"}


def _requirement_names(filename: str) -> set[str]:
    with open(os.path.join(REPO, filename)) as f:
        return {_name(line) for line in f if line.strip() and not line.lstrip().startswith(("#", "-"))}


def test_requirements_txt_holds_every_declared_dependency():
    project = _project()
    declared = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for name, extra in project["project"]["optional-dependencies"].items():
        if name not in SEPARATE_ENVIRONMENTS:
            declared += [r for r in extra if _name(r) != "minlora"]
    missing = sorted({_name(r) for r in declared} - _requirement_names("requirements.txt"))
    assert not missing, f"requirements.txt lacks {missing}"


def test_separate_environments_hold_their_extras():
    extras = _project()["project"]["optional-dependencies"]
    for name, filename in SEPARATE_ENVIRONMENTS.items():
        missing = sorted({_name(r) for r in extras[name]} - _requirement_names(filename))
        assert not missing, f"{filename} lacks {missing}"


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
