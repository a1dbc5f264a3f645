"""Whether the user opted in: MINLORA_VLLM=1 makes minlora vLLM's LoRA backend.

vLLM runs every installed general plugin in each of its processes, so installing minlora
must change nothing until the user asks for it.  vLLM itself has no setting that selects a
LoRA backend; its own plugin switch, VLLM_PLUGINS, when set, must name "minlora" as well.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

__all__ = ["ENV_VAR", "enabled"]

ENV_VAR = "MINLORA_VLLM"

_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})


def enabled(environ: Optional[Mapping[str, str]] = None) -> bool:
    """True when MINLORA_VLLM is 1 (or true / yes / on); False when unset, empty or 0.

    Any other value raises ValueError: a typo must not silently run vLLM without minlora.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"{ENV_VAR}={raw!r} is not understood: set {ENV_VAR}=1 to make minlora vLLM's LoRA backend, "
        f"or unset it (or 0) to run vLLM as it is"
    )
