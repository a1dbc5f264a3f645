"""The `minlora` command line: `minlora bench ...`, `minlora adapters ...`, `minlora serve`,
`minlora demo`.

Each command lives in its own module (see minlora.command for the convention); this file
only names them.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import command
from .command import Command

COMMANDS: dict[str, Command] = {
    "bench": Command("minlora.bench.cli", "benchmarks against the baselines: ops, model, pool, registry, train, serve, vllm"),
    "adapters": Command("minlora.registry.cli", "adapter registry: import, commit, log, promote, ..."),
    "demo": Command("minlora.demo", "serve a mixed batch of PEFT adapters on a small random Llama"),
    "serve": Command("minlora.serve.cli", "the Tinker/MinT-compatible training and sampling service"),
}


def build_parser() -> command.ArgumentParser:
    parser = command.ArgumentParser(prog="minlora", description="Batched multi-adapter LoRA.")
    command.add_commands(parser, COMMANDS, dest="command")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
