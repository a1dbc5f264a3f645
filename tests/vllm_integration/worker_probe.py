"""What a vLLM worker's model holds, for the tests (sent to the worker by LLM.apply_model)."""
from __future__ import annotations


def inspect_lora_layers(model) -> dict:
    """Runs in the worker: the LoRA layers' classes and recorded slot ranks."""
    layers = {}
    for name, module in model.named_modules():
        wrapper = getattr(module, "punica_wrapper", None)
        if wrapper is None:
            continue
        pages = getattr(module, "minlora_pages", None)
        layers[name] = {
            "layer": type(module).__name__,
            "wrapper": type(wrapper).__name__,
            "ranks": pages.slot_ranks() if pages is not None else None,
        }
    return layers
