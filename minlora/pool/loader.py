"""The loader: fetch workers that turn an adapter's source into a packed host copy, and the
errors of loads that failed."""
from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any, Callable, Optional, Union

from ..formats.adapter import Adapter
from ..formats.load import load_adapter
from .layout import Layout, PackedAdapter

__all__ = ["Loader", "Source", "load_source"]

Source = Union[Adapter, Callable[[], Adapter], str, "os.PathLike[str]"]


def load_source(source: Any) -> Adapter:
    """source (a path, an Adapter, or a callable returning one) -> Adapter (not yet checked)."""
    if isinstance(source, str):
        return load_adapter(source)
    if isinstance(source, Adapter):
        return source
    return source()


class Loader:
    """Fetches run on `workers` threads; a finished fetch waits in `fetching` until the pool
    collects it (under its lock).  Not thread-safe itself: the pool calls it with its lock held;
    only `materialise` runs on the workers."""

    def __init__(self, layout: Layout, workers: int) -> None:
        self.layout = layout
        self.fetching: dict[str, tuple[cf.Future, Any]] = {}  # id -> (future, the source it reads)
        self.errors: dict[str, BaseException] = {}  # id -> why its last load failed
        self._workers = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minlora-fetch")

    def materialise(self, source: Any) -> PackedAdapter:
        """source -> checked Adapter -> packed host copy (on a worker thread)."""
        adapter = load_source(source)
        self.layout.check_adapter(adapter, "the loaded adapter")
        return self.layout.pack(adapter)

    def submit(self, adapter_id: str, source: Any) -> None:
        self.fetching[adapter_id] = (self._workers.submit(self.materialise, source), source)

    def is_fetching(self, adapter_id: str) -> bool:
        return adapter_id in self.fetching

    def future(self, adapter_id: str) -> Optional[cf.Future]:
        got = self.fetching.get(adapter_id)
        return got[0] if got is not None else None

    def cancel(self, adapter_id: str) -> None:
        """Forgets a fetch in flight (its result is ignored) and the adapter's last error."""
        self.fetching.pop(adapter_id, None)
        self.errors.pop(adapter_id, None)

    def collect(self) -> list[tuple[str, Any, Optional[PackedAdapter], Optional[BaseException]]]:
        """The fetches that finished: (id, source read, packed copy or None, error or None)."""
        out = []
        for a, (fut, src) in list(self.fetching.items()):
            if fut.done():
                del self.fetching[a]
                exc = fut.exception()
                out.append((a, src, None if exc is not None else fut.result(), exc))
        return out

    def take_error(self, adapter_id: str) -> Optional[BaseException]:
        return self.errors.pop(adapter_id, None)

    def close(self, wait: bool) -> None:
        self._workers.shutdown(wait=wait)
