"""PEFT's targeting rules, on module names: which modules a LoRA config adapts, and each one's rank
and scale.  Pure functions of a config (a dict, as in adapter_config.json) and a module's full
name in the model ("model.layers.0.self_attn.q_proj"); nothing here reads files or models.

    target_modules       a list matches a name exactly or as a dotted suffix; a string is a
                         regex that must match the whole name ("all-linear" is PEFT's own word)
    exclude_modules      wins over target_modules (the same two forms)
    layers_to_transform  with list targets: only these layer numbers (an int or a list), the
    / layers_pattern     number being the first one after `layers_pattern` (or after any
                         second-level component when no pattern is given)
    rank_pattern /       {regex: value}: the first key matching a dotted suffix of the name
    alpha_pattern        overrides r / lora_alpha
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["module_rank", "module_scale", "select_modules", "targets_module"]

TargetModules = Union[None, str, Sequence[str]]


def _as_list(v: Any) -> list:
    return [v] if isinstance(v, (str, int)) else list(v)


def _layer_index(config: Mapping[str, Any], name: str) -> Optional[int]:
    """The layer number in `name` the way PEFT finds it: the first number after `layers_pattern`
    (or after any second-level component when no pattern is given)."""
    patterns = config.get("layers_pattern")
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in _as_list(patterns):
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _excluded(exclude: Any, name: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return name in exclude or any(name.endswith("." + e) for e in exclude)


def targets_module(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT would put this adapter on the module called `name` (its full name in the model).

    An exact name in a target list is taken as given, even with layers_to_transform (PEFT does
    the same); suffix matches are filtered by layer number.
    """
    if _excluded(config.get("exclude_modules"), name):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _layer_index(config, name)
    return idx is not None and idx in _as_list(layers)


def select_modules(names: Sequence[str], target_modules: TargetModules) -> list[str]:
    """The names that `target_modules` (PEFT's two forms; None = all) selects, in order."""
    if target_modules is None:
        return list(names)
    config = {"target_modules": target_modules if isinstance(target_modules, str) else list(target_modules)}
    return [n for n in names if targets_module(config, n)]


def _pattern_value(patterns: Optional[Mapping[str, Any]], name: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key, a regex, that matches a
    # dotted suffix of the name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_rank(config: Mapping[str, Any], name: str) -> int:
    """r for this module: `rank_pattern` if a key matches, else `r`."""
    return int(_pattern_value(config.get("rank_pattern"), name, config.get("r", 8)))


def module_scale(config: Mapping[str, Any], name: str, rank: Optional[int] = None) -> float:
    """The final scale of this module: alpha / r, or alpha / sqrt(r) with use_rslora.

    alpha comes from `alpha_pattern` if a key matches, else `lora_alpha`; r from `rank`
    (the stored tensors' rank) or the config.
    """
    r = module_rank(config, name) if rank is None else rank
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r
