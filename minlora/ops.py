"""Typed wrappers over torch.ops.minlora.*, with their fake kernels and autograd.

Shapes (DESIGN.md, "The op contract"): x [T, in]; a_pool [Pa, in]; b_pool [Pb, out];
a_pages, b_pages [S, R] int32; ranks [S] int32; scales [S] float32; token_slot [T] int32
(-1 = no adapter).  The result is the LoRA delta [T, out]: y_t = scale_s B_s (A_s x_t).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)
from .plan import BatchPlan

__all__ = ["ModuleTables", "lora", "lora_add_", "lora_backward"]

_ops = torch.ops.minlora
Tensor = torch.Tensor


def _plan_tensors(plan: Optional[BatchPlan]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return (plan.order, plan.seg_offsets) if plan is not None else (None, None)


# ---------------------------------------------------------------- the op's argument bundle

@dataclass(frozen=True)
class ModuleTables:
    """The op arguments of one target module for one step (DESIGN.md, "The op contract").

    a_pool:  [Pa, in]  the shared pool of row length `in` (A rows)
    b_pool:  [Pb, out] the shared pool of row length `out` (B columns)
    a_pages: [S, R] int32, b_pages: [S, R] int32 (entries past ranks[s] are 0 and ignored)
    ranks:   [S] int32, 0 for a slot whose adapter does not target this module
    scales:  [S] float32
    """

    a_pool: Tensor
    b_pool: Tensor
    a_pages: Tensor
    b_pages: Tensor
    ranks: Tensor
    scales: Tensor


def lora(
    x: Tensor,
    a_pool: Tensor,
    b_pool: Tensor,
    a_pages: Tensor,
    b_pages: Tensor,
    ranks: Tensor,
    scales: Tensor,
    token_slot: Tensor,
    plan: Optional[BatchPlan] = None,
) -> Tensor:
    """The LoRA delta [T, out]; differentiable with respect to x, a_pool and b_pool.

    `plan` (from minlora.build_plan(token_slot, S)) saves rebuilding it in every layer.
    """
    order, seg = _plan_tensors(plan)
    return _ops.lora_forward(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg)


def lora_add_(
    y: Tensor,
    x: Tensor,
    a_pool: Tensor,
    b_pool: Tensor,
    a_pages: Tensor,
    b_pages: Tensor,
    ranks: Tensor,
    scales: Tensor,
    token_slot: Tensor,
    plan: Optional[BatchPlan] = None,
) -> Tensor:
    """y [T, out] += the LoRA delta, in place (no autograd); returns y."""
    order, seg = _plan_tensors(plan)
    _ops.lora_forward_add_(y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg)
    return y


def lora_backward(
    grad_y: Tensor,
    x: Tensor,
    a_pool: Tensor,
    b_pool: Tensor,
    a_pages: Tensor,
    b_pages: Tensor,
    ranks: Tensor,
    scales: Tensor,
    token_slot: Tensor,
    plan: Optional[BatchPlan] = None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]); None where output_mask is False.

    Only the pool pages the batch uses are non-zero.
    """
    order, seg = _plan_tensors(plan)
    grads = _ops.lora_backward(
        grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, list(output_mask)
    )
    return tuple(g if want else None for g, want in zip(grads, output_mask))  # type: ignore[return-value]


# ---------------------------------------------------------------- fake kernels (shape only)


@torch.library.register_fake("minlora::build_plan")
def _build_plan_fake(token_slot: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(token_slot), token_slot.new_empty(num_slots + 1)


_ARG_NAMES = ("x", "a_pool", "b_pool", "a_pages", "b_pages", "ranks", "scales", "token_slot", "order", "seg_offsets")


def _delta_fake(*args: Optional[Tensor]) -> Tensor:
    """Shape of the delta, after the checks that need no values (the real kernels check the rest)."""
    x, b_pool = args[0], args[2]
    for name, t in zip(_ARG_NAMES, args):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} must be on {x.device} like x, got {t.device}")
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [T, in] (flatten leading dims), got shape {tuple(x.shape)}")
    torch._check(b_pool.dim() == 2, lambda: f"b_pool must be 2-D [num_pages, row_length], got {tuple(b_pool.shape)}")
    return x.new_empty(x.shape[0], b_pool.shape[1])


@torch.library.register_fake("minlora::lora_forward")
def _lora_forward_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order=None, seg=None):
    return _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg)


@torch.library.register_fake("minlora::lora_forward_add_")
def _lora_forward_add_fake(y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order=None, seg=None):
    _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg)


@torch.library.register_fake("minlora::lora_backward")
def _lora_backward_fake(grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, mask):
    def grad(want: bool, like: Tensor) -> Tensor:
        return torch.empty_like(like, memory_format=torch.contiguous_format) if want else x.new_empty(0)

    return grad(mask[0], x), grad(mask[1], a_pool), grad(mask[2], b_pool)


# ---------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg = inputs
    ctx.has_plan = order is not None
    plan = (order, seg) if ctx.has_plan else ()
    ctx.save_for_backward(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *plan)


def _backward(ctx, grad_y: Tensor):
    x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *plan = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    order, seg = plan if ctx.has_plan else (None, None)
    gx, ga, gb = _ops.lora_backward(
        grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, mask
    )
    grads = [gx if mask[0] else None, ga if mask[1] else None, gb if mask[2] else None]
    return tuple(grads + [None] * (len(ctx.needs_input_grad) - 3))


torch.library.register_autograd("minlora::lora_forward", _backward, setup_context=_setup_context)
