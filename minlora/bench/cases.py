"""Random LoRA op problems: paged pools, page tables and token assignments, drawn fresh.

One builder serves the tests (mixed ranks, NaN in unused pages, garbage past each rank,
unsorted tokens, no-adapter rows) and the ops benchmark (equal ranks and equal token counts
per slot, no spare pages, and the same weights as dense per-slot stacks for the baselines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class LoraCase:
    """The op's eight inputs; S slots, T tokens, R page-table columns."""

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

    def to(self, device: str | torch.device) -> "LoraCase":
        return LoraCase(*(t.to(device) for t in self.args()))

    @property
    def used_a_pages(self) -> torch.Tensor:
        return _used_pages(self.a_pages, self.ranks, self.a_pool.shape[0])

    @property
    def used_b_pages(self) -> torch.Tensor:
        return _used_pages(self.b_pages, self.ranks, self.b_pool.shape[0])

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' weights gathered from the pools: a [S, r, in], b [S, out, r] (contiguous).

        Needs one rank r shared by every slot (dense stacks have no room for mixed ranks)."""
        ranks = set(self.ranks.tolist())
        if len(ranks) > 1:
            raise ValueError(f"dense_weights needs one rank for every slot, got ranks {sorted(ranks)}")
        r = ranks.pop() if ranks else 0
        a = self.a_pool[self.a_pages[:, :r].long()]
        b = self.b_pool[self.b_pages[:, :r].long()].transpose(1, 2).contiguous()
        return a, b


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
    balanced: bool = False,
    no_adapter_fraction: float = 0.15,
    nan_unused: bool = True,
    generator: Optional[torch.Generator] = None,
) -> LoraCase:
    """A case with S = len(ranks) slots on the CPU; tokens are assigned to slots at random (unsorted).

    Pages are shuffled across the pool, so a slot's pages are neither contiguous nor in order.
    Page-table entries past a slot's rank (extra_rank_columns of them at least) hold garbage,
    in range, negative and past the end, since they must never be read.  nan_unused: the
    spare_pages pages no slot uses are NaN, so a kernel that reads a wrong page poisons its
    output.  slot_weights: relative token counts per slot (default uniform), so that some
    segments are long and some short; balanced: exactly num_tokens / S tokens per slot instead
    (num_tokens a multiple of S).  Then no_adapter_fraction of the tokens, at random, get slot -1.
    Values are drawn in float64 and rounded to dtype once.
    """
    g = generator or torch.Generator().manual_seed(torch.randint(0, 2**31 - 1, ()).item())
    num_slots = len(ranks)
    width = max([0, *ranks]) + extra_rank_columns
    total = sum(ranks)
    num_a = total + spare_pages
    num_b = total + spare_pages
    a_pool = torch.randn(num_a, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    b_pool = torch.randn(num_b, out_features, generator=g, dtype=torch.float64)
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
        token_slot=_assign(num_tokens, num_slots, slot_weights, balanced, no_adapter_fraction, g),
    )
    if nan_unused:
        case.a_pool[~case.used_a_pages] = float("nan")
        case.b_pool[~case.used_b_pages] = float("nan")
    case.x = case.x.to(dtype)
    case.a_pool = case.a_pool.to(dtype)
    case.b_pool = case.b_pool.to(dtype)
    return case


def _assign(num_tokens: int, num_slots: int, slot_weights: Optional[Sequence[float]], balanced: bool,
            no_adapter_fraction: float, g: torch.Generator) -> torch.Tensor:
    """[T] int32 token -> slot (-1: no adapter), in random order."""
    if num_slots == 0:
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    if balanced:
        if num_tokens % num_slots:
            raise ValueError(f"balanced needs num_tokens ({num_tokens}) to be a multiple of the slots ({num_slots})")
        slots = torch.arange(num_slots).repeat_interleave(num_tokens // num_slots)
        slots = slots[torch.randperm(num_tokens, generator=g)]
    else:
        weights = torch.tensor(slot_weights if slot_weights is not None else [1.0] * num_slots, dtype=torch.float64)
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=g) if num_tokens else torch.empty(0)
    slots = slots.to(torch.int32)
    none = torch.rand(num_tokens, generator=g) < no_adapter_fraction
    slots[none] = -1
    return slots


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, norm-wise over the whole tensor, in float64.

    Against an all-zero want: 0 when got is exactly zero too, else infinite."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    denom = want.norm().item()
    err = (got - want).norm().item()
    if denom > 0:
        return err / denom
    return 0.0 if err == 0 else math.inf
