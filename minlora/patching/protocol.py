"""What a patched model needs from a pool and from one of its steps: nothing about tiers,
files or allocation, so any pool that hands out page tables can drive a patched model."""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from ..ops import ModuleTables

__all__ = ["LoraAddFn", "PoolLike", "StepLike"]

# A step's own differentiable path for one module's LoRA delta (see StepLike.lora_add):
# (module name, x [T, in], y [T, out] the base layer's output, the module's tables (views of the
#  patch's fixed-capacity step buffers: [max_slots, max_rank], unused slots of rank 0),
#  token_slot [T] int32, plan) -> y + delta [T, out]  (y may be updated in place).
LoraAddFn = Callable[[str, torch.Tensor, torch.Tensor, ModuleTables, torch.Tensor, Any], torch.Tensor]


class StepLike(Protocol):
    """One step: a slot per request and, per module, the op's arguments for those slots."""

    @property
    def num_slots(self) -> int:
        """S: the slots the page tables cover (the same for every module of the step)."""

    @property
    def request_slot(self) -> torch.Tensor:
        """[B] int32: the slot of each request, -1 = no adapter."""

    def tables(self, module: str) -> ModuleTables:
        """The pools and [S, R] page tables of `module` for this step."""

    def release(self) -> None:
        """The step is over: its adapters may be evicted and its tables reused."""

    # Optional: `host_tables(modules) -> minlora.plan.HostTables`, every listed module's page
    # tables at once on the host (the pool's Step has it): the patch refills its step buffers
    # from it in one copy.  Without it the patch reads `tables(module)` module by module.
    #
    # Optional: a step may have `lora_add: LoraAddFn`.  When it has one and autograd is
    # recording, every patched layer adds its delta with it (always, even when neither x nor
    # the base output needs a gradient) instead of `minlora.ops.lora`: a training step decides
    # there how the adapters' gradients are kept.  Without it (or under no_grad) the patch uses
    # the op's own autograd, or the in-place op.


class PoolLike(Protocol):
    """A source of steps over a fixed set of modules (the model's names, as in named_modules())."""

    @property
    def module_names(self) -> Sequence[str]:
        """Every module the pool holds adapters for."""

    @property
    def max_slots(self) -> int:
        """The most distinct adapters one step may use."""

    def prepare(self, adapter_ids: Sequence[Optional[str]], *, wait: bool = False) -> StepLike:
        """A step with one entry per request (an adapter id, or None for the base model)."""
