"""The `deps` step of scripts/gpu_check.sh: installs the wheels scripts/prepare_gpu_carry.sh
carried (the packages the device image lacks) into a folder of their own, never into the image's
environment, then imports every module the CUDA tests and benchmarks need.

    python scripts/gpu_deps.py --target DIR [--wheel W.whl ...] MODULE [MODULE ...]

DIR must already be on PYTHONPATH of the steps after this one (gpu_check.sh puts it there).
Exit status 0 when every module imports; otherwise 1, naming each module that does not and why,
so that a missing package shows here rather than as the first failure of `pytest -x`.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path


def install(wheels: list[Path], target: Path) -> None:
    if not wheels:
        print("deps: no wheels carried")
        return
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--target", str(target), *map(str, wheels)], check=True)
    print("deps: installed", " ".join(w.name for w in wheels), "into", target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()


def missing_modules(names: list[str]) -> list[str]:
    """The modules of `names` that do not import, each as "name (why)"."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken install raises more than ImportError
            missing.append(f"{name} ({type(error).__name__}: {error})")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True, help="folder the wheels are installed into")
    parser.add_argument("--wheel", type=Path, action="append", default=[], help="a carried wheel (repeatable)")
    parser.add_argument("modules", nargs="+", help="modules that must import")
    args = parser.parse_args(argv)
    try:
        install(args.wheel, args.target)
    except subprocess.CalledProcessError as error:
        print(f"deps: installing the carried wheels failed (exit status {error.returncode})", file=sys.stderr)
        return 1
    missing = missing_modules(args.modules)
    if missing:
        print("deps: missing on this machine: " + "; ".join(missing), file=sys.stderr)
        return 1
    print("deps: these import:", " ".join(args.modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
