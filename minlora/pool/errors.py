"""The pool's exceptions."""
from __future__ import annotations

__all__ = ["AdapterLoadError", "LoadTimeoutError", "PoolExhaustedError"]


class PoolExhaustedError(RuntimeError):
    """The adapters of one step do not fit in the fast tier together (nothing was changed)."""


class AdapterLoadError(RuntimeError):
    """Materialising an adapter from its source failed; `__cause__` is the original error."""


class LoadTimeoutError(TimeoutError):
    """prepare(wait=True, timeout=...) gave up waiting for sources still being read.

    adapter_ids: the adapters still loading.  The step was not made (no references taken);
    their loads go on in the background and a later prepare uses them once they finish.
    """

    def __init__(self, message: str, adapter_ids: list[str]) -> None:
        super().__init__(message)
        self.adapter_ids = adapter_ids
