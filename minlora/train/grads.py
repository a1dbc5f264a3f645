"""The gradient path of training: one forward and one backward for all rows of a batch, with
each adapter's dA / dB accumulated in float32 into its own gradient pages, and no dense
gradient of a whole pool ever made.

`GradientStep` wraps a pool Step for the patched model (`minlora.patching.use_step`): its
`lora_delta` is what every patched layer calls while autograd records.  It runs the op's
forward through `LoraGrad`, a custom autograd function whose backward computes grad_x with the
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

# Per slot with tokens: (slot, rank, scale, token rows [n] int64, A pages [r] int64, B pages [r] int64)
Segment = tuple[int, int, float, torch.Tensor, torch.Tensor, torch.Tensor]


def accumulate_lora_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    segments: list[Segment],
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
) -> None:
    """grad_a [Pa, in] / grad_b [Pb, out] (float32) += each segment's dA_s / dB_s^T rows.

    grad_y [T, out], x [T, in] (any float dtype; products in float32), a_pool [Pa, in],
    b_pool [Pb, out] the weights; only the segments' pages are touched."""
    for _, _, scale, rows, a_idx, b_idx in segments:
        xs = x.index_select(0, rows).float()
        gs = grad_y.index_select(0, rows).float()
        a = a_pool.index_select(0, a_idx).float()  # A_s [r, in]
        bt = b_pool.index_select(0, b_idx).float()  # B_s^T [r, out]
        h = xs @ a.t()  # [n, r] = A_s x_t
        u = gs @ bt.t()  # [n, r] = B_s^T g_t
        grad_a.index_add_(0, a_idx, (u.t() @ xs).mul_(scale))
        grad_b.index_add_(0, b_idx, (h.t() @ gs).mul_(scale))


class LoraGrad(torch.autograd.Function):
    """delta = lora(x) with the adapters' gradients accumulated into gradient pages (see module doc).

    `anchor` is a scalar that requires grad, so the delta takes part in autograd even when
    neither x nor anything else feeding it does (the first patched layer of a frozen model).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, t: ModuleTables, token_slot: torch.Tensor,
                plan: BatchPlan, segments: list[Segment], grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.args = (t, token_slot, plan, segments, grad_a, grad_b)
        return ops.lora(x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot, plan=plan)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        t, token_slot, plan, segments, grad_a, grad_b = ctx.args
        grad_y = grad_y.contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            gx, _, _ = ops.lora_backward(
                grad_y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot,
                plan=plan, output_mask=(True, False, False),
            )
        accumulate_lora_grads(grad_y, x, t.a_pool, t.b_pool, segments, grad_a, grad_b)
        return gx, None, None, None, None, None, None, None


class GradientStep:
    """A StepLike over a pool Step whose patched layers accumulate the adapters' gradients.

    grad_pool(row_length) -> the [P, row_length] float32 gradient pool (AdapterPool.state_tensor).
    The pool step stays the caller's to release.
    """

    def __init__(self, step: Any, grad_pool: Any) -> None:
        self._step = step
        self._grad_pool = grad_pool
        self._anchor = torch.zeros((), requires_grad=True)
        self._segments: dict[tuple[str, int], tuple[BatchPlan, list[Segment]]] = {}
        self._plans: dict[int, tuple[BatchPlan, list[tuple[int, int, int]]]] = {}

    @property
    def num_slots(self) -> int:
        return self._step.num_slots

    @property
    def request_slot(self) -> torch.Tensor:
        return self._step.request_slot

    def tables(self, module: str) -> ModuleTables:
        return self._step.tables(module)

    def release(self) -> None:
        self._step.release()

    def lora_delta(self, module: str, x: torch.Tensor, t: ModuleTables, token_slot: torch.Tensor,
                   plan: Optional[BatchPlan]) -> torch.Tensor:
        """The module's delta [T, out] for x [T, in], differentiable as described above."""
        if plan is None:
            from ..plan import build_plan

            plan = build_plan(token_slot, int(t.ranks.shape[0]))
        segments = self._module_segments(module, t, plan)
        grad_a = self._grad_pool(t.a_pool.shape[1])
        grad_b = self._grad_pool(t.b_pool.shape[1])
        return LoraGrad.apply(x, self._anchor, t, token_slot, plan, segments, grad_a, grad_b)

    def _plan_segments(self, plan: BatchPlan) -> list[tuple[int, int, int]]:
        """(slot, start, end) of every non-empty segment of the plan (read to the host once)."""
        key = id(plan)
        hit = self._plans.get(key)
        if hit is None or hit[0] is not plan:
            seg = plan.seg_offsets.tolist()
            hit = (plan, [(s, seg[s], seg[s + 1]) for s in range(len(seg) - 1) if seg[s + 1] > seg[s]])
            self._plans[key] = hit
        return hit[1]

    def _module_segments(self, module: str, t: ModuleTables, plan: BatchPlan) -> list[Segment]:
        key = (module, id(plan))
        hit = self._segments.get(key)
        if hit is not None and hit[0] is plan:
            return hit[1]
        ranks = t.ranks.tolist()
        scales = t.scales.tolist()
        order = plan.order.long()
        segments = []
        for s, lo, hi in self._plan_segments(plan):
            r = ranks[s]
            if r > 0:
                segments.append((s, r, scales[s], order[lo:hi], t.a_pages[s, :r].long(), t.b_pages[s, :r].long()))
        self._segments[key] = (plan, segments)
        return segments
