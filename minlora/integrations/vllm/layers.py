"""The weights hook: vLLM's linear LoRA layers with B stored as rows of B^T and each slot's
true rank known, so minlora's op reads vLLM's stacked tensors in place as page pools.

vLLM keeps, per linear LoRA layer and output slice i (L = max_loras slots, R = max_lora_rank):

    lora_a_stacked[i]  [L, 1, R, in]      row j of slot s's A at [s, 0, j]
    lora_b_stacked[i]  [L, 1, out_i, R]   column j of slot s's B at [s, 0, :, j]

and `set_lora(slot, lora_a, lora_b)` copies an adapter of true rank r into the first r rows /
columns, zero-filling the rest; the rank itself is never recorded.  The layer classes made
here (a mixin in front of each of vLLM's linear LoRA classes) change two things:

- B is allocated as `bt[i]` [L, 1, R, out_i] and vLLM is given its transposed view, which
  has the shape vLLM expects, so vLLM's own set_lora / reset_lora / dummy-LoRA code keeps
  working unchanged while column j of B_s is the contiguous row (s, j) of bt[i];
- set_lora / reset_lora record the rank of each slice's adapter in each slot.

Then, with page (s, j) = s * R + j, `a_pool = lora_a_stacked[i].view(L * R, in)` and
`b_pool = bt[i].view(L * R, out_i)` are minlora pools (views, no copy), and a slot of rank r
is r pages of each: the op moves the true bytes of each adapter, whatever R is.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .mixin import mixed_in

__all__ = ["LayerPages", "PagedLinearLoRA", "PagedStack", "paged_lora_classes", "slice_ranks"]


class LayerPages:
    """One linear LoRA layer's adapter weights as minlora page pools, and each slot's rank.

    a_pools[i]: [L * R, in]     A rows (a view of vLLM's lora_a_stacked[i])
    b_pools[i]: [L * R, out_i]  B columns, i.e. rows of B^T (a view of bt[i])
    pages:      [L, R] int32    page (s, j) = s * R + j, for A and B alike
    ranks:      [n_slices, L] int32 on the layer's device; ranks[i, s] = true rank of slot
                s's adapter on slice i (0: empty slot, or the adapter does not target it)
    """

    def __init__(self, a_stacked: Sequence[torch.Tensor], out_sizes: Sequence[int]) -> None:
        if len(a_stacked) != len(out_sizes) or not a_stacked:
            raise ValueError(f"{len(a_stacked)} A stacks for {len(out_sizes)} output slices")
        first = a_stacked[0]
        num_slots, _, max_rank, _ = first.shape
        self.num_slots, self.max_rank = int(num_slots), int(max_rank)
        self.a_pools: tuple[torch.Tensor, ...] = tuple(self._a_pool(a) for a in a_stacked)
        self._bt = tuple(
            torch.zeros(num_slots, 1, max_rank, out, dtype=first.dtype, device=first.device) for out in out_sizes
        )
        self.b_pools: tuple[torch.Tensor, ...] = tuple(bt.view(num_slots * max_rank, bt.shape[-1]) for bt in self._bt)
        self.pages = torch.arange(num_slots * max_rank, dtype=torch.int32, device=first.device).view(
            num_slots, max_rank
        )
        self.ranks = torch.zeros(len(out_sizes), num_slots, dtype=torch.int32, device=first.device)
        # The same ranks on the host, so nothing ever reads them back from the device.
        self._host_ranks = [[0] * self.num_slots for _ in out_sizes]

    def _a_pool(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or a.shape[1] != 1 or not a.is_contiguous():
            raise ValueError(f"lora_a_stacked must be a contiguous [L, 1, R, in] tensor, got {tuple(a.shape)}")
        return a.view(a.shape[0] * a.shape[2], a.shape[3])

    @property
    def num_slices(self) -> int:
        return len(self.a_pools)

    def b_stacked(self) -> tuple[torch.Tensor, ...]:
        """What vLLM sees as lora_b_stacked: views [L, 1, out_i, R] of the B^T buffers."""
        return tuple(bt.transpose(2, 3) for bt in self._bt)

    def set_ranks(self, slot: int, ranks: Sequence[int]) -> None:
        """Records the true rank of slot `slot` on each slice (called from set_lora / reset_lora)."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.num_slots - 1}")
        if len(ranks) != self.num_slices:
            raise ValueError(f"{len(ranks)} ranks for {self.num_slices} slices")
        for i, r in enumerate(ranks):
            if not 0 <= r <= self.max_rank:
                raise ValueError(f"rank {r} of slice {i} is outside 0..max_lora_rank = 0..{self.max_rank}")
            self._host_ranks[i][slot] = int(r)
        column = torch.tensor([int(r) for r in ranks], dtype=torch.int32)
        self.ranks[:, slot].copy_(column.to(self.ranks.device, non_blocking=True))

    def slot_ranks(self) -> list[list[int]]:
        """[n_slices][L]: the recorded ranks (host copy)."""
        return [list(row) for row in self._host_ranks]


class PagedStack(tuple):
    """A layer's lora_a_stacked / lora_b_stacked tuple that also carries its LayerPages.

    vLLM passes these tuples, unchanged, from the layer to the punica wrapper; the wrapper
    finds the pools, pages and ranks of the layer through `.pages`.
    """

    pages: LayerPages

    def __new__(cls, tensors: Sequence[torch.Tensor], pages: LayerPages) -> "PagedStack":
        stack = super().__new__(cls, tensors)
        stack.pages = pages
        return stack


def slice_ranks(layer: Any, lora_a: Any, lora_b: Any) -> list[int]:
    """The true rank per output slice of the adapter that set_lora(slot, lora_a, lora_b) stores.

    lora_a [r, in] (one matrix for every slice: single-slice layers and layers whose adapter
    has one weight for the whole packed module) or a list with one [r_i, in] or None per
    packed sub-module; a list shorter than the layer's slices is expanded the way vLLM's
    set_lora expands it.  A slice whose A or B is None keeps its zeros: rank 0.
    """
    n = int(layer.n_slices)
    if isinstance(lora_a, torch.Tensor):
        return [int(lora_a.shape[0])] * n
    a_list, b_list = list(lora_a), list(lora_b)
    if len(b_list) != n:
        a_list, b_list = layer.expand_packed_lora(a_list, b_list)
    if len(a_list) != n or len(b_list) != n:
        raise ValueError(f"adapter weights for {len(a_list)} slices, the layer has {n}")
    return [0 if a is None or b is None else int(a.shape[0]) for a, b in zip(a_list, b_list)]


class PagedLinearLoRA:
    """Mixed in front of one of vLLM's linear LoRA layer classes (see the module docstring)."""

    minlora_pages: LayerPages

    def create_lora_weights(self, max_loras: int, lora_config: Any, model_config: Optional[Any] = None) -> None:
        if getattr(lora_config, "fully_sharded_loras", False) or getattr(self, "tp_size", 1) != 1:
            raise NotImplementedError(
                "minlora's vLLM plugin supports tensor_parallel_size=1 without fully_sharded_loras for now"
            )
        super().create_lora_weights(max_loras, lora_config, model_config)  # type: ignore[misc]
        a_stacked = self.lora_a_stacked  # type: ignore[has-type]
        out_sizes = [int(b.shape[2]) for b in self.lora_b_stacked]  # type: ignore[has-type]
        pages = LayerPages(a_stacked, out_sizes)
        self.minlora_pages = pages
        self.lora_a_stacked = PagedStack(a_stacked, pages)
        self.lora_b_stacked = PagedStack(pages.b_stacked(), pages)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)  # type: ignore[misc]
        self.minlora_pages.set_ranks(index, [0] * self.minlora_pages.num_slices)

    def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
        # vLLM's set_lora resets the slot first (through self.reset_lora), then copies the
        # adapter's true-rank matrices into it; the ranks are recorded once it is done.
        super().set_lora(index, lora_a, lora_b)  # type: ignore[misc]
        self.minlora_pages.set_ranks(index, slice_ranks(self, lora_a, lora_b))


def _linear_lora_classes() -> tuple[type, ...]:
    """vLLM's linear LoRA layer classes that run unsharded (tensor parallel size 1)."""
    from vllm.lora import layers

    return (
        layers.ColumnParallelLinearWithLoRA,
        layers.MergedColumnParallelLinearWithLoRA,
        layers.QKVParallelLinearWithLoRA,
        layers.MergedQKVParallelLinearWithLoRA,
        layers.RowParallelLinearWithLoRA,
        layers.ReplicatedLinearWithLoRA,
        layers.MergedColumnParallelLinearVariableSliceWithLoRA,
    )


def paged_class(cls: type) -> type:
    """The paged version of vLLM's LoRA layer class `cls` (made once per class)."""
    return mixed_in(PagedLinearLoRA, cls, "Paged", "{} with minlora's page layout and true ranks.")


def paged_lora_classes(classes: Sequence[type]) -> tuple[type, ...]:
    """vLLM's ordered list of LoRA layer classes with each linear one replaced by its paged
    version (same order, so vLLM's choice of class for a module is unchanged)."""
    linear = set(_linear_lora_classes())
    return tuple(paged_class(c) if c in linear else c for c in classes)
