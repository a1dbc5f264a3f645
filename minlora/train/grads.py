"""The gradient path of training: one forward and one backward for all rows of a batch, with
each adapter's dA / dB accumulated in float32 into its own gradient pages, and no dense
gradient of a whole pool ever made.

`GradientStep` wraps a pool Step for the patched model (`minlora.patching.use_step`): its
`lora_add` is what every patched layer calls while autograd records.  It runs the op's
accumulating forward (y += delta, in place) through `LoraGrad`, a custom autograd function
whose backward passes grad_y through to the base layer and calls the op's accumulating
backward (`minlora.ops.lora_backward_accumulate_`) once: grad_x when x needs it, and per slot s

    dB_s^T += scale_s * sum_t (A_s x_t) g_t^T      (rows of the `out` gradient pool)
    dA_s   += scale_s * sum_t (B_s^T g_t) x_t^T    (rows of the `in` gradient pool)

into the pages the batch's adapters hold (the same page numbers as their weights).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import ops
from ..ops import ModuleTables
from ..plan import BatchPlan, build_plan

__all__ = ["GradientStep", "LoraGrad"]


class LoraGrad(torch.autograd.Function):
    """y += lora(x), in place, with the adapters' gradients accumulated into gradient pages (see
    the module doc); the gradient of y passes through unchanged.

    `anchor` is a scalar that requires grad, so the result takes part in autograd even when
    neither x nor y does (the first patched layers of a frozen model).
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, t: ModuleTables,
                token_slot: torch.Tensor, plan: BatchPlan, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.args = (t, token_slot, plan, grad_a, grad_b)
        ops.lora_add_(y, x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot, plan=plan)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        t, token_slot, plan, grad_a, grad_b = ctx.args
        gx = ops.lora_backward_accumulate_(
            grad_a, grad_b, grad_y.contiguous(), x, t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales,
            token_slot, plan=plan, grad_x=ctx.needs_input_grad[1],
        )
        return grad_y, gx, None, None, None, None, None, None


class GradientStep:
    """A StepLike over a pool Step whose patched layers accumulate the adapters' gradients.

    grad_pool(row_length) -> the [P, row_length] float32 gradient pool (AdapterPool.state_tensor).
    The pool step stays the caller's to release.
    """

    def __init__(self, step: Any, grad_pool: Any) -> None:
        self._step = step
        self._grad_pool = grad_pool
        self._anchor = torch.zeros((), requires_grad=True)

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
            plan = build_plan(token_slot, int(t.ranks.shape[0]))
        grad_a = self._grad_pool(t.a_pool.shape[1])
        grad_b = self._grad_pool(t.b_pool.shape[1])
        if not y.is_contiguous():
            y = y.contiguous()
        # y first: autograd's in-place-on-a-view handling takes the first input as the one modified.
        return LoraGrad.apply(y, x, self._anchor, t, token_slot, plan, grad_a, grad_b)
