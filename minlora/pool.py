"""AdapterPool: the memory of many LoRA adapters, in paged pools the minlora ops read in place.

DESIGN.md ("Paged adapter memory", "AdapterPool") is the architecture; this is the contract.

Memory layout
-------------
The fast tier is ONE arena of `capacity_bytes` (GPU memory on CUDA; ordinary memory on CPU).
For every distinct row length d among the target modules' in/out features there is one pool
tensor `[P_d, d]`, a view of the whole arena; all modules whose A rows (length `in`) or B
columns (length `out`) have length d share it.  A page is one row: an adapter of rank r on a
module uses r pages of the `in` pool (the rows of A [r, in]) and r pages of the `out` pool (the
columns of B [out, r], i.e. the rows of B^T).  The C++ allocator (`minlora._C.PageAllocator`,
csrc/pool/) cuts the arena into chunks and lends each chunk to one row length at a time, so all
row lengths draw on one budget; no fixed per-module split.

Tiers and residency
-------------------
``residency(adapter_id)`` returns:

* ``"gpu"``: in the fast tier (the page arena the ops read), ready for a step.  On a CPU pool
  the fast tier is ordinary memory but is still reported as ``"gpu"``: the value names the
  tier's role (usable by a step now), so code and tests behave the same on both devices;
  ``AdapterPool.fast_tier_device`` says where that tier really lives.
* ``"host"``: a copy in the host tier (pinned memory on CUDA), not (yet) in the fast tier.
  An adapter whose copy into the fast tier is still in flight reports ``"host"``.
* ``"disk"``: only at its source (a safetensors file, a PEFT directory, a loader callable, or
  an in-memory `Adapter` that the pool has not converted yet).
* ``"unregistered"``.

Loads are asynchronous: source -> host copy runs on a worker thread; host -> fast tier runs
on a side CUDA stream (on CPU: a second worker thread).  A step uses only adapters whose load
has finished.  Fast-tier eviction is LRU among adapters that are neither pinned nor referenced
by an unreleased `Step` nor loading; an evicted adapter keeps (or gets) a host copy while the
host tier (`host_capacity_bytes`, None = unbounded, 0 = none) has room, and the host tier's
LRU victims are written to `disk_dir` when their source is in memory (a loader callable or an
`Adapter`), else just dropped (they reload from their file).

Public API
----------
::

    pool = AdapterPool(modules, dtype=torch.float32, device="cpu", capacity_bytes=...,
                       host_capacity_bytes=None, max_slots=256, disk_dir=None)
    # modules: module name (as in the model, "model.layers.0.self_attn.q_proj") -> (in, out)
    pool.register(adapter_id, source)    # metadata only, O(1); source: Adapter, a callable
                                         # returning one, or a path (safetensors file / PEFT dir)
    pool.unregister(adapter_id)
    with pool.prepare(["u1", None, "u2", "u1"]) as step:   # one call per step
        step.request_slot   # [B] int32 on the pool's device; -1 for None or not ready
        step.ready          # [B] bools; None counts as ready
        step.num_slots      # S, the same for every module of the step
        t = step.tables("model.layers.0.self_attn.q_proj")  # ModuleTables
        token_slot, plan = step.plan(tokens_per_request)     # [B*L] int32, BatchPlan
        minlora.ops.lora_add_(y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks,
                              t.scales, token_slot, plan=plan)
    pool.residency(adapter_id) -> "gpu" | "host" | "disk" | "unregistered"
    pool.pin(adapter_id); pool.unpin(adapter_id)   # a pinned adapter is never evicted
    pool.stats() -> dict                           # hits, misses, evictions, bytes per tier, ...
    pool.module_names: list[str]
    # also: poll() (take in finished loads), read_adapter(id) (the weights as the fast tier
    # holds them), pool_tensor(row_length), check_invariants(), close()

`Step.tables(module)` returns a `ModuleTables` (a_pool, b_pool, a_pages, b_pages, ranks,
scales: the op's arguments).  A step builds the tables of all modules at once, on first use,
in one int32 buffer (one host-to-device copy on CUDA); R is the step's largest rank over all
modules, ranks[s] = 0 where slot s's adapter does not target the module, and table entries
past ranks[s] are 0.  `Step.adapter_ids[s]` is the adapter in slot s.  Slots are numbered
0..S-1 in order of first appearance among the ready requests.

`prepare(ids, wait=False)` starts loads for what is missing and returns at once; with
``wait=True`` it returns when every named adapter is ready.  All adapters of one step must fit
in the fast tier together: when they cannot (even after evicting every evictable adapter)
prepare raises `PoolExhaustedError` and the fast tier, references and pins are unchanged.  A
load that failed raises `AdapterLoadError` from the prepare that waits for it (wait=True) or
from the next prepare naming the adapter (the one after that retries).

Steps hold a reference on each adapter they use until `release()` (or the end of their
``with`` block).  On CUDA, enqueue a step's kernels on the current stream before releasing
it: freeing pages records an event on the current stream, and the side stream writes freed
pages only after it, so kernels already queued keep reading valid weights; the host never
waits.  Every method is thread-safe.

Per registered-but-unloaded adapter the pool keeps one dict entry (id -> source); nothing else.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _C
from .formats.adapter import Adapter, LoraWeights, check_adapter
from .formats.load import load_adapter
from .formats.native import load_adapter_file, save_adapter_file
from .ops import ModuleTables
from .plan import BatchPlan, build_plan

__all__ = [
    "AdapterPool",
    "Step",
    "ModuleTables",
    "PoolExhaustedError",
    "AdapterLoadError",
    "save_adapter_file",
    "load_adapter_file",
]

Source = Union[Adapter, Callable[[], Adapter], str, "os.PathLike[str]"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CPU pools copy an adapter into its pages in the calling thread up to this size, else on the
# copy worker.
_INLINE_COPY_BYTES = 1 << 20
_NO_PAGES = np.zeros(0, dtype=np.int32)


class PoolExhaustedError(RuntimeError):
    """The adapters of one step do not fit in the fast tier together (nothing was changed)."""


class AdapterLoadError(RuntimeError):
    """Materialising an adapter from its source failed; `__cause__` is the original error."""


# ----------------------------------------------------------------------------- internals


class _HostCopy:
    """An adapter in page layout, in the pool's dtype.

    rows: allocator pool id -> [n, d] (all the adapter's rows of that length, module after
          module: A rows of modules with in = d, B columns (B^T rows) of modules with out = d);
    mods: module index -> (a_off, b_off, r, scale): module mi's A is rows[pa][a_off:a_off+r] and
          its B^T is rows[pb][b_off:b_off+r].
    Copies and page allocation work per row length, not per module (a model has hundreds).
    """

    __slots__ = ("rows", "mods", "nbytes", "minfo", "flat_pools")

    def __init__(self, rows: dict[int, torch.Tensor], mods: dict[int, tuple[int, int, int, float]]) -> None:
        self.rows = rows
        self.mods = mods
        self.nbytes = sum(t.nbytes for t in rows.values())
        # Packed once here, reused by every promotion of this copy (see _Resident.minfo/flat).
        self.minfo = (
            np.array([(mi, m[0], m[1], m[2]) for mi, m in mods.items()], dtype=np.int64).reshape(-1, 4).T.copy(),
            np.array([m[3] for m in mods.values()], dtype=np.float32),
        )
        self.flat_pools = np.repeat(
            np.array(list(rows), dtype=np.int32), np.array([t.shape[0] for t in rows.values()], dtype=np.int64)
        )


class _Pending:
    """A copy into the fast tier in flight: a worker's future (CPU) or a CUDA event."""

    __slots__ = ("future", "event", "keep")

    def __init__(self, future: Optional[cf.Future] = None, event: Any = None, keep: Any = None) -> None:
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


class _Resident:
    """An adapter that holds fast-tier pages (loading or ready)."""

    __slots__ = ("id", "pages", "npages", "plist", "flat", "mods", "minfo", "nbytes", "refs", "ready", "pending")

    def __init__(self, adapter_id: str) -> None:
        self.id = adapter_id
        self.pages: dict[int, torch.Tensor] = {}  # allocator pool -> int32 pages (as _HostCopy.rows)
        self.npages: dict[int, Any] = {}  # the same as numpy arrays (for tables)
        self.plist: list[tuple[int, torch.Tensor]] = []  # (allocator pool, pages), for free()
        self.flat: tuple[Any, Any] = (None, None)  # (pool of each page, page) int32 arrays, for plans
        self.mods: dict[int, tuple[int, int, int, float]] = {}  # as _HostCopy.mods
        # The same as arrays, for building a step's tables without Python loops:
        # (int64 [4, k]: module index, a_off, b_off, rank; float32 [k]: scale).
        self.minfo: tuple[Any, Any] = (np.zeros((4, 0), np.int64), np.zeros(0, np.float32))
        self.nbytes = 0
        self.refs = 0
        self.ready = False
        self.pending: Optional[_Pending] = None


def _choose_chunk_bytes(row_bytes: list[int], capacity: int, elem: int) -> int:
    """A chunk size that every row length fits well in (see page_allocator.h).

    When the lcm of the row sizes is small, chunks are a multiple of it and waste nothing;
    otherwise chunks of >= 16 of the longest rows keep the edge waste under ~6%.
    """
    max_rb = max(row_bytes)
    lcm = math.lcm(*row_bytes)
    target = max(16 * max_rb, 1 << 16)
    cap = max(capacity // 16, 1)  # small test pools still get several chunks
    if lcm <= max(min(target, cap), max_rb) or lcm <= 4 * max_rb:
        return lcm * max(1, min(target, cap) // lcm)
    c = max(min(target, cap), 2 * max_rb)
    align = math.lcm(elem, 256)
    return -(-c // align) * align


# ----------------------------------------------------------------------------- the pool


class AdapterPool:
    """Paged memory for many LoRA adapters (see the module docstring for the contract)."""

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
        load_workers: int = 1,
    ) -> None:
        """modules: target module name -> (in_features, out_features).
        capacity_bytes: the fast tier's budget, shared by all row lengths.
        host_capacity_bytes: the host tier's budget (None = unbounded, 0 = no host tier).
        max_slots: the most distinct adapters one step may use.
        disk_dir: where in-memory adapters are written when they leave the host tier.
        chunk_bytes: the allocator's chunk size (default: chosen from the row lengths).
        poison: NaN-fill the arena at creation and every page when it is freed (for tests:
            a read of a page that is not the adapter's shows).
        load_workers: threads reading sources (loader callables, files) for prepare(wait=False).
            A loader runs on such a thread (or, with wait=True, in the caller's) and must not
            call back into the pool.
        """
        if not isinstance(modules, Mapping) or len(modules) == 0:
            raise ValueError("modules must be a non-empty mapping: module name -> (in_features, out_features)")
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32; got {dtype}")
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if host_capacity_bytes is not None and (not isinstance(host_capacity_bytes, int) or host_capacity_bytes < 0):
            raise ValueError(f"host_capacity_bytes must be None or an int >= 0, got {host_capacity_bytes!r}")
        if not isinstance(max_slots, int) or max_slots <= 0:
            raise ValueError(f"max_slots must be a positive int, got {max_slots!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device}")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.max_slots = max_slots
        self.capacity_bytes = capacity_bytes
        self.host_capacity_bytes = host_capacity_bytes
        self.disk_dir = os.fspath(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            os.makedirs(self.disk_dir, exist_ok=True)
        self.poison = poison
        self._cuda = self.device.type == "cuda"

        self.module_names: list[str] = []
        self._features: list[tuple[int, int]] = []
        for name, feats in modules.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"module names must be non-empty strings, got {name!r}")
            try:
                fin, fout = (int(feats[0]), int(feats[1]))
                ok = len(feats) == 2
            except (TypeError, ValueError, IndexError):
                ok = False
            if not ok or fin <= 0 or fout <= 0:
                raise ValueError(f"modules[{name!r}] must be (in_features, out_features) > 0, got {feats!r}")
            self.module_names.append(name)
            self._features.append((fin, fout))
        self._index = {n: i for i, n in enumerate(self.module_names)}

        elem = torch.empty((), dtype=dtype).element_size()
        lengths = sorted({d for f in self._features for d in f})
        row_bytes = [d * elem for d in lengths]
        if chunk_bytes is None:
            chunk_bytes = _choose_chunk_bytes(row_bytes, capacity_bytes, elem)
        if chunk_bytes % elem:
            raise ValueError(f"chunk_bytes ({chunk_bytes}) must be a multiple of the element size {elem}")
        arena_bytes = capacity_bytes // chunk_bytes * chunk_bytes
        if arena_bytes == 0:
            raise ValueError(
                f"capacity_bytes = {capacity_bytes} is less than one allocator chunk ({chunk_bytes} bytes) "
                f"for rows of {max(row_bytes)} bytes"
            )
        self._alloc = _C.PageAllocator(arena_bytes, chunk_bytes)
        self._arena = torch.empty(arena_bytes // elem, dtype=dtype, device=self.device)
        if poison:
            self._arena.fill_(float("nan"))
        self._pool_of_len: dict[int, int] = {}  # row length -> allocator pool id
        self._views: dict[int, torch.Tensor] = {}  # allocator pool id -> [P, d] view of the arena
        for d, rb in zip(lengths, row_bytes):
            pid = self._alloc.add_pool(rb)
            n = self._alloc.pool_info(pid)["num_pages"]
            self._pool_of_len[d] = pid
            self._views[pid] = self._arena[: n * d].view(n, d)
        self._mod_pools = [(self._pool_of_len[fi], self._pool_of_len[fo]) for fi, fo in self._features]
        self._mod_pa = np.array([p[0] for p in self._mod_pools], dtype=np.int64)
        self._mod_pb = np.array([p[1] for p in self._mod_pools], dtype=np.int64)

        self._lock = threading.RLock()
        self._reg: dict[str, Any] = {}  # id -> source: the only per-adapter state until loaded
        self._res: dict[str, _Resident] = {}  # fast tier (loading or ready)
        self._lru: OrderedDict[str, None] = OrderedDict()  # evictable ready adapters, oldest first
        self._lru_bytes = 0
        self._loading: set[str] = set()
        self._host: OrderedDict[str, _HostCopy] = OrderedDict()  # host tier, oldest first
        self._host_bytes = 0
        self._wanted: dict[str, _HostCopy] = {}  # fetched for a step, not yet in the fast tier
        self._fetching: dict[str, tuple[cf.Future, Any]] = {}  # id -> (future, source it reads)
        self._errors: dict[str, BaseException] = {}
        self._pinned: set[str] = set()
        self._spilled: set[str] = set()  # ids whose source is a file we wrote in disk_dir
        self._steps_in_flight = 0
        self._closed = False
        self._fetcher = cf.ThreadPoolExecutor(max_workers=max(1, load_workers), thread_name_prefix="minlora-fetch")
        self._copier = None if self._cuda else cf.ThreadPoolExecutor(1, thread_name_prefix="minlora-copy")
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        # CUDA: an event on the current stream recorded when pages were last freed.  Kernels of
        # released steps that read those pages were queued before it, so a copy that may reuse
        # the pages waits for it (on the side stream, never the host).
        self._free_fence = None
        self._stats = dict.fromkeys(
            (
                "hits",
                "misses",
                "requests",
                "steps",
                "fetches",
                "promotions",
                "evictions",
                "host_evictions",
                "spills",
                "load_errors",
                "bytes_disk_to_host",
                "bytes_host_to_fast",
                "bytes_fast_to_host",
                "bytes_host_to_disk",
            ),
            0,
        )

    # ------------------------------------------------------------------ properties

    @property
    def fast_tier_device(self) -> torch.device:
        """Where the fast tier (residency "gpu") lives: the pool's device."""
        return self.device

    @property
    def chunk_bytes(self) -> int:
        return self._alloc.chunk_bytes

    def pool_tensor(self, row_length: int) -> torch.Tensor:
        """The shared [P, row_length] pool of that row length."""
        if row_length not in self._pool_of_len:
            raise ValueError(f"no module has a row length of {row_length}; lengths: {sorted(self._pool_of_len)}")
        return self._views[self._pool_of_len[row_length]]

    def __len__(self) -> int:
        return len(self._reg)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._reg

    # ------------------------------------------------------------------ registration

    def _check_adapter(self, adapter: Adapter, what: str) -> None:
        check_adapter(adapter, what)
        for name, w in adapter.modules.items():
            if name not in self._index:
                raise ValueError(
                    f"{what} targets module {name!r}, which this pool does not know "
                    f"(it has {len(self.module_names)} modules, e.g. {self.module_names[:3]})"
                )
            fin, fout = self._features[self._index[name]]
            if w.a.shape[1] != fin or w.b.shape[0] != fout:
                raise ValueError(
                    f"{what}: module {name!r} has a {tuple(w.a.shape)} and b {tuple(w.b.shape)}, "
                    f"expected a [r, {fin}] and b [{fout}, r]"
                )

    def register(self, adapter_id: str, source: Source) -> None:
        """Registers an adapter (metadata only, O(1)): an `Adapter`, a callable returning one,
        or the path of a safetensors file (save_adapter_file) or a PEFT directory."""
        if not isinstance(adapter_id, str) or not adapter_id:
            raise TypeError(f"adapter_id must be a non-empty str, got {adapter_id!r}")
        if isinstance(source, Adapter):
            self._check_adapter(source, f"adapter {adapter_id!r}")
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
            if adapter_id in self._reg:
                raise ValueError(f"adapter {adapter_id!r} is already registered (unregister it first)")
            self._reg[adapter_id] = source

    def unregister(self, adapter_id: str) -> None:
        """Forgets an adapter and frees its pages and copies.  Refused while a step uses it."""
        with self._lock:
            self._check_registered(adapter_id)
            e = self._res.get(adapter_id)
            if e is not None and e.refs > 0:
                raise ValueError(f"adapter {adapter_id!r} is used by {e.refs} unreleased step(s); release them first")
            if e is not None:
                if e.pending is not None:
                    e.pending.wait()  # its copy writes its pages: let it finish before freeing them
                    self._loading.discard(adapter_id)
                self._drop_resident(e)
            self._fetching.pop(adapter_id, None)  # a fetch in flight is ignored when it completes
            h = self._host.pop(adapter_id, None)
            if h is not None:
                self._host_bytes -= h.nbytes
            self._wanted.pop(adapter_id, None)
            self._errors.pop(adapter_id, None)
            self._pinned.discard(adapter_id)
            src = self._reg.pop(adapter_id)
            if adapter_id in self._spilled:
                self._spilled.discard(adapter_id)
                try:
                    os.remove(src)
                except OSError:
                    pass

    def _check_registered(self, adapter_id: str) -> None:
        if adapter_id not in self._reg:
            raise KeyError(f"unknown adapter id {adapter_id!r} (not registered)")

    # ------------------------------------------------------------------ queries

    def residency(self, adapter_id: str) -> str:
        """"gpu" (fast tier, ready) | "host" | "disk" | "unregistered" (see the module docstring)."""
        with self._lock:
            self._reap()
            if adapter_id not in self._reg:
                return "unregistered"
            e = self._res.get(adapter_id)
            if e is not None and e.ready:
                return "gpu"
            if adapter_id in self._host or adapter_id in self._wanted or e is not None:
                return "host"
            return "disk"

    def pin(self, adapter_id: str) -> None:
        """Keeps the adapter in the fast tier once it is there (prepare loads it).  Idempotent."""
        with self._lock:
            self._check_registered(adapter_id)
            self._pinned.add(adapter_id)
            self._lru_remove(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._check_registered(adapter_id)
            if adapter_id not in self._pinned:
                raise ValueError(f"adapter {adapter_id!r} is not pinned")
            self._pinned.discard(adapter_id)
            e = self._res.get(adapter_id)
            if e is not None and e.ready and e.refs == 0:
                self._lru_add(e)

    def poll(self) -> None:
        """Takes in loads that finished (prepare and residency do this too)."""
        with self._lock:
            self._reap()

    def is_pinned(self, adapter_id: str) -> bool:
        return adapter_id in self._pinned

    def stats(self) -> dict:
        """Counters and gauges.  hits/misses count requests (a request whose adapter was ready in
        the fast tier when prepare was called is a hit); bytes_* count bytes moved between tiers."""
        with self._lock:
            self._reap()
            s = dict(self._stats)
            looked = s["hits"] + s["misses"]
            used = self._alloc.used_bytes()
            s.update(
                hit_rate=s["hits"] / looked if looked else 0.0,
                registered=len(self._reg),
                resident=sum(1 for e in self._res.values() if e.ready),
                loading=len(self._loading),
                fetching=len(self._fetching),
                host_resident=len(self._host),
                pinned=len(self._pinned),
                steps_in_flight=self._steps_in_flight,
                fast_capacity_bytes=self._alloc.arena_bytes,
                fast_used_bytes=used,
                fast_free_chunks=self._alloc.free_chunks(),
                fast_chunks=self._alloc.num_chunks,
                chunk_bytes=self._alloc.chunk_bytes,
                host_used_bytes=self._host_bytes,
                host_capacity_bytes=self.host_capacity_bytes,
            )
            return s

    # ------------------------------------------------------------------ LRU helpers

    def _lru_add(self, e: _Resident) -> None:
        if e.id not in self._lru and e.id not in self._pinned:
            self._lru[e.id] = None
            self._lru_bytes += e.nbytes

    def _lru_remove(self, adapter_id: str) -> None:
        if adapter_id in self._lru:
            del self._lru[adapter_id]
            self._lru_bytes -= self._res[adapter_id].nbytes

    # ------------------------------------------------------------------ host tier

    def _host_get(self, adapter_id: str) -> Optional[_HostCopy]:
        h = self._host.get(adapter_id)
        if h is not None:
            self._host.move_to_end(adapter_id)
            return h
        return self._wanted.get(adapter_id)

    def _host_put(self, adapter_id: str, h: _HostCopy) -> None:
        cap = self.host_capacity_bytes
        if adapter_id in self._host or (cap is not None and h.nbytes > cap):
            return
        if cap is not None:
            while self._host_bytes + h.nbytes > cap and self._host:
                vid, v = self._host.popitem(last=False)
                self._host_bytes -= v.nbytes
                self._stats["host_evictions"] += 1
                self._maybe_spill(vid, v)
        self._host[adapter_id] = h
        self._host_bytes += h.nbytes

    def _maybe_spill(self, adapter_id: str, h: _HostCopy) -> None:
        """Writes an adapter whose source lives in memory to disk_dir, so the pool can drop it."""
        src = self._reg.get(adapter_id)
        if self.disk_dir is None or src is None or isinstance(src, str):
            return
        path = os.path.join(self.disk_dir, hashlib.sha256(adapter_id.encode()).hexdigest()[:32] + ".safetensors")
        save_adapter_file(self._to_adapter(h.rows, h.mods), path)
        self._reg[adapter_id] = path
        self._spilled.add(adapter_id)
        self._stats["spills"] += 1
        self._stats["bytes_host_to_disk"] += h.nbytes

    # ------------------------------------------------------------------ loading

    def _materialise(self, source: Any) -> _HostCopy:
        """Runs on a fetch worker: source -> Adapter -> host copy in page layout."""
        if isinstance(source, str):
            adapter = load_adapter(source)
        elif isinstance(source, Adapter):
            adapter = source
        else:
            adapter = source()
        self._check_adapter(adapter, "the loaded adapter")
        return self._host_copy(adapter)

    def _layout(self, ranks: dict[int, int]) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
        """Rows per allocator pool and each module's (a_off, b_off), for module index -> rank."""
        count: dict[int, int] = {}
        offs = {}
        for mi, r in ranks.items():
            pa, pb = self._mod_pools[mi]
            ao = count.get(pa, 0)
            count[pa] = ao + r
            bo = count.get(pb, 0)
            count[pb] = bo + r
            offs[mi] = (ao, bo)
        return count, offs

    def _host_copy(self, adapter: Adapter) -> _HostCopy:
        # One pass: the offsets handed out here follow _layout's rule (module order; per module
        # its A rows, then its B^T rows).
        count: dict[int, int] = {}
        parts: dict[int, list[torch.Tensor]] = {}
        mods = {}
        same = True  # every tensor already has the pool dtype and lives on the CPU
        for name, w in adapter.modules.items():
            r = w.rank
            if r == 0:
                continue
            mi = self._index[name]
            pa, pb = self._mod_pools[mi]
            a, b = w.a, w.b
            if a.requires_grad or b.requires_grad:
                a, b = a.detach(), b.detach()
            bt = b.t()
            same = same and a.dtype == bt.dtype == self.dtype and not a.is_cuda and not bt.is_cuda
            ao = count.get(pa, 0)
            count[pa] = ao + r
            parts.setdefault(pa, []).append(a)
            bo = count.get(pb, 0)
            count[pb] = bo + r
            parts.setdefault(pb, []).append(bt)
            mods[mi] = (ao, bo, r, float(w.scale))
        rows = {}
        for pid, n in count.items():
            out = torch.empty(n, self._views[pid].shape[1], dtype=self.dtype, pin_memory=self._cuda)
            if same:
                torch.cat(parts[pid], out=out)  # one copy for all modules of this row length
            else:
                o = 0
                for t in parts[pid]:
                    out[o : o + t.shape[0]].copy_(t)
                    o += t.shape[0]
            rows[pid] = out
        return _HostCopy(rows, mods)

    def _to_adapter(self, rows: dict[int, torch.Tensor], mods: dict[int, tuple[int, int, int, float]]) -> Adapter:
        out = {}
        for mi, (ao, bo, r, scale) in mods.items():
            pa, pb = self._mod_pools[mi]
            a = rows[pa][ao : ao + r].clone()
            b = rows[pb][bo : bo + r].t().contiguous()
            out[self.module_names[mi]] = LoraWeights(a, b, scale)
        return Adapter(out)

    def _submit_fetch(self, adapter_id: str) -> None:
        src = self._reg[adapter_id]
        self._fetching[adapter_id] = (self._fetcher.submit(self._materialise, src), src)

    def _reap(self) -> None:
        """Takes in finished fetches (-> host tier) and finished copies (-> ready).  Lock held."""
        for a, (fut, src) in list(self._fetching.items()):
            if not fut.done():
                continue
            del self._fetching[a]
            if self._reg.get(a) is not src:
                continue  # unregistered (or re-registered) while it was being read
            exc = fut.exception()
            if exc is not None:
                self._errors[a] = exc
                self._stats["load_errors"] += 1
                continue
            self._fetched(a, fut.result())
        self._reap_loads()

    def _fetched(self, a: str, h: _HostCopy) -> None:
        self._stats["fetches"] += 1
        self._stats["bytes_disk_to_host"] += h.nbytes
        self._host_put(a, h)
        if a not in self._res:
            self._wanted[a] = h

    def _reap_loads(self) -> None:
        for a in list(self._loading):
            e = self._res[a]
            if not e.pending.done():
                continue
            self._loading.discard(a)
            try:
                e.pending.wait()
            except BaseException as exc:  # a failed copy: the pages hold garbage, drop them
                self._errors[a] = exc
                self._stats["load_errors"] += 1
                self._drop_resident(e)
                continue
            e.pending = None
            e.ready = True
            if e.refs == 0:
                self._lru_add(e)

    def _requests_of(self, h: _HostCopy) -> list[tuple[int, int]]:
        return [(pid, t.shape[0]) for pid, t in h.rows.items()]

    def _drop_resident(self, e: _Resident) -> None:
        """Frees an adapter's pages (lock held; it must not be referenced or loading)."""
        self._lru_remove(e.id)
        del self._res[e.id]
        for pid, pages in e.plist:
            if self.poison and pages.numel():
                self._views[pid].index_fill_(0, pages.to(self.device, torch.long), float("nan"))
            self._alloc.free(pid, pages)
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free_fence = ev

    def _evict(self, adapter_id: str) -> None:
        e = self._res[adapter_id]
        if adapter_id not in self._host and self.host_capacity_bytes != 0:
            # Demote: copy the pages out so a reload needs no trip to the source.
            rows = {}
            for pid, pages in e.pages.items():
                t = self._views[pid].index_select(0, pages.to(self.device, torch.long)).cpu()
                rows[pid] = t.pin_memory() if self._cuda else t
            h = _HostCopy(rows, dict(e.mods))
            self._stats["bytes_fast_to_host"] += h.nbytes
            self._host_put(adapter_id, h)
        self._drop_resident(e)
        self._stats["evictions"] += 1

    def _known_requests(self, adapter_id: str) -> Optional[list[tuple[int, int]]]:
        """The allocator requests of an adapter when known without reading its source."""
        h = self._host_get(adapter_id)
        if h is not None:
            return self._requests_of(h)
        src = self._reg[adapter_id]
        if isinstance(src, Adapter):
            count, _ = self._layout({self._index[n]: w.rank for n, w in src.modules.items() if w.rank > 0})
            return list(count.items())
        return None

    def _fit(self, requests: list[tuple[int, int]], protect: set[str], strict: bool, what: str) -> int:
        """The number of LRU victims to evict for `requests` (-1: impossible, when not strict)."""
        k = self._plan(requests, protect)
        if k < 0 and strict and self._loading - protect:
            # Adapters still being copied cannot be evicted yet; they finish soon.
            for a in list(self._loading - protect):
                self._res[a].pending.wait()
            self._reap()
            k = self._plan(requests, protect)
        if k < 0 and strict:
            need = sum(n * self._alloc.pool_info(p)["row_bytes"] for p, n in requests)
            pinned = sum(e.nbytes for e in self._res.values() if e.id in self._pinned)
            busy = sum(e.nbytes for e in self._res.values() if e.refs > 0)
            raise PoolExhaustedError(
                f"the fast tier cannot hold this step's adapters: {what} need {need} bytes of pages; "
                f"capacity {self._alloc.arena_bytes} bytes, {self._alloc.used_bytes()} in use "
                f"({pinned} pinned, {busy} used by {self._steps_in_flight} unreleased steps, "
                f"{self._lru_bytes} evictable).  Release steps, unpin adapters, use fewer distinct "
                f"adapters per step, or raise capacity_bytes.  The fast tier was not changed."
            )
        return k

    def _promote(self, ids: list[str], protect: set[str], strict: bool) -> list[str]:
        """Allocates pages for `ids` (all have a host copy), evicting LRU adapters outside
        `protect` as needed, and starts their copies.  All or nothing: when they cannot fit,
        raises PoolExhaustedError (strict) or returns [] with nothing changed."""
        hosts = [self._host_get(a) for a in ids]
        requests = [r for h in hosts for r in self._requests_of(h)]
        k = self._fit(requests, protect, strict, f"the {len(ids)} adapter(s) to load")
        if k < 0:
            return []
        victims = self._victims(protect, k)
        for v in victims:
            self._evict(v)
        got = self._alloc.alloc(requests)
        if got is None:  # the plan said it fits: a bug, never silently corrupt
            raise RuntimeError("minlora pool: the page allocator refused an allocation its plan accepted")
        i = 0
        for a, h in zip(ids, hosts):
            e = _Resident(a)
            for pid in h.rows:
                pages = got[i]
                i += 1
                e.pages[pid] = pages
                e.npages[pid] = pages.numpy()
                e.plist.append((pid, pages))
            e.mods = h.mods
            e.minfo = h.minfo
            if e.plist:
                e.flat = (h.flat_pools, np.concatenate([e.npages[pid] for pid, _ in e.plist]))
            e.nbytes = h.nbytes
            self._res[a] = e
            self._wanted.pop(a, None)
            e.pending = self._start_copy(e, h)
            self._loading.add(a)
            self._stats["promotions"] += 1
            self._stats["bytes_host_to_fast"] += h.nbytes
        return ids

    def _plan(self, requests: list[tuple[int, int]], protect: set[str]) -> int:
        """How many LRU victims (outside protect) must go for `requests` to fit; -1 if impossible."""
        if self._alloc.plan_evictions(requests, []) == 0:
            return 0
        # The LRU may hold many thousands: look at its oldest few first, more only if needed.
        n = 16
        while True:
            cands = self._victims(protect, n)
            flats = [self._res[a].flat for a in cands]
            offsets = np.zeros(len(cands) + 1, dtype=np.int64)
            np.cumsum([0 if f[0] is None else len(f[0]) for f in flats], out=offsets[1:])
            pools = [f[0] for f in flats if f[0] is not None]
            pages = [f[1] for f in flats if f[1] is not None]
            k = self._alloc.plan_evictions_flat(
                requests,
                torch.from_numpy(np.concatenate(pools) if pools else np.zeros(0, np.int32)),
                torch.from_numpy(np.concatenate(pages) if pages else np.zeros(0, np.int32)),
                torch.from_numpy(offsets),
            )
            if k >= 0 or len(cands) < n:
                return k
            n *= 4

    def _victims(self, protect: set[str], n: int) -> list[str]:
        """The n oldest evictable adapters outside protect (fewer if there are not n)."""
        return list(itertools.islice((a for a in self._lru if a not in protect), n))

    def _start_copy(self, e: _Resident, h: _HostCopy) -> _Pending:
        jobs = [(self._views[pid], e.pages[pid], rows) for pid, rows in h.rows.items()]
        if not self._cuda:
            if h.nbytes <= _INLINE_COPY_BYTES:
                # A small memcpy costs less than handing it to a thread (and the GIL back).
                _copy_rows(jobs)
                return _Pending()
            return _Pending(future=self._copier.submit(_copy_rows, jobs))
        # CUDA: on the side stream, after the kernels that may still read pages freed earlier
        # (the free fence), host -> device -> scatter into the pages.
        with torch.cuda.stream(self._side):
            if self._free_fence is not None:
                self._side.wait_event(self._free_fence)
            for view, pages, rows in jobs:
                idx = pages.to(self.device, non_blocking=True).long()
                view.index_copy_(0, idx, rows.to(self.device, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(self._side)
        return _Pending(event=ev, keep=(h, jobs))

    # ------------------------------------------------------------------ steps

    def prepare(self, adapter_ids: Sequence[Optional[str]], *, wait: bool = False) -> "Step":
        """One call per step: the adapter id (or None) of every request.  Starts loads for what
        is missing; returns a Step with what is ready now (all of them with wait=True)."""
        if isinstance(adapter_ids, str):
            raise TypeError("adapter_ids must be a sequence of ids (one per request), not a single str")
        ids = list(adapter_ids)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            bad = [a for a in ids if a is not None and not isinstance(a, str)]
            if bad:
                raise TypeError(f"adapter ids must be str or None, got {bad[:3]!r}")
            unknown = [a for a in dict.fromkeys(ids) if a is not None and a not in self._reg]
            if unknown:
                raise KeyError(f"unknown adapter id(s) {unknown[:5]!r} (not registered)")
            distinct = list(dict.fromkeys(a for a in ids if a is not None))
            if len(distinct) > self.max_slots:
                raise ValueError(f"{len(distinct)} distinct adapters in one step, more than max_slots = {self.max_slots}")
            self._reap()
            failed = [a for a in distinct if a in self._errors]
            if failed:
                exc = self._errors.pop(failed[0])
                raise AdapterLoadError(f"loading adapter {failed[0]!r} failed: {exc!r}") from exc
            protect = set(distinct)
            was_ready = {a for a in distinct if a in self._res and self._res[a].ready}

            missing = [a for a in distinct if a not in self._res]
            if missing:
                known = [self._known_requests(a) for a in missing]
                if all(r is not None for r in known):
                    # Refuse before any fetch when the sizes are known: nothing changes.
                    self._fit([r for rs in known for r in rs], protect, True, f"the {len(missing)} adapter(s) to load")
            if wait:
                while True:
                    todo = [a for a in distinct if a not in self._res and self._host_get(a) is None]
                    if not todo:
                        break
                    for a in todo:
                        if a not in self._fetching:
                            # We block anyway: read it here rather than hand it to a thread.
                            try:
                                h = self._materialise(self._reg[a])
                            except Exception as exc:
                                self._stats["load_errors"] += 1
                                raise AdapterLoadError(f"loading adapter {a!r} failed: {exc!r}") from exc
                            self._fetched(a, h)
                    busy = [self._fetching[a][0] for a in todo if a in self._fetching]
                    if busy:
                        cf.wait(busy)
                    self._reap()
                    failed = [a for a in todo if a in self._errors]
                    if failed:
                        exc = self._errors.pop(failed[0])
                        raise AdapterLoadError(f"loading adapter {failed[0]!r} failed: {exc!r}") from exc
            # Strict: what has a host copy goes to the fast tier now, or nothing changes.
            promote = [a for a in distinct if a not in self._res and self._host_get(a) is not None]
            if promote:
                self._promote(promote, protect, strict=True)
            if not wait:
                for a in distinct:
                    if a not in self._res and a not in self._fetching and self._host_get(a) is None:
                        self._submit_fetch(a)
            # Best effort: adapters fetched for earlier steps that are still wanted.
            for a in list(self._wanted):
                if a in self._res or a not in self._reg:
                    self._wanted.pop(a, None)
                elif not self._promote([a], protect, strict=False):
                    self._wanted.pop(a, None)  # no room now; it stays in the host tier
            self._reap_loads()  # inline copies are done already
            if wait:
                for a in distinct:
                    e = self._res[a]
                    if e.pending is not None:
                        e.pending.wait()
                self._reap()
                failed = [a for a in distinct if a in self._errors]
                if failed:
                    exc = self._errors.pop(failed[0])
                    raise AdapterLoadError(f"loading adapter {failed[0]!r} failed: {exc!r}") from exc

            slot_of: dict[str, int] = {}
            entries: list[_Resident] = []
            for a in distinct:
                e = self._res.get(a)
                if e is not None and e.ready:
                    slot_of[a] = len(entries)
                    entries.append(e)
                    if e.refs == 0:
                        self._lru_remove(a)
                    e.refs += 1
            n_req = sum(1 for a in ids if a is not None)
            hits = sum(1 for a in ids if a is not None and a in was_ready)
            self._stats["hits"] += hits
            self._stats["misses"] += n_req - hits
            self._stats["requests"] += len(ids)
            self._stats["steps"] += 1
            self._steps_in_flight += 1
        slots = [slot_of.get(a, -1) if a is not None else -1 for a in ids]
        ready = [a is None or a in slot_of for a in ids]
        return Step(self, entries, slots, ready)

    def _release(self, entries: list[_Resident]) -> None:
        with self._lock:
            for e in entries:
                e.refs -= 1
                if e.refs == 0 and e.ready and self._res.get(e.id) is e:
                    self._lru_add(e)
            self._steps_in_flight -= 1

    # ------------------------------------------------------------------ tests and teardown

    def read_adapter(self, adapter_id: str) -> dict[str, LoraWeights]:
        """The weights as the fast tier holds them (a copy): module -> LoraWeights(a [r, in],
        b [out, r], scale), in the pool's dtype.  The adapter must be ready ("gpu")."""
        with self._lock:
            self._check_registered(adapter_id)
            e = self._res.get(adapter_id)
            if e is None or not e.ready:
                raise ValueError(f"adapter {adapter_id!r} is not in the fast tier (residency {self.residency(adapter_id)!r})")
            rows = {
                pid: self._views[pid].index_select(0, pages.to(self.device, torch.long)).cpu()
                for pid, pages in e.pages.items()
            }
            return self._to_adapter(rows, e.mods).modules

    def check_invariants(self) -> None:
        """Raises AssertionError/RuntimeError if any bookkeeping invariant is broken (for tests)."""
        with self._lock:
            self._alloc.check_invariants()
            owned: dict[int, set[int]] = {}
            for e in self._res.values():
                assert e.id in self._reg, f"{e.id} resident but not registered"
                for pid, pages in e.plist:
                    s = owned.setdefault(pid, set())
                    for p in pages.tolist():
                        assert p not in s, f"page {p} of pool {pid} owned twice"
                        s.add(p)
                assert (e.id in self._lru) == (e.ready and e.refs == 0 and e.id not in self._pinned), e.id
                assert (e.id in self._loading) == (not e.ready), e.id
            for pid in self._views:
                used = set(self._alloc.used_pages(pid).tolist())
                assert used == owned.get(pid, set()), f"pool {pid}: allocated pages != pages owned (leak)"
            assert self._lru_bytes == sum(self._res[a].nbytes for a in self._lru)
            assert self._host_bytes == sum(h.nbytes for h in self._host.values())
            if self.host_capacity_bytes is not None:
                assert self._host_bytes <= self.host_capacity_bytes
            assert set(self._lru) <= set(self._res)

    def close(self) -> None:
        """Waits for loads in flight and stops the worker threads."""
        with self._lock:
            self._closed = True
        self._fetcher.shutdown(wait=True)
        if self._copier is not None:
            self._copier.shutdown(wait=True)

    def __del__(self) -> None:
        try:
            self._fetcher.shutdown(wait=False)
            if self._copier is not None:
                self._copier.shutdown(wait=False)
        except Exception:
            pass


def _copy_rows(jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Runs on the CPU copy worker: scatters rows into their pages."""
    for view, pages, rows in jobs:
        view.index_copy_(0, pages.long(), rows)


class Step:
    """One step's view of the pool (see the module docstring).  Use as a context manager or
    call release(); until then the adapters it uses are not evicted."""

    def __init__(self, pool: AdapterPool, entries: list[_Resident], slots: list[int], ready: list[bool]) -> None:
        self._pool = pool
        self._entries = entries
        self._released = False
        self._tables: dict[str, ModuleTables] = {}
        self._plans: dict[int, tuple[torch.Tensor, BatchPlan]] = {}
        self._buf: Optional[tuple[torch.Tensor, int, int, int]] = None
        self.num_slots = len(entries)
        self.adapter_ids: list[str] = [e.id for e in entries]  # slot -> adapter id
        self.ready: list[bool] = ready
        self.request_slot: torch.Tensor = torch.tensor(slots, dtype=torch.int32).to(pool.device)

    def tables(self, module: str) -> ModuleTables:
        """The op arguments of `module` for this step (built once, then cached)."""
        t = self._tables.get(module)
        if t is not None:
            return t
        if self._released:
            raise RuntimeError("this step was released; its page tables may be reused")
        pool = self._pool
        mi = pool._index.get(module)
        if mi is None:
            raise KeyError(f"unknown module {module!r}; the pool's modules are e.g. {pool.module_names[:3]}")
        buf, M, S, R = self._build()
        n = M * S * R
        pa, pb = pool._mod_pools[mi]
        t = ModuleTables(
            a_pool=pool._views[pa],
            b_pool=pool._views[pb],
            a_pages=buf[:n].view(M, S, R)[mi],
            b_pages=buf[n : 2 * n].view(M, S, R)[mi],
            ranks=buf[2 * n : 2 * n + M * S].view(M, S)[mi],
            scales=buf[2 * n + M * S :].view(torch.float32).view(M, S)[mi],
        )
        self._tables[module] = t
        return t

    def _build(self) -> tuple[torch.Tensor, int, int, int]:
        """Every module's page tables at once, in one int32 buffer (one host->device copy):
        a_pages [M, S, R] | b_pages [M, S, R] | ranks [M, S] | scales [M, S] (float32 bits),
        with R the largest rank in the step.  Returns (buffer, M, S, R); built once per step.

        Vectorised over (slot, module) records: slot s's pages for module m are entries
        a_off..a_off+r of its adapter's pages of row length `in` (likewise B), no Python loop
        over modules or ranks."""
        if self._buf is not None:
            return self._buf
        pool = self._pool
        S, M, P = self.num_slots, len(pool.module_names), len(pool._views)
        if S:
            infos = [e.minfo for e in self._entries]
            cat = np.concatenate([i[0] for i in infos], axis=1)  # [4, K]: module, a_off, b_off, rank
            sc = np.concatenate([i[1] for i in infos])
            slot = np.repeat(np.arange(S), [i[1].shape[0] for i in infos])
        else:
            cat, sc, slot = np.zeros((4, 0), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        mi, ao, bo, r = cat
        R = int(r.max()) if r.size else 0
        n = M * S * R
        nbuf = np.zeros(2 * n + 2 * M * S, dtype=np.int32)
        if R:
            arrs = [e.npages.get(pid, _NO_PAGES) for pid in range(P) for e in self._entries]
            lens = np.fromiter((len(a) for a in arrs), np.int64, P * S)
            base = (np.cumsum(lens) - lens).reshape(P, S)
            flat = np.concatenate(arrs)
            within = np.arange(int(r.sum())) - np.repeat(np.cumsum(r) - r, r)
            dst = np.repeat(mi * (S * R) + slot * R, r) + within
            nbuf[:n][dst] = flat[np.repeat(base[pool._mod_pa[mi], slot] + ao, r) + within]
            nbuf[n : 2 * n][dst] = flat[np.repeat(base[pool._mod_pb[mi], slot] + bo, r) + within]
        nbuf[2 * n : 2 * n + M * S].reshape(M, S)[mi, slot] = r
        nbuf[2 * n + M * S :].view(np.float32).reshape(M, S)[mi, slot] = sc
        buf = torch.from_numpy(nbuf)
        if pool._cuda:
            buf = buf.pin_memory().to(pool.device, non_blocking=True)
        self._buf = (buf, M, S, R)
        return self._buf

    def plan(self, tokens_per_request: int) -> tuple[torch.Tensor, BatchPlan]:
        """(token_slot [B*L] int32, its BatchPlan) for L tokens per request, request i's L
        tokens consecutive."""
        L = int(tokens_per_request)
        if L < 0:
            raise ValueError(f"tokens_per_request must be >= 0, got {tokens_per_request}")
        got = self._plans.get(L)
        if got is None:
            token_slot = self.request_slot.repeat_interleave(L)
            got = (token_slot, build_plan(token_slot, self.num_slots))
            self._plans[L] = got
        return got

    def release(self) -> None:
        """Drops this step's references (idempotent)."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._entries)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
