"""The benchmarks' base model: a Llama of a given shape with random weights, built from a
config (nothing is downloaded), and the projections the benchmarks' adapters target.

`LlamaShape` is the one description of that model for `bench model`, `bench train`,
`bench serve` and `bench vllm`; `add_shape_arguments` / `shape_from_args` give each of them the
same size options (an option left out keeps the benchmark's default or preset).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from ..command import positive_int

__all__ = ["PROJECTIONS", "SHAPES", "LlamaShape", "add_shape_arguments", "shape_from_args"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LlamaShape:
    """A Llama's sizes: hidden and MLP widths, decoder layers, attention and KV heads, vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def describe(self) -> str:
        """One phrase for a benchmark's table: "Llama hidden 256, intermediate 688, 2 layers, ..."."""
        kv = f" ({self.kv_heads} KV)" if self.kv_heads != self.heads else ""
        return (f"Llama hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads} heads{kv}, vocab {self.vocab}")

    def config(self, *, max_positions: int, **extra: Any) -> Any:
        """The transformers `LlamaConfig` of this shape; `extra` adds config fields."""
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                           max_position_embeddings=max_positions, **extra)

    def build(self, *, max_positions: int, seed: int, **extra: Any) -> Any:
        """A `LlamaForCausalLM` of this shape in eval mode, float32 on the CPU, its random weights
        drawn after `torch.manual_seed(seed)`."""
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(self.config(max_positions=max_positions, **extra)).eval()


# "small" runs on a 2-core CPU in about a minute; the real shapes are for GPUs.
SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=256, intermediate=704, layers=2, heads=4, kv_heads=4, vocab=4096),
    "small": LlamaShape(hidden=1024, intermediate=2816, layers=4, heads=16, kv_heads=16, vocab=32000),
    "llama3-1b": LlamaShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    "llama3-8b": LlamaShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "qwen2-7b": LlamaShape(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064),
}

_OPTIONS = {f.name: f"--{f.name.replace('_', '-')}" for f in fields(LlamaShape)}


def add_shape_arguments(parser: Any, default: Optional[LlamaShape] = None, *,
                        layers_option: str = "--layers") -> None:
    """The size options (`--hidden`, `--intermediate`, `--layers`, `--heads`, `--kv-heads`,
    `--vocab`) on `parser` (a parser or an argument group); each left out keeps the shape the
    benchmark starts from, which `default` shows in the help (`--heads` alone also sets the KV
    heads where the start's do not divide it). `layers_option` renames `--layers` where a
    benchmark already uses that name."""
    for name, option in _OPTIONS.items():
        shown = f" (default {getattr(default, name)})" if default is not None else ""
        parser.add_argument(layers_option if name == "layers" else option, dest=f"shape_{name}", type=positive_int,
                            default=None, metavar="N", help=f"model {name.replace('_', ' ')}{shown}")


def shape_from_args(args: argparse.Namespace, start: LlamaShape) -> LlamaShape:
    """`start` with the size options given on the command line; raises ValueError naming the
    options when they do not make a Llama."""
    given = {name: getattr(args, f"shape_{name}") for name in _OPTIONS if getattr(args, f"shape_{name}", None)}
    if "heads" in given and "kv_heads" not in given and given["heads"] % start.kv_heads:
        given["kv_heads"] = given["heads"]
    try:
        return replace(start, **given)
    except ValueError as e:
        raise ValueError(f"model size options: {e}") from None

