"""The seam between the registry and the PEFT adapter format.

When `minlora.peft_io` (the PEFT reader/writer) is importable, import and export go through
its `load_peft(path) -> Adapter` and `save_peft(adapter, path)`, so the registry accepts
exactly what the patcher accepts.  Without it, a small built-in fallback reads and writes
the plain case (a directory with adapter_model.safetensors + adapter_config.json, lora_A /
lora_B weights, r / lora_alpha / use_rslora / rank_pattern / alpha_pattern) and refuses
anything else with a clear error.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from typing import Any

from safetensors.torch import load_file, save_file

from ..adapter import Adapter, LoraWeights

__all__ = ["read_peft", "using_peft_io", "write_peft"]

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$"
)


def _peft_io() -> Any | None:
    try:
        mod = importlib.import_module("minlora.peft_io")
    except ImportError:
        return None
    if hasattr(mod, "load_peft") and hasattr(mod, "save_peft"):
        return mod
    return None


def using_peft_io() -> bool:
    """True when import/export go through minlora.peft_io."""
    return _peft_io() is not None


def read_peft(path: str) -> Adapter:
    """A PEFT adapter directory -> Adapter."""
    mod = _peft_io()
    if mod is not None:
        return mod.load_peft(path)
    return _fallback_read(path)


def write_peft(adapter: Adapter, path: str) -> None:
    """Adapter -> a PEFT adapter directory."""
    mod = _peft_io()
    if mod is not None:
        mod.save_peft(adapter, path)
        return
    _fallback_write(adapter, path)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches a pattern key against the end of the module name.
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(f"(.*\\.)?{key}", module):
            return value
    return default


def _fallback_read(path: str) -> Adapter:
    cfg_path = os.path.join(path, _CONFIG)
    w_path = os.path.join(path, _WEIGHTS)
    if not os.path.isfile(cfg_path) or not os.path.isfile(w_path):
        raise FileNotFoundError(f"{path}: expected {_CONFIG} and {_WEIGHTS} (a PEFT adapter directory)")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    for flag in ("use_dora",):
        if config.get(flag):
            raise ValueError(f"{path}: {flag} adapters are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: LoRA bias ({config['bias']!r}) is not supported")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save is not supported")
    tensors = load_file(w_path)
    parts: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        parts.setdefault(m["module"], {})[m["ab"]] = t
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraWeights] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {module!r} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if config.get("fan_in_fan_out"):
            pass  # lora_A/lora_B are stored [r, in] / [out, r] either way; only the base is transposed
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / (math.sqrt(r) if rslora else r)
        modules[module] = LoraWeights(a=a, b=b, scale=scale)
    return Adapter(modules=modules, config=config)


def _fallback_write(adapter: Adapter, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for module, w in adapter.modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = w.a.detach().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = w.b.detach().cpu().contiguous()
    config = dict(adapter.config)
    config.setdefault("peft_type", "LORA")
    ranks = {m: w.rank for m, w in adapter.modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    rslora = bool(config.get("use_rslora", False))
    config["r"] = r
    config["rank_pattern"] = {m: k for m, k in ranks.items() if k != r}
    # Alphas that reproduce each module's scale exactly (scale = alpha / r or alpha / sqrt(r)).
    alphas = {m: w.scale * (math.sqrt(w.rank) if rslora else w.rank) for m, w in adapter.modules.items()}
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config["lora_alpha"] = alpha
    config["alpha_pattern"] = {m: a for m, a in alphas.items() if a != alpha}
    config.setdefault("target_modules", sorted({m.rsplit(".", 1)[-1] for m in adapter.modules}))
    save_file(tensors, os.path.join(path, _WEIGHTS))
    with open(os.path.join(path, _CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
