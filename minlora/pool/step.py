"""Step: one step's slots and page tables over the pool's fast tier."""
from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..plan import BatchPlan, build_plan
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
        self.num_slots = len(entries)
        self.adapter_ids: list[str] = [e.id for e in entries]  # slot -> adapter id
        self.ready: list[bool] = ready
        self.request_slot: torch.Tensor = torch.tensor(list(slots), dtype=torch.int32).to(layout.device)

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
        with R the largest rank in the step.  Returns (buffer, M, S, R); built once per step.

        Vectorised over (slot, module) records: slot s's pages for module m are entries
        a_off..a_off+r of its adapter's pages of row length `in` (likewise B), no Python loop
        over modules or ranks."""
        if self._buf is not None:
            return self._buf
        layout = self._layout
        S, M, P = self.num_slots, len(layout.module_names), layout.num_pools
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
            nbuf[:n][dst] = flat[np.repeat(base[layout.mod_pa[mi], slot] + ao, r) + within]
            nbuf[n : 2 * n][dst] = flat[np.repeat(base[layout.mod_pb[mi], slot] + bo, r) + within]
        nbuf[2 * n : 2 * n + M * S].reshape(M, S)[mi, slot] = r
        nbuf[2 * n + M * S :].view(np.float32).reshape(M, S)[mi, slot] = sc
        buf = torch.from_numpy(nbuf)
        if layout.cuda:
            buf = buf.pin_memory().to(layout.device, non_blocking=True)
        self._buf = (buf, M, S, R)
        return self._buf

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
        tokens consecutive."""
        self._check_live()
        L = int(tokens_per_request)
        if L < 0:
            raise ValueError(f"tokens_per_request must be >= 0, got {tokens_per_request}")
        got = self._plans.get(L)
        if got is None:
            token_slot = self.request_slot.repeat_interleave(L)
            got = (token_slot, build_plan(token_slot, self.num_slots))
            self._plans[L] = got
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
