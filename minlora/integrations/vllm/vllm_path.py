"""The LoRA layers that stay on vLLM's own computation, embed_tokens and lm_head: which slots
hold weights for them.

vLLM wraps both in every LoRA model, whether or not any adapter targets them, and its lm_head
path gathers a [rows, vocab, R] copy of B per step.  These classes (a mixin in front of
vLLM's) record, per slot, whether set_lora stored weights (reset_lora: none), as a host
bool tensor [L] on the layer's B tensor, `lora_b_stacked.minlora_slots_with_weights`, the one
object vLLM hands the wrapper; the wrapper then runs vLLM's math only on the rows whose
slot holds weights for the layer, and not at all in a step without any.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .mixin import mixed_in

__all__ = ["SLOT_FLAGS", "SlotTrackingLoRA", "slots_with_weights", "tracked_class"]

SLOT_FLAGS = "minlora_slots_with_weights"


def slots_with_weights(lora_b_stacked: torch.Tensor) -> Optional[torch.Tensor]:
    """The [L] bool host tensor a tracked layer keeps on its B, or None for another layer's."""
    return getattr(lora_b_stacked, SLOT_FLAGS, None)


class SlotTrackingLoRA:
    """Mixed in front of VocabParallelEmbeddingWithLoRA or LogitsProcessorWithLoRA."""

    def create_lora_weights(self, max_loras: int, lora_config: Any, model_config: Optional[Any] = None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)  # type: ignore[misc]
        setattr(self.lora_b_stacked, SLOT_FLAGS, torch.zeros(max_loras, dtype=torch.bool))  # type: ignore[has-type]

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)  # type: ignore[misc]
        slots_with_weights(self.lora_b_stacked)[index] = False  # type: ignore[index]

    def set_lora(self, index: int, lora_a: Any, lora_b: Any) -> None:
        super().set_lora(index, lora_a, lora_b)  # type: ignore[misc]
        slots_with_weights(self.lora_b_stacked)[index] = True  # type: ignore[index]


def tracked_class(cls: type) -> type:
    """The slot-tracking version of vLLM's embedding or lm_head LoRA class (made once per class)."""
    return mixed_in(SlotTrackingLoRA, cls, "Tracked", "{} that records which slots hold weights.")
