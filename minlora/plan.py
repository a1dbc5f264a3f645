"""BatchPlan: the per-step token -> adapter-slot metadata, built once and shared by all layers."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)

__all__ = ["BatchPlan", "build_plan"]


@dataclass(frozen=True)
class BatchPlan:
    """Tokens grouped by adapter slot.

    order:       [T] int32, a permutation of 0..T-1: the tokens of slot s are
                 order[seg_offsets[s]:seg_offsets[s + 1]], those with slot -1 come after
                 seg_offsets[S] (build_plan keeps each group in the tokens' original order).
    seg_offsets: [S + 1] int32, non-decreasing, seg_offsets[0] = 0.

    The ops refuse a plan that is not such a permutation of its token_slot (ValueError naming
    order or seg_offsets) when its tensors are on the CPU, or on CUDA with
    MINLORA_CHECK_INDICES=1; on CUDA otherwise nothing is read on the host, and the kernels
    skip the positions (or, in the grouped path, the segments) that do not match.

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

    On the CPU token_slot's values are checked (ValueError); on CUDA it runs on the current
    stream without synchronising the host, and slots outside 0..num_slots-1 count as -1
    (MINLORA_CHECK_INDICES=1 checks them on the host instead).
    """
    order, seg_offsets = torch.ops.minlora.build_plan(token_slot, num_slots)
    return BatchPlan(order, seg_offsets)
