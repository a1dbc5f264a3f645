"""Installs minlora into vLLM, in the current process: vLLM's platform chooses minlora's
punica wrapper, and vLLM's LoRA layer classes become the paged linear classes (layers.py) and
the slot-tracking embedding and lm_head classes (vllm_path.py).

Nothing of vLLM is forked or copied: three attributes are replaced, all read by vLLM when it
builds a model's LoRA layers (`Platform.get_punica_wrapper()` in
`vllm.lora.punica_wrapper.punica_selector`; `_all_lora_classes` and `LogitsProcessorWithLoRA`
in `vllm.lora.utils`).  Idempotent; vLLM calls the plugin once in each of its processes.
"""
from __future__ import annotations

import os

__all__ = ["install", "installed"]

_INSTALLED = False


def installed() -> bool:
    """Whether install() ran in this process."""
    return _INSTALLED


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import vllm.lora.utils as lora_utils
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    from .layers import paged_lora_classes
    from .vllm_path import tracked_class
    from .wrapper import WRAPPER_QUALNAME

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"minlora's vLLM plugin runs on vLLM's CPU platform for now (this is {current_platform.device_name!r}); "
            "unset MINLORA_VLLM to use vLLM's own LoRA kernels here"
        )
    platform_cls = type(current_platform)
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    embedding = lora_utils.VocabParallelEmbeddingWithLoRA
    lora_utils._all_lora_classes = tuple(
        tracked_class(c) if c is embedding else c for c in paged_lora_classes(lora_utils._all_lora_classes)
    )
    # lm_head's LoRA class is made by name in from_layer_logits_processor, not from the list.
    lora_utils.LogitsProcessorWithLoRA = tracked_class(lora_utils.LogitsProcessorWithLoRA)
    _INSTALLED = True
    init_logger("vllm.minlora").info(
        "minlora is vLLM's LoRA backend in this process (pid %d, platform %s)", os.getpid(), platform_cls.__name__
    )
