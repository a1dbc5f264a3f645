"""BatchPlan: the per-step token -> adapter-slot metadata, built once and shared by all layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import _C  # noqa: F401  (registers torch.ops.minlora.*)

__all__ = ["BatchPlan", "build_plan", "plan_positions"]


@dataclass(frozen=True)
class BatchPlan:
    """Tokens grouped by adapter slot.

    order:       [T] int32, a permutation of 0..T-1: the tokens of slot s are
                 order[seg_offsets[s]:seg_offsets[s + 1]], those with slot -1 come after
                 seg_offsets[S] (build_plan keeps each group in the tokens' original order).
    seg_offsets: [S + 1] int32, non-decreasing, seg_offsets[0] = 0.
    positions:   [T] int32 or None, the inverse of order (positions[order[q]] == q).  The CUDA
                 kernels trust a plan position only when positions agrees with it, so no
                 output row is ever written twice, whatever the plan holds; an op given a plan
                 without positions computes them (one small kernel per call).
    max_segment: the longest segment, when the caller knows it on the host (the step knows
                 its tokens per request), else None.  It decides which CUDA kernels are
                 launched (no grouped GEMM when every segment is short), never the results.

    The ops refuse a plan that is not such a permutation of its token_slot (ValueError naming
    order, seg_offsets or positions) when its tensors are on the CPU, or on CUDA with
    MINLORA_CHECK_INDICES=1; on CUDA otherwise nothing is read on the host, and the kernels
    skip the positions (or, in the grouped path, the segments) that do not match.

    Its sizes depend only on T and S, never on the assignment, so a plan held in fixed
    buffers can be refilled with `copy_` between replays of a captured CUDA graph.
    """

    order: torch.Tensor
    seg_offsets: torch.Tensor
    positions: Optional[torch.Tensor] = None
    max_segment: Optional[int] = None

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
        """Overwrites this plan's buffers with `other`'s (same T and S); returns self.

        positions are copied when both plans have them; this plan's max_segment (a host value,
        fixed with the buffers) is kept, and must bound `other`'s longest segment for the
        kernels it selects to be the fast ones (results are right either way)."""
        if other.order.shape != self.order.shape or other.seg_offsets.shape != self.seg_offsets.shape:
            raise ValueError(
                f"plan shapes differ: T={other.num_tokens}, S={other.num_slots} into "
                f"T={self.num_tokens}, S={self.num_slots}"
            )
        self.order.copy_(other.order, non_blocking=True)
        self.seg_offsets.copy_(other.seg_offsets, non_blocking=True)
        if self.positions is not None:
            src = other.positions if other.positions is not None else plan_positions(other.order)
            self.positions.copy_(src, non_blocking=True)
        return self


def plan_positions(order: torch.Tensor) -> torch.Tensor:
    """[T] int32: the inverse of the permutation `order` ([T] int32) on its device.

    On the CPU order is checked to be a permutation of 0..T-1 (ValueError); on CUDA it runs on
    the current stream without synchronising the host (entries outside 0..T-1 are skipped,
    tokens order misses get -1, and a repeated token keeps one of its positions).
    """
    return torch.ops.minlora.plan_positions(order)


def build_plan(token_slot: torch.Tensor, num_slots: int, max_segment: Optional[int] = None) -> BatchPlan:
    """Builds the plan of `token_slot` ([T] int32 in -1..num_slots-1) on its device, with its positions.

    On the CPU token_slot's values are checked (ValueError) and max_segment, when not given, is
    the plan's longest segment; on CUDA it runs on the current stream without synchronising the
    host, slots outside 0..num_slots-1 count as -1 (MINLORA_CHECK_INDICES=1 checks them on the
    host instead), and max_segment is what the caller says (None: unknown).
    """
    if max_segment is not None and max_segment < 0:
        raise ValueError(f"max_segment must be >= 0, got {max_segment}")
    order, seg_offsets = torch.ops.minlora.build_plan(token_slot, num_slots)
    # Read on the host only where that is free: CPU tensors, outside tracing (under
    # torch.compile the value would be data-dependent and turn into a graph break).
    if max_segment is None and seg_offsets.device.type == "cpu" and num_slots > 0 and not torch.compiler.is_compiling():
        max_segment = int((seg_offsets[1:] - seg_offsets[:-1]).max())
    return BatchPlan(order, seg_offsets, plan_positions(order), max_segment)
