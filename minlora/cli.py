"""The `minlora` command line: `minlora bench ...`, `minlora adapters ...`, `minlora demo`, `minlora serve`.

Each command group lives in its own module exposing `register(subparsers)`; this file
only assembles them, importing each lazily so `minlora --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command -> (module, help).  The module's register(subparsers) adds the command's parser
# and sets `func` (called with the parsed args; returns an exit code).
COMMANDS = {
    "bench": ("minlora.bench.cli", "microbenchmarks against the baselines"),
    "adapters": ("minlora.registry.cli", "adapter registry: import, commit, log, promote, ..."),
    "demo": ("minlora.demo", "serve a mixed batch of PEFT adapters on a small random Llama"),
    "serve": ("minlora.serve.cli", "the Tinker/MinT-compatible training and sampling service"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minlora", description="Batched multi-adapter LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
