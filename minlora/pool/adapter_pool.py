"""AdapterPool: the thread-safe facade over the layout, the tiers, the loader and the steps."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..formats.adapter import Adapter, LoraWeights
from ..formats.state import AdapterState
from .errors import AdapterLoadError, LoadTimeoutError
from .fast_tier import FastTier, Resident
from .host_tier import HostTier
from .layout import Layout, PackedAdapter
from .loader import Loader, Source
from .options import PoolOptions
from .snapshot import PoolSnapshot
from .step import Step
from .tiers import Tiers

__all__ = ["AdapterPool"]


class AdapterPool:
    """Paged memory for many LoRA adapters (the contract: minlora/pool/__init__.py).

    Holds the lock and the count of unreleased steps; the objects below it (Tiers, FastTier,
    HostTier, Loader) are called with the lock held.
    """

    def __init__(
        self,
        modules: Mapping[str, tuple[int, int]],
        *,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        capacity_bytes: int,
        host_capacity_bytes: Optional[int] = None,
        max_slots: int = 256,
        disk_dir: Union[str, "os.PathLike[str]", None] = None,
        chunk_bytes: Optional[int] = None,
        poison: bool = False,
        load_workers: int = 4,
        optimizer_state: bool = False,
    ) -> None:
        """modules: target module name -> (in_features, out_features).
        capacity_bytes: the fast tier's budget, shared by all row lengths.
        host_capacity_bytes: the host tier's budget (None = unbounded, 0 = no host tier).
        max_slots: the most distinct adapters one step may use.
        disk_dir: where in-memory adapters are written when they leave the host tier.
        chunk_bytes: the allocator's chunk size (default: chosen from the row lengths).
        poison: NaN-fill the arena at creation and every page when it is freed (for tests:
            a read of a page that is not the adapter's shows).
        load_workers: how many sources (loader callables, files) are read at once, each on its own
            thread; a source that blocks holds one of them.  A loader must not call back into
            the pool.
        optimizer_state: also keep, for adapters registered with trainable=True, float32
            companion pages (STATE_KINDS: gradient accumulator, Adam's exp_avg and exp_avg_sq)
            under the weights' page numbers: three float32 arenas with as many elements as the
            weight arena, on top of capacity_bytes.
        """
        o = PoolOptions.check(
            dtype=dtype, device=device, capacity_bytes=capacity_bytes,
            host_capacity_bytes=host_capacity_bytes, max_slots=max_slots, disk_dir=disk_dir,
            chunk_bytes=chunk_bytes, poison=poison, load_workers=load_workers,
            optimizer_state=optimizer_state,
        )
        self.device = o.device
        self.dtype = o.dtype
        self.max_slots = o.max_slots
        self.capacity_bytes = o.capacity_bytes
        self.host_capacity_bytes = o.host_capacity_bytes
        self.disk_dir = o.disk_dir
        self.poison = o.poison
        if self.disk_dir is not None:
            os.makedirs(self.disk_dir, exist_ok=True)
        self._layout = Layout(
            modules, dtype=o.dtype, device=o.device, capacity_bytes=o.capacity_bytes,
            chunk_bytes=o.chunk_bytes, poison=o.poison, optimizer_state=o.optimizer_state,
        )
        self.module_names: list[str] = list(self._layout.module_names)
        self._fast = FastTier(self._layout, poison=o.poison)
        self._host = HostTier(o.host_capacity_bytes, self.disk_dir)
        self._loader = Loader(self._layout, o.load_workers)
        self._tiers = Tiers(self._layout, self._fast, self._host, self._loader)
        self._lock = threading.RLock()
        self._steps_in_flight = 0
        self._dropped: collections.deque = collections.deque()  # entries of steps collected unreleased
        self._awaited: collections.Counter = collections.Counter()  # ids prepare(wait=True) waits for
        self._closed = False

    # ------------------------------------------------------------------ properties

    @property
    def fast_tier_device(self) -> torch.device:
        """Where the fast tier (residency "gpu") lives: the pool's device."""
        return self.device

    @property
    def chunk_bytes(self) -> int:
        return self._layout.chunk_bytes

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        """Target module name -> (in_features, out_features), as given (a copy)."""
        return dict(zip(self._layout.module_names, self._layout.features))

    def pool_tensor(self, row_length: int) -> torch.Tensor:
        """The shared [P, row_length] pool of that row length."""
        return self._layout.pool_tensor(row_length)

    @property
    def optimizer_state(self) -> bool:
        """Whether the pool keeps companion state pages (optimizer_state=True)."""
        return self._layout.state_arena is not None

    def state_tensor(self, kind: str, row_length: int) -> torch.Tensor:
        """The [P, row_length] float32 companion pool of `kind` ("grad", "exp_avg",
        "exp_avg_sq"): row p is the state of page p of pool_tensor(row_length)."""
        return self._layout.state_tensor(kind, row_length)

    def __len__(self) -> int:
        return len(self._tiers.sources)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._tiers.sources

    # ------------------------------------------------------------------ registration

    def register(
        self, adapter_id: str, source: Source, *, trainable: bool = False, state: Optional[AdapterState] = None
    ) -> None:
        """Registers an adapter (metadata only, O(1)): an `Adapter`, a callable returning one,
        or the path of a safetensors file (save_adapter_file) or a PEFT directory.

        trainable (optimizer_state pools; source an Adapter, copied at once in the pool's dtype):
        its pages change in the fast tier and carry companion `state` (kinds it lacks are zero).
        The pool holds its only up-to-date copy: written back on eviction, never reloaded stale."""
        if not isinstance(adapter_id, str) or not adapter_id:
            raise TypeError(f"adapter_id must be a non-empty str, got {adapter_id!r}")
        if trainable or state is not None:
            what = f"adapter {adapter_id!r}"
            if not trainable:
                raise ValueError(f"{what}: state is given only with trainable=True")
            source = self._layout.pack_trainable(source, state, what)
        elif isinstance(source, Adapter):
            self._layout.check_adapter(source, f"adapter {adapter_id!r}")
        elif isinstance(source, (str, os.PathLike)):
            source = os.fspath(source)
            if not os.path.exists(source):
                raise FileNotFoundError(f"adapter {adapter_id!r}: no file or directory {source!r}")
        elif not callable(source):
            raise TypeError(
                f"adapter {adapter_id!r}: source must be an Adapter, a callable returning one, or a path; "
                f"got {type(source).__name__}"
            )
        with self._lock:
            if adapter_id in self._tiers.sources:
                raise ValueError(f"adapter {adapter_id!r} is already registered (unregister it first)")
            self._tiers.sources[adapter_id] = source
            if trainable:
                self._tiers.trainable.add(adapter_id)

    def is_trainable(self, adapter_id: str) -> bool:
        return adapter_id in self._tiers.trainable

    def unregister(self, adapter_id: str) -> None:
        """Forgets an adapter and frees its pages and copies.  Refused while a step uses it."""
        with self._lock:
            self._sync()
            self._check_registered(adapter_id)
            e = self._fast.get(adapter_id)
            if e is not None and e.refs > 0:
                raise ValueError(f"adapter {adapter_id!r} is used by {e.refs} unreleased step(s); release them first")
            self._tiers.forget(adapter_id)

    def _check_registered(self, adapter_id: str) -> None:
        if adapter_id not in self._tiers.sources:
            raise KeyError(f"unknown adapter id {adapter_id!r} (not registered)")

    # ------------------------------------------------------------------ queries

    def residency(self, adapter_id: str) -> str:
        """"gpu" (fast tier, ready) | "host" | "disk" | "unregistered" (see minlora/pool/__init__.py)."""
        with self._lock:
            self._sync()
            return self._tiers.residency(adapter_id)

    def pin(self, adapter_id: str) -> None:
        """Keeps the adapter in the fast tier once it is there (prepare loads it).  Idempotent."""
        with self._lock:
            self._check_registered(adapter_id)
            self._sync()
            self._fast.pin(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._check_registered(adapter_id)
            if adapter_id not in self._fast.pinned:
                raise ValueError(f"adapter {adapter_id!r} is not pinned")
            self._sync()
            self._fast.unpin(adapter_id)

    def is_pinned(self, adapter_id: str) -> bool:
        return adapter_id in self._fast.pinned

    def poll(self) -> None:
        """Takes in loads that finished (prepare and residency do this too)."""
        with self._lock:
            self._sync()

    def stats(self) -> dict:
        """Counters and gauges.  hits/misses count requests (a request whose adapter was ready in
        the fast tier when prepare was called is a hit); bytes_* count bytes moved between tiers."""
        with self._lock:
            self._sync()
            s = dict(self._tiers.counters)
            looked = s["hits"] + s["misses"]
            s.update(self._tiers.gauges())
            s.update(hit_rate=s["hits"] / looked if looked else 0.0, steps_in_flight=self._steps_in_flight)
            return s

    def snapshot(self) -> PoolSnapshot:
        """The pool's bookkeeping now, as an immutable value (for tests and diagnostics)."""
        with self._lock:
            self._sync()
            return self._tiers.snapshot(self._steps_in_flight)

    # ------------------------------------------------------------------ steps

    def prepare(
        self, adapter_ids: Sequence[Optional[str]], *, wait: bool = False, timeout: Optional[float] = None
    ) -> Step:
        """One call per step: the adapter id (or None) of every request.  Starts loads for what
        is missing; returns a Step with what is ready now (all of them with wait=True).

        timeout (wait=True only): the most seconds to wait for sources; past it, LoadTimeoutError
        names the adapters still loading and nothing is changed (their loads go on).  Sources
        are read without the pool's lock, so other threads use the pool meanwhile."""
        if isinstance(adapter_ids, str):
            raise TypeError("adapter_ids must be a sequence of ids (one per request), not a single str")
        if timeout is not None:
            if not wait:
                raise ValueError("timeout applies to prepare(wait=True) only")
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
                raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        ids = list(adapter_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        was_ready: Optional[set[str]] = None
        awaited: list[str] = []
        try:
            while True:
                with self._lock:
                    if self._closed:
                        raise RuntimeError("the pool is closed")
                    distinct = self._tiers.check_request(ids, self.max_slots)
                    self._sync()
                    self._raise_load_error(distinct)
                    if was_ready is None:  # hits count what was ready when prepare was called
                        was_ready = {a for a in distinct if self._fast.is_ready(a)}
                        self._refuse_known(distinct)
                    loads = self._start_loads(distinct) if wait else {}
                    if not loads:
                        return self._make_step(ids, distinct, was_ready, wait)
                    if not awaited:
                        awaited = distinct
                        self._awaited.update(awaited)
                # Without the lock: read in-memory adapters here, wait for the workers' reads.
                for future, source in loads.values():
                    if source is not None:
                        self._loader.run(future, source)
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                _, pending = cf.wait([f for f, _ in loads.values()], timeout=left)
                if pending:
                    slow = [a for a, (f, _) in loads.items() if f in pending]
                    raise LoadTimeoutError(
                        f"prepare(wait=True, timeout={timeout}): adapter(s) {slow[:5]!r} still loading "
                        f"({len(slow)} in all); no step was made, their loads go on",
                        slow,
                    )
        finally:
            if awaited:
                with self._lock:
                    self._awaited -= collections.Counter(awaited)  # (drops ids that reach 0)

    def _refuse_known(self, distinct: list[str]) -> None:
        """PoolExhaustedError before any fetch when the sizes of the missing adapters are known
        and they cannot fit (lock held; nothing changes)."""
        missing = [a for a in distinct if a not in self._fast]
        known = [self._tiers.known_requests(a) for a in missing]
        if missing and all(r is not None for r in known):
            what = f"the {len(missing)} adapter(s) to load"
            requests = [r for rs in known for r in rs]
            self._tiers.evictions_to_fit(requests, set(distinct), True, what, self._steps_in_flight)

    def _start_loads(self, distinct: list[str]) -> dict[str, tuple[cf.Future, Any]]:
        """Starts reading what has no copy in any tier (lock held): id -> (future, source), the
        source set when the caller reads it itself (an in-memory Adapter: no I/O, never blocks)."""
        loads = {}
        for a in distinct:
            if a in self._fast or self._host.get(a) is not None:
                continue
            future = self._loader.future(a)
            source = None
            if future is None:
                src = self._tiers.sources[a]
                if isinstance(src, (Adapter, PackedAdapter)):
                    future, source = self._loader.claim(a, src), src
                else:
                    self._loader.submit(a, src)
                    future = self._loader.future(a)
            loads[a] = (future, source)
        return loads

    def _make_step(
        self, ids: list[Optional[str]], distinct: list[str], was_ready: set[str], wait: bool
    ) -> Step:
        """Moves what has a host copy to the fast tier (all or nothing), starts the other loads
        (wait=False), and makes the step (lock held)."""
        tiers, fast, protect = self._tiers, self._fast, set(distinct)
        promote = [a for a in distinct if a not in fast and self._host.get(a) is not None]
        if promote:
            tiers.promote(promote, protect, True, self._steps_in_flight)
        if not wait:
            for a in distinct:
                if a not in fast and not self._loader.is_fetching(a) and self._host.get(a) is None:
                    self._loader.submit(a, tiers.sources[a])
        tiers.promote_staged(protect, self._steps_in_flight, self._awaited)
        tiers.finish_copies()  # inline copies are done already
        if wait:
            for a in distinct:
                fast.wait_copy(a)  # a memcpy or a DMA: bounded
            tiers.collect()
            self._raise_load_error(distinct)
        return self._new_step(ids, distinct, was_ready)

    def _raise_load_error(self, ids: list[str]) -> None:
        """Raises the first recorded load error among `ids` (and forgets it: the next prepare retries)."""
        for a in ids:
            exc = self._loader.take_error(a)
            if exc is not None:
                raise AdapterLoadError(f"loading adapter {a!r} failed: {exc!r}") from exc

    def _new_step(self, ids: list[Optional[str]], distinct: list[str], was_ready: set[str]) -> Step:
        """A Step over the ready adapters among `distinct`, one reference on each (lock held)."""
        slot_of: dict[str, int] = {}
        entries: list[Resident] = []
        for a in distinct:
            e = self._fast.get(a)
            if e is not None and e.ready:
                slot_of[a] = len(entries)
                entries.append(e)
                self._fast.acquire(e)
        self._tiers.count_step(ids, was_ready)
        self._steps_in_flight += 1
        slots = [slot_of.get(a, -1) if a is not None else -1 for a in ids]
        ready = [a is None or a in slot_of for a in ids]
        return Step(self._layout, entries, slots, ready, self._release)

    def _release(self, entries: list[Resident], dropped: bool) -> None:
        """A step hands its references back: at once, or (a step collected unreleased, maybe
        inside a locked section of this thread) at the next call that takes the lock."""
        if dropped:
            self._dropped.append(entries)
            return
        with self._lock:
            self._fast.release(entries)
            self._steps_in_flight -= 1

    def _sync(self) -> None:
        """Takes in the references of dropped steps, finished fetches and copies (lock held)."""
        while self._dropped:
            self._fast.release(self._dropped.popleft())
            self._steps_in_flight -= 1
        self._tiers.collect()

    # ------------------------------------------------------------------ tests and teardown

    def read_adapter(self, adapter_id: str) -> dict[str, LoraWeights]:
        """The weights as the fast tier holds them (a copy): module -> LoraWeights(a [r, in],
        b [out, r], scale), in the pool's dtype.  The adapter must be ready ("gpu")."""
        with self._lock:
            e = self._ready_resident(adapter_id)
            return self._layout.unpack(self._fast.read(adapter_id), e.mods).modules

    def read_state(self, adapter_id: str) -> AdapterState:
        """A trainable adapter's companion state as the fast tier holds it (a copy): every kind
        of STATE_KINDS, module -> (a [r, in], b [out, r]) float32.  It must be ready ("gpu")."""
        with self._lock:
            e = self._ready_resident(adapter_id)
            if not e.trainable:
                raise ValueError(f"adapter {adapter_id!r} is not trainable (it has no state)")
            return self._layout.unpack_state(self._layout.read_state_rows(e.pages), e.mods)

    def _ready_resident(self, adapter_id: str) -> Resident:
        self._check_registered(adapter_id)
        e = self._fast.get(adapter_id)
        if e is None or not e.ready:
            raise ValueError(f"adapter {adapter_id!r} is not in the fast tier (residency {self.residency(adapter_id)!r})")
        return e

    def check_invariants(self) -> None:
        """Raises AssertionError/RuntimeError if any bookkeeping invariant is broken (for tests)."""
        with self._lock:
            self._sync()
            self._tiers.check_invariants()

    def close(self) -> None:
        """Stops the worker threads and removes this pool's spill files; returns at once.  A
        source still being read is not waited for (it may never return): its thread ends when it
        does, and its result is dropped.  Steps still held stay readable until released."""
        with self._lock:
            self._closed = True
            self._loader.close()
            self._fast.close()
            self._host.close()
