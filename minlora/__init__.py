"""minlora: batched multi-adapter LoRA on paged adapter memory.

The package's names are imported when first used (PEP 562), so `import minlora.registry`
works without the compiled extension and `minlora --help` imports no torch.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import types
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
    "adapters": ("minlora.patch", "adapters"),
    "patch": ("minlora.patch", "patch"),
    "unpatch": ("minlora.patch", "unpatch"),
    "AdapterPool": ("minlora.pool", "AdapterPool"),
    "AdapterLoadError": ("minlora.pool", "AdapterLoadError"),
    "ModuleTables": ("minlora.pool", "ModuleTables"),
    "PoolExhaustedError": ("minlora.pool", "PoolExhaustedError"),
    "Step": ("minlora.pool", "Step"),
}

__all__ = ["BatchPlan", "build_plan", "lora", "ops", "__version__"]
__all__ += ["adapters", "patch", "unpatch"]
__all__ += ["AdapterPool", "AdapterLoadError", "ModuleTables", "PoolExhaustedError", "Step"]

if TYPE_CHECKING:
    from . import ops
    from .ops import lora
    from .patch import adapters, patch, unpatch
    from .plan import BatchPlan, build_plan
    from .pool import AdapterLoadError, AdapterPool, ModuleTables, PoolExhaustedError, Step


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


# Names that are both a function of this package and the name of one of its submodules: the
# import system binds a submodule to its parent's attribute once it is imported, which would
# replace the function.  The function wins, as it did when this package imported it eagerly.
_FUNCTIONS_NAMED_LIKE_SUBMODULES = {
    name
    for name, (module, attribute) in _LAZY.items()
    if attribute is not None and module == f"{__name__}.{name}"
}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_SUBMODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _TorchBeforeExtension(importlib.abc.MetaPathFinder):
    """The compiled extension links against libtorch, which only `import torch` loads: this
    imports torch before the extension, however it is imported (`minlora._C`, `import minlora._C`,
    `from . import _C`); the ordinary finders then load it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == f"{__name__}._C":
            import torch  # noqa: F401

        return None


sys.meta_path.insert(0, _TorchBeforeExtension())
