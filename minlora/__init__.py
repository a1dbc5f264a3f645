"""minlora: batched multi-adapter LoRA on paged adapter memory."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)
from . import ops
from .ops import lora
from .plan import BatchPlan, build_plan
from .patch import adapters, patch, unpatch  # noqa: E402  (the function shadows the submodule name)
from .pool import AdapterLoadError, AdapterPool, ModuleTables, PoolExhaustedError, Step

__version__ = "0.1.0"

__all__ = ["BatchPlan", "build_plan", "lora", "ops", "__version__"]
__all__ += ["adapters", "patch", "unpatch"]
__all__ += ["AdapterPool", "AdapterLoadError", "ModuleTables", "PoolExhaustedError", "Step"]
