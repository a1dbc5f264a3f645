"""One step's adapter assignment, from vLLM's LoRA mapping, in fixed-capacity buffers.

vLLM describes a step by a LoRAMapping (the LoRA int id of every scheduled token and of
every sampled row, 0 = none) and its slot layout (`lora_index_to_id[s]` = the int id held
by slot s, or None).  StepSlots turns that, on the host, into minlora's token_slot and one
BatchPlan for the step, shared by every layer, and refills the same buffers each step:
every layer reads the same tensors, and a captured CUDA graph could replay them with new
contents.  vLLM skips update_metadata when a step repeats the last mapping and layout, so
the buffers keep their contents between steps.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ...plan import BatchPlan, build_plan

__all__ = ["StepSlots"]


class StepSlots:
    """The fixed-capacity step buffers (T <= capacity tokens, S slots):

    token_slot:   [capacity] int32  slot of token t, -1 = no adapter; -1 past the step's T tokens
    order:        [capacity] int32  the plan's token order; the identity past the step's T tokens,
                                    so for any n >= T, (token_slot[:n], order[:n], seg_offsets)
                                    is a valid plan for x with n rows (padded rows: no adapter)
    seg_offsets:  [S + 1] int32

    and, on the host, for the layers that stay on vLLM's own computation (embedding, lm_head):
    token_rows / token_row_slots:   [n] int64, the tokens with an adapter and their slots;
    sample_rows / sample_row_slots: [m] int64, the sampled rows with an adapter and their slots.
    """

    def __init__(self, capacity: int, num_slots: int, device: torch.device | str) -> None:
        if capacity < 0 or num_slots < 0:
            raise ValueError(f"capacity and num_slots must be >= 0, got {capacity} and {num_slots}")
        self.capacity, self.num_slots = int(capacity), int(num_slots)
        self.device = torch.device(device)
        self.token_slot = torch.full((capacity,), -1, dtype=torch.int32, device=self.device)
        self.order = torch.arange(capacity, dtype=torch.int32, device=self.device)
        self.seg_offsets = torch.zeros(num_slots + 1, dtype=torch.int32, device=self.device)
        self.num_tokens = 0  # of the current step, on the host (never read back from the device)
        empty = torch.zeros(0, dtype=torch.int64)
        self.token_rows, self.token_row_slots = empty, empty
        self.sample_rows, self.sample_row_slots = empty, empty
        self._plans: dict[int, BatchPlan] = {}

    # ------------------------------------------------------------------ per step

    def update(self, index_mapping: Sequence[int], prompt_mapping: Sequence[int],
               lora_index_to_id: Sequence[Optional[int]]) -> None:
        """Refills the buffers for a step; everything is computed on the host."""
        if len(lora_index_to_id) != self.num_slots:
            raise ValueError(f"the slot layout has {len(lora_index_to_id)} slots, expected {self.num_slots}")
        slots = self._slots_of(index_mapping, lora_index_to_id, "token")
        samples = self._slots_of(prompt_mapping, lora_index_to_id, "sampled row")
        T = slots.shape[0]
        if T > self.capacity or samples.shape[0] > self.capacity:
            raise ValueError(
                f"the step has {T} tokens and {samples.shape[0]} sampled rows, more than the "
                f"capacity of {self.capacity} (max_num_batched_tokens)"
            )
        plan = build_plan(slots, self.num_slots)  # host counting sort; checks the slot values

        prev = self.num_tokens
        if prev > T:  # restore the no-adapter / identity tail the last step overwrote
            self.token_slot[T:prev].fill_(-1)
            self.order[T:prev].copy_(torch.arange(T, prev, dtype=torch.int32))
        self._put(self.token_slot, slots)
        self._put(self.order, plan.order)
        self._put(self.seg_offsets, plan.seg_offsets)
        self.num_tokens = T
        self.token_rows = torch.nonzero(slots >= 0).flatten()
        self.token_row_slots = slots[self.token_rows].long()
        self.sample_rows = torch.nonzero(samples >= 0).flatten()
        self.sample_row_slots = samples[self.sample_rows].long()

    def _slots_of(self, lora_ids: Sequence[int], lora_index_to_id: Sequence[Optional[int]], what: str) -> torch.Tensor:
        """[n] int32: the slot of each LoRA int id (-1 for 0 = no adapter)."""
        ids = torch.as_tensor(tuple(lora_ids), dtype=torch.int64)
        slots = torch.full(ids.shape, -1, dtype=torch.int32)
        for slot, lora_id in enumerate(lora_index_to_id):
            if lora_id is not None:
                slots[ids == lora_id] = slot
        missing = (ids > 0) & (slots < 0)
        if bool(missing.any()):
            first = int(torch.nonzero(missing)[0])
            raise ValueError(f"{what} {first} uses LoRA id {int(ids[first])}, which holds no slot in {list(lora_index_to_id)}")
        if bool((ids < 0).any()):
            raise ValueError(f"LoRA ids must be >= 0 (0 = no adapter), got {int(ids.min())}")
        return slots

    def _put(self, buffer: torch.Tensor, host: torch.Tensor) -> None:
        # From the host without synchronising: pinned staging on CUDA, a plain copy on CPU.
        if self.device.type == "cuda":
            host = host.pin_memory()
        buffer[: host.shape[0]].copy_(host, non_blocking=True)

    # ------------------------------------------------------------------ per layer (no host syncs)

    def check_rows(self, num_rows: int) -> None:
        """x of a layer has num_rows rows: at least the step's tokens (more: padded rows)."""
        if not self.num_tokens <= num_rows <= self.capacity:
            raise ValueError(
                f"x has {num_rows} rows but the step mapped {self.num_tokens} tokens "
                f"(capacity {self.capacity}): update_metadata was not called for this batch"
            )

    def token_slots(self, num_rows: int) -> torch.Tensor:
        """[num_rows] int32 (a view of the fixed buffer)."""
        return self.token_slot[:num_rows]

    def plan(self, num_rows: int) -> BatchPlan:
        """The step's BatchPlan for x with num_rows rows (views of the fixed buffers)."""
        plan = self._plans.get(num_rows)
        if plan is None:
            plan = self._plans[num_rows] = BatchPlan(self.order[:num_rows], self.seg_offsets)
        return plan
