"""Drop-in patching of HuggingFace / torch models: every batch row may use its own adapter.

    pool = AdapterPool(target_shapes(model, ["alice/", "bob/"]), capacity_bytes=2**28)
    pool.register("alice", "alice/"); pool.register("bob", "bob/")
    minlora.patch(model, pool)
    with minlora.adapters(model, ["alice", None, "bob"]):
        logits = model(input_ids).logits          # row 1 runs the base model alone
    model(input_ids, adapters=["bob", "alice", None])   # the same, as a forward keyword
    minlora.unpatch(model)

How it works.  `patch` turns each target `nn.Linear` (or subclass) and transformers `Conv1D`
into a LoRA-aware version of itself: its class is swapped in place for a subclass whose forward
calls the original forward, then adds the LoRA delta of the current step with the accumulating
op.  Swapping the class rather than nesting the layer in a new module keeps parameter names,
state_dict keys, weight tying, hooks and `isinstance` checks exactly as they were, and makes
`unpatch` a matter of swapping the class back (so the base logits come back bit for bit).

Per step (a `with adapters(...)` block, or one forward call with `adapters=`), the pool's
`prepare` gives each request a slot and each module its page tables; these are fetched once
per step.  Per forward, the first patched layer to run turns the request slots into per-token
slots and a BatchPlan (tensor ops only, so torch.compile traces them); every other layer of the
same forward reuses that plan.  A forward pre-hook on the model drops the plan before each call.

torch.compile: choose adapters with `adapters(...)` around the compiled call (the keyword form
calls the pool inside the forward, which a fullgraph trace cannot hold).  Page tables are padded
to sizes that only grow, so a new assignment of the same batch shape does not recompile.

Not thread-safe: one patched model serves one forward (or generate) at a time.

Rows: a step's assignment has one entry per request.  When the model sees k times as many
rows (beam search, num_return_sequences: generate repeats each row k times in place), each
entry covers k consecutive rows; the tokens of a row are assumed contiguous ([B, L, in]).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import ops
from .plan import build_plan
from .pool import ModuleTables

__all__ = ["adapters", "is_patched", "patch", "target_shapes", "unpatch", "PatchedLayer"]

_STATE = "_minlora_patch_state"
_FORWARD_KEYWORD = "adapters"
# PEFT's mixed-batch forward spells "no adapter" this way; accept it so its callers can switch.
_PEFT_BASE = "__base__"

AdapterIds = Sequence[Optional[str]]


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional for plain torch models
        return None
    return Conv1D


def _linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in_features, out_features) of a patchable layer, None for anything else."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        # Conv1D keeps its weight transposed: [in, out].
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return None


def target_shapes(
    model: nn.Module, peft_dirs_or_configs: Sequence[Union[str, "os.PathLike[str]", Mapping[str, Any]]]
) -> dict[str, tuple[int, int]]:
    """The `modules` mapping an AdapterPool needs for these PEFT adapters on this model:
    module name -> (in_features, out_features), for every linear / Conv1D layer any adapter targets
    (PEFT's rules: target_modules, exclude_modules, layers_to_transform / layers_pattern)."""
    from .peft_io import check_supported, read_config, targets_module

    configs = []
    for c in peft_dirs_or_configs:
        config = dict(c) if isinstance(c, Mapping) else read_config(c)
        check_supported(config)
        configs.append(config)
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is not None and any(targets_module(c, name) for c in configs):
            shapes[name] = shape
    return shapes


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
class _State:
    """What a patched model carries: the pool, the patched layers and the current step."""

    pool: Any
    layers: dict[str, nn.Module]
    hooks: list = field(default_factory=list)
    # The current step; None = no adapter anywhere (the patched model is the base model).
    step: Any = None
    request_slot: Optional[torch.Tensor] = None  # [B] int32, -1 = none
    num_slots: int = 0
    tables: dict[str, ModuleTables] = field(default_factory=dict)
    # Per forward: leading shape of x -> (token_slot [T] int32, BatchPlan); emptied before each forward.
    plans: dict = field(default_factory=dict)
    # Steps opened by the forward keyword, to close when that forward ends.
    keyword_steps: list = field(default_factory=list)
    # High-water marks of the padded page-table sizes (see activate).
    slot_capacity: int = 1
    rank_capacity: dict = field(default_factory=dict)
    depth: int = 0  # nesting of the model's forward calls (hooks see the outermost too)

    def activate(self, step: Any) -> None:
        self.step = step
        device = None
        tables: dict[str, ModuleTables] = {}
        # Pad every page table to sizes that only grow (powers of two, slots at most the pool's
        # max_slots): a compiled model then sees the same shapes for every assignment and does
        # not recompile; padded slots have rank 0 and scale 0, padded columns are never read.
        num_slots = int(step.num_slots)
        s_pad = max(self.slot_capacity, _pow2(num_slots))
        max_slots = getattr(self.pool, "max_slots", None)
        if max_slots is not None:
            s_pad = min(s_pad, max(int(max_slots), num_slots))
        self.slot_capacity = s_pad
        for name, layer in self.layers.items():
            t = step.tables(name)
            fin, fout = _linear_shape(layer)
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
        self.plans = {}

    def snapshot(self) -> tuple:
        return self.step, self.request_slot, self.num_slots, self.tables

    def restore(self, snap: tuple) -> None:
        self.step, self.request_slot, self.num_slots, self.tables = snap
        self.plans = {}


class PatchedLayer:
    """Mixin of the patched classes: the original forward, then the step's LoRA delta.

    Never instantiated directly: `patch` swaps a layer's class for `type(layer)` + this mixin.
    """

    _minlora_base_class: type
    _minlora_name: str
    _minlora_state: _State

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: D401
        y = self._minlora_base_class.forward(self, x, *args, **kwargs)
        state = self._minlora_state
        if state.request_slot is None:
            return y
        return _add_lora(state, self._minlora_name, x, y)


def _token_plan(state: _State, lead: tuple[int, ...]) -> tuple[torch.Tensor, Any]:
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


def _add_lora(state: _State, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def _patched_class(cls: type) -> type:
    # One patched class per original class, so torch.compile sees a stable type.
    if cls not in _patched_classes:
        name = f"MinLora{cls.__name__}"
        _patched_classes[cls] = type(name, (PatchedLayer, cls), {"_minlora_base_class": cls})
    return _patched_classes[cls]


def _select(names: Sequence[str], target_modules: Union[None, str, Sequence[str]]) -> list[str]:
    if target_modules is None:
        return list(names)
    from .peft_io import targets_module

    config = {"target_modules": target_modules if isinstance(target_modules, str) else list(target_modules)}
    return [n for n in names if targets_module(config, n)]


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` was applied to this model (and not undone)."""
    return getattr(model, _STATE, None) is not None


def patch(model: nn.Module, pool: Any, target_modules: Union[None, str, Sequence[str]] = None) -> nn.Module:
    """Makes the pool's adapters usable per batch row in `model` (in place); returns the model.

    pool: an AdapterPool whose module names are the model's (`model.named_modules()`) and whose
        (in_features, out_features) match the layers.
    target_modules: which of the pool's modules to patch; a list matches names exactly or as a
        dotted suffix, a string is a regex matching the whole name (PEFT's rules).  Default: all of
        the pool's modules, i.e. the union of what its adapters target.
    Until a step is chosen (`adapters(...)` or the `adapters=` keyword) the model computes exactly
    what it did before.
    """
    if is_patched(model):
        raise RuntimeError("minlora: this model is already patched; call minlora.unpatch(model) first")
    names = list(pool.module_names)
    chosen = _select(names, target_modules)
    if not chosen:
        raise ValueError(f"minlora: target_modules={target_modules!r} selects none of the pool's modules")
    found = dict(model.named_modules())
    missing = [n for n in chosen if n not in found]
    if missing:
        raise ValueError(
            f"minlora: the model has no module {missing[0]!r} (the pool's names must be the model's, "
            f"as in model.named_modules(); {len(missing)} missing)"
        )
    layers: dict[str, nn.Module] = {}
    for name in chosen:
        module = found[name]
        shape = _linear_shape(module)
        if shape is None:
            raise TypeError(
                f"minlora: {name!r} is a {type(module).__name__}; "
                "only nn.Linear and transformers' Conv1D are patched"
            )
        if isinstance(module, PatchedLayer):
            raise RuntimeError(f"minlora: {name!r} is already patched")
        layers[name] = module

    state = _State(pool=pool, layers=layers)
    for name, module in layers.items():
        # Plain attributes (not submodules / buffers): state_dict and parameters stay the model's.
        module.__dict__["_minlora_name"] = name
        module.__dict__["_minlora_state"] = state
        module.__class__ = _patched_class(type(module))
    state.hooks.append(model.register_forward_pre_hook(_pre_forward, with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True))
    generate = getattr(model, "generate", None)
    if callable(generate):
        # generate() refuses keywords its model's forward does not declare, so the `adapters=`
        # keyword is taken here: one step for the whole generation, as with `adapters(...)`.
        @functools.wraps(generate)
        def generate_with_adapters(*args: Any, **kwargs: Any) -> Any:
            if _FORWARD_KEYWORD not in kwargs:
                return generate(*args, **kwargs)
            ids = kwargs.pop(_FORWARD_KEYWORD)
            with adapters(model, [None] * _batch_rows(args, kwargs) if ids is None else ids):
                return generate(*args, **kwargs)

        model.__dict__["generate"] = generate_with_adapters
    model.__dict__[_STATE] = state
    return model


def _batch_rows(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 1


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes `patch`: the original layer classes, no hooks; returns the model."""
    state: Optional[_State] = getattr(model, _STATE, None)
    if state is None:
        raise RuntimeError("minlora: this model is not patched")
    for h in state.hooks:
        h.remove()
    for _, step, _ in state.keyword_steps:
        if step is not None:
            step.release()
    state.keyword_steps.clear()
    for module in state.layers.values():
        module.__class__ = module._minlora_base_class
        module.__dict__.pop("_minlora_name", None)
        module.__dict__.pop("_minlora_state", None)
    state.restore((None, None, 0, {}))
    model.__dict__.pop("generate", None)
    del model.__dict__[_STATE]
    return model


def _state_of(model: nn.Module) -> _State:
    # torch.compile's wrapper forwards attributes to the original module.
    state = getattr(model, _STATE, None)
    if state is None:
        orig = getattr(model, "_orig_mod", None)
        state = getattr(orig, _STATE, None) if orig is not None else None
    if state is None:
        raise RuntimeError("minlora: call minlora.patch(model, pool) first")
    return state


def _normalise(adapter_ids: AdapterIds) -> list[Optional[str]]:
    if isinstance(adapter_ids, str):
        raise TypeError("minlora: give one adapter id (or None) per batch row, as a list")
    return [None if a is None or a == _PEFT_BASE else a for a in adapter_ids]


@contextlib.contextmanager
def adapters(model: nn.Module, adapter_ids: AdapterIds, *, wait: bool = True) -> Iterator[Any]:
    """Within the block, batch row i of every forward (and `generate`) uses adapter_ids[i]
    (None: the base model alone).  Yields the pool's Step.

    wait: block until every adapter is loaded (the default, so every row gets its adapter);
        with wait=False rows whose adapter is still loading run without it (step.ready says which).
    """
    state = _state_of(model)
    step = state.pool.prepare(_normalise(adapter_ids), wait=wait)
    previous = state.snapshot()
    try:
        state.activate(step)
        yield step
    finally:
        state.restore(previous)
        step.release()


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state: _State = module.__dict__[_STATE]
    # The post-hook runs even when this hook or the forward raises (always_call), so count first.
    state.depth = depth = state.depth + 1
    if _FORWARD_KEYWORD in kwargs:
        kwargs = dict(kwargs)
        ids = kwargs.pop(_FORWARD_KEYWORD)
        # Keyword steps stack like nested `with` blocks; the post-hook of the same call (same
        # depth: forward hooks see the kwargs after this hook removed the keyword) closes it.
        previous = state.snapshot()
        if ids is None:
            state.keyword_steps.append((depth, None, previous))
            state.restore((None, None, 0, {}))
        else:
            step = state.pool.prepare(_normalise(ids), wait=True)
            state.keyword_steps.append((depth, step, previous))
            state.activate(step)
    # A new forward: the plan is rebuilt for its shape by the first patched layer.
    state.plans = {}
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state: _State = module.__dict__[_STATE]
    if state.keyword_steps and state.keyword_steps[-1][0] == state.depth:
        _, step, previous = state.keyword_steps.pop()
        state.restore(previous)
        if step is not None:
            step.release()
    state.depth -= 1
    return output
