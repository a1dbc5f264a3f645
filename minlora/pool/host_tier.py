"""The host tier: packed copies of adapters in host memory (pinned on CUDA), LRU within a byte
budget, and spill files in disk_dir for adapters whose source lives only in memory."""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Optional

from ..formats.adapter import Adapter
from ..formats.native import save_adapter_file
from .layout import PackedAdapter

__all__ = ["HostTier"]


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

    def spill_path(self, adapter_id: str) -> str:
        return os.path.join(self.disk_dir, hashlib.sha256(adapter_id.encode()).hexdigest()[:32] + ".safetensors")

    def spill(self, adapter_id: str, adapter: Adapter) -> str:
        """Writes the adapter to its spill file; returns the path."""
        path = self.spill_path(adapter_id)
        save_adapter_file(adapter, path)
        return path

    @staticmethod
    def remove_spill(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass

    def check_invariants(self) -> None:
        assert self.used_bytes == sum(h.nbytes for h in self.copies.values())
        if self.capacity_bytes is not None:
            assert self.used_bytes <= self.capacity_bytes
