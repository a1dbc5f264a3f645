"""The pool's immutable layout: target modules, row lengths, the arena and its views, page packing."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
import torch

from ..formats.adapter import Adapter, LoraWeights, check_adapter
from ..formats.state import AdapterState, check_state

__all__ = ["STATE_KINDS", "Layout", "PackedAdapter", "choose_chunk_bytes"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The float32 companions of every weight page in a pool made with optimizer_state=True, in the
# order of the companion arena's first dimension.
STATE_KINDS = ("grad", "exp_avg", "exp_avg_sq")

# module index -> (a_off, b_off, rank, scale)
ModulePlacement = dict[int, tuple[int, int, int, float]]


class PackedAdapter:
    """An adapter in page layout, in the pool's dtype (a host-tier copy, or one in flight).

    rows: allocator pool id -> [n, d] (all the adapter's rows of that length, module after
          module: A rows of modules with in = d, B columns (B^T rows) of modules with out = d);
    mods: module index -> (a_off, b_off, r, scale): module mi's A is rows[pa][a_off:a_off+r] and
          its B^T is rows[pb][b_off:b_off+r].
    state: None, or (a trainable adapter's companions) allocator pool id -> [len(STATE_KINDS),
          n, d] float32, row i of state[pid][k] the companion of rows[pid][i]; None = all zero.
    Copies and page allocation work per row length, not per module (a model has hundreds).
    """

    __slots__ = ("rows", "mods", "state", "nbytes", "minfo", "flat_pools")

    def __init__(
        self, rows: dict[int, torch.Tensor], mods: ModulePlacement, state: Optional[dict[int, torch.Tensor]] = None
    ) -> None:
        self.rows = rows
        self.mods = mods
        self.state = state
        self.nbytes = sum(t.nbytes for t in rows.values()) + sum(t.nbytes for t in (state or {}).values())
        # Packed once here and shared by every residency of this copy (see Resident.minfo/flat):
        # (int64 [4, k]: module index, a_off, b_off, rank; float32 [k]: scale).
        self.minfo = (
            np.array([(mi, m[0], m[1], m[2]) for mi, m in mods.items()], dtype=np.int64).reshape(-1, 4).T.copy(),
            np.array([m[3] for m in mods.values()], dtype=np.float32),
        )
        # The allocator pool of each of the adapter's pages, in page order.
        self.flat_pools = np.repeat(
            np.array(list(rows), dtype=np.int32), np.array([t.shape[0] for t in rows.values()], dtype=np.int64)
        )

    def requests(self) -> list[tuple[int, int]]:
        """The allocator requests for this adapter's pages: [(pool id, rows)]."""
        return [(pid, t.shape[0]) for pid, t in self.rows.items()]


def choose_chunk_bytes(row_bytes: list[int], capacity: int, elem: int) -> int:
    """A chunk size that every row length fits well in (see csrc/pool/page_allocator.h).

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


def _check_modules(modules: Mapping[str, tuple[int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
    if not isinstance(modules, Mapping) or len(modules) == 0:
        raise ValueError("modules must be a non-empty mapping: module name -> (in_features, out_features)")
    names, features = [], []
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
        names.append(name)
        features.append((fin, fout))
    return names, features


class Layout:
    """What never changes after construction: the modules, the row lengths and their allocator
    pool ids, the arena and its [P_d, d] views, and how an adapter is packed into rows.

    Pool ids are 0..len(row_lengths)-1 in increasing row length: the fast tier adds its
    allocator's pools in that order.  The view of row length d is [arena_bytes // (d * elem), d]
    (the allocator's page count for that row size).
    """

    def __init__(
        self,
        modules: Mapping[str, tuple[int, int]],
        *,
        dtype: torch.dtype,
        device: torch.device,
        capacity_bytes: int,
        chunk_bytes: Optional[int],
        poison: bool,
        optimizer_state: bool = False,
    ) -> None:
        self.module_names, self.features = _check_modules(modules)
        self.index = {n: i for i, n in enumerate(self.module_names)}
        self.dtype = dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.row_lengths = sorted({d for f in self.features for d in f})
        self.row_bytes = [d * self.elem for d in self.row_lengths]  # indexed by pool id
        if chunk_bytes is None:
            chunk_bytes = choose_chunk_bytes(self.row_bytes, capacity_bytes, self.elem)
        if chunk_bytes % self.elem:
            raise ValueError(f"chunk_bytes ({chunk_bytes}) must be a multiple of the element size {self.elem}")
        self.chunk_bytes = chunk_bytes
        self.arena_bytes = capacity_bytes // chunk_bytes * chunk_bytes
        if self.arena_bytes == 0:
            raise ValueError(
                f"capacity_bytes = {capacity_bytes} is less than one allocator chunk ({chunk_bytes} bytes) "
                f"for rows of {max(self.row_bytes)} bytes"
            )
        self.arena = torch.empty(self.arena_bytes // self.elem, dtype=dtype, device=device)
        if poison:
            self.arena.fill_(float("nan"))
        self.pool_of_length = {d: pid for pid, d in enumerate(self.row_lengths)}
        self.num_pages = [self.arena_bytes // rb for rb in self.row_bytes]
        self.views = [self.arena[: n * d].view(n, d) for n, d in zip(self.num_pages, self.row_lengths)]
        # optimizer_state: float32 companion arenas with the weight arena's page numbering (page
        # p of row length d is elements [p*d, (p+1)*d) of each), one per STATE_KINDS entry.
        self.state_arena: Optional[torch.Tensor] = None
        self.state_views: list[torch.Tensor] = []  # pool id -> [len(STATE_KINDS), P, d]
        if optimizer_state:
            elems = self.arena.numel()
            self.state_arena = torch.empty(len(STATE_KINDS), elems, dtype=torch.float32, device=device)
            if poison:
                self.state_arena.fill_(float("nan"))
            self.state_views = [
                self.state_arena[:, : n * d].view(len(STATE_KINDS), n, d)
                for n, d in zip(self.num_pages, self.row_lengths)
            ]
        self.mod_pools = [(self.pool_of_length[fi], self.pool_of_length[fo]) for fi, fo in self.features]
        self.mod_pa = np.array([p[0] for p in self.mod_pools], dtype=np.int64)
        self.mod_pb = np.array([p[1] for p in self.mod_pools], dtype=np.int64)

    @property
    def num_pools(self) -> int:
        return len(self.row_lengths)

    def pool_tensor(self, row_length: int) -> torch.Tensor:
        """The shared [P, row_length] pool of that row length."""
        if row_length not in self.pool_of_length:
            raise ValueError(f"no module has a row length of {row_length}; lengths: {self.row_lengths}")
        return self.views[self.pool_of_length[row_length]]

    def state_tensor(self, kind: str, row_length: int) -> torch.Tensor:
        """The [P, row_length] float32 companion pool of `kind` (same page numbers as the weights)."""
        if self.state_arena is None:
            raise ValueError("this pool keeps no optimizer state (create it with optimizer_state=True)")
        if kind not in STATE_KINDS:
            raise ValueError(f"kind must be one of {STATE_KINDS}, got {kind!r}")
        self.pool_tensor(row_length)  # ValueError for a row length no module has
        return self.state_views[self.pool_of_length[row_length]][STATE_KINDS.index(kind)]

    def check_adapter(self, adapter: Adapter, what: str) -> None:
        """Raises TypeError/ValueError if `adapter` does not fit this pool's modules."""
        check_adapter(adapter, what)
        for name, w in adapter.modules.items():
            if name not in self.index:
                raise ValueError(
                    f"{what} targets module {name!r}, which this pool does not know "
                    f"(it has {len(self.module_names)} modules, e.g. {self.module_names[:3]})"
                )
            fin, fout = self.features[self.index[name]]
            if w.a.shape[1] != fin or w.b.shape[0] != fout:
                raise ValueError(
                    f"{what}: module {name!r} has a {tuple(w.a.shape)} and b {tuple(w.b.shape)}, "
                    f"expected a [r, {fin}] and b [{fout}, r]"
                )

    def requests_of(self, adapter: Adapter) -> list[tuple[int, int]]:
        """The allocator requests [(pool id, rows)] of a (checked) adapter, without packing it."""
        count: dict[int, int] = {}
        for name, w in adapter.modules.items():
            if w.rank > 0:
                pa, pb = self.mod_pools[self.index[name]]
                count[pa] = count.get(pa, 0) + w.rank
                count[pb] = count.get(pb, 0) + w.rank
        return list(count.items())

    def pack(self, adapter: Adapter) -> PackedAdapter:
        """A (checked) adapter in page layout: per row length, module order; per module its A
        rows, then its B^T rows (the order `requests_of` counts in)."""
        count: dict[int, int] = {}
        parts: dict[int, list[torch.Tensor]] = {}
        mods: ModulePlacement = {}
        same = True  # every tensor already has the pool dtype and lives on the CPU
        for name, w in adapter.modules.items():
            r = w.rank
            if r == 0:
                continue
            mi = self.index[name]
            pa, pb = self.mod_pools[mi]
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
            out = torch.empty(n, self.row_lengths[pid], dtype=self.dtype, pin_memory=self.cuda)
            if same:
                torch.cat(parts[pid], out=out)  # one copy for all modules of this row length
            else:
                o = 0
                for t in parts[pid]:
                    out[o : o + t.shape[0]].copy_(t)
                    o += t.shape[0]
            rows[pid] = out
        return PackedAdapter(rows, mods)

    def unpack(self, rows: dict[int, torch.Tensor], mods: ModulePlacement) -> Adapter:
        """The Adapter whose packed rows are `rows` (CPU tensors; copied out)."""
        out = {}
        for mi, (ao, bo, r, scale) in mods.items():
            pa, pb = self.mod_pools[mi]
            a = rows[pa][ao : ao + r].clone()
            b = rows[pb][bo : bo + r].t().clone(memory_format=torch.contiguous_format)
            out[self.module_names[mi]] = LoraWeights(a, b, scale)
        return Adapter(out)

    def read_rows(self, pages: dict[int, torch.Tensor], pin: bool = False) -> dict[int, torch.Tensor]:
        """The arena rows at `pages` (pool id -> int32 pages), copied to the host."""
        return self._read(self.views, 0, pages, pin)

    def read_state_rows(self, pages: dict[int, torch.Tensor], pin: bool = False) -> dict[int, torch.Tensor]:
        """The companion rows at `pages`: pool id -> [len(STATE_KINDS), n, d] float32 on the host."""
        return self._read(self.state_views, 1, pages, pin)

    def _read(self, views: list[torch.Tensor], dim: int, pages: dict[int, torch.Tensor], pin: bool) -> dict:
        out = {}
        for pid, p in pages.items():
            idx = p.to(self.device, torch.long)
            if dim == 0:
                t = views[pid].index_select(0, idx)
            else:  # per kind: index_select along dim 1 of the [K, P, d] view is slow on CPU
                t = torch.stack([v.index_select(0, idx) for v in views[pid]])
            t = t.cpu()
            out[pid] = t.pin_memory() if pin else t
        return out

    # ------------------------------------------------------------------ companion state

    def pack_state(self, state: AdapterState, mods: ModulePlacement, what: str) -> dict[int, torch.Tensor]:
        """`state` (checked against the placement `mods` of the adapter's packed weights) in
        companion-row layout: pool id -> [len(STATE_KINDS), n, d] float32; kinds it lacks are 0."""
        check_state(state, what)
        placed = {self.module_names[mi]: m for mi, m in mods.items()}
        counts: dict[int, int] = {}
        for mi, (ao, bo, r, _) in mods.items():
            pa, pb = self.mod_pools[mi]
            counts[pa] = max(counts.get(pa, 0), ao + r)
            counts[pb] = max(counts.get(pb, 0), bo + r)
        out = {pid: torch.zeros(len(STATE_KINDS), n, self.row_lengths[pid], pin_memory=self.cuda)
               for pid, n in counts.items()}
        for name, kinds in state.modules.items():
            if name not in placed:
                raise ValueError(f"{what}: module {name!r} is not one of the adapter's modules")
            ao, bo, r, _ = placed[name]
            fin, fout = self.features[self.index[name]]
            pa, pb = self.mod_pools[self.index[name]]
            for kind, (a, b) in kinds.items():
                if kind not in STATE_KINDS:
                    raise ValueError(f"{what}: module {name!r}: kind {kind!r} is not one of {STATE_KINDS}")
                if tuple(a.shape) != (r, fin) or tuple(b.shape) != (fout, r):
                    raise ValueError(
                        f"{what}: module {name!r} kind {kind!r} has a {tuple(a.shape)} and b {tuple(b.shape)}, "
                        f"expected a [{r}, {fin}] and b [{fout}, {r}] like the weights"
                    )
                k = STATE_KINDS.index(kind)
                out[pa][k, ao : ao + r].copy_(a)
                out[pb][k, bo : bo + r].copy_(b.t())
        return out

    def pack_trainable(self, adapter: object, state: Optional[AdapterState], what: str) -> PackedAdapter:
        """A trainable adapter's packed copy (its registered source): weights and state checked."""
        if self.state_arena is None:
            raise ValueError(f"{what}: trainable=True needs a pool made with optimizer_state=True")
        if not isinstance(adapter, Adapter):
            raise TypeError(f"{what}: a trainable adapter's source must be an Adapter, got {type(adapter).__name__}")
        self.check_adapter(adapter, what)
        packed = self.pack(adapter)
        if state is None:
            return packed
        return PackedAdapter(packed.rows, packed.mods, self.pack_state(state, packed.mods, f"{what} state"))

    def unpack_state(self, state: dict[int, torch.Tensor], mods: ModulePlacement) -> AdapterState:
        """The AdapterState (every kind) of companion rows in the layout of `mods` (copied out)."""
        out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for mi, (ao, bo, r, _) in mods.items():
            pa, pb = self.mod_pools[mi]
            out[self.module_names[mi]] = {
                kind: (state[pa][k, ao : ao + r].clone(),
                       state[pb][k, bo : bo + r].t().clone(memory_format=torch.contiguous_format))
                for k, kind in enumerate(STATE_KINDS)
            }
        return AdapterState(out)
