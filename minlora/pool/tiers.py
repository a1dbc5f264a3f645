"""Tiers: the registry of adapter sources and the moves of adapters between the tiers
(source -> host -> fast tier, fast -> host on eviction, host -> disk_dir on spill)."""
from __future__ import annotations

import types
from typing import Any, Collection, Optional

from ..formats.adapter import Adapter
from .fast_tier import FastTier
from .host_tier import HostTier, SpillFile
from .layout import Layout, PackedAdapter
from .loader import Loader
from .snapshot import PoolSnapshot, ResidentState

__all__ = ["Tiers"]

COUNTERS = (
    "hits",
    "misses",
    "requests",
    "steps",
    "fetches",
    "promotions",
    "evictions",
    "host_evictions",
    "spills",
    "spill_errors",
    "load_errors",
    "bytes_disk_to_host",
    "bytes_host_to_fast",
    "bytes_fast_to_host",
    "bytes_host_to_disk",
)


class Tiers:
    """Not thread-safe: the pool calls it with its lock held.

    sources: id -> source, the only per-adapter state of a registered adapter until it loads.
    counters: the pool's statistics counters (COUNTERS).
    """

    def __init__(self, layout: Layout, fast: FastTier, host: HostTier, loader: Loader) -> None:
        self.layout = layout
        self.fast = fast
        self.host = host
        self.loader = loader
        self.sources: dict[str, Any] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ registry

    def forget(self, adapter_id: str) -> None:
        """Frees the adapter's pages and copies and forgets its source (it must be unreferenced)."""
        if adapter_id in self.fast:
            self.fast.drop(adapter_id)
        self.loader.cancel(adapter_id)  # a fetch in flight is ignored when it completes
        self.host.forget(adapter_id)
        self.fast.pinned.discard(adapter_id)
        src = self.sources.pop(adapter_id)
        if isinstance(src, SpillFile):
            self.host.remove_spill(src)

    def residency(self, adapter_id: str) -> str:
        if adapter_id not in self.sources:
            return "unregistered"
        if self.fast.is_ready(adapter_id):
            return "gpu"
        if self.host.holds(adapter_id) or adapter_id in self.fast:
            return "host"
        return "disk"

    # ------------------------------------------------------------------ moves

    def collect(self) -> None:
        """Takes in finished fetches (-> host tier) and finished copies (-> ready)."""
        for a, src, packed, exc in self.loader.collect():
            if self.sources.get(a) is not src:
                continue  # unregistered (or re-registered) while it was being read
            if exc is not None:
                self.load_failed(a, exc)
                continue
            self.fetched(a, packed)
        self.finish_copies()

    def finish_copies(self) -> None:
        """Takes in finished copies into the fast tier (-> ready); a failed one is a load error."""
        for a, exc in self.fast.finish_copies():
            self.load_failed(a, exc)

    def load_failed(self, adapter_id: str, exc: BaseException) -> None:
        self.loader.errors[adapter_id] = exc
        self.counters["load_errors"] += 1

    def fetched(self, a: str, h: PackedAdapter) -> None:
        """A fetch's packed copy: into the host tier, and staged for the fast tier."""
        self.counters["fetches"] += 1
        self.counters["bytes_disk_to_host"] += h.nbytes
        self._host_put(a, h)
        if a not in self.fast:
            self.host.stage(a, h)

    def _host_put(self, adapter_id: str, h: PackedAdapter) -> None:
        for vid, v in self.host.put(adapter_id, h):
            self.counters["host_evictions"] += 1
            self._maybe_spill(vid, v)

    def _maybe_spill(self, adapter_id: str, h: PackedAdapter) -> None:
        """Writes an adapter whose source lives in memory (an Adapter or a loader callable) to
        disk_dir, so the pool can drop it.  When that fails the source stays as it was: the
        adapter reloads from it."""
        src = self.sources.get(adapter_id)
        if self.host.disk_dir is None or src is None or isinstance(src, (str, SpillFile)):
            return
        fallback = None if isinstance(src, Adapter) else src
        try:
            spill = self.host.spill(adapter_id, self.layout.unpack(h.rows, h.mods), fallback)
        except Exception:  # disk_dir unusable (full, removed, not writable)
            self.counters["spill_errors"] += 1
            return
        self.sources[adapter_id] = spill
        self.counters["spills"] += 1
        self.counters["bytes_host_to_disk"] += h.nbytes

    def _evict(self, adapter_id: str) -> None:
        e = self.fast.get(adapter_id)
        if adapter_id not in self.host and self.host.enabled:
            # Demote: copy the pages out so a reload needs no trip to the source.
            h = PackedAdapter(self.layout.read_rows(e.pages, pin=self.layout.cuda), dict(e.mods))
            self.counters["bytes_fast_to_host"] += h.nbytes
            self._host_put(adapter_id, h)
        self.fast.drop(adapter_id)
        self.counters["evictions"] += 1

    def known_requests(self, adapter_id: str) -> Optional[list[tuple[int, int]]]:
        """The allocator requests of an adapter when known without reading its source."""
        h = self.host.get(adapter_id)
        if h is not None:
            return h.requests()
        src = self.sources[adapter_id]
        if isinstance(src, Adapter):
            return self.layout.requests_of(src)
        return None

    def evictions_to_fit(
        self,
        requests: list[tuple[int, int]],
        protect: set[str],
        strict: bool,
        what: str,
        steps_in_flight: int,
    ) -> int:
        """How many LRU victims (outside protect) must go for `requests` to fit, after letting
        copies in flight finish when that is the only way.  When they cannot fit: -1, or
        (strict) PoolExhaustedError, with nothing changed."""
        fast = self.fast
        k = fast.count_evictions(requests, protect)
        if k < 0 and strict and fast.loading - protect:
            # Adapters still being copied cannot be evicted yet; their copies end soon.
            for a in list(fast.loading - protect):
                fast.wait_copy(a)
            self.collect()
            k = fast.count_evictions(requests, protect)
        if k < 0 and strict:
            raise fast.exhausted_error(requests, what, steps_in_flight)
        return k

    def promote(self, ids: list[str], protect: set[str], strict: bool, steps_in_flight: int) -> list[str]:
        """Allocates pages for `ids` (all have a host copy), evicting LRU adapters outside
        `protect` as needed, and starts their copies.  All or nothing: when they cannot fit,
        raises PoolExhaustedError (strict) or returns [] with nothing changed."""
        hosts = [self.host.get(a) for a in ids]
        requests = [r for h in hosts for r in h.requests()]
        what = f"the {len(ids)} adapter(s) to load"
        k = self.evictions_to_fit(requests, protect, strict, what, steps_in_flight)
        if k < 0:
            return []
        for v in self.fast.victims(protect, k):
            self._evict(v)
        self.fast.admit(ids, hosts)
        for a, h in zip(ids, hosts):
            self.host.unstage(a)
            self.counters["promotions"] += 1
            self.counters["bytes_host_to_fast"] += h.nbytes
        return ids

    def promote_staged(self, protect: set[str], steps_in_flight: int, awaited: Collection[str]) -> None:
        """Best effort: adapters fetched for earlier steps go to the fast tier if they fit.  One
        that does not fit is given up (it stays in the host tier if that has room), unless a
        prepare is waiting for it (`awaited`)."""
        for a in list(self.host.staged):
            if a in self.fast or a not in self.sources:
                self.host.unstage(a)
            elif not self.promote([a], protect, False, steps_in_flight) and a not in awaited:
                self.host.unstage(a)

    # ------------------------------------------------------------------ descriptions

    def gauges(self) -> dict:
        fast, alloc = self.fast, self.fast.alloc
        return dict(
            registered=len(self.sources),
            resident=fast.ready_count(),
            loading=len(fast.loading),
            fetching=len(self.loader.fetching),
            host_resident=len(self.host.copies),
            pinned=len(fast.pinned),
            fast_capacity_bytes=alloc.arena_bytes,
            fast_used_bytes=alloc.used_bytes(),
            fast_free_chunks=alloc.free_chunks(),
            fast_chunks=alloc.num_chunks,
            chunk_bytes=alloc.chunk_bytes,
            host_used_bytes=self.host.used_bytes,
            host_capacity_bytes=self.host.capacity_bytes,
        )

    def snapshot(self, steps_in_flight: int) -> PoolSnapshot:
        fast = self.fast
        residents = {
            a: ResidentState(refs=e.refs, ready=e.ready, pinned=a in fast.pinned, nbytes=e.nbytes)
            for a, e in fast.residents.items()
        }
        return PoolSnapshot(
            residents=types.MappingProxyType(residents),
            lru=tuple(fast.lru),
            pinned=frozenset(fast.pinned),
            loading=frozenset(fast.loading),
            fetching=frozenset(self.loader.fetching),
            host=tuple(self.host.copies),
            staged=frozenset(self.host.staged),
            used_pages=fast.used_pages(),
            fast_used_bytes=fast.alloc.used_bytes(),
            evictable_bytes=fast.lru_bytes,
            host_used_bytes=self.host.used_bytes,
            steps_in_flight=steps_in_flight,
            registered=len(self.sources),
        )

    def check_invariants(self) -> None:
        self.fast.check_invariants(self.sources)
        self.host.check_invariants()
