"""Random LoRA op cases for the tests: paged pools, page tables and token assignments.

Every case is drawn fresh.  Pool pages no slot uses are NaN, so a kernel that reads a
wrong page poisons its output; page-table entries past a slot's rank hold garbage
(including out-of-range values), since they must never be read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# Relative norm-wise error allowed against the float64 reference (DESIGN.md, Testing strategy).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass
class LoraCase:
    x: torch.Tensor  # [T, in]
    a_pool: torch.Tensor  # [Pa, in]
    b_pool: torch.Tensor  # [Pb, out]
    a_pages: torch.Tensor  # [S, R] int32
    b_pages: torch.Tensor  # [S, R] int32
    ranks: torch.Tensor  # [S] int32
    scales: torch.Tensor  # [S] float32
    token_slot: torch.Tensor  # [T] int32

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.a_pool, self.b_pool, self.a_pages, self.b_pages, self.ranks, self.scales, self.token_slot)

    def to(self, device: str) -> "LoraCase":
        return LoraCase(*(t.to(device) for t in self.args()))

    @property
    def used_a_pages(self) -> torch.Tensor:
        return _used_pages(self.a_pages, self.ranks, self.a_pool.shape[0])

    @property
    def used_b_pages(self) -> torch.Tensor:
        return _used_pages(self.b_pages, self.ranks, self.b_pool.shape[0])


def _used_pages(pages: torch.Tensor, ranks: torch.Tensor, num_pages: int) -> torch.Tensor:
    """[P] bool: pages some slot refers to below its rank."""
    used = torch.zeros(num_pages, dtype=torch.bool)
    for s in range(ranks.shape[0]):
        used[pages[s, : int(ranks[s])].long().cpu()] = True
    return used


def make_case(
    num_tokens: int,
    in_features: int,
    out_features: int,
    ranks: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    extra_rank_columns: int = 3,
    spare_pages: int = 5,
    slot_weights: Optional[Sequence[float]] = None,
    no_adapter_fraction: float = 0.15,
    nan_unused: bool = True,
    generator: Optional[torch.Generator] = None,
) -> LoraCase:
    """A case with S = len(ranks) slots; tokens are assigned to slots at random (unsorted).

    slot_weights: relative token counts per slot (default uniform), so that some segments
    are long and some short.  Pages are shuffled across the pool, so a slot's pages are
    neither contiguous nor in order.
    """
    g = generator or torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    num_slots = len(ranks)
    width = max([0, *ranks]) + extra_rank_columns
    total = sum(ranks)
    num_a = total + spare_pages
    num_b = total + spare_pages
    a_pool = torch.randn(num_a, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    b_pool = torch.randn(num_b, out_features, generator=g, dtype=torch.float64)
    # Garbage past each rank: in range, negative and past the end, none of which may be read.
    garbage = torch.tensor([-7, num_a + 100, 0, -1, 2**30], dtype=torch.int32)
    a_pages = garbage[torch.randint(0, len(garbage), (num_slots, width), generator=g)]
    b_pages = garbage[torch.randint(0, len(garbage), (num_slots, width), generator=g)]
    a_perm = torch.randperm(num_a, generator=g).to(torch.int32)
    b_perm = torch.randperm(num_b, generator=g).to(torch.int32)
    at = 0
    for s, r in enumerate(ranks):
        a_pages[s, :r] = a_perm[at : at + r]
        b_pages[s, :r] = b_perm[at : at + r]
        at += r
    case = LoraCase(
        x=torch.randn(num_tokens, in_features, generator=g, dtype=torch.float64),
        a_pool=a_pool,
        b_pool=b_pool,
        a_pages=a_pages,
        b_pages=b_pages,
        ranks=torch.tensor(list(ranks), dtype=torch.int32),
        scales=(torch.rand(num_slots, generator=g) * 2 + 0.25).to(torch.float32),
        token_slot=_assign(num_tokens, num_slots, slot_weights, no_adapter_fraction, g),
    )
    if nan_unused:
        case.a_pool[~case.used_a_pages] = float("nan")
        case.b_pool[~case.used_b_pages] = float("nan")
    case.x = case.x.to(dtype)
    case.a_pool = case.a_pool.to(dtype)
    case.b_pool = case.b_pool.to(dtype)
    return case


def _assign(num_tokens, num_slots, slot_weights, no_adapter_fraction, g) -> torch.Tensor:
    if num_slots == 0:
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    weights = torch.tensor(slot_weights if slot_weights is not None else [1.0] * num_slots, dtype=torch.float64)
    slots = torch.multinomial(weights, num_tokens, replacement=True, generator=g) if num_tokens else torch.empty(0)
    slots = slots.to(torch.int32)
    none = torch.rand(num_tokens, generator=g) < no_adapter_fraction
    slots[none] = -1
    return slots


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (absolute when want is 0)."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    denom = want.norm().item()
    err = (got - want).norm().item()
    return err / denom if denom > 0 else err


def mixed_ranks() -> list[int]:
    """Ranks 1..128 mixed in one batch, with a rank-0 slot and repeats."""
    return [16, 1, 128, 0, 8, 64, 3, 16, 32, 2, 128, 7]


def opcheck_cases(device: str = "cpu", dtype: torch.dtype = torch.float32, num_tokens: int = 24) -> list[tuple]:
    """(op, args) for torch.library.opcheck: every torch.ops.minlora op, planned or not."""
    import minlora  # noqa: F401  (registers the ops)

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
