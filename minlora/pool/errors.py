"""The pool's exceptions."""
from __future__ import annotations

__all__ = ["AdapterLoadError", "PoolExhaustedError"]


class PoolExhaustedError(RuntimeError):
    """The adapters of one step do not fit in the fast tier together (nothing was changed)."""


class AdapterLoadError(RuntimeError):
    """Materialising an adapter from its source failed; `__cause__` is the original error."""
