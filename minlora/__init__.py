"""minlora: batched multi-adapter LoRA on paged adapter memory.

The package's names are imported when first used (PEP 562), so `import minlora.registry`
works without the compiled extension and `minlora --help` imports no torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Every lazily imported name: name -> (module, attribute), or (module, None) for the module
# itself.  When a module moves, this table is the one place to change.
_LAZY: dict[str, tuple[str, str | None]] = {
    "_C": ("minlora._C", None),
    "ops": ("minlora.ops", None),
    "plan": ("minlora.plan", None),
    "pool": ("minlora.pool", None),
    "lora": ("minlora.ops", "lora"),
    "BatchPlan": ("minlora.plan", "BatchPlan"),
    "build_plan": ("minlora.plan", "build_plan"),
    "adapters": ("minlora.patching", "adapters"),
    "patch": ("minlora.patching", "patch"),
    "unpatch": ("minlora.patching", "unpatch"),
    "target_shapes": ("minlora.targets", "target_shapes"),
    "AdapterPool": ("minlora.pool", "AdapterPool"),
    "AdapterLoadError": ("minlora.pool", "AdapterLoadError"),
    "ModuleTables": ("minlora.ops", "ModuleTables"),
    "PoolExhaustedError": ("minlora.pool", "PoolExhaustedError"),
    "Step": ("minlora.pool", "Step"),
}

__all__ = ["BatchPlan", "build_plan", "lora", "ops", "__version__"]
__all__ += ["adapters", "patch", "target_shapes", "unpatch"]
__all__ += ["AdapterPool", "AdapterLoadError", "ModuleTables", "PoolExhaustedError", "Step"]

if TYPE_CHECKING:
    from . import ops
    from .ops import ModuleTables, lora
    from .patching import adapters, patch, unpatch
    from .plan import BatchPlan, build_plan
    from .pool import AdapterLoadError, AdapterPool, PoolExhaustedError, Step
    from .targets import target_shapes


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups find it without calling __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _TorchBeforeExtension(importlib.abc.MetaPathFinder):
    """The compiled extension links against libtorch, which only `import torch` loads: this
    imports torch before the extension, however it is imported (`minlora._C`, `import minlora._C`,
    `from . import _C`); the ordinary finders then load it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == f"{__name__}._C":
            import torch  # noqa: F401

        return None


sys.meta_path.insert(0, _TorchBeforeExtension())
