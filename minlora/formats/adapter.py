"""In-memory LoRA adapter weights: the common currency of the pool, the file formats and the registry.

`check_adapter` is the one validation of an adapter's own consistency (types, shapes, dtypes,
scales); whoever stores or serves an adapter calls it, then checks what only it knows (the
pool: that the modules fit its layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Adapter", "LoraWeights", "check_adapter"]


@dataclass
class LoraWeights:
    """One target module's LoRA factors: delta_W = scale * b @ a.

    a: [r, in]   (PEFT's lora_A.weight)
    b: [out, r]  (PEFT's lora_B.weight)
    scale: the final float scale (alpha / r, or alpha / sqrt(r) for rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if not isinstance(self.a, torch.Tensor) or not isinstance(self.b, torch.Tensor):
            raise TypeError(f"a and b must be tensors, got {type(self.a).__name__} and {type(self.b).__name__}")
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ValueError(f"a and b must be 2-D, got shapes {tuple(self.a.shape)} and {tuple(self.b.shape)}")
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"rank mismatch: a is {tuple(self.a.shape)} [r, in] but b is {tuple(self.b.shape)} [out, r]"
            )

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]


@dataclass
class Adapter:
    """A whole adapter: module name (as in the model, e.g. "model.layers.0.self_attn.q_proj") -> weights."""

    modules: dict[str, LoraWeights]
    config: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b.nbytes for w in self.modules.values())


def _check_module(what: str, name: object, w: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: module names must be non-empty strings, got {name!r}")
    if not isinstance(w, LoraWeights):
        raise TypeError(f"{what}: modules[{name!r}] must be LoraWeights, got {type(w).__name__}")
    a, b = w.a, w.b
    # The fields are mutable, so what __post_init__ checked may have changed since.
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{what}: module {name!r}: a and b must be tensors")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{what}: module {name!r} has a {tuple(a.shape)} and b {tuple(b.shape)}; expected a [r, in] and b [out, r]"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{what}: module {name!r} weights must be floating point, got {a.dtype}/{b.dtype}")
    if a.dtype != b.dtype:
        raise ValueError(f"{what}: module {name!r}: a is {a.dtype} but b is {b.dtype}")
    if isinstance(w.scale, bool):
        raise TypeError(f"{what}: module {name!r}: scale must be a real number, got {w.scale!r}")
    try:
        scale = float(w.scale)
    except (TypeError, ValueError):
        raise TypeError(f"{what}: module {name!r}: scale must be a real number, got {w.scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"{what}: module {name!r}: scale {w.scale!r} is not finite")


def check_adapter(adapter: object, what: str = "adapter") -> None:
    """Raises TypeError / ValueError (naming `what` and the module) unless `adapter` is an
    Adapter with at least one module, each with 2-D floating-point factors of one dtype whose
    ranks agree, and a finite scale."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"{what} must be a minlora.formats.Adapter, got {type(adapter).__name__}")
    if not isinstance(adapter.modules, dict):
        raise TypeError(f"{what}: modules must be a dict of LoraWeights, got {type(adapter.modules).__name__}")
    if not adapter.modules:
        raise ValueError(f"{what}: an adapter must have at least one module")
    for name, w in adapter.modules.items():
        _check_module(what, name, w)
