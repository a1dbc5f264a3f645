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

Loads are asynchronous: source -> host copy runs on one of `load_workers` threads (never
under the pool's lock, so a source that blocks holds up only its own load and thread); host
-> fast tier runs on a side CUDA stream (on CPU: a copy thread, or inline when small).  A step
uses only adapters whose load has finished.  A file source is refused (`AdapterLoadError`)
from its safetensors header, before its data is read, when its tensors declare more bytes (in
the pool's dtype) than the fast tier holds.

Fast-tier eviction is LRU among adapters that are neither pinned nor referenced by an
unreleased `Step` nor loading; an evicted adapter keeps (or gets) a host copy while the host
tier (`host_capacity_bytes`, None = unbounded, 0 = none) has room, and the host tier's LRU
victims are written to `disk_dir` when their source is in memory (a loader callable or an
`Adapter`), else just dropped (they reload from their file).  Each pool writes into its own
new directory under `disk_dir`, and a spill file names its pool and adapter, so pools sharing
a `disk_dir` never read or delete each other's files; `close()` removes the directory.  When a
spill cannot be written (disk_dir unusable) the adapter keeps its source and reloads from it
(`stats()["spill_errors"]` counts these); a loader callable also stands behind its spill file.

Trainable adapters and optimizer state
--------------------------------------
``AdapterPool(..., optimizer_state=True)`` also allocates three float32 companion arenas
(``STATE_KINDS``: "grad", the gradient accumulator; "exp_avg" and "exp_avg_sq", Adam's moments)
with the weight arena's element count, so page p of row length d has its companions at the same
page of ``state_tensor(kind, d)`` ([P_d, d] float32): the same page tables address the weights
and their state, and a rank-1 adapter's state is as small as the adapter.  They come on top of
capacity_bytes: 3 * 4 / (the weights' element size) times capacity_bytes more memory.

``register(id, adapter, trainable=True, state=None)`` (the source must be an `Adapter`; `state`
an `AdapterState` holding any of the kinds, the others zero) makes an adapter whose pages change
in the fast tier (an optimizer writes them in place through ``Step.slot_pages()``).  The pool
copies its weights at once and holds the only up-to-date copy from then on: while it is ready in
the fast tier the pages are authoritative (its source is let go); eviction writes weights and
state back to the host tier (always, replacing any older copy) and a host-tier victim is spilled
to disk_dir with its state file, or, when there is no disk_dir or the write fails, kept in memory
as the adapter's source beyond the host budget.  A trainable adapter is never dropped and never
reloaded from an older copy; a step's references (and pins) keep it in place while it is used.
``read_state(id)`` returns the companions as an `AdapterState` (like ``read_adapter``).

Public API
----------
::

    pool = AdapterPool(modules, dtype=torch.float32, device="cpu", capacity_bytes=...,
                       host_capacity_bytes=None, max_slots=256, disk_dir=None,
                       chunk_bytes=None, poison=False, load_workers=4, optimizer_state=False)
    # a bad argument raises ValueError naming it (TypeError for dtype)
    # modules: module name (as in the model, "model.layers.0.self_attn.q_proj") -> (in, out)
    pool.register(adapter_id, source)    # metadata only, O(1); source: Adapter, a callable
                                         # returning one, or a path (safetensors file / PEFT dir)
    pool.register(adapter_id, adapter, trainable=True, state=None)   # optimizer_state pools
    pool.unregister(adapter_id)
    with pool.prepare(["u1", None, "u2", "u1"]) as step:   # one call per step
        step.request_slot   # [B] int32 on the pool's device; -1 for None or not ready
        step.ready          # [B] bools; None counts as ready
        step.num_slots      # S, the same for every module of the step
        step.host_request_slot   # [B] int32 numpy, the same on the host
        host = step.host_tables(module_names)   # every listed module's tables, on the host
        t = step.tables("model.layers.0.self_attn.q_proj")  # ModuleTables
        token_slot, plan = step.plan(tokens_per_request)     # [B*L] int32, BatchPlan
        minlora.ops.lora_add_(y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks,
                              t.scales, token_slot, plan=plan)
    pool.residency(adapter_id) -> "gpu" | "host" | "disk" | "unregistered"
    pool.pin(adapter_id); pool.unpin(adapter_id)   # a pinned adapter is never evicted
    pool.stats() -> dict                           # hits, misses, evictions, bytes per tier, ...
    pool.module_names: list[str]
    pool.modules: dict[str, tuple[int, int]]       # module name -> (in, out)
    # also: poll() (take in finished loads), read_adapter(id) (the weights as the fast tier
    # holds them), read_state(id), is_trainable(id), state_tensor(kind, row_length),
    # step.slot_pages(), pool_tensor(row_length), snapshot() (an immutable PoolSnapshot of the
    # bookkeeping: residents with refs / ready / pinned, LRU order, host tier, pages, bytes),
    # check_invariants(), close()

`Step.tables(module)` returns a `ModuleTables` (a_pool, b_pool, a_pages, b_pages, ranks,
scales: the op's arguments).  A step builds the tables of all modules at once, on first use,
in one int32 buffer (one host-to-device copy on CUDA); R is the step's largest rank over all
modules, ranks[s] = 0 where slot s's adapter does not target the module, and table entries
past ranks[s] are 0.  `Step.adapter_ids[s]` is the adapter in slot s.  Slots are numbered
0..S-1 in order of first appearance among the ready requests.  `step.plan(L)` is built on
the host (values checked there, its longest segment known) and copied without a host sync.

Fixed-capacity step buffers: `Step.host_tables(modules)` gives the same tables for a list of
modules on the host (`minlora.plan.HostTables`: [M, S, R] pages, [M, S] ranks and scales,
the pools, `host_request_slot`), which `minlora.plan.StepBuffers` (capacities max_slots,
max_rank, max_tokens, allocated once) checks and copies into its fixed tensors in one
host-to-device copy; slots past S get rank 0.  The patch reads only those buffers, so every
layer and every step uses the same tensors (a captured CUDA graph replays after a refill).

`prepare(ids, wait=False)` starts loads for what is missing and returns at once; with
``wait=True`` it returns when every named adapter is ready, and ``timeout=seconds`` bounds
the wait for sources: past it `LoadTimeoutError` (a TimeoutError) names the adapters still
loading, no step is made and no reference taken (the loads go on).  All adapters of one step must fit
in the fast tier together: when they cannot (even after evicting every evictable adapter)
prepare raises `PoolExhaustedError` and the fast tier, references and pins are unchanged.  A
load that failed raises `AdapterLoadError` from the prepare that waits for it (wait=True) or
from the next prepare naming the adapter (the one after that retries).

Steps hold a reference on each adapter they use until `release()` (or the end of their
``with`` block).  On CUDA, enqueue a step's kernels on the current stream before releasing
it: freeing pages records an event on the current stream, and the side stream writes freed
pages only after it, so kernels already queued keep reading valid weights; the host never
waits.  A released step's `tables()` and `plan()` raise RuntimeError (its pages may hold other
adapters by then); its plain fields stay readable.  A step dropped without release hands its
references back when it is collected (they count again from the next pool call).

Every method is thread-safe, and none waits for a source under the lock: `residency`,
`stats`, `prepare` of ready adapters and `Step.release` return promptly while a load is slow.
`close()` returns at once: it does not wait for a source that is still being read (that
thread ends when the source returns) and the worker threads never hold up the interpreter's
exit.

Per registered-but-unloaded adapter the pool keeps one dict entry (id -> source); nothing else.

Package layout (each object owns its state; the facade holds the lock and calls the others
with it held):

* ``layout.py``: `Layout`, immutable: modules, row lengths and allocator pool ids, the arena
  and its views, packing an adapter into rows (`PackedAdapter`) and back.
* ``fast_tier.py``: `FastTier`: the C++ page allocator, residents, LRU, pins and references,
  eviction planning, copies into pages (CPU copy worker / CUDA side stream, free fence).
* ``host_tier.py``: `HostTier`: the budgeted LRU of packed copies, staged copies, spill files.
* ``loader.py``: `Loader`: fetch workers, source -> packed copy, load errors; `load_source`
  is the one place a source becomes an `Adapter`.  ``workers.py``: daemon worker threads.
* ``tiers.py``: `Tiers`: the registry of sources and the moves between the tiers.
* ``options.py``: `PoolOptions`, the checked constructor arguments.
* ``step.py``: `Step`, built from the layout, the fast tier's residents and a release callback.
* `ModuleTables`, the op's argument bundle, comes from `minlora.ops`.  ``errors.py``, ``snapshot.py``.
* ``adapter_pool.py``: `AdapterPool`, the facade.
"""
from __future__ import annotations

from ..formats.native import load_adapter_file, save_adapter_file
from .adapter_pool import AdapterPool
from .errors import AdapterLoadError, LoadTimeoutError, PoolExhaustedError
from .layout import STATE_KINDS
from .snapshot import PoolSnapshot, ResidentState
from .step import Step
from ..ops import ModuleTables

__all__ = [
    "AdapterPool",
    "STATE_KINDS",
    "Step",
    "ModuleTables",
    "PoolExhaustedError",
    "AdapterLoadError",
    "LoadTimeoutError",
    "PoolSnapshot",
    "ResidentState",
    "save_adapter_file",
    "load_adapter_file",
]
