"""Installs minlora into vLLM, in the current process: vLLM's platform chooses minlora's
punica wrapper, and vLLM's list of LoRA layer classes gets the paged linear classes.

Nothing of vLLM is forked or copied: two attributes are replaced, both read by vLLM at the
moment it builds a model's LoRA layers (`Platform.get_punica_wrapper()` in
`vllm.lora.punica_wrapper.punica_selector`, `vllm.lora.utils._all_lora_classes` in
`from_layer`).  Idempotent; vLLM calls the plugin once in each of its processes.
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
    from .wrapper import WRAPPER_QUALNAME

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"minlora's vLLM plugin runs on vLLM's CPU platform for now (this is {current_platform.device_name!r}); "
            "unset MINLORA_VLLM to use vLLM's own LoRA kernels here"
        )
    platform_cls = type(current_platform)
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    lora_utils._all_lora_classes = paged_lora_classes(lora_utils._all_lora_classes)
    _INSTALLED = True
    init_logger("vllm.minlora").info(
        "minlora is vLLM's LoRA backend in this process (pid %d, platform %s)", os.getpid(), platform_cls.__name__
    )
