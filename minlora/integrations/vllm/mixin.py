"""mixed_in: one of vLLM's LoRA layer classes with a minlora mixin in front, made once per pair."""
from __future__ import annotations

__all__ = ["mixed_in"]

_MADE: dict[tuple[type, type], type] = {}


def mixed_in(mixin: type, cls: type, prefix: str, doc: str) -> type:
    """The class `prefix + cls.__name__` with bases (mixin, cls), in mixin's module; `doc` is its
    docstring with {} standing for cls's name.  Made once per (mixin, cls), so vLLM's isinstance
    checks and its class lists see one class."""
    key = (mixin, cls)
    if key not in _MADE:
        _MADE[key] = type(
            f"{prefix}{cls.__name__}",
            (mixin, cls),
            {"__module__": mixin.__module__, "__doc__": doc.format(cls.__name__)},
        )
    return _MADE[key]
