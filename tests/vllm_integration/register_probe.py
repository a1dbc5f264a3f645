"""minlora's vLLM plugin hook in a fresh process; prints what it did as JSON (test_vllm_plugin.py).

    python register_probe.py off   # register() under MINLORA_VLLM unset / 0 / a bad value / another vLLM version
    python register_probe.py on    # vLLM's own plugin loader with MINLORA_VLLM=1, run twice
"""
from __future__ import annotations

import json
import os
import sys


def state() -> dict:
    import vllm.lora.utils as lora_utils
    from vllm.platforms import current_platform

    return {"wrapper": type(current_platform).get_punica_wrapper(),
            "classes": [c.__name__ for c in lora_utils._all_lora_classes],
            "lm_head": lora_utils.LogitsProcessorWithLoRA.__name__}


def error_of(fn) -> str:
    try:
        fn()
    except Exception as exc:  # the probe reports what the hook raised
        return f"{type(exc).__name__}: {exc}"
    return ""


def main(mode: str) -> dict:
    if mode == "on":
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        first = state()
        import minlora.integrations.vllm as plugin

        plugin.register()
        return {"first": first, "again": state()}
    import vllm

    import minlora.integrations.vllm as plugin

    report = {"before": state()}
    os.environ.pop("MINLORA_VLLM", None)
    plugin.register()
    report["unset"] = state()
    os.environ["MINLORA_VLLM"] = "0"
    plugin.register()
    report["zero"] = state()
    os.environ["MINLORA_VLLM"] = "maybe"
    report["bad_value"] = error_of(plugin.register)
    os.environ["MINLORA_VLLM"] = "1"
    real, vllm.__version__ = vllm.__version__, "0.33.0"
    report["other_version"] = error_of(plugin.register)
    vllm.__version__ = real
    report["after_refusals"] = state()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
