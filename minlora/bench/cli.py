"""`minlora bench WHAT`: the benchmarks, each side by side with its baselines, in one run.

Every benchmark prints a table; `--json` prints its results and machine information as JSON
instead, `--json-out FILE` writes them to FILE, and the size options take a `--preset`.
"""
from __future__ import annotations

import argparse

from ..command import Command, add_commands

BENCHMARKS: dict[str, Command] = {
    "ops": Command("minlora.bench.ops", "the LoRA op vs a per-adapter loop, gather + bmm and grouped_mm"),
    "model": Command("minlora.bench.model", "a patched HF model vs PEFT's mixed batch vs the base model"),
    "pool": Command("minlora.bench.pool", "the AdapterPool at scale: registration, Zipf trace, hit rate"),
    "registry": Command("minlora.bench.registry", "the adapter registry at scale: registration, latencies"),
    "train": Command("minlora.bench.train", "many adapters trained together vs PEFT one by one and one adapter on all rows"),
    "serve": Command("minlora.bench.serve", "concurrent tinker clients of minlora serve: mixed batches vs one adapter at a time"),
    "vllm": Command("minlora.bench.vllm", "minlora as vLLM's LoRA backend vs vLLM's own: the layer and end to end"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_commands(parser, BENCHMARKS, dest="benchmark", metavar="WHAT")
