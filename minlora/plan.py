"""BatchPlan: the per-step token -> adapter-slot metadata, built once and shared by all layers;
StepBuffers: the fixed-capacity tensors a step's page tables and plan are refilled into."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)

__all__ = ["BatchPlan", "HostTables", "StepBuffers", "build_plan", "plan_positions"]


@dataclass(frozen=True)
class BatchPlan:
    """Tokens grouped by adapter slot.

    order:       [T] int32, a permutation of 0..T-1: the tokens of slot s are
                 order[seg_offsets[s]:seg_offsets[s + 1]], those with slot -1 come after
                 seg_offsets[S] (build_plan keeps each group in the tokens' original order).
    seg_offsets: [S + 1] int32, non-decreasing, seg_offsets[0] = 0.
    positions:   [T] int32 or None, the inverse of order (positions[order[q]] == q).  The CUDA
                 kernels trust a plan position only when positions agrees with it, so no
                 output row is ever written twice, whatever the plan holds; an op given a plan
                 without positions computes them (one small kernel per call).
    max_segment: the longest segment, when the caller knows it on the host (the step knows
                 its tokens per request), else None.  It decides which CUDA kernels are
                 launched (no grouped GEMM when every segment is short), never the results.

    The ops refuse a plan that is not such a permutation of its token_slot (ValueError naming
    order, seg_offsets or positions) when its tensors are on the CPU, or on CUDA with
    MINLORA_CHECK_INDICES=1; on CUDA otherwise nothing is read on the host, and the kernels
    skip the positions (or, in the grouped path, the segments) that do not match.

    Its sizes depend only on T and S, never on the assignment, so a plan held in fixed
    buffers can be refilled with `copy_` between replays of a captured CUDA graph.
    """

    order: torch.Tensor
    seg_offsets: torch.Tensor
    positions: Optional[torch.Tensor] = None
    max_segment: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return self.order.shape[0]

    @property
    def num_slots(self) -> int:
        return self.seg_offsets.shape[0] - 1

    def segment_lengths(self) -> torch.Tensor:
        """[S] int32: the number of tokens of each slot."""
        return self.seg_offsets[1:] - self.seg_offsets[:-1]

    def copy_(self, other: "BatchPlan") -> "BatchPlan":
        """Overwrites this plan's buffers with `other`'s (same T and S); returns self.

        positions are copied when both plans have them; this plan's max_segment (a host value,
        fixed with the buffers) is kept, and must bound `other`'s longest segment for the
        kernels it selects to be the fast ones (results are right either way)."""
        if other.order.shape != self.order.shape or other.seg_offsets.shape != self.seg_offsets.shape:
            raise ValueError(
                f"plan shapes differ: T={other.num_tokens}, S={other.num_slots} into "
                f"T={self.num_tokens}, S={self.num_slots}"
            )
        self.order.copy_(other.order, non_blocking=True)
        self.seg_offsets.copy_(other.seg_offsets, non_blocking=True)
        if self.positions is not None:
            src = other.positions if other.positions is not None else plan_positions(other.order)
            self.positions.copy_(src, non_blocking=True)
        return self


def plan_positions(order: torch.Tensor) -> torch.Tensor:
    """[T] int32: the inverse of the permutation `order` ([T] int32) on its device.

    On the CPU order is checked to be a permutation of 0..T-1 (ValueError); on CUDA it runs on
    the current stream without synchronising the host (entries outside 0..T-1 are skipped,
    tokens order misses get -1, and a repeated token keeps one of its positions).
    """
    return torch.ops.minlora.plan_positions(order)


def build_plan(token_slot: torch.Tensor, num_slots: int, max_segment: Optional[int] = None) -> BatchPlan:
    """Builds the plan of `token_slot` ([T] int32 in -1..num_slots-1) on its device, with its positions.

    On the CPU token_slot's values are checked (ValueError) and max_segment, when not given, is
    the plan's longest segment; on CUDA it runs on the current stream without synchronising the
    host, slots outside 0..num_slots-1 count as -1 (MINLORA_CHECK_INDICES=1 checks them on the
    host instead), and max_segment is what the caller says (None: unknown).
    """
    if max_segment is not None and max_segment < 0:
        raise ValueError(f"max_segment must be >= 0, got {max_segment}")
    order, seg_offsets = torch.ops.minlora.build_plan(token_slot, num_slots)
    # Read on the host only where that is free: CPU tensors, outside tracing (under
    # torch.compile the value would be data-dependent and turn into a graph break).
    if max_segment is None and seg_offsets.device.type == "cpu" and num_slots > 0 and not torch.compiler.is_compiling():
        max_segment = int((seg_offsets[1:] - seg_offsets[:-1]).max())
    return BatchPlan(order, seg_offsets, plan_positions(order), max_segment)


# ---------------------------------------------------------------- fixed-capacity step buffers


@dataclass(frozen=True)
class HostTables:
    """One step's page tables of a list of modules, on the host (what StepBuffers.load_tables copies).

    a_pages, b_pages: [M, S, R] int32, module i's tables for the step's S slots (entries past
                  ranks[i, s] are 0); R is the step's largest rank over these modules.
    ranks:        [M, S] int32 (0 where slot s's adapter does not target module i); scales: [M, S] float32.
    pools:        per module (a_pool [Pa, in], b_pool [Pb, out]), the device tensors the pages index.
    request_slot: [B] int32, the slot of each request (-1 = no adapter).
    """

    a_pages: np.ndarray
    b_pages: np.ndarray
    ranks: np.ndarray
    scales: np.ndarray
    pools: Sequence[tuple[torch.Tensor, torch.Tensor]]
    request_slot: np.ndarray


class StepBuffers:
    """Fixed-capacity device tensors that every step refills in place (DESIGN.md, "BatchPlan").

    Allocated once for M modules and capacities (max_slots S, max_rank R, max_tokens T):
        a_pages, b_pages [M, S, R] int32; ranks [M, S] int32; scales [M, S] float32;
        token_slot, order, positions [T] int32; seg_offsets [S + 1] int32.
    `tables(i)`, `token_slot_view(n)` and `plan(n)` are views of them, the same tensors for
    every step, so a CUDA graph captured over them replays with whatever the last refill wrote.

    load_tables / load_tokens check the host values (slots, ranks, pages, token slots and the
    plan) once per step, pack them into a host staging buffer (pinned on CUDA) and copy it to the
    device in one copy, then scatter it into the fixed tensors with a few device copies: no host
    synchronisation, and the number of copies does not depend on M.  Slots past the step's count
    get rank 0 and scale 0 (no adapter); page entries past a slot's rank are never read.

    Not thread-safe; refills are ordered on the current stream.
    """

    def __init__(self, num_modules: int, *, max_slots: int, max_rank: int, max_tokens: int,
                 device: torch.device | str) -> None:
        for name, v, lo in (("num_modules", num_modules, 0), ("max_slots", max_slots, 1),
                            ("max_rank", max_rank, 1), ("max_tokens", max_tokens, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        M, S, R, T = num_modules, max_slots, max_rank, max_tokens
        self.num_modules, self.max_slots, self.max_rank, self.max_tokens = M, S, R, T
        self.device = torch.device(device)
        n_pages, n_slots = M * S * R, M * S
        # Normal tensors even when made under torch.inference_mode, so later steps may refill
        # them outside it (an inference tensor refuses in-place updates there).
        with torch.inference_mode(False):
            fixed = torch.zeros(2 * n_pages + 2 * n_slots + 3 * T + S + 1, dtype=torch.int32, device=self.device)
            cuts = _cut(fixed, [n_pages, n_pages, n_slots, n_slots, T, T, T, S + 1])
            self.a_pages, self.b_pages = cuts[0].view(M, S, R), cuts[1].view(M, S, R)
            self.ranks, self.scales = cuts[2].view(M, S), cuts[3].view(torch.float32).view(M, S)
            self.token_slot, self.order, self.positions, self.seg_offsets = cuts[4:]
            self.token_slot.fill_(-1)
        self._cuda = self.device.type == "cuda"
        # Host staging (pinned on CUDA) in a ring of two, each reused only once the device copy
        # out of it has finished; and, on CUDA, the device buffer the staged data lands in.
        self._host: list[Optional[torch.Tensor]] = [None, None]
        self._events: list[Any] = [None, None]
        self._turn = 0
        self._device_stage: Optional[torch.Tensor] = None
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._pools: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self._page_limits = np.zeros((M, 2), dtype=np.int64)
        self.num_slots = 0  # slots the last load_tables filled

    def tables_view(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_pages [S, R], b_pages [S, R], ranks [S], scales [S]) of module i (views)."""
        return self.a_pages[i], self.b_pages[i], self.ranks[i], self.scales[i]

    def bind_pools(self, pools: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Records the pools the page tables index (module i's (a_pool, b_pool)); True when
        they changed (the caller's tables built on the old ones are stale)."""
        if len(pools) != self.num_modules:
            raise ValueError(f"{len(pools)} modules' pools for {self.num_modules} modules")
        old = self._pools
        if old is not None and all(a is c and b is d for (a, b), (c, d) in zip(old, pools)):
            return False
        self._pools = list(pools)
        self._page_limits = np.array([(a.shape[0], b.shape[0]) for a, b in pools], dtype=np.int64).reshape(-1, 2)
        return True

    def load_tables(self, host: HostTables) -> None:
        """Refills the page tables, ranks and scales from one step's host tables (checked here)."""
        M, S, R = host.a_pages.shape if host.a_pages.ndim == 3 else (self.num_modules, 0, 0)
        if M != self.num_modules or host.ranks.shape != (M, S) or host.scales.shape != (M, S):
            raise ValueError(f"host tables of shape {host.a_pages.shape} / {host.ranks.shape} for "
                             f"{self.num_modules} modules")
        if S > self.max_slots:
            raise ValueError(f"the step has {S} slots, more than the step buffers' max_slots = {self.max_slots}")
        if R > self.max_rank:
            raise ValueError(f"the step has rank {R}, more than the step buffers' max_rank = {self.max_rank}")
        self.bind_pools(host.pools)
        _check_tables(host, self._page_limits)
        n_pages, n_slots = M * S * R, M * S
        stage = self._stage(2 * n_pages + 2 * n_slots)
        parts = _cut(stage, [n_pages, n_pages, n_slots, n_slots])
        for dst, src in zip(parts, (host.a_pages, host.b_pages, host.ranks,
                                      np.ascontiguousarray(host.scales, dtype=np.float32).view(np.int32))):
            dst.numpy()[:] = np.ascontiguousarray(src).reshape(-1)
        parts = _cut(self._to_device(stage), [n_pages, n_pages, n_slots, n_slots])
        if R:
            self.a_pages[:, :S, :R].copy_(parts[0].view(M, S, R))
            self.b_pages[:, :S, :R].copy_(parts[1].view(M, S, R))
        if S:
            self.ranks[:, :S].copy_(parts[2].view(M, S))
            self.scales[:, :S].copy_(parts[3].view(torch.float32).view(M, S))
        if S < self.max_slots and self.num_slots > S:
            self.ranks[:, S:].zero_()
            self.scales[:, S:].zero_()
        self.num_slots = S

    def load_tokens(self, token_slot: np.ndarray, max_segment: Optional[int] = None) -> tuple[torch.Tensor, BatchPlan]:
        """Refills the token slots and the plan for token_slot ([n] int32 in -1..num_slots-1,
        checked here); returns (token_slot [n], BatchPlan) views of the fixed buffers.

        The plan is built on the host by build_plan (over all max_slots slots, so its shape does
        not depend on the step); max_segment is its longest segment (computed when None)."""
        n = int(token_slot.shape[0])
        if n > self.max_tokens:
            raise ValueError(f"this forward has {n} tokens, more than the step buffers' max_tokens = "
                             f"{self.max_tokens} (minlora.patch(..., max_tokens=...) sets it)")
        ts = torch.from_numpy(np.ascontiguousarray(token_slot, dtype=np.int32))
        if n and (int(ts.max()) >= self.num_slots or int(ts.min()) < -1):
            raise ValueError(f"token_slot values must be in -1..{self.num_slots - 1} (the step's slots)")
        host_plan = build_plan(ts, self.max_slots, max_segment)
        S1 = self.max_slots + 1
        stage = self._stage(3 * n + S1)
        parts = _cut(stage, [n, n, n, S1])
        for dst, src in zip(parts, (ts, host_plan.order, host_plan.positions, host_plan.seg_offsets)):
            dst.copy_(src)
        parts = _cut(self._to_device(stage), [n, n, n, S1])
        token_view, order_view, positions_view = self._token_views(n)
        for dst, src in zip((token_view, order_view, positions_view, self.seg_offsets), parts):
            dst.copy_(src)
        return token_view, BatchPlan(order_view, self.seg_offsets, positions_view, host_plan.max_segment)

    def _token_views(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The same view objects for every step with n tokens (compiled graphs see one tensor).
        got = self._views.get(n)
        if got is None:
            got = self._views[n] = (self.token_slot[:n], self.order[:n], self.positions[:n])
        return got

    def _stage(self, n: int) -> torch.Tensor:
        """A host int32 staging buffer of n entries, free to overwrite (its last copy is done)."""
        self._turn ^= 1 if self._cuda else 0
        k = self._turn
        event = self._events[k]
        if event is not None and not event.query():
            event.synchronize()  # the host is two refills ahead of the device: wait for it
        buf = self._host[k]
        if buf is None or buf.numel() < n:
            # Grows to the high-water mark (rarely); the staging is never read by a captured graph.
            with torch.inference_mode(False):
                buf = torch.empty(max(n, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.int32,
                                  pin_memory=self._cuda)
            self._host[k] = buf
        return buf[:n]

    def _to_device(self, stage: torch.Tensor) -> torch.Tensor:
        """stage on the buffers' device (one copy on CUDA, recorded so the staging is reused safely)."""
        if not self._cuda:
            return stage
        n = stage.numel()
        dev = self._device_stage
        if dev is None or dev.numel() < n:
            with torch.inference_mode(False):
                dev = self._device_stage = torch.empty(max(n, 2 * (dev.numel() if dev is not None else 0)),
                                                       dtype=torch.int32, device=self.device)
        dev = dev[:n]
        dev.copy_(stage, non_blocking=True)
        event = self._events[self._turn] = self._events[self._turn] or torch.cuda.Event()
        event.record()
        return dev


def _cut(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Consecutive 1-D pieces of `flat` of the given sizes (views)."""
    out, at = [], 0
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


def _check_tables(host: HostTables, page_limits: np.ndarray) -> None:
    """Index values of one step's tables, on the host: ranks in 0..R, every page a slot uses
    (j < rank) inside its module's pool, request slots in -1..S-1."""
    M, S = host.ranks.shape
    R = host.a_pages.shape[2] if host.a_pages.ndim == 3 else 0
    if host.ranks.size and (host.ranks.min() < 0 or host.ranks.max() > R):
        raise ValueError(f"ranks must be in 0..{R} (the tables' width)")
    if R:
        used = np.arange(R) < host.ranks[:, :, None]
        for k, pages in enumerate((host.a_pages, host.b_pages)):
            limit = page_limits[:, k].reshape(M, 1, 1)
            if ((pages < 0) | (pages >= limit))[used].any():
                raise ValueError(f"{'ab'[k]}_pages name a page outside the module's pool")
    rs = host.request_slot
    if rs.size and (rs.min() < -1 or rs.max() >= S):
        raise ValueError(f"request_slot values must be in -1..{S - 1}")
