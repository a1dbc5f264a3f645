"""Drop-in patching of HuggingFace / torch models: every batch row may use its own adapter.

    pool = AdapterPool(minlora.target_shapes(model, ["alice/", "bob/"]), capacity_bytes=2**28)
    pool.register("alice", "alice/"); pool.register("bob", "bob/")
    minlora.patch(model, pool)
    with minlora.adapters(model, ["alice", None, "bob"]):
        logits = model(input_ids).logits          # row 1 runs the base model alone
    model(input_ids, adapters=["bob", "alice", None])   # the same, as a forward keyword
    minlora.unpatch(model)

How a patched layer works: minlora/patching/layers.py.

Per step (a `with adapters(...)` block, or one forward call with `adapters=`), the pool's
`prepare` gives each request a slot and each module its page tables; these are copied once per
step into fixed-capacity buffers (capacities: `patch(..., max_slots=, max_rank=, max_tokens=)`)
that every patched layer reads.  The first forward of a step with a given batch shape refills
the token slots and the BatchPlan there (built on the host); every layer of it, and every later
forward of that shape (a decode loop), reads the same tensors.  The pool is reached only
through `PoolLike` / `StepLike` (protocol.py).

torch.compile: choose adapters with `adapters(...)` around the compiled call (the keyword form
calls the pool inside the forward, which a fullgraph trace cannot hold).  The buffers' shapes
never change, so a new assignment of the same batch shape does not recompile.

CUDA graphs: capture a forward inside a step, then for each new step open it with
`adapters(model, ids, tokens_per_request=L)` (which refills the tables and the plan for [B, L])
and replay: the graph reads the refilled buffers.

Not thread-safe: one patched model serves one forward (or generate) at a time.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..formats.targeting import TargetModules, select_modules
from .layers import PatchedLayer, PatchState, linear_shape, patched_class
from .protocol import PoolLike, StepLike

__all__ = ["adapters", "is_patched", "patch", "patched_modules", "patched_pool", "plan_tokens", "unpatch", "use_step"]

_STATE = "_minlora_patch_state"
_FORWARD_KEYWORD = "adapters"
# PEFT's mixed-batch forward spells "no adapter" this way; accept it so its callers can switch.
_PEFT_BASE = "__base__"

AdapterIds = Sequence[Optional[str]]


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` was applied to this model (and not undone)."""
    return getattr(model, _STATE, None) is not None


def patch(
    model: nn.Module,
    pool: PoolLike,
    target_modules: TargetModules = None,
    *,
    max_slots: Optional[int] = None,
    max_rank: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> nn.Module:
    """Makes the pool's adapters usable per batch row in `model` (in place); returns the model.

    pool: an AdapterPool (or any PoolLike) whose module names are the model's (`model.named_modules()`) and whose
        (in_features, out_features) match the layers.
    target_modules: which of the pool's modules to patch; a list matches names exactly or as a
        dotted suffix, a string is a regex matching the whole name (PEFT's rules).  Default: all of
        the pool's modules, i.e. the union of what its adapters target.
    max_slots, max_rank, max_tokens: capacities of the step buffers every patched layer reads
        (fixed once made, at the first step): the most distinct adapters per step (default: the
        pool's max_slots), the largest rank on any patched module (default: the largest the
        pool's pages hold, at most 128) and the most tokens per forward (default 2**20).  A step
        or forward beyond them raises ValueError.  Device memory: 8 * modules * max_slots *
        max_rank bytes of page tables.
    Until a step is chosen (`adapters(...)` or the `adapters=` keyword) the model computes exactly
    what it did before.
    """
    for name, v in (("max_slots", max_slots), ("max_rank", max_rank), ("max_tokens", max_tokens)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"minlora: {name} must be a positive int or None, got {v!r}")
    if is_patched(model):
        raise RuntimeError("minlora: this model is already patched; call minlora.unpatch(model) first")
    names = list(pool.module_names)
    chosen = select_modules(names, target_modules)
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
        shape = linear_shape(module)
        if shape is None:
            raise TypeError(
                f"minlora: {name!r} is a {type(module).__name__}; "
                "only nn.Linear and transformers' Conv1D are patched"
            )
        if isinstance(module, PatchedLayer):
            raise RuntimeError(f"minlora: {name!r} is already patched")
        layers[name] = module

    state = PatchState(pool=pool, layers=layers, max_slots=max_slots, max_rank=max_rank, max_tokens=max_tokens)
    for name, module in layers.items():
        # Plain attributes (not submodules / buffers): state_dict and parameters stay the model's.
        module.__dict__["_minlora_name"] = name
        module.__dict__["_minlora_state"] = state
        module.__class__ = patched_class(type(module))
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
    state: Optional[PatchState] = getattr(model, _STATE, None)
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
    state.deactivate()
    model.__dict__.pop("generate", None)
    del model.__dict__[_STATE]
    return model


def _state_of(model: nn.Module) -> PatchState:
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


def patched_pool(model: nn.Module) -> PoolLike:
    """The pool the model was patched with."""
    return _state_of(model).pool


def patched_modules(model: nn.Module) -> list[str]:
    """The names of the model's patched layers, in the model's order."""
    return list(_state_of(model).layers)


@contextlib.contextmanager
def adapters(
    model: nn.Module, adapter_ids: AdapterIds, *, wait: bool = True, tokens_per_request: Optional[int] = None
) -> Iterator[StepLike]:
    """Within the block, batch row i of every forward (and `generate`) uses adapter_ids[i]
    (None: the base model alone).  Yields the pool's Step.

    wait: block until every adapter is loaded (the default, so every row gets its adapter);
        with wait=False rows whose adapter is still loading run without it (step.ready says which).
    tokens_per_request: see use_step.
    """
    state = _state_of(model)
    step = state.pool.prepare(_normalise(adapter_ids), wait=wait)
    try:
        with use_step(model, step, tokens_per_request=tokens_per_request):
            yield step
    finally:
        step.release()


@contextlib.contextmanager
def use_step(model: nn.Module, step: StepLike, *, tokens_per_request: Optional[int] = None) -> Iterator[StepLike]:
    """Within the block the model's forwards use `step` (one slot per batch row, its page
    tables; a step with `lora_add` also decides the differentiable path, see protocol.py).
    The caller made the step (from the model's pool, or a wrapper of one) and releases it.

    tokens_per_request: also refill the token slots and plan for forwards of [B, that many]
        tokens (B = the step's requests) on entry.  Needed before replaying a CUDA graph
        captured over the patched model (a replay runs no Python, so nothing refills them);
        without it the first forward of each shape refills them.
    """
    state = _state_of(model)
    previous = state.snapshot()
    try:
        state.activate(step, tokens_per_request)
        yield step
    finally:
        state.restore(previous)


def plan_tokens(model: nn.Module, tokens_per_request: int) -> None:
    """Refills the current step's token slots and plan for forwards of [B, tokens_per_request]
    tokens (B = the step's requests), e.g. after a prefill and before replaying a CUDA graph
    captured over a decode forward (a replay runs no Python, so nothing else refills them)."""
    state = _state_of(model)
    if state.step is None:
        raise RuntimeError("minlora: no step is active (use minlora.adapters(...) first)")
    if isinstance(tokens_per_request, bool) or not isinstance(tokens_per_request, int) or tokens_per_request < 0:
        raise ValueError(f"minlora: tokens_per_request must be an int >= 0, got {tokens_per_request!r}")
    requests = int(state.host_request_slot.shape[0])
    state.plan_for(requests, requests * tokens_per_request)


def _pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state: PatchState = module.__dict__[_STATE]
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
            state.deactivate()
        else:
            step = state.pool.prepare(_normalise(ids), wait=True)
            state.keyword_steps.append((depth, step, previous))
            state.activate(step)
    return args, kwargs


def _post_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state: PatchState = module.__dict__[_STATE]
    if state.keyword_steps and state.keyword_steps[-1][0] == state.depth:
        _, step, previous = state.keyword_steps.pop()
        state.restore(previous)
        if step is not None:
            step.release()
    state.depth -= 1
    return output
