"""MinloraPunicaWrapper: vLLM's punica wrapper interface over minlora's op.

vLLM builds one wrapper per model and hands it to every LoRA layer.  Per step it calls
`update_metadata(mapping, lora_index_to_id, ...)`; here that builds the step's token_slot
and one BatchPlan on the host (StepSlots), kept until the next call.  Per layer it calls

    add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
        y [T, sum(out_i)] += scale * B_i,s (A_i,s x_t) on each output slice i (q/k/v, gate/up,
        or the one slice of o/down), for the tokens with a slot s; rows without one unchanged

which runs minlora's op once per slice on the layer's pools (layers.py: vLLM's stacked
tensors read in place, each slot at its true rank).  The per-layer path reads only tensors
the step and the layer already hold: no host synchronisation, no allocation but the
delta of a sliced output, fixed-capacity buffers.

Embedding and lm_head LoRA stay on vLLM's own computation (its torch ops' math), restricted
to the rows whose slot holds weights for the layer (vllm_path.py): vLLM's CPU ops read slot
-1 as the last slot, so stock vLLM gives the rows without an adapter the last slot's adapter
whenever that slot is occupied, and it computes lm_head LoRA for every row even when no
adapter targets lm_head.
add_shrink / add_expand (only vLLM's tensor-parallel and fully sharded paths call them)
are minlora's op with an identity pool on the other side.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ...ops import lora, lora_add_
from ...plan import BatchPlan
from .layers import LayerPages, PagedStack
from .step import StepSlots
from .vllm_path import slots_with_weights

__all__ = ["MinloraPunicaWrapper", "WRAPPER_QUALNAME"]

WRAPPER_QUALNAME = "minlora.integrations.vllm.wrapper.MinloraPunicaWrapper"

Tensor = torch.Tensor
Slices = Union[Tensor, Sequence[Tensor]]


def _pages_of(stacked: Sequence[Tensor]) -> LayerPages:
    if not isinstance(stacked, PagedStack):
        raise TypeError(
            "these LoRA weights were not allocated by minlora's layer classes (layers.py); "
            "the plugin must be registered before vLLM builds the model's LoRA layers"
        )
    return stacked.pages


class MinloraPunicaWrapper(PunicaWrapperCPU):
    """Drop-in for vLLM's PunicaWrapperCPU (same constructor, same methods)."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: Union[torch.device, str],
                 **kwargs: Any) -> None:
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        lora_config = kwargs.get("lora_config")
        if lora_config is None:
            raise TypeError("MinloraPunicaWrapper needs vLLM's lora_config")
        if lora_config.fully_sharded_loras:
            raise NotImplementedError("minlora's vLLM plugin does not support fully_sharded_loras yet")
        num_slots = int(lora_config.max_loras)
        self.step = StepSlots(max_num_batched_tokens, num_slots, device)
        self._ones = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._identity: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ per step

    def update_metadata(self, mapping: Any, lora_index_to_id: list[Optional[int]], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:
        self.step.update(mapping.index_mapping, mapping.prompt_mapping, lora_index_to_id)  # checks the mapping
        self.is_prefill = mapping.is_prefill
        # vLLM's own indices: its embedding layer reads _embeddings_indices, classification
        # heads read sampler_indices.  (Its prefill segments are not needed: they are only
        # for its own sgmv ops, which this wrapper does not call.)
        self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)

    # ------------------------------------------------------------------ linear layers

    def _scales(self, scale: float) -> Tensor:
        # vLLM folds each adapter's scale into its B when it loads it, and passes 1.0 here.
        return self._ones if scale == 1.0 else self._ones * scale

    def _step_tensors(self, num_rows: int) -> tuple[Tensor, BatchPlan]:
        """token_slot [num_rows] and the step's plan, for an x of num_rows rows."""
        self.step.check_rows(num_rows)
        return self.step.token_slots(num_rows), self.step.plan(num_rows)

    def add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked: Sequence[Tensor],
                        lora_b_stacked: Sequence[Tensor], scale: float, output_slices: Sequence[int], *,
                        buffer: Optional[Sequence[Tensor]] = None, **kwargs: Any) -> None:
        """y [T, sum(output_slices)] += the LoRA delta of every slice; x [T, in]."""
        pages = _pages_of(lora_a_stacked)
        if len(output_slices) != pages.num_slices:
            raise ValueError(f"{len(output_slices)} output slices for a layer with {pages.num_slices}")
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        T = x2.shape[0]
        if y2.shape[0] != T or y2.shape[1] != sum(output_slices):
            raise ValueError(f"y has shape {tuple(y2.shape)}, expected [{T}, {sum(output_slices)}]")
        token_slot, plan = self._step_tensors(T)
        scales = self._scales(scale)
        overwrite = kwargs.get("add_inputs", True) is False  # vLLM's dual-stream path: y = delta
        offset = 0
        for i, size in enumerate(output_slices):
            y_i = y2 if len(output_slices) == 1 else y2[:, offset:offset + size]
            if overwrite:
                y_i.zero_()
            args = (pages.a_pools[i], pages.b_pools[i], pages.pages, pages.pages, pages.ranks[i], scales, token_slot)
            x_i = x2 if x2.dtype == pages.a_pools[i].dtype else x2.to(pages.a_pools[i].dtype)
            if y_i.is_contiguous() and y_i.dtype == x_i.dtype:
                lora_add_(y_i, x_i, *args, plan=plan)
            else:
                # A column slice of qkv / gate_up is strided, and the accumulating op writes
                # only contiguous rows: the slice's delta goes through a temporary.
                y_i.add_(lora(x_i, *args, plan=plan).to(y_i.dtype))
            offset += size

    def _identity_pool(self, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """An identity pool [R, R] and its page table [S, R] (page j of every slot = e_j)."""
        key = (rank, dtype)
        if key not in self._identity:
            eye = torch.eye(rank, dtype=dtype, device=self.device)
            table = torch.arange(rank, dtype=torch.int32, device=self.device).repeat(self.step.num_slots, 1)
            self._identity[key] = (eye, table)
        return self._identity[key]

    def add_shrink(self, y: Slices, x: Tensor, lora_a_stacked: Sequence[Tensor], scale: float,
                   **kwargs: Any) -> None:
        """y[i] [T, R] = scale * A_i,s x_t for the tokens with a slot (0 for the others)."""
        pages = _pages_of(lora_a_stacked)
        x2 = x.reshape(-1, x.shape[-1])
        T = x2.shape[0]
        token_slot, plan = self._step_tensors(T)
        scales = self._scales(scale)
        for i in range(pages.num_slices):
            eye, table = self._identity_pool(pages.max_rank, pages.a_pools[i].dtype)
            x_i = x2.to(pages.a_pools[i].dtype)
            h = lora(x_i, pages.a_pools[i], eye, pages.pages, table, pages.ranks[i], scales, token_slot, plan=plan)
            y[i][:T, : pages.max_rank].copy_(h)

    def add_expand(self, y: Tensor, x: Slices, lora_b_stacked: Sequence[Tensor], output_slices: Sequence[int],
                   offset_start: int = 0, add_inputs: bool = True, **kwargs: Any) -> None:
        """y[:, slice i] += B_i,s x[i]_t for the tokens with a slot; x[i] [T, R]."""
        pages = _pages_of(lora_b_stacked)
        y2 = y.view(-1, y.shape[-1])
        T = y2.shape[0]
        token_slot, plan = self._step_tensors(T)
        offset = offset_start
        for i, size in enumerate(output_slices):
            eye, table = self._identity_pool(pages.max_rank, pages.b_pools[i].dtype)
            h = x[i][:T, : pages.max_rank].to(pages.b_pools[i].dtype)
            delta = lora(h, eye, pages.b_pools[i], table, pages.pages, pages.ranks[i], self._ones, token_slot,
                         plan=plan)
            y_i = y2[:, offset:offset + size]
            if add_inputs:
                y_i.add_(delta.to(y_i.dtype))
            else:
                y_i.copy_(delta)
            offset += size

    # ------------------------------------------------------------------ vLLM's own paths, adapter rows only

    def _rows_with_weights(self, rows: Tensor, slots: Tensor, lora_b_stacked: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        """The rows (and their slots) whose slot holds weights for this layer, on the device;
        None when there are none.  All on the host: rows, slots and the layer's slot flags."""
        flags = slots_with_weights(lora_b_stacked)
        if flags is not None and rows.numel():
            keep = flags[slots]
            rows, slots = rows[keep], slots[keep]
        if rows.numel() == 0:
            return None
        return rows.to(self.device), slots.to(self.device)

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor, add_inputs: bool = True,
                           **kwargs: Any) -> None:
        """y [T, dim] += B_s x_t ([L, 1, dim, R] B, x [T, R] = the embedding layer's A lookup)."""
        if not add_inputs:
            y.zero_()
        picked = self._rows_with_weights(self.step.token_rows, self.step.token_row_slots, lora_b_stacked)
        if picked is None:
            return
        rows, slots = picked
        b = lora_b_stacked.index_select(0, slots).flatten(0, 1).to(y.dtype)  # [n, dim, R]
        delta = torch.einsum("bi,boi->bo", x.index_select(0, rows).to(y.dtype), b)
        y.index_add_(0, rows, delta)

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor, scale: float,
                        *, buffer: Optional[Tensor] = None, **kwargs: Any) -> None:
        """y [N, vocab] += scale * B_s (A_s x_n) for the sampled rows with a slot."""
        picked = self._rows_with_weights(self.step.sample_rows, self.step.sample_row_slots, lora_b_stacked)
        if picked is None:
            return
        rows, slots = picked
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a = lora_a_stacked.index_select(0, slots).flatten(0, 1).float()  # [n, R, hidden]
        h = torch.einsum("bi,boi->bo", x2.index_select(0, rows).float(), a) * scale  # float32, as vLLM's buffer
        b = lora_b_stacked.index_select(0, slots).flatten(0, 1).to(y2.dtype)  # [n, vocab, R]
        delta = torch.einsum("bi,boi->bo", h.to(y2.dtype), b)
        width = min(delta.shape[1], y2.shape[1])  # vLLM pads the LoRA vocabulary
        y2[:, :width].index_add_(0, rows, delta[:, :width])
