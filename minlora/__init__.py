"""minlora: batched multi-adapter LoRA on paged adapter memory."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)
from . import ops
from .ops import ModuleTables, lora
from .plan import BatchPlan, build_plan
from .patching import adapters, patch, unpatch
from .pool import AdapterLoadError, AdapterPool, PoolExhaustedError, Step
from .targets import target_shapes

__version__ = "0.1.0"

__all__ = ["BatchPlan", "build_plan", "lora", "ops", "__version__"]
__all__ += ["adapters", "patch", "target_shapes", "unpatch"]
__all__ += ["AdapterPool", "AdapterLoadError", "ModuleTables", "PoolExhaustedError", "Step"]
