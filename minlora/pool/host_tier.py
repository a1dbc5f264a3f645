"""The host tier: packed copies of adapters in host memory (pinned on CUDA), LRU within a byte
budget, and spill files under disk_dir for adapters whose source lives only in memory."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from ..formats.adapter import Adapter
from ..formats.native import save_adapter_file
from ..formats.state import AdapterState, save_state_file
from .layout import PackedAdapter

__all__ = ["HostTier", "SpillFile"]

# The config key of a spill file that says whose it is.
_SPILL_KEY = "minlora_spill"


@dataclass(frozen=True)
class SpillFile:
    """A source: the file a pool wrote for one adapter when its copy left the host tier.

    The file is in the pool's own directory under disk_dir and names the pool and the adapter
    in its config, so no other pool (and no other adapter) can be served from it.  fallback:
    the loader callable the file stands in for, if any (called when the file is unusable).
    state_path: a trainable adapter's companion state (optimizer moments), written beside it.
    """

    path: str
    pool: str
    adapter_id: str
    fallback: Optional[Callable[[], Adapter]] = None
    state_path: Optional[str] = None

    def check(self, adapter: Adapter) -> Adapter:
        """`adapter` read from the file, if the file is this pool's spill of this adapter."""
        if adapter.config.get(_SPILL_KEY) != {"pool": self.pool, "adapter": self.adapter_id}:
            raise ValueError(f"{self.path!r} is not this pool's spill file of adapter {self.adapter_id!r}")
        return adapter

    def check_state(self, state: AdapterState) -> AdapterState:
        """`state` read from `state_path`, if it is this pool's spill of this adapter's state."""
        if state.meta.get(_SPILL_KEY) != {"pool": self.pool, "adapter": self.adapter_id}:
            raise ValueError(f"{self.state_path!r} is not this pool's state file of adapter {self.adapter_id!r}")
        return state


class HostTier:
    """Not thread-safe: the pool calls it with its lock held.

    Two kinds of copies: the budgeted LRU (`capacity_bytes`, None = unbounded, 0 = none) and the
    staged ones, fetched for a step but not yet in the fast tier, held outside the budget until
    they are promoted or given up (a step that asked for them must not lose them to the LRU).
    """

    def __init__(self, capacity_bytes: Optional[int], disk_dir: Optional[str]) -> None:
        self.capacity_bytes = capacity_bytes
        self.disk_dir = disk_dir
        self.copies: OrderedDict[str, PackedAdapter] = OrderedDict()  # oldest first
        self.used_bytes = 0
        self.staged: dict[str, PackedAdapter] = {}
        self._spill_dir: Optional[str] = None  # made at the first spill
        self._remove_spill_dir: Optional[weakref.finalize] = None
        self._spill_files = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes != 0

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self.copies

    def holds(self, adapter_id: str) -> bool:
        """A copy of the adapter is in the host tier (budgeted or staged)."""
        return adapter_id in self.copies or adapter_id in self.staged

    def get(self, adapter_id: str) -> Optional[PackedAdapter]:
        """The adapter's copy (marked recently used), or None."""
        h = self.copies.get(adapter_id)
        if h is not None:
            self.copies.move_to_end(adapter_id)
            return h
        return self.staged.get(adapter_id)

    def put(self, adapter_id: str, h: PackedAdapter) -> list[tuple[str, PackedAdapter]]:
        """Adds a copy within the budget (a copy larger than the budget is not kept); returns the
        LRU victims it pushed out, oldest first, for the caller to spill or forget."""
        cap = self.capacity_bytes
        if adapter_id in self.copies or (cap is not None and h.nbytes > cap):
            return []
        victims = []
        if cap is not None:
            while self.used_bytes + h.nbytes > cap and self.copies:
                vid, v = self.copies.popitem(last=False)
                self.used_bytes -= v.nbytes
                victims.append((vid, v))
        self.copies[adapter_id] = h
        self.used_bytes += h.nbytes
        return victims

    def stage(self, adapter_id: str, h: PackedAdapter) -> None:
        self.staged[adapter_id] = h

    def unstage(self, adapter_id: str) -> None:
        self.staged.pop(adapter_id, None)

    def forget(self, adapter_id: str) -> None:
        """Drops every copy of the adapter."""
        h = self.copies.pop(adapter_id, None)
        if h is not None:
            self.used_bytes -= h.nbytes
        self.staged.pop(adapter_id, None)

    # ------------------------------------------------------------------ spill files

    def spill(
        self,
        adapter_id: str,
        adapter: Adapter,
        fallback: Optional[Callable[[], Adapter]],
        state: Optional[AdapterState] = None,
    ) -> SpillFile:
        """Writes the adapter (and its companion state, if given) to files of this pool's own
        under disk_dir; OSError if it cannot."""
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="minlora-pool-", dir=self.disk_dir)
            self._remove_spill_dir = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        name = hashlib.sha256(adapter_id.encode()).hexdigest()[:32] + ".safetensors"
        pool = os.path.basename(self._spill_dir)
        path = os.path.join(self._spill_dir, name)
        state_path = None if state is None else path[: -len(".safetensors")] + ".state.safetensors"
        spill = SpillFile(path, pool, adapter_id, fallback, state_path)
        config = {_SPILL_KEY: {"pool": spill.pool, "adapter": adapter_id}}
        if state is not None:
            # The state first: a file of weights under this name is then never without it.
            save_state_file(AdapterState(state.modules, config), state_path)
        save_adapter_file(Adapter(adapter.modules, config), spill.path)
        self._spill_files += 1
        return spill

    def remove_spill(self, spill: SpillFile) -> None:
        """Deletes a spill file; the pool's directory goes with its last file."""
        for path in (spill.path, spill.state_path):
            try:
                if path is not None:
                    os.remove(path)
            except OSError:
                pass
        self._spill_files -= 1
        if self._spill_files == 0:
            self.close()

    def close(self) -> None:
        """Removes this pool's spill directory and files (no other pool can read them)."""
        if self._remove_spill_dir is not None:
            self._remove_spill_dir()
        self._spill_dir = self._remove_spill_dir = None
        self._spill_files = 0

    def check_invariants(self) -> None:
        assert self.used_bytes == sum(h.nbytes for h in self.copies.values())
        if self.capacity_bytes is not None:
            assert self.used_bytes <= self.capacity_bytes
