"""How two adapters differ, tensor by tensor (and scale by scale, config key by config key).
Pure: it compares two in-memory adapters."""

from __future__ import annotations

import math
from typing import Any

import torch

from .adapter_io import Adapter
from .types import TensorChange

__all__ = ["config_changes", "tensor_change", "tensor_changes"]


def tensor_change(name: str, ta: torch.Tensor | None, tb: torch.Tensor | None) -> TensorChange:
    """The change from `ta` to `tb` (None: the tensor is absent on that side)."""
    if ta is None:
        return TensorChange(name, "added", shape_b=list(tb.shape))  # type: ignore[union-attr]
    if tb is None:
        return TensorChange(name, "removed", shape_a=list(ta.shape))
    if ta.shape != tb.shape:
        return TensorChange(name, "reshaped", shape_a=list(ta.shape), shape_b=list(tb.shape))
    a64, b64 = ta.detach().to(torch.float64), tb.detach().to(torch.float64)
    d = b64 - a64
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    norm_a = float(a64.norm())
    rel = float(d.norm()) / norm_a if norm_a else (0.0 if max_abs == 0 else math.inf)
    status = "unchanged" if max_abs == 0 and ta.dtype == tb.dtype else "changed"
    return TensorChange(name, status, list(ta.shape), list(tb.shape), max_abs, rel)


def tensor_changes(a: Adapter, b: Adapter) -> list[TensorChange]:
    """lora_A and lora_B of every module of either adapter, and each scale that changed."""
    changes: list[TensorChange] = []
    for module in sorted(set(a.modules) | set(b.modules)):
        wa, wb = a.modules.get(module), b.modules.get(module)
        changes.append(tensor_change(f"{module}.lora_A", wa.a if wa else None, wb.a if wb else None))
        changes.append(tensor_change(f"{module}.lora_B", wa.b if wa else None, wb.b if wb else None))
        if wa is not None and wb is not None and wa.scale != wb.scale:
            changes.append(
                TensorChange(
                    name=f"{module}.scale",
                    status="changed",
                    max_abs_diff=abs(wb.scale - wa.scale),
                    rel_norm_diff=abs(wb.scale - wa.scale) / abs(wa.scale) if wa.scale else math.inf,
                )
            )
    return changes


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """key -> [value in a, value in b] for every key whose value differs (None: absent)."""
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
