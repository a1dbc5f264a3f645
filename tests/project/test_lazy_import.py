"""The package imports its names lazily: the registry works without the compiled extension,
and `minlora --help` imports no torch.  Each check runs in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, pythonpath

import minlora

# Makes `import minlora._C` fail as it does where the extension was never built.
BLOCK_EXTENSION = """
import importlib.abc, sys

class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "minlora._C":
            raise ImportError("minlora._C is blocked (as if it were not built)")
        return None

sys.meta_path.insert(0, NoExtension())
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


def test_registry_works_without_the_extension(tmp_path):
    code = BLOCK_EXTENSION + """
import torch
import minlora
from minlora.registry import Gate, Registry
from minlora.formats import Adapter, LoraWeights

root = sys.argv[1]
g = torch.Generator().manual_seed(0)
adapter = Adapter({"q_proj": LoraWeights(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 0.5)})
with Registry(root=root) as reg:
    rev = reg.commit("alice", adapter, message="first")
    reg.set_gate("alice", Gate("qa", "acc"))
    reg.record_evaluation("alice", rev.number, "qa", {"acc": 0.9})
    reg.promote("alice", rev.number)
with Registry(root=root) as reg:
    assert reg.adapters() == ["alice"]
    assert reg.serving("alice").number == 1
    assert torch.equal(reg.load("alice").modules["q_proj"].a, adapter.modules["q_proj"].a)
    assert reg.verify().ok
assert "minlora._C" not in sys.modules
try:
    minlora.lora
except ImportError as exc:
    assert "blocked" in str(exc)
else:
    raise AssertionError("the op loaded without its extension")
print("REGISTRY OK")
"""
    done = _python(code, str(tmp_path / "reg"))
    assert done.returncode == 0, done.stderr
    assert "REGISTRY OK" in done.stdout


def test_registry_cli_works_without_the_extension(tmp_path):
    code = BLOCK_EXTENSION + """
from minlora.cli import main
root = sys.argv[1]
assert main(["adapters", "--root", root, "list", "--json"]) == 0
assert main(["adapters", "--root", root, "verify"]) == 0
assert "minlora._C" not in sys.modules
"""
    done = _python(code, str(tmp_path / "reg"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[]") and "all good" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["adapters", "--help"],
                                  ["adapters", "log", "--help"]])
def test_help_imports_no_torch(argv):
    code = """
import sys
from minlora.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("torch", "numpy", "minlora._C", "sqlalchemy", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""
    done = _python(code, *argv)
    assert done.returncode == 0, done.stderr
    assert "usage: minlora" in done.stdout
    assert "HEAVY []" in done.stdout


def test_package_import_is_light_and_names_resolve():
    done = _python("import sys, minlora; print(sorted(m for m in ('torch', 'minlora._C') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # In this process: every public name resolves, and dir() lists them before they are loaded.
    assert set(minlora.__all__) <= set(dir(minlora))
    for name in minlora.__all__:
        assert getattr(minlora, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        minlora.nope  # noqa: B018


def test_patch_stays_the_function_after_the_patching_modules_are_imported():
    done = _python("import minlora\nfrom minlora.patching import model\nfrom minlora.targets import target_shapes\n"
                   "print(callable(minlora.patch), type(minlora.patch).__name__, minlora.patch.__module__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "function", "minlora.patching.model"]


def test_registry_package_imports_no_torch():
    done = _python("import sys, minlora.registry\nfrom minlora.registry import RegistryError, Gate\n"
                   "print(sorted(m for m in ('torch', 'minlora._C') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
