"""The op tests' cases: minlora.bench.cases's builder (random paged pools, page tables and
token assignments, NaN in unused pages, garbage past each rank), the tolerances against the
float64 reference, and the calls every op test makes.
"""
from __future__ import annotations

from typing import Optional

import torch

from minlora.bench.cases import LoraCase, make_case, rel_error

__all__ = ["TOLERANCE", "LoraCase", "make_case", "rel_error", "mixed_ranks", "opcheck_cases", "check_autograd",
           "run_forward"]

# Relative norm-wise error allowed against the float64 reference (DESIGN.md, Testing strategy).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def mixed_ranks() -> list[int]:
    """Ranks 1..128 mixed in one batch, with a rank-0 slot and repeats."""
    return [16, 1, 128, 0, 8, 64, 3, 16, 32, 2, 128, 7]


def opcheck_cases(device: str = "cpu", dtype: torch.dtype = torch.float32, num_tokens: int = 24) -> list[tuple]:
    """(op, args) for torch.library.opcheck: every torch.ops.minlora op, planned or not."""
    import minlora

    case = make_case(num_tokens, 16, 16, [3, 1, 4, 0], dtype, nan_unused=False, slot_weights=[9, 1, 2, 1]).to(device)
    plan = minlora.build_plan(case.token_slot, 4)
    y = torch.randn(num_tokens, 16, device=device).to(dtype)
    grad_y = torch.randn(num_tokens, 16, device=device).to(dtype)
    a = case.args()
    (x, ap, bp), rest = (t.clone().requires_grad_() for t in a[:3]), a[3:]
    ops = torch.ops.minlora
    acc = (torch.randn(case.a_pool.shape, device=device), torch.randn(case.b_pool.shape, device=device))
    return [
        (ops.build_plan, (case.token_slot, 4)),
        (ops.plan_positions, (plan.order,)),
        (ops.lora_forward, (x, ap, bp, *rest)),
        (ops.lora_forward_add_, (y, *a)),
        (ops.lora_forward, (x, ap, bp, *rest, plan.order, plan.seg_offsets)),
        (ops.lora_forward, (x, ap, bp, *rest, plan.order, plan.seg_offsets, plan.positions, 9)),
        (ops.lora_forward_add_, (y.clone(), *a, plan.order, plan.seg_offsets, plan.positions)),
        (ops.lora_backward, (grad_y, *a, None, None, [True, True, True])),
        (ops.lora_backward, (grad_y, *a, plan.order, plan.seg_offsets, [True, False, True], plan.positions, 9)),
        (ops.lora_backward_accumulate_, (*acc, grad_y, *a)),
        (ops.lora_backward_accumulate_, (acc[0].clone(), acc[1].clone(), grad_y, *a, plan.order, plan.seg_offsets,
                                         plan.positions, None, False)),
    ]


def check_autograd(case: LoraCase, planned: bool, tol: float) -> None:
    """minlora.lora's autograd gradients for x, a_pool and b_pool equal the float64 reference's."""
    import minlora
    from minlora.reference import lora_backward_ref

    x, a_pool, b_pool = (t.clone().requires_grad_() for t in case.args()[:3])
    plan = minlora.build_plan(case.token_slot, case.ranks.shape[0]) if planned else None
    y = minlora.lora(x, a_pool, b_pool, *case.args()[3:], plan=plan)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    want = lora_backward_ref(grad_y, *case.args())
    for got, w in zip((x.grad, a_pool.grad, b_pool.grad), want):
        assert rel_error(got, w) <= tol


def run_forward(case: LoraCase, variant: str, y0: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The op's delta through one of its four variants: functional, add, planned, planned_add
    (the add variants start from a copy of y0 and return it)."""
    import minlora

    args = case.args()
    plan = minlora.build_plan(case.token_slot, case.ranks.shape[0]) if variant.startswith("planned") else None
    if variant in ("functional", "planned"):
        return minlora.lora(*args, plan=plan)
    y = y0.clone()
    minlora.ops.lora_add_(y, *args, plan=plan)
    return y


def check_no_rank_columns_and_no_in_features(device: str) -> None:
    """Page tables of R = 0 columns (every slot rank 0) and x of in_features = 0: the forward
    gives zeros / adds nothing, grad_x is zero and the pool gradients get nothing, in every
    variant and dtype (on CUDA, scratch of such shapes has no element and no address)."""
    import minlora
    from minlora.reference import lora_backward_ref, lora_forward_ref

    for dtype in (torch.float32, torch.bfloat16):
        for case in (make_case(12, 32, 16, [0, 0], dtype, extra_rank_columns=0), make_case(12, 0, 16, [3, 2], dtype)):
            case = case.to(device)
            y0 = torch.full((12, 16), 1.5, dtype=dtype, device=device)
            for variant in ("functional", "add", "planned", "planned_add"):
                want = lora_forward_ref(*case.args()) + (1.5 if variant.endswith("add") else 0)
                got = run_forward(case, variant, y0)
                assert got.dtype == dtype and torch.equal(got.cpu().double(), want), (dtype, variant)
            grad_y = torch.randn(12, 16, device=device).to(dtype)
            want_grads = lora_backward_ref(grad_y, *case.args())
            for got, want in zip(minlora.ops.lora_backward(grad_y, *case.args()), want_grads):
                assert got.shape == want.shape and rel_error(got, want) <= TOLERANCE[dtype]
            grad_a = torch.full(case.a_pool.shape, 0.5, device=device)
            grad_b = torch.full(case.b_pool.shape, 0.25, device=device)
            grad_x = minlora.ops.lora_backward_accumulate_(grad_a, grad_b, grad_y, *case.args())
            assert grad_x.shape == case.x.shape and rel_error(grad_x, want_grads[0]) <= TOLERANCE[dtype]
            # Nothing to add: with R = 0 no slot has a rank; with in_features = 0, A x is zero.
            assert bool((grad_a == 0.5).all()) and bool((grad_b == 0.25).all())
