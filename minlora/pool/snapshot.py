"""An immutable description of a pool's state, for tests and diagnostics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["PoolSnapshot", "ResidentState"]


@dataclass(frozen=True)
class ResidentState:
    """One adapter holding fast-tier pages."""

    refs: int  # unreleased steps using it
    ready: bool  # its copy into the pages finished (residency "gpu")
    pinned: bool
    nbytes: int  # bytes of its pages


@dataclass(frozen=True)
class PoolSnapshot:
    """AdapterPool.snapshot(): the pool's bookkeeping at one instant (a copy; O(residents))."""

    residents: Mapping[str, ResidentState]  # read-only
    lru: tuple[str, ...]  # evictable adapters (ready, unreferenced, not pinned), oldest first
    pinned: frozenset[str]  # every pinned id, resident or not
    loading: frozenset[str]  # resident, copy into the pages in flight
    fetching: frozenset[str]  # being read from their source
    host: tuple[str, ...]  # the host tier's budgeted copies, oldest first
    staged: frozenset[str]  # fetched for a step, held outside the host budget until promoted
    used_pages: tuple[tuple[int, ...], ...]  # allocator pool id -> its allocated pages
    fast_used_bytes: int
    evictable_bytes: int  # bytes of the adapters in `lru`
    host_used_bytes: int
    steps_in_flight: int
    registered: int
    trainable: frozenset[str] = frozenset()  # registered with trainable=True
