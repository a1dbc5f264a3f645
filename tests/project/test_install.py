"""`pip install --no-build-isolation .` into a fresh virtual environment that already has torch
(the test environment's packages, seen through a .pth file), then the installed `minlora`
console script runs `demo`.

The build is the real one (setup.py, pyproject.toml, the C++ sources) with
MINLORA_FORCE_CPU=1, so it compiles only the CPU sources (about a minute on two cores);
the CUDA sources are compiled by the in-place build every test run starts with.  The
sources are copied first so the install's build folder never touches the in-place one.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest
from helpers import REPO

# What a source checkout needs to build and install (tests, benchmarks and results stay behind).
SOURCES = ("setup.py", "pyproject.toml", "README.md", "minlora", "csrc", "third_party")


def _copy_sources(dest: str) -> None:
    os.makedirs(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    for name in SOURCES:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
        else:
            shutil.copy2(src, os.path.join(dest, name))


def _run(argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pip_install_without_build_isolation_then_console_script_demo(tmp_path):
    src, venv, work = str(tmp_path / "src"), str(tmp_path / "venv"), str(tmp_path / "work")
    _copy_sources(src)
    os.makedirs(work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # ninja and the compilers' helpers live beside the test environment's interpreter.
    env["PATH"] = os.pathsep.join([os.path.join(venv, "bin"), os.path.dirname(sys.executable), env.get("PATH", "")])
    env["MINLORA_FORCE_CPU"] = "1"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))

    # No pip or setuptools of its own: the test environment's (seen through the .pth file) serve,
    # and older copies would shadow the versions torch requires.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env, work, 300)
    python = os.path.join(venv, "bin", "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, work,
                   60).stdout.strip()
    # The fresh environment sees the test environment's packages (torch, ...) after its own.
    cached = sorted({*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    with open(os.path.join(purelib, "test-environment.pth"), "w") as f:
        f.write("\n".join(cached) + "\n")

    # --no-index: every dependency must already be there; nothing is downloaded.
    _run([python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-cache-dir", src], env, work,
         1500)

    where = _run([python, "-c", "import minlora, minlora._C; print(minlora.__file__); print(minlora._C.__file__)"],
                 env, work, 300).stdout.split()
    assert all(path.startswith(purelib) for path in where), where
    demo = _run([os.path.join(venv, "bin", "minlora"), "demo", "--adapters", "2", "--new-tokens", "2",
                 "--device", "cpu"], env, work, 600)
    err = float(demo.stdout.split("relative error ")[1].split()[0])
    assert err < 1e-5
    assert "user-0:" in demo.stdout and "(no adapter):" in demo.stdout
