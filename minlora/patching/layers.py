"""The patched layers: a linear layer whose forward adds the LoRA delta of the current step,
and the per-model state they share (the step's page tables and the per-forward BatchPlan).

`patch` turns each target `nn.Linear` (or subclass) and transformers `Conv1D` into a LoRA-aware
version of itself: its class is swapped in place for a subclass whose forward calls the original
forward, then adds the LoRA delta of the current step with the accumulating op.  Swapping the
class rather than nesting the layer in a new module keeps parameter names, state_dict keys,
weight tying, hooks and `isinstance` checks exactly as they were, and makes `unpatch` a matter
of swapping the class back (so the base logits come back bit for bit).

Per forward, the first patched layer to run turns the request slots into per-token slots and a
BatchPlan (tensor ops only, so torch.compile traces them); every other layer of the same forward
reuses that plan.

Rows: a step's assignment has one entry per request.  When the model sees k times as many
rows (beam search, num_return_sequences: generate repeats each row k times in place), each
entry covers k consecutive rows; the tokens of a row are assumed contiguous ([B, L, in]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from ..ops import ModuleTables
from ..plan import build_plan
from .protocol import LoraAddFn, PoolLike, StepLike

__all__ = ["PatchState", "PatchedLayer", "linear_shape", "patched_class"]


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional for plain torch models
        return None
    return Conv1D


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a patchable layer, None for anything else."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        # Conv1D keeps its weight transposed: [in, out].
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pad(t: torch.Tensor, rows: int, cols: Optional[int] = None) -> torch.Tensor:
    """t ([S] or [S, R]) zero-padded to [rows] or [rows, cols]; t itself when already that size."""
    shape = (rows,) if cols is None else (rows, cols)
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    if t.dim() == 1:
        out[: t.shape[0]] = t
    else:
        out[: t.shape[0], : t.shape[1]] = t
    return out


@dataclass
class PatchState:
    """What a patched model carries: the pool, the patched layers and the current step."""

    pool: PoolLike
    layers: dict[str, nn.Module]
    hooks: list = field(default_factory=list)
    # The current step; None = no adapter anywhere (the patched model is the base model).
    step: Optional[StepLike] = None
    request_slot: Optional[torch.Tensor] = None  # [B] int32, -1 = none
    num_slots: int = 0
    tables: dict[str, ModuleTables] = field(default_factory=dict)
    # The step's own differentiable path (StepLike.lora_add), if it has one.
    lora_add: Optional[LoraAddFn] = None
    # Per forward: leading shape of x -> (token_slot [T] int32, BatchPlan); emptied before each forward.
    plans: dict = field(default_factory=dict)
    # Steps opened by the forward keyword, to close when that forward ends.
    keyword_steps: list = field(default_factory=list)
    # High-water marks of the padded page-table sizes (see activate).
    slot_capacity: int = 1
    rank_capacity: dict = field(default_factory=dict)
    depth: int = 0  # nesting of the model's forward calls (hooks see the outermost too)

    def activate(self, step: StepLike) -> None:
        self.step = step
        device = None
        tables: dict[str, ModuleTables] = {}
        # Pad every page table to sizes that only grow (powers of two, slots at most the pool's
        # max_slots): a compiled model then sees the same shapes for every assignment and does
        # not recompile; padded slots have rank 0 and scale 0, padded columns are never read.
        num_slots = int(step.num_slots)
        s_pad = max(self.slot_capacity, _pow2(num_slots))
        s_pad = min(s_pad, max(int(self.pool.max_slots), num_slots))
        self.slot_capacity = s_pad
        for name, layer in self.layers.items():
            t = step.tables(name)
            fin, fout = linear_shape(layer)
            if t.a_pool.shape[-1] != fin or t.b_pool.shape[-1] != fout:
                raise ValueError(
                    f"minlora: {name!r} is (in, out) = {(fin, fout)} but the pool's pages are "
                    f"{(t.a_pool.shape[-1], t.b_pool.shape[-1])} long"
                )
            r = int(t.a_pages.shape[1])
            r_pad = max(self.rank_capacity.get(name, 1), _pow2(r))
            self.rank_capacity[name] = r_pad
            tables[name] = ModuleTables(
                t.a_pool, t.b_pool, _pad(t.a_pages, s_pad, r_pad), _pad(t.b_pages, s_pad, r_pad),
                _pad(t.ranks, s_pad), _pad(t.scales, s_pad),
            )
            device = t.a_pool.device
        slots = step.request_slot
        self.request_slot = slots.to(device=device, dtype=torch.int32) if device is not None else slots
        self.num_slots = s_pad
        self.tables = tables
        self.lora_add = getattr(step, "lora_add", None)
        self.plans = {}

    def snapshot(self) -> tuple:
        return self.step, self.request_slot, self.num_slots, self.tables

    def restore(self, snap: tuple) -> None:
        self.step, self.request_slot, self.num_slots, self.tables = snap
        self.lora_add = getattr(self.step, "lora_add", None)
        self.plans = {}


class PatchedLayer:
    """Mixin of the patched classes: the original forward, then the step's LoRA delta.

    Never instantiated directly: `patch` swaps a layer's class for `type(layer)` + this mixin.
    """

    _minlora_base_class: type
    _minlora_name: str
    _minlora_state: PatchState

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: D401
        y = self._minlora_base_class.forward(self, x, *args, **kwargs)
        state = self._minlora_state
        if state.request_slot is None:
            return y
        return _add_lora(state, self._minlora_name, x, y)


def _token_plan(state: PatchState, lead: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
    """token_slot [T] and its BatchPlan for activations of leading shape `lead` ([B, L] or [T]);
    built by the first patched layer of a forward, reused by the others."""
    hit = state.plans.get(lead)
    if hit is not None:
        return hit
    requests = state.request_slot.shape[0]
    rows = lead[0] if lead else 1
    if requests == 0 or rows % requests != 0:
        raise ValueError(
            f"minlora: this forward has {rows} batch rows, which do not split evenly over the "
            f"{requests} adapter assignments of the step (one per batch row)"
        )
    # Rows are row-major [B, L] and generate's expansion repeats each row in place, so the
    # tokens of one assignment are contiguous: repeat each slot T / (number of assignments) times.
    num_tokens = math.prod(lead)
    token_slot = state.request_slot.repeat_interleave(num_tokens // requests)
    plan = build_plan(token_slot, state.num_slots)
    state.plans[lead] = (token_slot, plan)
    return token_slot, plan


def _add_lora(state: PatchState, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y [..., out] + the LoRA delta of x [..., in] for this module's slots (y is updated in place
    when no gradient is needed)."""
    t = state.tables.get(name)
    if t is None:
        return y
    in_features = x.shape[-1]
    out_features = y.shape[-1]
    lead = tuple(x.shape[:-1])
    num_tokens = math.prod(lead)
    token_slot, plan = _token_plan(state, lead)
    x2 = x.reshape(num_tokens, in_features)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if state.lora_add is not None and torch.is_grad_enabled():
        # The step keeps the adapters' gradients itself (a training step).
        y2 = y.reshape(num_tokens, out_features)
        return state.lora_add(name, x2, y2, t, token_slot, plan).view(y.shape)
    args = (t.a_pool, t.b_pool, t.a_pages, t.b_pages, t.ranks, t.scales, token_slot)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or y.requires_grad or t.a_pool.requires_grad or t.b_pool.requires_grad
    )
    if needs_grad or not y.is_contiguous():
        # Autograd is recording (the in-place op has no autograd), or y's layout does not let us
        # write [T, out] rows into it: out of place, through the differentiable op.
        delta = ops.lora(x2, *args, plan=plan)
        return y + delta.view(y.shape)
    # Inference: accumulate into the base layer's fresh output (saves a pass over y).
    ops.lora_add_(y.view(num_tokens, out_features), x2, *args, plan=plan)
    return y


_patched_classes: dict[type, type] = {}


def patched_class(cls: type) -> type:
    # One patched class per original class, so torch.compile sees a stable type.
    if cls not in _patched_classes:
        name = f"MinLora{cls.__name__}"
        _patched_classes[cls] = type(name, (PatchedLayer, cls), {"_minlora_base_class": cls})
    return _patched_classes[cls]
