"""The fast tier: the page allocator, the resident adapters, their LRU, eviction planning and
the copies of packed adapters into their pages (a CPU copy worker, or a CUDA side stream)."""
from __future__ import annotations

import concurrent.futures as cf
import itertools
from collections import OrderedDict
from typing import Any, Collection, Iterable, Optional

import numpy as np
import torch

from .. import _C
from .errors import PoolExhaustedError
from .layout import Layout, ModulePlacement, PackedAdapter
from .workers import Workers

__all__ = ["FastTier", "Resident"]

# CPU pools copy an adapter into its pages in the calling thread up to this size, else on the
# copy worker.
_INLINE_COPY_BYTES = 1 << 20


class _PendingCopy:
    """A copy into the fast tier in flight: a worker's future (CPU) or a CUDA event."""

    __slots__ = ("future", "event", "keep")

    def __init__(self, future: Optional[cf.Future] = None, event: Any = None, keep: Any = None) -> None:
        # keep: the host tensors a CUDA copy reads, alive until its event completes.
        self.future, self.event, self.keep = future, event, keep

    def done(self) -> bool:
        if self.future is not None:
            return self.future.done()
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()
        elif self.event is not None:
            self.event.synchronize()


class Resident:
    """An adapter that holds fast-tier pages (loading or ready).  A Step reads `id`, `minfo`
    and `npages` of the residents it was built from; everything else is the fast tier's."""

    __slots__ = ("id", "pages", "npages", "flat", "mods", "minfo", "nbytes", "refs", "ready", "pending", "trainable")

    def __init__(
        self, adapter_id: str, packed: PackedAdapter, pages: dict[int, torch.Tensor], trainable: bool = False
    ) -> None:
        self.id = adapter_id
        # A trainable adapter's companion pages (optimizer state) are copied in and out with its
        # weights, and its pages are the only up-to-date copy while it is resident.
        self.trainable = trainable
        self.pages = pages  # allocator pool -> int32 pages (as PackedAdapter.rows)
        self.npages = {pid: p.numpy() for pid, p in pages.items()}  # the same as numpy arrays
        # (pool of each page, page) int32 arrays, for eviction planning.
        self.flat: tuple[Any, Any] = (
            (packed.flat_pools, np.concatenate(list(self.npages.values()))) if pages else (None, None)
        )
        self.mods: ModulePlacement = packed.mods
        self.minfo = packed.minfo
        self.nbytes = packed.nbytes
        self.refs = 0
        self.ready = False
        self.pending: Optional[_PendingCopy] = None


# One copy into pages: (view, page dimension, int32 pages, rows or None = zero the pages).
CopyJob = tuple[torch.Tensor, int, torch.Tensor, Optional[torch.Tensor]]


def _copy_rows(jobs: list[CopyJob]) -> None:
    """Scatters packed rows into their pages (inline, or on the CPU copy worker)."""
    for view, dim, pages, rows in jobs:
        if rows is None:
            view.index_fill_(dim, pages.long(), 0.0)
        else:
            view.index_copy_(dim, pages.long(), rows)


class FastTier:
    """Pages of the arena lent to adapters.  Not thread-safe: the pool calls it with its lock held.

    An adapter is evictable (in the LRU, oldest first) when it is ready, unreferenced and not
    pinned; `loading` holds those whose copy is still in flight.
    """

    def __init__(self, layout: Layout, *, poison: bool) -> None:
        self.layout = layout
        self.poison = poison
        self.alloc = _C.PageAllocator(layout.arena_bytes, layout.chunk_bytes)
        for pid, rb in enumerate(layout.row_bytes):
            got = self.alloc.add_pool(rb)
            if got != pid or self.alloc.pool_info(pid)["num_pages"] != layout.num_pages[pid]:
                raise RuntimeError("minlora pool: the page allocator's pools differ from the layout")
        self.residents: dict[str, Resident] = {}
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.lru_bytes = 0
        self.loading: set[str] = set()
        self.pinned: set[str] = set()
        cuda = layout.cuda
        self._copier = None if cuda else Workers(1, "minlora-copy")
        self._side = torch.cuda.Stream(layout.device) if cuda else None
        # CUDA: an event on the current stream recorded when pages were last freed.  Kernels of
        # released steps that read those pages were queued before it, so a copy that may reuse
        # the pages waits for it (on the side stream, never the host).
        self._free_fence = None

    # ------------------------------------------------------------------ queries

    def get(self, adapter_id: str) -> Optional[Resident]:
        return self.residents.get(adapter_id)

    def is_ready(self, adapter_id: str) -> bool:
        e = self.residents.get(adapter_id)
        return e is not None and e.ready

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self.residents

    def ready_count(self) -> int:
        return sum(1 for e in self.residents.values() if e.ready)

    def read(self, adapter_id: str) -> dict[int, torch.Tensor]:
        """The packed rows of a resident adapter, copied to the host."""
        return self.layout.read_rows(self.residents[adapter_id].pages)

    def read_packed(self, adapter_id: str) -> PackedAdapter:
        """A resident adapter's pages (and, trainable, its companion pages) as a host copy."""
        e = self.residents[adapter_id]
        pin = self.layout.cuda
        state = self.layout.read_state_rows(e.pages, pin=pin) if e.trainable else None
        return PackedAdapter(self.layout.read_rows(e.pages, pin=pin), dict(e.mods), state)

    # ------------------------------------------------------------------ LRU, pins, references

    def _lru_add(self, e: Resident) -> None:
        if e.id not in self.lru and e.id not in self.pinned:
            self.lru[e.id] = None
            self.lru_bytes += e.nbytes

    def _lru_remove(self, adapter_id: str) -> None:
        if adapter_id in self.lru:
            del self.lru[adapter_id]
            self.lru_bytes -= self.residents[adapter_id].nbytes

    def pin(self, adapter_id: str) -> None:
        self.pinned.add(adapter_id)
        self._lru_remove(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.pinned.discard(adapter_id)
        e = self.residents.get(adapter_id)
        if e is not None and e.ready and e.refs == 0:
            self._lru_add(e)

    def acquire(self, e: Resident) -> None:
        """One more step references `e` (it must be ready)."""
        if e.refs == 0:
            self._lru_remove(e.id)
        e.refs += 1

    def release(self, entries: Iterable[Resident]) -> None:
        for e in entries:
            e.refs -= 1
            if e.refs == 0 and e.ready and self.residents.get(e.id) is e:
                self._lru_add(e)

    # ------------------------------------------------------------------ eviction planning

    def victims(self, protect: set[str], n: int) -> list[str]:
        """The n oldest evictable adapters outside protect (fewer if there are not n)."""
        return list(itertools.islice((a for a in self.lru if a not in protect), n))

    def count_evictions(self, requests: list[tuple[int, int]], protect: set[str]) -> int:
        """How many LRU victims (outside protect) must go for `requests` to fit; -1 if impossible."""
        if self.alloc.plan_evictions(requests, []) == 0:
            return 0
        # The LRU may hold many thousands: look at its oldest few first, more only if needed.
        n = 16
        while True:
            cands = self.victims(protect, n)
            flats = [self.residents[a].flat for a in cands]
            offsets = np.zeros(len(cands) + 1, dtype=np.int64)
            np.cumsum([0 if f[0] is None else len(f[0]) for f in flats], out=offsets[1:])
            pools = [f[0] for f in flats if f[0] is not None]
            pages = [f[1] for f in flats if f[1] is not None]
            k = self.alloc.plan_evictions_flat(
                requests,
                torch.from_numpy(np.concatenate(pools) if pools else np.zeros(0, np.int32)),
                torch.from_numpy(np.concatenate(pages) if pages else np.zeros(0, np.int32)),
                torch.from_numpy(offsets),
            )
            if k >= 0 or len(cands) < n:
                return k
            n *= 4

    def exhausted_error(
        self, requests: list[tuple[int, int]], what: str, steps_in_flight: int
    ) -> PoolExhaustedError:
        """The error for `requests` that cannot fit even after every possible eviction."""
        need = sum(n * self.layout.row_bytes[p] for p, n in requests)
        pinned = sum(e.nbytes for e in self.residents.values() if e.id in self.pinned)
        busy = sum(e.nbytes for e in self.residents.values() if e.refs > 0)
        return PoolExhaustedError(
            f"the fast tier cannot hold this step's adapters: {what} need {need} bytes of pages; "
            f"capacity {self.alloc.arena_bytes} bytes, {self.alloc.used_bytes()} in use "
            f"({pinned} pinned, {busy} used by {steps_in_flight} unreleased steps, "
            f"{self.lru_bytes} evictable).  Release steps, unpin adapters, use fewer distinct "
            f"adapters per step, or raise capacity_bytes.  The fast tier was not changed."
        )

    # ------------------------------------------------------------------ pages in and out

    def admit(self, ids: list[str], packed: list[PackedAdapter], trainable: Collection[str] = ()) -> None:
        """Allocates pages for `ids` and starts copying `packed` into them (and, for the
        `trainable` ones, their companion state, zero when they have none).  The caller has
        made room (evictions_needed + drop); all or nothing."""
        requests = [r for p in packed for r in p.requests()]
        got = self.alloc.alloc(requests)
        if got is None:  # the plan said it fits: a bug, never silently corrupt
            raise RuntimeError("minlora pool: the page allocator refused an allocation its plan accepted")
        pages = iter(got)
        for a, p in zip(ids, packed):
            e = Resident(a, p, {pid: next(pages) for pid in p.rows}, a in trainable)
            self.residents[a] = e
            e.pending = self._start_copy(e, p)
            self.loading.add(a)

    def _start_copy(self, e: Resident, p: PackedAdapter) -> _PendingCopy:
        views = self.layout.views
        jobs: list[CopyJob] = [(views[pid], 0, e.pages[pid], rows) for pid, rows in p.rows.items()]
        if e.trainable:
            state = p.state or {}
            jobs += [(self.layout.state_views[pid], 1, e.pages[pid], state.get(pid)) for pid in p.rows]
        if self._side is None:
            if p.nbytes <= _INLINE_COPY_BYTES:
                # A small memcpy costs less than handing it to a thread (and the GIL back).
                _copy_rows(jobs)
                return _PendingCopy()
            return _PendingCopy(future=self._copier.submit(_copy_rows, jobs))
        # CUDA: on the side stream, after the kernels that may still read pages freed earlier
        # (the free fence), host -> device -> scatter into the pages.
        device = self.layout.device
        with torch.cuda.stream(self._side):
            if self._free_fence is not None:
                self._side.wait_event(self._free_fence)
            for view, dim, pages, rows in jobs:
                idx = pages.to(device, non_blocking=True).long()
                if rows is None:
                    view.index_fill_(dim, idx, 0.0)
                else:
                    view.index_copy_(dim, idx, rows.to(device, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(self._side)
        return _PendingCopy(event=ev, keep=(p, jobs))

    def finish_copies(self) -> tuple[list[str], list[tuple[str, BaseException]]]:
        """Marks adapters whose copy finished ready; drops those whose copy failed.  Returns
        (the adapters now ready, [(adapter, error)] of the failed ones)."""
        ready: list[str] = []
        failed = []
        for a in list(self.loading):
            e = self.residents[a]
            if not e.pending.done():
                continue
            self.loading.discard(a)
            try:
                e.pending.wait()
            except BaseException as exc:  # a failed copy: the pages hold garbage, drop them
                failed.append((a, exc))
                self.drop(a)
                continue
            e.pending = None
            e.ready = True
            ready.append(a)
            if e.refs == 0:
                self._lru_add(e)
        return ready, failed

    def wait_copy(self, adapter_id: str) -> None:
        """Blocks until the adapter's copy (if any) is done (a bounded memcpy or DMA)."""
        e = self.residents[adapter_id]
        if e.pending is not None:
            e.pending.wait()

    def drop(self, adapter_id: str) -> None:
        """Frees an adapter's pages (it must not be referenced; a copy in flight is waited for)."""
        e = self.residents[adapter_id]
        if e.pending is not None and adapter_id in self.loading:
            try:
                e.pending.wait()  # its copy writes its pages: let it finish before freeing them
            except BaseException:
                pass
            self.loading.discard(adapter_id)
        self._lru_remove(adapter_id)
        del self.residents[adapter_id]
        views = self.layout.views
        for pid, pages in e.pages.items():
            if self.poison and pages.numel():
                idx = pages.to(self.layout.device, torch.long)
                views[pid].index_fill_(0, idx, float("nan"))
                if self.layout.state_views:
                    self.layout.state_views[pid].index_fill_(1, idx, float("nan"))
            self.alloc.free(pid, pages)
        if self._side is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.layout.device))
            self._free_fence = ev

    # ------------------------------------------------------------------ tests and teardown

    def check_invariants(self, registered: Any) -> None:
        self.alloc.check_invariants()
        owned: dict[int, set[int]] = {}
        for e in self.residents.values():
            assert e.id in registered, f"{e.id} resident but not registered"
            for pid, pages in e.pages.items():
                s = owned.setdefault(pid, set())
                for p in pages.tolist():
                    assert p not in s, f"page {p} of pool {pid} owned twice"
                    s.add(p)
            assert (e.id in self.lru) == (e.ready and e.refs == 0 and e.id not in self.pinned), e.id
            assert (e.id in self.loading) == (not e.ready), e.id
        for pid in range(self.layout.num_pools):
            used = set(self.alloc.used_pages(pid).tolist())
            assert used == owned.get(pid, set()), f"pool {pid}: allocated pages != pages owned (leak)"
        assert self.lru_bytes == sum(self.residents[a].nbytes for a in self.lru)
        assert set(self.lru) <= set(self.residents)

    def used_pages(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self.alloc.used_pages(pid).tolist()) for pid in range(self.layout.num_pools))

    def close(self) -> None:
        """Stops the copy worker once the copies queued before have run."""
        if self._copier is not None:
            self._copier.close()
