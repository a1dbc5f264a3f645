"""The patched layers: a linear layer whose forward adds the LoRA delta of the current step,
and the per-model state they share (fixed-capacity buffers holding the step's page tables,
token slots and BatchPlan).

`patch` turns each target `nn.Linear` (or subclass) and transformers `Conv1D` into a LoRA-aware
version of itself: its class is swapped in place for a subclass whose forward calls the original
forward, then adds the LoRA delta of the current step with the accumulating op.  Swapping the
class rather than nesting the layer in a new module keeps parameter names, state_dict keys,
weight tying, hooks and `isinstance` checks exactly as they were, and makes `unpatch` a matter
of swapping the class back (so the base logits come back bit for bit).

Per step, the page tables of every patched layer are refilled into the buffers at once; per
step and activation shape, the first patched layer to run refills the token slots and the
BatchPlan (built on the host from the requests' slots); every other layer, and every later
forward of that shape in the step (a decode loop), reads the same tensors.

Rows: a step's assignment has one entry per request.  When the model sees k times as many
rows (beam search, num_return_sequences: generate repeats each row k times in place), each
entry covers k consecutive rows; the tokens of a row are assumed contiguous ([B, L, in]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import ops
from ..ops import ModuleTables
from ..plan import BatchPlan, HostTables, StepBuffers, build_plan
from .protocol import LoraAddFn, PoolLike, StepLike

__all__ = ["DEFAULT_MAX_RANK", "DEFAULT_MAX_TOKENS", "PatchState", "PatchedLayer", "linear_shape", "patched_class"]


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


# Defaults of the step buffers' capacities (see PatchState): ranks up to 128 (the largest the
# pool's pages can hold, when that is less), and up to 2**20 tokens per forward.
DEFAULT_MAX_RANK = 128
DEFAULT_MAX_TOKENS = 1 << 20


@dataclass
class PatchState:
    """What a patched model carries: the pool, the patched layers, the current step and the
    fixed-capacity buffers every layer reads.

    The buffers (minlora.plan.StepBuffers over the patched layers) are made at the first step,
    with capacities max_slots (default: the pool's), max_rank (default: the largest rank the
    pool's pages hold, at most DEFAULT_MAX_RANK) and max_tokens (default DEFAULT_MAX_TOKENS).
    `activate` refills their page tables once per step; the first forward of a step with a
    given shape refills the token slots and the plan (built on the host from the requests'
    slots), and later forwards of that shape reuse them.  Every layer's tables are the same
    tensors for every step, so a compiled model never recompiles for a new assignment and a
    captured CUDA graph replays with the contents of the last refill.
    """

    pool: PoolLike
    layers: dict[str, nn.Module]
    hooks: list = field(default_factory=list)
    max_slots: Optional[int] = None
    max_rank: Optional[int] = None
    max_tokens: Optional[int] = None
    # The current step; None = no adapter anywhere (the patched model is the base model).
    step: Optional[StepLike] = None
    request_slot: Optional[torch.Tensor] = None  # [B] int32 on the device, -1 = none
    # Per patched layer: its pools and views of the buffers' tables (the same objects every step).
    tables: dict[str, ModuleTables] = field(default_factory=dict)
    # The step's own differentiable path (StepLike.lora_add), if it has one.
    lora_add: Optional[LoraAddFn] = None
    # Steps opened by the forward keyword, to close when that forward ends.
    keyword_steps: list = field(default_factory=list)
    depth: int = 0  # nesting of the model's forward calls (hooks see the outermost too)
    buffers: Optional[StepBuffers] = None
    host_request_slot: Optional[np.ndarray] = None  # [B] int32
    # (batch rows, tokens) whose token slots and plan the buffers hold, and those:
    # (token_slot [T], plan, the same plan without its host-only longest-segment hint).
    plan_key: tuple = ()
    plan: Optional[tuple[torch.Tensor, BatchPlan, BatchPlan]] = None

    def activate(self, step: StepLike, tokens_per_request: Optional[int] = None) -> None:
        """Makes `step` the current one: its page tables go into the buffers (one refill).
        tokens_per_request: also refill the token slots and plan for forwards of [B, that many]
        tokens now (B = the step's requests), e.g. before replaying a captured CUDA graph."""
        names = list(self.layers)
        host = step.host_tables(names) if callable(getattr(step, "host_tables", None)) else _host_tables(step, names)
        if self.buffers is None:
            self.buffers = self._make_buffers(host)
        if self.buffers.bind_pools(host.pools):
            self._bind_tables(host.pools)
        self.buffers.load_tables(host)
        self.step = step
        self.host_request_slot = np.asarray(host.request_slot, dtype=np.int32)
        self.request_slot = step.request_slot
        self.lora_add = getattr(step, "lora_add", None)
        self.plan_key, self.plan = (), None
        if tokens_per_request is not None:
            requests = int(self.host_request_slot.shape[0])
            self.plan_for(requests, requests * int(tokens_per_request))

    def deactivate(self) -> None:
        self.step, self.request_slot, self.host_request_slot, self.lora_add = None, None, None, None
        self.plan_key, self.plan = (), None

    def snapshot(self) -> Optional[StepLike]:
        return self.step

    def restore(self, step: Optional[StepLike]) -> None:
        """Makes `step` (from snapshot) current again, refilling the buffers with its tables."""
        if step is None:
            self.deactivate()
        elif step is not self.step:
            self.activate(step)

    def token_plan(self, lead: tuple[int, ...]) -> tuple[torch.Tensor, BatchPlan]:
        """token_slot [T] and the BatchPlan for activations of leading shape `lead` ([B, L] or
        [T]): the buffers' when they hold this shape's, else refilled now (host work, once per
        step and shape; under torch.compile without a refill, built by traceable tensor ops)."""
        rows = lead[0] if lead else 1
        num_tokens = math.prod(lead)
        if self.plan_key == (rows, num_tokens):
            token_slot, plan, hintless = self.plan
            # A host hint would be a guarded constant under torch.compile: recompiles per step.
            return token_slot, hintless if torch.compiler.is_compiling() else plan
        requests = self.request_slot.shape[0]
        if requests == 0 or rows % requests != 0:
            raise ValueError(
                f"minlora: this forward has {rows} batch rows, which do not split evenly over the "
                f"{requests} adapter assignments of the step (one per batch row)"
            )
        if torch.compiler.is_compiling():
            token_slot = self.request_slot.repeat_interleave(num_tokens // requests)
            return token_slot, build_plan(token_slot, self.buffers.max_slots)
        token_slot, plan, _ = self.plan_for(rows, num_tokens)
        return token_slot, plan

    def plan_for(self, rows: int, num_tokens: int) -> tuple[torch.Tensor, BatchPlan, BatchPlan]:
        """Refills the token slots and plan for `rows` batch rows of num_tokens tokens in all."""
        # Rows are row-major [B, L] and generate's expansion repeats each row in place, so the
        # tokens of one assignment are contiguous: each slot repeated T / (assignments) times.
        rs = self.host_request_slot
        per_request = num_tokens // max(rs.shape[0], 1)
        counts = np.bincount(rs[rs >= 0], minlength=1)
        token_slot, plan = self.buffers.load_tokens(np.repeat(rs, per_request),
                                                    max_segment=int(counts.max()) * per_request)
        self.plan_key = (rows, num_tokens)
        self.plan = (token_slot, plan, BatchPlan(plan.order, plan.seg_offsets, plan.positions, None))
        return self.plan

    def _make_buffers(self, host: HostTables) -> StepBuffers:
        fits = max((min(a.shape[0], b.shape[0]) for a, b in host.pools), default=1)
        return StepBuffers(
            len(self.layers),
            max_slots=int(self.max_slots or self.pool.max_slots),
            max_rank=int(self.max_rank or max(1, min(DEFAULT_MAX_RANK, fits))),
            max_tokens=int(self.max_tokens or DEFAULT_MAX_TOKENS),
            device=host.pools[0][0].device if host.pools else "cpu",
        )

    def _bind_tables(self, pools: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        tables = {}
        for i, ((name, layer), (a_pool, b_pool)) in enumerate(zip(self.layers.items(), pools)):
            fin, fout = linear_shape(layer)
            if a_pool.shape[-1] != fin or b_pool.shape[-1] != fout:
                raise ValueError(
                    f"minlora: {name!r} is (in, out) = {(fin, fout)} but the pool's pages are "
                    f"{(a_pool.shape[-1], b_pool.shape[-1])} long"
                )
            tables[name] = ModuleTables(a_pool, b_pool, *self.buffers.tables_view(i))
        self.tables = tables


def _host_tables(step: StepLike, names: Sequence[str]) -> HostTables:
    """HostTables of a step that has only `tables(module)` (read to the host module by module)."""
    got = [step.tables(n) for n in names]
    S = int(step.num_slots)
    R = max((int(t.a_pages.shape[1]) for t in got), default=0) if S else 0
    a = np.zeros((len(got), S, R), dtype=np.int32)
    b = np.zeros_like(a)
    ranks = np.zeros((len(got), S), dtype=np.int32)
    scales = np.zeros((len(got), S), dtype=np.float32)
    for i, t in enumerate(got):
        r = int(t.a_pages.shape[1])
        a[i, :, :r] = t.a_pages.cpu().numpy()
        b[i, :, :r] = t.b_pages.cpu().numpy()
        ranks[i] = t.ranks.cpu().numpy()
        scales[i] = t.scales.cpu().numpy()
    return HostTables(a, b, ranks, scales, [(t.a_pool, t.b_pool) for t in got],
                      step.request_slot.cpu().numpy().astype(np.int32))


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
    token_slot, plan = state.token_plan(lead)
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
