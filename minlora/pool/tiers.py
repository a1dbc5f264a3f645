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

__all__ = ["FAST_TIER_ONLY", "Tiers"]


class _FastTierOnly:
    """The source of a trainable adapter while it is ready in the fast tier: its pages are the
    only up-to-date copy (eviction writes them back to the host tier or disk)."""

    def __repr__(self) -> str:
        return "FAST_TIER_ONLY"


FAST_TIER_ONLY = _FastTierOnly()

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
    trainable: the ids whose weights change in the fast tier (registered with trainable=True).
        Their source is the authoritative copy outside the fast tier: a packed copy in memory
        (the registered weights, or the pages written back at eviction), a spill file with its
        state, or FAST_TIER_ONLY while the pages are ready.  They are never reloaded from an
        older copy: eviction always writes the pages back, and a host-tier victim is spilled
        (or, when it cannot be, kept in memory as the source).
    counters: the pool's statistics counters (COUNTERS).
    """

    def __init__(self, layout: Layout, fast: FastTier, host: HostTier, loader: Loader) -> None:
        self.layout = layout
        self.fast = fast
        self.host = host
        self.loader = loader
        self.sources: dict[str, Any] = {}
        self.trainable: set[str] = set()
        self.counters = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ registry

    def forget(self, adapter_id: str) -> None:
        """Frees the adapter's pages and copies and forgets its source (it must be unreferenced)."""
        if adapter_id in self.fast:
            self.fast.drop(adapter_id)
        self.loader.cancel(adapter_id)  # a fetch in flight is ignored when it completes
        self.host.forget(adapter_id)
        self.fast.pinned.discard(adapter_id)
        self.trainable.discard(adapter_id)
        src = self.sources.pop(adapter_id)
        if isinstance(src, SpillFile):
            self.host.remove_spill(src)

    def check_request(self, ids: list[Optional[str]], max_slots: int) -> list[str]:
        """The distinct adapter ids of a step's request list, checked."""
        bad = [a for a in ids if a is not None and not isinstance(a, str)]
        if bad:
            raise TypeError(f"adapter ids must be str or None, got {bad[:3]!r}")
        unknown = [a for a in dict.fromkeys(ids) if a is not None and a not in self.sources]
        if unknown:
            raise KeyError(f"unknown adapter id(s) {unknown[:5]!r} (not registered)")
        distinct = list(dict.fromkeys(a for a in ids if a is not None))
        if len(distinct) > max_slots:
            raise ValueError(f"{len(distinct)} distinct adapters in one step, more than max_slots = {max_slots}")
        return distinct

    def count_step(self, ids: list[Optional[str]], was_ready: set[str]) -> None:
        """Counts a step's requests: hits are those whose adapter was ready when it was asked for."""
        n_req = sum(1 for a in ids if a is not None)
        hits = sum(1 for a in ids if a is not None and a in was_ready)
        c = self.counters
        c["hits"] += hits
        c["misses"] += n_req - hits
        c["requests"] += len(ids)
        c["steps"] += 1

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
        """Takes in finished copies into the fast tier (-> ready); a failed one is a load error.
        A trainable adapter's pages become its only copy (its older source is let go)."""
        ready, failed = self.fast.finish_copies()
        for a, exc in failed:
            self.load_failed(a, exc)
        for a in ready:
            if a in self.trainable:
                src = self.sources[a]
                self.sources[a] = FAST_TIER_ONLY
                if isinstance(src, SpillFile):
                    self.host.remove_spill(src)

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
        """Writes an adapter whose source lives in memory (an Adapter or a loader callable; any
        trainable adapter's copy) to disk_dir, so the pool can drop it.  When that fails the
        source stays as it was: the adapter reloads from it."""
        src = self.sources.get(adapter_id)
        if adapter_id in self.trainable:
            if self.host.disk_dir is None or src is not h:
                return  # kept in memory as its source (or a newer copy is the source)
        elif self.host.disk_dir is None or src is None or isinstance(src, (str, SpillFile)):
            return
        fallback = None if isinstance(src, (Adapter, PackedAdapter)) else src
        state = None
        if adapter_id in self.trainable:
            state = self.layout.unpack_state(h.state, h.mods) if h.state is not None else None
        try:
            spill = self.host.spill(adapter_id, self.layout.unpack(h.rows, h.mods), fallback, state)
        except Exception:  # disk_dir unusable (full, removed, not writable)
            self.counters["spill_errors"] += 1
            return
        self.sources[adapter_id] = spill
        self.counters["spills"] += 1
        self.counters["bytes_host_to_disk"] += h.nbytes

    def _evict(self, adapter_id: str) -> None:
        e = self.fast.get(adapter_id)
        if adapter_id in self.trainable:
            self._write_back(adapter_id)
        elif adapter_id not in self.host and self.host.enabled:
            # Demote: copy the pages out so a reload needs no trip to the source.
            h = PackedAdapter(self.layout.read_rows(e.pages, pin=self.layout.cuda), dict(e.mods))
            self.counters["bytes_fast_to_host"] += h.nbytes
            self._host_put(adapter_id, h)
        self.fast.drop(adapter_id)
        self.counters["evictions"] += 1

    def _write_back(self, adapter_id: str) -> None:
        """A trainable adapter leaves the fast tier: its pages and companion state become its
        source, in the host tier when it has room, else spilled to disk_dir, else kept in memory."""
        h = self.fast.read_packed(adapter_id)
        self.counters["bytes_fast_to_host"] += h.nbytes
        self.sources[adapter_id] = h
        self.host.forget(adapter_id)
        self._host_put(adapter_id, h)
        if adapter_id not in self.host:
            self._maybe_spill(adapter_id, h)

    def known_requests(self, adapter_id: str) -> Optional[list[tuple[int, int]]]:
        """The allocator requests of an adapter when known without reading its source."""
        h = self.host.get(adapter_id)
        if h is not None:
            return h.requests()
        src = self.sources[adapter_id]
        if isinstance(src, Adapter):
            return self.layout.requests_of(src)
        if isinstance(src, PackedAdapter):
            return src.requests()
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
        self.fast.admit(ids, hosts, self.trainable)
        for a, h in zip(ids, hosts):
            self.host.unstage(a)
            if a in self.trainable:
                self.host.forget(a)  # its pages are about to change: this copy would go stale
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
            trainable=len(self.trainable),
            state_bytes=0 if self.layout.state_arena is None else self.layout.state_arena.nbytes,
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
            trainable=frozenset(self.trainable),
        )

    def check_invariants(self) -> None:
        self.fast.check_invariants(self.sources)
        self.host.check_invariants()
        assert self.trainable <= set(self.sources)
        for a in self.trainable:
            ready = self.fast.is_ready(a)
            assert (self.sources[a] is FAST_TIER_ONLY) == ready, f"{a}: trainable source {self.sources[a]!r}"
            assert not (ready and self.host.holds(a)), f"{a}: a stale host copy of a trainable adapter"
            e = self.fast.get(a)
            assert e is None or e.trainable, a
        for a, src in self.sources.items():
            assert src is not FAST_TIER_ONLY or a in self.trainable, a
