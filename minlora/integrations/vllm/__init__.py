"""minlora as vLLM's LoRA backend: a vLLM plugin.

Installed with minlora, it is the entry point `vllm.general_plugins: minlora =
minlora.integrations.vllm:register`, which vLLM runs in each of its processes (the front
end, the engine core, every worker).  It does nothing unless the user opts in with
MINLORA_VLLM=1; then it checks that vLLM is the one supported version (SUPPORTED_VLLM_VERSION)
and makes vLLM compute linear LoRA layers with minlora's op:

- wrapper.py  MinloraPunicaWrapper: one BatchPlan per step, minlora's op per layer;
- layers.py   the weights hook: B stored as rows of B^T, each slot's true rank recorded;
- step.py     the step's token slots and plan in fixed-capacity buffers;
- hooks.py    where vLLM is told (its platform's punica wrapper, its LoRA layer classes).

See README.md in this folder for the design, what stays on vLLM's path (embedding and
lm_head LoRA), and the CUDA step.
"""
from __future__ import annotations

from .activation import ENV_VAR, enabled
from .version import SUPPORTED_VLLM_VERSION, check_vllm_version

__all__ = ["ENV_VAR", "SUPPORTED_VLLM_VERSION", "check_vllm_version", "enabled", "register"]


def register() -> None:
    """vLLM's plugin hook: with MINLORA_VLLM=1, makes minlora vLLM's LoRA backend in this
    process (RuntimeError for an unsupported vLLM version or platform); otherwise a no-op."""
    if not enabled():
        return
    check_vllm_version()
    from .hooks import install

    install()
