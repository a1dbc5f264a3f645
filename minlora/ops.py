"""Typed wrappers over torch.ops.minlora.*, with their fake kernels and autograd.

Shapes (DESIGN.md, "The op contract"): x [T, in]; a_pool [Pa, in]; b_pool [Pb, out];
a_pages, b_pages [S, R] int32; ranks [S] int32; scales [S] float32; token_slot [T] int32
(-1 = no adapter).  The result is the LoRA delta [T, out]: y_t = scale_s B_s (A_s x_t).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import _C  # registers torch.ops.minlora.*
from .plan import BatchPlan

__all__ = ["ModuleTables", "lora", "lora_add_", "lora_backward", "lora_backward_accumulate_",
           "set_cpu_min_parallel_work"]

_ops = torch.ops.minlora
Tensor = torch.Tensor


def _plan_args(plan: Optional[BatchPlan]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[int]]:
    """(order, seg_offsets, positions, max_segment) of the ops' schemas."""
    if plan is None:
        return None, None, None, None
    return plan.order, plan.seg_offsets, plan.positions, plan.max_segment


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
    x: Tensor, a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor, ranks: Tensor,
    scales: Tensor, token_slot: Tensor, plan: Optional[BatchPlan] = None,
) -> Tensor:
    """The LoRA delta [T, out]; differentiable with respect to x, a_pool and b_pool.

    `plan` (from minlora.build_plan(token_slot, S)) saves rebuilding it in every layer.
    """
    return _ops.lora_forward(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *_plan_args(plan))


def lora_add_(
    y: Tensor, x: Tensor, a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor, ranks: Tensor,
    scales: Tensor, token_slot: Tensor, plan: Optional[BatchPlan] = None,
) -> Tensor:
    """y [T, out] += the LoRA delta, in place (no autograd); returns y."""
    _ops.lora_forward_add_(y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *_plan_args(plan))
    return y


def lora_backward(
    grad_y: Tensor, x: Tensor, a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor,
    ranks: Tensor, scales: Tensor, token_slot: Tensor, plan: Optional[BatchPlan] = None,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]); None where output_mask is False.

    Only the pool pages the batch uses are non-zero.  The pool gradients are dense tensors of
    the pools' dtype; training accumulates into float32 pages with lora_backward_accumulate_.
    """
    order, seg, positions, max_segment = _plan_args(plan)
    grads = _ops.lora_backward(
        grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, list(output_mask),
        positions, max_segment,
    )
    return tuple(g if want else None for g, want in zip(grads, output_mask))  # type: ignore[return-value]


def lora_backward_accumulate_(
    grad_a_acc: Tensor, grad_b_acc: Tensor, grad_y: Tensor, x: Tensor, a_pool: Tensor, b_pool: Tensor,
    a_pages: Tensor, b_pages: Tensor, ranks: Tensor, scales: Tensor, token_slot: Tensor,
    plan: Optional[BatchPlan] = None, grad_x: bool = True,
) -> Optional[Tensor]:
    """Adds the batch's adapter gradients into float32 pages; returns grad_x [T, in] (None if not asked).

    grad_a_acc [Pa, in] and grad_b_acc [Pb, out] are float32 and numbered like the pools: for
    every slot s and j < ranks[s],
        grad_a_acc[a_pages[s, j]] += scale_s * sum_{t of s} (B_s^T g_t)_j x_t
        grad_b_acc[b_pages[s, j]] += scale_s * sum_{t of s} (A_s x_t)_j g_t
    (pages shared by slots or rank indices get every contribution).  No other row is touched.
    """
    order, seg, positions, max_segment = _plan_args(plan)
    gx = _ops.lora_backward_accumulate_(
        grad_a_acc, grad_b_acc, grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot,
        order, seg, positions, max_segment, grad_x,
    )
    return gx if grad_x else None


def set_cpu_min_parallel_work(multiply_adds: int) -> int:
    """Sets the work (multiply-adds) below which a CPU op call runs on the calling thread, with
    no parallel region; returns the previous threshold.

    The default, 2^25 (about 3 ms on one core; MINLORA_CPU_MIN_PARALLEL_WORK overrides it at
    load), keeps the op's cost steady on a machine shared with other processes, where a
    parallel region ends only when a thread on a busy core has been scheduled (milliseconds).
    A process that has its cores to itself can lower it, so that decode-sized calls use every
    core (where another busy process shares them, lowering it makes those calls slower).
    """
    if isinstance(multiply_adds, bool) or not isinstance(multiply_adds, int) or multiply_adds < 0:
        raise ValueError(f"multiply_adds must be a non-negative integer, got {multiply_adds!r}")
    return int(_C.set_cpu_min_parallel_work(multiply_adds))


def _min_parallel_work_from_environment() -> None:
    text = os.environ.get("MINLORA_CPU_MIN_PARALLEL_WORK", "").strip()
    if not text:
        return
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"MINLORA_CPU_MIN_PARALLEL_WORK must be a non-negative integer, got {text!r}")
    set_cpu_min_parallel_work(value)


_min_parallel_work_from_environment()


# ---------------------------------------------------------------- fake kernels (shape only)


@torch.library.register_fake("minlora::build_plan")
def _build_plan_fake(token_slot: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    return torch.empty_like(token_slot), token_slot.new_empty(num_slots + 1)


@torch.library.register_fake("minlora::plan_positions")
def _plan_positions_fake(order: Tensor) -> Tensor:
    return torch.empty_like(order)


_ARG_NAMES = ("x", "a_pool", "b_pool", "a_pages", "b_pages", "ranks", "scales", "token_slot", "order", "seg_offsets",
              "positions")


def _check_devices(x: Tensor, named: dict[str, Optional[Tensor]]) -> None:
    """Every given tensor is on x's device (the C++ checks never run when one is on meta)."""
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name} must be on {x.device} like x, got {t.device}")


def _delta_fake(*args: Optional[Tensor], **extra: Tensor) -> Tensor:
    """Shape of the delta, after the checks that need no values (the real kernels check the rest)."""
    x, b_pool = args[0], args[2]
    _check_devices(x, {**dict(zip(_ARG_NAMES, args)), **extra})
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [T, in] (flatten leading dims), got shape {tuple(x.shape)}")
    torch._check(b_pool.dim() == 2, lambda: f"b_pool must be 2-D [num_pages, row_length], got {tuple(b_pool.shape)}")
    return x.new_empty(x.shape[0], b_pool.shape[1])


@torch.library.register_fake("minlora::lora_forward")
def _lora_forward_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order=None, seg=None,
                       positions=None, max_segment=None):
    return _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, positions)


@torch.library.register_fake("minlora::lora_forward_add_")
def _lora_forward_add_fake(
    y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order=None, seg=None, positions=None,
    max_segment=None,
):
    _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, positions, y=y)


@torch.library.register_fake("minlora::lora_backward")
def _lora_backward_fake(grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, mask,
                        positions=None, max_segment=None):
    _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, positions, grad_y=grad_y)

    def grad(want: bool, like: Tensor) -> Tensor:
        return torch.empty_like(like, memory_format=torch.contiguous_format) if want else x.new_empty(0)

    return grad(mask[0], x), grad(mask[1], a_pool), grad(mask[2], b_pool)


@torch.library.register_fake("minlora::lora_backward_accumulate_")
def _lora_backward_accumulate_fake(grad_a_acc, grad_b_acc, grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks,
                                   scales, token_slot, order=None, seg=None, positions=None, max_segment=None,
                                   grad_x=True):
    _delta_fake(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, positions,
                grad_y=grad_y, grad_a_acc=grad_a_acc, grad_b_acc=grad_b_acc)
    return torch.empty_like(x, memory_format=torch.contiguous_format) if grad_x else x.new_empty(0)


# ---------------------------------------------------------------- autograd
#
# The forward's gradients are lora_backward; lora_backward's own gradients (double backward)
# are the same two ops again, on the cotangents in place of the operands they are linear in:
#   grad_x = s A^T B^T g,  grad_a = s (B^T g) x^T,  grad_b = s g (A x)^T   (per slot, pages as in the forward)
# so for cotangents (cx, ca, cb) of (grad_x, grad_a, grad_b):
#   d grad_y = fwd(cx; A, B) + fwd(x; ca, B) + fwd(x; A, cb)
#   d x      = bwd_x(g, x; ca, B) + bwd_x(g, x; A, cb)
#   d a_pool = bwd_a(g, cx; A, B) + bwd_a(g, x; A, cb)
#   d b_pool = bwd_b(g, cx; A, B) + bwd_b(g, x; ca, B)
# Both ops being differentiable, any order of derivative follows.


def _setup_context(ctx, inputs, output) -> None:
    x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, positions, max_segment = inputs
    ctx.has_plan = order is not None
    ctx.has_positions = positions is not None
    ctx.max_segment = max_segment
    plan = (order, seg) if ctx.has_plan else ()
    plan += (positions,) if ctx.has_positions else ()
    ctx.save_for_backward(x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *plan)


def _backward(ctx, grad_y: Tensor):
    x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, *plan = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    order, seg = plan[:2] if ctx.has_plan else (None, None)
    positions = plan[2] if ctx.has_positions else None
    gx, ga, gb = _ops.lora_backward(
        grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, mask, positions,
        ctx.max_segment,
    )
    grads = [gx if mask[0] else None, ga if mask[1] else None, gb if mask[2] else None]
    return tuple(grads + [None] * (len(ctx.needs_input_grad) - 3))


torch.library.register_autograd("minlora::lora_forward", _backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output) -> None:
    grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot, order, seg, mask, positions, max_seg = inputs
    ctx.mask = tuple(bool(m) for m in mask)
    ctx.tables = (a_pages, b_pages, ranks, scales, token_slot, order, seg)
    ctx.plan_extra = (positions, max_seg)
    ctx.save_for_backward(grad_y, x, a_pool, b_pool)


def _backward_of_backward(ctx, cx: Optional[Tensor], ca: Optional[Tensor], cb: Optional[Tensor]):
    g, x, a_pool, b_pool = ctx.saved_tensors
    positions, max_seg = ctx.plan_extra
    # Cotangents of outputs the mask left out (empty tensors) are ignored.
    cx, ca, cb = (c.contiguous() if c is not None and m else None for c, m in zip((cx, ca, cb), ctx.mask))
    want_g, want_x, want_a, want_b = ctx.needs_input_grad[:4]
    tables = ctx.tables

    def fwd(v: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return _ops.lora_forward(v, a, b, *tables, positions, max_seg)

    def bwd(v: Tensor, a: Tensor, b: Tensor, out: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
        return _ops.lora_backward(g, v, a, b, *tables, list(out), positions, max_seg)

    def total(*terms: Optional[Tensor]) -> Optional[Tensor]:
        present = [t for t in terms if t is not None]
        return sum(present[1:], present[0]) if present else None

    d_g = None
    if want_g:
        d_g = total(fwd(cx, a_pool, b_pool) if cx is not None else None,
                    fwd(x, ca, b_pool) if ca is not None else None,
                    fwd(x, a_pool, cb) if cb is not None else None)
    from_cx = bwd(cx, a_pool, b_pool, (False, want_a, want_b)) if cx is not None and (want_a or want_b) else None
    from_ca = bwd(x, ca, b_pool, (want_x, False, want_b)) if ca is not None and (want_x or want_b) else None
    from_cb = bwd(x, a_pool, cb, (want_x, want_a, False)) if cb is not None and (want_x or want_a) else None

    def part(grads: Optional[tuple[Tensor, Tensor, Tensor]], k: int, want: bool) -> Optional[Tensor]:
        return grads[k] if grads is not None and want else None

    d_x = total(part(from_ca, 0, want_x), part(from_cb, 0, want_x))
    d_a = total(part(from_cx, 1, want_a), part(from_cb, 1, want_a))
    d_b = total(part(from_cx, 2, want_b), part(from_ca, 2, want_b))
    return (d_g, d_x, d_a, d_b) + (None,) * (len(ctx.needs_input_grad) - 4)


torch.library.register_autograd("minlora::lora_backward", _backward_of_backward,
                                setup_context=_setup_backward_context)
