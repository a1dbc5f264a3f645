"""Step: one step's slots and page tables over the pool's fast tier."""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..plan import BatchPlan, HostTables, build_plan
from .fast_tier import Resident
from .layout import Layout
from ..ops import ModuleTables

__all__ = ["Step"]

_NO_PAGES = np.zeros(0, dtype=np.int32)


class Step:
    """One step's view of the pool (see minlora/pool/__init__.py).  Use as a context manager or
    call release(); until then the adapters it uses are not evicted.

    Built by AdapterPool.prepare from the layout, the residents of its ready adapters (slot s is
    entries[s]; the pool has taken one reference on each) and `release(entries, dropped)`, which
    hands the references back exactly once: from release() (dropped=False), or from the garbage
    collector (dropped=True, any thread, possibly while the pool's lock is held) when the step
    is dropped unreleased.

    After release, tables() and plan() raise RuntimeError (the pages may hold other adapters
    by then); num_slots, adapter_ids, ready and request_slot stay readable.
    """

    def __init__(
        self,
        layout: Layout,
        entries: list[Resident],
        slots: Sequence[int],
        ready: list[bool],
        release: Callable[[list[Resident], bool], None],
    ) -> None:
        self._layout = layout
        self._entries = entries
        self._released = False
        self._release = weakref.finalize(self, release, entries, True)
        self._release.atexit = False
        self._tables: dict[str, ModuleTables] = {}
        self._plans: dict[int, tuple[torch.Tensor, BatchPlan]] = {}
        self._buf: Optional[tuple[torch.Tensor, int, int, int]] = None
        self._host: dict[tuple[str, ...], HostTables] = {}
        self._request_slot: Optional[torch.Tensor] = None
        self.num_slots = len(entries)
        self.adapter_ids: list[str] = [e.id for e in entries]  # slot -> adapter id
        self.ready: list[bool] = ready
        self.host_request_slot: np.ndarray = np.array(list(slots), dtype=np.int32)  # [B], on the host

    @property
    def request_slot(self) -> torch.Tensor:
        """[B] int32 on the pool's device: the slot of each request, -1 = none (copied on first use,
        without synchronising the host)."""
        if self._request_slot is None:
            t = torch.from_numpy(self.host_request_slot)
            if self._layout.cuda:
                t = t.pin_memory().to(self._layout.device, non_blocking=True)
            self._request_slot = t
        return self._request_slot

    def tables(self, module: str) -> ModuleTables:
        """The op arguments of `module` for this step (built once, then cached)."""
        self._check_live()
        t = self._tables.get(module)
        if t is not None:
            return t
        layout = self._layout
        mi = layout.index.get(module)
        if mi is None:
            raise KeyError(f"unknown module {module!r}; the pool's modules are e.g. {layout.module_names[:3]}")
        buf, M, S, R = self._build()
        n = M * S * R
        pa, pb = layout.mod_pools[mi]
        t = ModuleTables(
            a_pool=layout.views[pa],
            b_pool=layout.views[pb],
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
        with R the largest rank in the step.  Returns (buffer, M, S, R); built once per step."""
        if self._buf is not None:
            return self._buf
        a, b, ranks, scales = self._host_arrays(None)
        M, S, R = a.shape
        nbuf = np.concatenate([a.reshape(-1), b.reshape(-1), ranks.reshape(-1), scales.view(np.int32).reshape(-1)])
        buf = torch.from_numpy(nbuf)
        if self._layout.cuda:
            buf = buf.pin_memory().to(self._layout.device, non_blocking=True)
        self._buf = (buf, M, S, R)
        return self._buf

    def host_tables(self, modules: Sequence[str]) -> HostTables:
        """The page tables of `modules` (in that order) for this step, on the host: what
        `minlora.plan.StepBuffers.load_tables` refills fixed-capacity buffers from.  R is the
        step's largest rank over these modules."""
        self._check_live()
        layout = self._layout
        key = tuple(modules)
        got = self._host.get(key)
        if got is None:
            idx = []
            for m in key:
                mi = layout.index.get(m)
                if mi is None:
                    raise KeyError(f"unknown module {m!r}; the pool's modules are e.g. {layout.module_names[:3]}")
                idx.append(mi)
            pools = [(layout.views[layout.mod_pools[mi][0]], layout.views[layout.mod_pools[mi][1]]) for mi in idx]
            got = HostTables(*self._host_arrays(np.array(idx, dtype=np.int64)), pools=pools,
                             request_slot=self.host_request_slot)
            self._host[key] = got
        return got

    def _host_arrays(self, modules: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(a_pages [M, S, R], b_pages [M, S, R], ranks [M, S] int32, scales [M, S] float32) of
        the layout's modules `modules` (indices, in that order; None = all), R their largest rank.

        Vectorised over (slot, module) records: slot s's pages for module m are entries
        a_off..a_off+r of its adapter's pages of row length `in` (likewise B), no Python loop
        over modules or ranks."""
        layout = self._layout
        S, P = self.num_slots, layout.num_pools
        n_mod = len(layout.module_names)
        if S:
            infos = [e.minfo for e in self._entries]
            cat = np.concatenate([i[0] for i in infos], axis=1)  # [4, K]: module, a_off, b_off, rank
            sc = np.concatenate([i[1] for i in infos])
            slot = np.repeat(np.arange(S), [i[1].shape[0] for i in infos])
        else:
            cat, sc, slot = np.zeros((4, 0), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
        if modules is None:
            row = np.arange(n_mod)
        else:  # layout module index -> row of the result, -1 for modules not asked for
            row = np.full(n_mod, -1, dtype=np.int64)
            row[modules] = np.arange(len(modules))
        keep = row[cat[0]] >= 0
        cat, sc, slot = cat[:, keep], sc[keep], slot[keep]
        mi, ao, bo, r = cat
        out = row[mi]
        M = n_mod if modules is None else len(modules)
        R = int(r.max()) if r.size else 0
        a = np.zeros((M, S, R), dtype=np.int32)
        b = np.zeros((M, S, R), dtype=np.int32)
        if R:
            arrs = [e.npages.get(pid, _NO_PAGES) for pid in range(P) for e in self._entries]
            lens = np.fromiter((len(x) for x in arrs), np.int64, P * S)
            base = (np.cumsum(lens) - lens).reshape(P, S)
            flat = np.concatenate(arrs)
            within = np.arange(int(r.sum())) - np.repeat(np.cumsum(r) - r, r)
            dst = np.repeat(out * (S * R) + slot * R, r) + within
            a.reshape(-1)[dst] = flat[np.repeat(base[layout.mod_pa[mi], slot] + ao, r) + within]
            b.reshape(-1)[dst] = flat[np.repeat(base[layout.mod_pb[mi], slot] + bo, r) + within]
        ranks = np.zeros((M, S), dtype=np.int32)
        scales = np.zeros((M, S), dtype=np.float32)
        ranks[out, slot] = r
        scales[out, slot] = sc
        return a, b, ranks, scales

    def slot_pages(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every page the step's adapters hold, per row length d: (pages [N] int64, slot [N]
        int64), on the pool's device; rows of `AdapterPool.pool_tensor(d)` (and of its state
        companions).  What an optimizer needs to update the step's adapters in place."""
        self._check_live()
        layout = self._layout
        out = {}
        for pid, d in enumerate(layout.row_lengths):
            arrs = [e.npages.get(pid, _NO_PAGES) for e in self._entries]
            if sum(len(a) for a in arrs) == 0:
                continue
            pages = torch.from_numpy(np.concatenate(arrs).astype(np.int64))
            slots = torch.from_numpy(np.repeat(np.arange(len(arrs), dtype=np.int64), [len(a) for a in arrs]))
            out[d] = (pages.to(layout.device), slots.to(layout.device))
        return out

    def plan(self, tokens_per_request: int) -> tuple[torch.Tensor, BatchPlan]:
        """(token_slot [B*L] int32, its BatchPlan) for L tokens per request, request i's L
        tokens consecutive.  Built on the host (values checked there, the longest segment known)
        and copied to the pool's device without synchronising the host."""
        self._check_live()
        L = int(tokens_per_request)
        if L < 0:
            raise ValueError(f"tokens_per_request must be >= 0, got {tokens_per_request}")
        got = self._plans.get(L)
        if got is None:
            rs = self.host_request_slot
            counts = np.bincount(rs[rs >= 0], minlength=1)
            token_slot = torch.from_numpy(np.repeat(rs, L))
            plan = build_plan(token_slot, self.num_slots, max_segment=int(counts.max()) * L)
            if self._layout.cuda:
                token_slot, plan = _to_device((token_slot, plan), self._layout.device)
            got = self._plans[L] = (token_slot, plan)
        return got

    def _check_live(self) -> None:
        if self._released:
            raise RuntimeError("this step was released; its page tables may be reused")

    def release(self) -> None:
        """Drops this step's references (idempotent)."""
        if self._released:
            return
        self._released = True
        got = self._release.detach()
        if got is not None:
            _, release, (entries, _), _ = got
            release(entries, False)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> "Step":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _to_device(host: tuple[torch.Tensor, BatchPlan], device: torch.device) -> tuple[torch.Tensor, BatchPlan]:
    """A host (token_slot, plan) on `device`, in one pinned non-blocking copy."""
    token_slot, plan = host
    parts = [token_slot, plan.order, plan.positions, plan.seg_offsets]
    flat = torch.cat(parts).pin_memory().to(device, non_blocking=True)
    ts, order, positions, seg = flat.split([p.numel() for p in parts])
    return ts, BatchPlan(order, seg, positions, plan.max_segment)
