"""What the trainer's calls return, and its error type."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ForwardResult", "OptimStepResult", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on as asked (e.g. a checkpoint cannot be read into this trainer);
    the message names what.  Bad arguments raise ValueError / KeyError instead."""


@dataclass
class ForwardResult:
    """loss [B] float32: each row's loss (a sum over its tokens); logprobs [B, L] float32: the
    logprob of each target token; metrics: "loss:sum", "tokens:sum" (tokens of nonzero weight),
    "rows:sum" and "rows_with_adapter:sum"."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    metrics: dict[str, float]


@dataclass
class OptimStepResult:
    """stepped: adapters that took a step; skipped: adapter -> why not; grad_norms: the
    gradient norm (before clipping) of each stepped adapter; status: "ok" (every adapter asked
    for stepped), "partial" (some were skipped) or "no-op" (none had anything to step)."""

    stepped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    status: str = "no-op"
