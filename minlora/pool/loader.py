"""The loader: fetch workers that turn an adapter's source into a packed host copy, and the
errors of loads that failed."""
from __future__ import annotations

import concurrent.futures as cf
import os
from typing import Any, Callable, Optional, Union

from ..formats.adapter import Adapter
from ..formats.load import load_adapter
from ..formats.native import safetensors_elements
from ..formats.peft import WEIGHTS_NAME
from ..formats.state import load_state_file
from .host_tier import SpillFile
from .layout import Layout, PackedAdapter
from .workers import Workers

__all__ = ["Loader", "Source", "load_source"]

Source = Union[Adapter, Callable[[], Adapter], str, "os.PathLike[str]"]


def declared_elements(path: str) -> Optional[int]:
    """The number of elements the tensors of the adapter at `path` declare, from the
    safetensors header alone (None when there is no weights file to look at)."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    return safetensors_elements(path) if os.path.isfile(path) else None


def load_source(source: Any) -> Adapter:
    """source (a path, a spill file, an Adapter, or a callable returning one) -> Adapter
    (not yet checked against the pool's modules)."""
    if isinstance(source, str):
        return load_adapter(source)
    if isinstance(source, SpillFile):
        try:
            return source.check(load_adapter(source.path))
        except (OSError, ValueError):
            if source.fallback is None:
                raise
            return source.fallback()  # the spill file is unusable; the loader it replaced is not
    if isinstance(source, Adapter):
        return source
    return source()


class Loader:
    """Fetches run on up to `workers` threads, so a source that blocks holds up only its own
    thread; a finished fetch waits in `fetching` until the pool collects it (under its lock).
    Not thread-safe itself: the pool calls it with its lock held; `materialise` and `run` run
    without it."""

    def __init__(self, layout: Layout, workers: int) -> None:
        self.layout = layout
        self.fetching: dict[str, tuple[cf.Future, Any]] = {}  # id -> (future, the source it reads)
        self.errors: dict[str, BaseException] = {}  # id -> why its last load failed
        self._workers = Workers(workers, "minlora-fetch")

    def materialise(self, source: Any) -> PackedAdapter:
        """source -> checked Adapter -> packed host copy.  A file is refused from its header
        when its tensors cannot fit the fast tier, before its data is read.  A packed copy (a
        trainable adapter's, held in memory) is its own host copy; a trainable adapter's spill
        file brings its companion state."""
        if isinstance(source, PackedAdapter):
            return source
        if isinstance(source, str):
            n = declared_elements(source)
            layout = self.layout
            if n is not None and n * layout.elem > layout.arena_bytes:
                raise ValueError(
                    f"{source!r} declares tensors of {n} elements, {n * layout.elem} bytes as "
                    f"{layout.dtype}: more than the fast tier's {layout.arena_bytes} bytes"
                )
        adapter = load_source(source)
        self.layout.check_adapter(adapter, "the loaded adapter")
        packed = self.layout.pack(adapter)
        if isinstance(source, SpillFile) and source.state_path is not None:
            state = source.check_state(load_state_file(source.state_path))
            rows = self.layout.pack_state(state, packed.mods, f"the state file {source.state_path!r}")
            packed = PackedAdapter(packed.rows, packed.mods, rows)
        return packed

    def submit(self, adapter_id: str, source: Any) -> None:
        """Starts reading the source on a worker."""
        self.fetching[adapter_id] = (self._workers.submit(self.materialise, source), source)

    def claim(self, adapter_id: str, source: Any) -> cf.Future:
        """Marks the adapter as being read by the caller, who then calls `run` (without the lock)."""
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        self.fetching[adapter_id] = (future, source)
        return future

    def run(self, future: cf.Future, source: Any) -> None:
        try:
            future.set_result(self.materialise(source))
        except BaseException as exc:
            future.set_exception(exc)

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

    def close(self) -> None:
        """Stops the workers without waiting for a read in flight (it may never return)."""
        self._workers.close()
