"""Drop-in patching of HuggingFace / torch models (see model.py): `patch`, `unpatch`, `adapters`.

The patch talks to a pool only through the `PoolLike` / `StepLike` protocols and knows nothing
about adapter files; which of a model's layers a set of PEFT adapters needs is
`minlora.targets.target_shapes`.
"""
from __future__ import annotations

from .layers import PatchedLayer, linear_shape
from .model import adapters, is_patched, patch, patched_modules, patched_pool, plan_tokens, unpatch, use_step
from .protocol import LoraAddFn, PoolLike, StepLike

__all__ = ["LoraAddFn", "PatchedLayer", "PoolLike", "StepLike", "adapters", "is_patched", "linear_shape", "patch",
           "patched_modules", "patched_pool", "plan_tokens", "unpatch", "use_step"]
