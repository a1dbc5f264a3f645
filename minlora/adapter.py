"""In-memory LoRA adapter weights: the common currency of the pool, the PEFT reader and the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoraWeights", "Adapter"]


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
