"""A training batch, checked before anything runs: every error names the argument, and nothing
has changed when one is raised."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional, Sequence

import torch

from .losses import check_loss_inputs

__all__ = ["Batch", "check_batch", "check_known"]


@dataclass(frozen=True)
class Batch:
    """adapters: one id (or None) per row; input_ids, targets [B, L] int64; weights [B, L] float32;
    attention_mask [B, L] int64 or None; loss_inputs: the loss's [B, L] float32 tensors."""

    adapters: list[Optional[str]]
    input_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    loss_fn: str
    loss_inputs: dict[str, torch.Tensor]
    loss_config: dict[str, float]

    def rows_of(self) -> dict[str, list[int]]:
        """adapter -> its rows, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, a in enumerate(self.adapters):
            if a is not None:
                out.setdefault(a, []).append(i)
        return out


def check_known(adapters: Any, known: Collection[str], what: str = "adapters") -> list[Optional[str]]:
    """The list of ids (None allowed) checked: TypeError / ValueError for its form, KeyError
    naming the ids that are not trainable adapters."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise ValueError(f"{what} must be a list with one adapter id (or None) per row, got {type(adapters).__name__}")
    ids = list(adapters)
    bad = [a for a in ids if a is not None and not isinstance(a, str)]
    if bad:
        raise ValueError(f"{what}: ids must be str or None, got {bad[:3]!r}")
    unknown = [a for a in dict.fromkeys(ids) if a is not None and a not in known]
    if unknown:
        raise KeyError(f"{what}: unknown adapter id(s) {unknown[:5]!r} (create or load them first)")
    return ids


def _tokens(name: str, t: Any, shape: Optional[tuple[int, int]], vocab: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a [B, L] integer tensor, got {type(t).__name__}")
    if t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
        want = "[B, L]" if shape is None else f"{shape} like input_ids"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    t = t.detach().to("cpu", torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): min {int(t.min())}, max {int(t.max())}")
    return t


def _floats(name: str, t: Any, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape {shape} like input_ids, got {got}")
    if t.dtype.is_complex:
        raise ValueError(f"{name} must be real, got {t.dtype}")
    return t.detach().to("cpu", torch.float32)


def check_batch(
    known: Collection[str],
    vocab: int,
    adapters: Any,
    input_ids: Any,
    target_tokens: Any,
    weights: Any,
    attention_mask: Any,
    loss_fn: Any,
    loss_fn_inputs: Optional[Mapping[str, Any]],
    loss_fn_config: Optional[Mapping[str, Any]],
) -> Batch:
    """The checked batch (all tensors on the CPU; the trainer moves them)."""
    ids = check_known(adapters, known)
    x = _tokens("input_ids", input_ids, None, vocab)
    shape = (int(x.shape[0]), int(x.shape[1]))
    if len(ids) != shape[0]:
        raise ValueError(f"adapters has {len(ids)} entries but input_ids has {shape[0]} rows (one id per row)")
    if shape[1] == 0:
        raise ValueError("input_ids must have at least one token per row (L >= 1)")
    targets = _tokens("target_tokens", target_tokens, shape, vocab)
    w = torch.ones(shape) if weights is None else _floats("weights", weights, shape)
    mask = None
    if attention_mask is not None:
        mask = _floats("attention_mask", attention_mask, shape)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.to(torch.int64)
    inputs, config = check_loss_inputs(loss_fn, loss_fn_inputs, loss_fn_config, shape)
    return Batch(ids, x, targets, w, mask, loss_fn, inputs, config)
