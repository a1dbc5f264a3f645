"""BatchPlan: the per-step token -> adapter-slot metadata, built once and shared by all layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)

__all__ = ["BatchPlan", "build_plan"]


@dataclass(frozen=True)
class BatchPlan:
    """Tokens grouped by adapter slot (a stable counting sort).

    order:       [T] int32; tokens of slot s are order[seg_offsets[s]:seg_offsets[s + 1]],
                 in their original order; tokens with slot -1 come after seg_offsets[S].
    seg_offsets: [S + 1] int32, non-decreasing, seg_offsets[0] = 0.

    Its sizes depend only on T and S, never on the assignment, so a plan held in fixed
    buffers can be refilled with `copy_` between replays of a captured CUDA graph.
    """

    order: torch.Tensor
    seg_offsets: torch.Tensor

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
        """Overwrites this plan's buffers with `other`'s (same T and S); returns self."""
        if other.order.shape != self.order.shape or other.seg_offsets.shape != self.seg_offsets.shape:
            raise ValueError(
                f"plan shapes differ: T={other.num_tokens}, S={other.num_slots} into "
                f"T={self.num_tokens}, S={self.num_slots}"
            )
        self.order.copy_(other.order, non_blocking=True)
        self.seg_offsets.copy_(other.seg_offsets, non_blocking=True)
        return self


def build_plan(token_slot: torch.Tensor, num_slots: int) -> BatchPlan:
    """Builds the plan of `token_slot` ([T] int32 in -1..num_slots-1) on its device.

    On CUDA it runs on the current stream without synchronising the host.
    """
    order, seg_offsets = torch.ops.minlora.build_plan(token_slot, num_slots)
    return BatchPlan(order, seg_offsets)
