"""The gradient path of training: one forward and one backward for all rows of a batch, with
each adapter's dA / dB accumulated in float32 into its own gradient pages, and no dense
gradient of a whole pool ever made.

`GradientStep` wraps a pool Step for the patched model (`minlora.patching.use_step`): its
`lora_add` is what every patched layer calls while autograd records.  It runs the op's
accumulating forward (y += delta, in place) through `LoraGrad`, a custom autograd function
whose backward passes grad_y through to the base layer, computes grad_x with the
op (`lora_backward`, output_mask (True, False, False)) and hands dA, dB to
`accumulate_lora_grads`, the one place they are computed: per slot segment,

    dB_s^T += scale_s * sum_t (A_s x_t) g_t^T      (rows of the `out` gradient pool)
    dA_s   += scale_s * sum_t (B_s^T g_t) x_t^T    (rows of the `in` gradient pool)

into the pages the batch's adapters hold (the same page numbers as their weights).  A native
accumulate op can replace that function without changing anything else.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from ..ops import ModuleTables
from ..plan import BatchPlan

__all__ = ["GradientStep", "LoraGrad", "accumulate_lora_grads"]

# Slot segments of one length n and one rank r, batched: (token rows [G, n] int64, A pages
# [G, r] int64, B pages [G, r] int64, scales [G, 1, 1] float32, the first row when the rows are
# one run of consecutive tokens (else -1)).
SegmentGroup = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def accumulate_lora_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    groups: list[SegmentGroup],
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
) -> None:
    """grad_a [Pa, in] / grad_b [Pb, out] (float32) += each segment's dA_s / dB_s^T rows.

    grad_y [T, out], x [T, in] (any float dtype; products in float32), a_pool [Pa, in],
    b_pool [Pb, out] the weights; groups: the segments, batched by (length, rank).  Only the
    segments' pages are touched."""
    for rows, a_idx, b_idx, scale, run in groups:
        G, n = rows.shape
        xs, gs = _gather(x, rows, run), _gather(grad_y, rows, run)  # [G, n, in], [G, n, out]
        a = a_pool.index_select(0, a_idx.reshape(-1)).float().view(G, -1, xs.shape[2])  # A_s [G, r, in]
        bt = b_pool.index_select(0, b_idx.reshape(-1)).float().view(G, -1, gs.shape[2])  # B_s^T [G, r, out]
        h = torch.bmm(xs, a.transpose(1, 2))  # [G, n, r] = A_s x_t
        u = torch.bmm(gs, bt.transpose(1, 2))  # [G, n, r] = B_s^T g_t
        d_a = torch.bmm(u.transpose(1, 2), xs).mul_(scale)  # [G, r, in]
        d_bt = torch.bmm(h.transpose(1, 2), gs).mul_(scale)  # [G, r, out]
        # index_put_(accumulate=True), not index_add_: on a view of a large arena, CPU
        # index_add_ costs time in the arena's size, not the rows'.
        grad_a.index_put_((a_idx.reshape(-1),), d_a.flatten(0, 1), accumulate=True)
        grad_b.index_put_((b_idx.reshape(-1),), d_bt.flatten(0, 1), accumulate=True)


def _gather(t: torch.Tensor, rows: torch.Tensor, run: int) -> torch.Tensor:
    """t[rows] as float32 [G, n, d]; a view, with no copy, when the rows are the run of
    consecutive tokens starting at `run` (each batch row its own adapter)."""
    G, n = rows.shape
    picked = t.narrow(0, run, G * n) if run >= 0 else t.index_select(0, rows.reshape(-1))
    return picked.float().view(G, n, -1)


class LoraGrad(torch.autograd.Function):
    """y += lora(x), in place, with the adapters' gradients accumulated into gradient pages (see
    the module doc); the gradient of y passes through unchanged.

    `anchor` is a scalar that requires grad, so the result takes part in autograd even when
    neither x nor y does (the first patched layers of a frozen model).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, t: ModuleTables,
                token_slot: torch.Tensor, plan: BatchPlan, segments: list[SegmentGroup], grad_a: torch.Tensor,
                grad_b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.args = (t, token_slot, plan, segments, grad_a, grad_b)
        ops.lora_add_(y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot, plan=plan)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        t, token_slot, plan, segments, grad_a, grad_b = ctx.args
        grad_y = grad_y.contiguous()
        gx = None
        if ctx.needs_input_grad[1]:
            gx, _, _ = ops.lora_backward(
                grad_y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot,
                plan=plan, output_mask=(True, False, False),
            )
        accumulate_lora_grads(grad_y, x, t.a_pool, t.b_pool, segments, grad_a, grad_b)
        return grad_y, gx, None, None, None, None, None, None, None


class GradientStep:
    """A StepLike over a pool Step whose patched layers accumulate the adapters' gradients.

    grad_pool(row_length) -> the [P, row_length] float32 gradient pool (AdapterPool.state_tensor).
    The pool step stays the caller's to release.
    """

    def __init__(self, step: Any, grad_pool: Any) -> None:
        self._step = step
        self._grad_pool = grad_pool
        self._anchor = torch.zeros((), requires_grad=True)
        self._segments: dict[tuple[str, int], tuple[BatchPlan, list[SegmentGroup]]] = {}
        self._plans: dict[int, tuple[BatchPlan, list[tuple[int, int, int]]]] = {}

    @property
    def num_slots(self) -> int:
        return self._step.num_slots

    @property
    def request_slot(self) -> torch.Tensor:
        return self._step.request_slot

    def tables(self, module: str) -> ModuleTables:
        return self._step.tables(module)

    def host_tables(self, modules: Any) -> Any:
        return self._step.host_tables(modules)

    def release(self) -> None:
        self._step.release()

    def lora_add(self, module: str, x: torch.Tensor, y: torch.Tensor, t: ModuleTables, token_slot: torch.Tensor,
                 plan: Optional[BatchPlan]) -> torch.Tensor:
        """y [T, out] (the base layer's output) + the module's delta for x [T, in], differentiable
        as described above; y is updated in place (a fresh tensor, or a view of one)."""
        if plan is None:
            from ..plan import build_plan

            plan = build_plan(token_slot, int(t.ranks.shape[0]))
        segments = self._module_segments(module, t, plan)
        grad_a = self._grad_pool(t.a_pool.shape[1])
        grad_b = self._grad_pool(t.b_pool.shape[1])
        if not y.is_contiguous():
            y = y.contiguous()
        # y first: autograd's in-place-on-a-view handling takes the first input as the one modified.
        return LoraGrad.apply(y, x, self._anchor, t, token_slot, plan, segments, grad_a, grad_b)

    def _plan_segments(self, plan: BatchPlan) -> list[tuple[int, int, int]]:
        """(slot, start, end) of every non-empty segment of the plan (read to the host once)."""
        key = id(plan)
        hit = self._plans.get(key)
        if hit is None or hit[0] is not plan:
            seg = plan.seg_offsets.tolist()
            hit = (plan, [(s, seg[s], seg[s + 1]) for s in range(len(seg) - 1) if seg[s + 1] > seg[s]])
            self._plans[key] = hit
        return hit[1]

    def _module_segments(self, module: str, t: ModuleTables, plan: BatchPlan) -> list[SegmentGroup]:
        """The module's segments with a non-zero rank, batched by (length, rank)."""
        key = (module, id(plan))
        hit = self._segments.get(key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        ranks = t.ranks.tolist()
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for s, lo, hi in self._plan_segments(plan):
            if ranks[s] > 0:
                by_shape.setdefault((hi - lo, ranks[s]), []).append((s, lo))
        order = plan.order.long()
        groups = []
        for (n, r), members in by_shape.items():
            slots = torch.tensor([s for s, _ in members], device=order.device)
            starts = torch.tensor([lo for _, lo in members], device=order.device)
            rows = order[starts[:, None] + torch.arange(n, device=order.device)]
            scale = t.scales.index_select(0, slots).view(-1, 1, 1)
            first = int(rows[0, 0])
            run = first if bool((rows.reshape(-1) == torch.arange(first, first + rows.numel(),
                                                                  device=rows.device)).all()) else -1
            groups.append((rows, t.a_pages.index_select(0, slots)[:, :r].long(),
                           t.b_pages.index_select(0, slots)[:, :r].long(), scale, run))
        self._segments[key] = (plan, groups)
        return groups
