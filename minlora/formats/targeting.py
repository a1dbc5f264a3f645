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

Regexes come from files anyone can write, and a backtracking engine can take hours on one
pattern (while holding the GIL), so every match runs on RE2 (linear in the name's length).  A
pattern is accepted only if Python's `re` (what PEFT uses) and RE2 both compile it and nothing
in it is read differently by the two ({,n} and nested sets are); patterns RE2 cannot run in
linear time (backreferences, lookarounds, possessive or atomic groups) are refused with a
ValueError naming the field.  The one remaining difference: RE2's \\d \\w \\s \\b are ASCII
(Python's are Unicode), which matters only for non-ASCII module names.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import re2

__all__ = ["check_targeting", "module_rank", "module_scale", "select_modules", "targets_module"]

TargetModules = Union[None, str, Sequence[str]]

# Module-name regexes are a line long; a bound keeps compiling (and the error message) cheap.
MAX_PATTERN_CHARS = 10_000
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error reaches the caller as a ValueError instead
# {,n} and {,} repeat in Python but are text in RE2.
_EMPTY_LOWER_BOUND = re.compile(r"\{,[0-9]*\}")


def _differently_read(pattern: str) -> Optional[str]:
    """What in `pattern` Python and RE2 would read differently, or None."""
    i, n, class_end_allowed = 0, len(pattern), -1
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "[":
                return "a '[' inside a character class (RE2 reads [:alpha:] as a class; escape it as \\[)"
            if c == "]" and i > class_end_allowed:
                in_class = False
        elif c == "[":
            in_class = True
            # A ']' right after '[' or '[^' is a literal in both engines.
            class_end_allowed = i + (2 if pattern[i + 1 : i + 2] == "^" else 1)
        elif c == "{" and _EMPTY_LOWER_BOUND.match(pattern, i):
            return "{,n} (write {0,n}: RE2 reads {,n} as text)"
        i += 1
    return None


@functools.lru_cache(maxsize=4096)
def _compile(field: str, shown: str, python_form: str, re2_form: str) -> Any:
    """RE2's compiled `re2_form` (which PEFT writes as `python_form`); ValueError naming `field`
    and the user's text `shown` when it cannot be matched safely and as PEFT would."""
    def refuse(why: str) -> ValueError:
        return ValueError(f"{field}: the regex {shown[:200]!r} is refused: {why}")

    if len(shown) > MAX_PATTERN_CHARS:
        raise refuse(f"longer than {MAX_PATTERN_CHARS} characters")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FutureWarnings about nested sets: refused below anyway
            re.compile(python_form)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise refuse(f"it is not a valid regex ({exc})") from None
    why = _differently_read(shown)
    if why is not None:
        raise refuse(f"it uses {why}")
    try:
        return re2.compile(re2_form, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise refuse(
            f"RE2 cannot run it in linear time ({detail}); backreferences, lookarounds, possessive and "
            "atomic groups are not supported"
        ) from None


def _whole_name_regex(field: str, pattern: str) -> Any:
    """target_modules / exclude_modules as a string: PEFT's re.fullmatch(pattern, name)."""
    return _compile(field, pattern, pattern, pattern)


def _pattern_key_regex(field: str, key: str) -> Any:
    r"""A rank_pattern / alpha_pattern key: PEFT's re.match(rf"(.*\.)?({key})$", name)."""
    composite = rf"(.*\.)?({key})$"
    return _compile(field, key, composite, composite)


def _layer_regex(pattern: Optional[str]) -> Any:
    r"""The regex whose `idx` group is the layer number, after `pattern` (or after any
    second-level component).  PEFT's \d is Unicode and its number goes through int(),
    which \p{Nd} reproduces on RE2."""
    if pattern is None:
        return _compile("layers_pattern", "", r".*?\.[^.]*\.(?P<idx>\d+)\.", r".*?\.[^.]*\.(?P<idx>\p{Nd}+)\.")
    return _compile(
        "layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
        rf"(?:^|.*?\.){pattern}\.(?P<idx>\p{{Nd}}+)\.",
    )


def _strings(field: str, value: Any) -> list[str]:
    """A list of module-name strings (a JSON list; a tuple or set from Python)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{field} must be a string or a list of strings, got {type(value).__name__}")
    bad = next((v for v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{field} must hold strings only, got {bad!r}")
    return list(value)


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


def _finite(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return float(value)


def _mapping(field: str, value: Any) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be a mapping of regex -> value, got {type(value).__name__}")
    bad = next((k for k in value if not isinstance(k, str)), None)
    if bad is not None:
        raise ValueError(f"{field} keys must be regex strings, got {bad!r}")
    return value


def _layer_list(value: Any) -> Optional[list[int]]:
    """layers_to_transform as a list of layer numbers; None when it does not restrict."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"layers_to_transform must be a layer number or a list of them, got {v!r}")
    return items or None


def _layer_patterns(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else _strings("layers_pattern", value)


def _layer_index(config: Mapping[str, Any], name: str) -> Optional[int]:
    """The layer number in `name` the way PEFT finds it: the first number after `layers_pattern`
    (or after any second-level component when no pattern is given)."""
    m = None
    for p in _layer_patterns(config.get("layers_pattern")) or [None]:
        m = _layer_regex(p).match(name)
        if m:
            break
    return int(m.group("idx")) if m else None


def _excluded(exclude: Any, name: str) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return _whole_name_regex("exclude_modules", exclude).fullmatch(name) is not None
    exclude = _strings("exclude_modules", exclude)
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
        return _whole_name_regex("target_modules", targets).fullmatch(name) is not None
    targets = _strings("target_modules", targets)
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = _layer_list(config.get("layers_to_transform"))
    if layers is None:
        return True
    idx = _layer_index(config, name)
    return idx is not None and idx in layers


def select_modules(names: Sequence[str], target_modules: TargetModules) -> list[str]:
    """The names that `target_modules` (PEFT's two forms; None = all) selects, in order."""
    if target_modules is None:
        return list(names)
    config = {"target_modules": target_modules if isinstance(target_modules, str) else list(target_modules)}
    return [n for n in names if targets_module(config, n)]


def _pattern_value(field: str, patterns: Any, name: str, default: Any) -> Any:
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key, a regex, such that
    # re.match(rf"(.*\.)?({key})$", name) succeeds.
    for key, value in _mapping(field, patterns).items():
        if _pattern_key_regex(field, key).match(name):
            return value
    return default


def module_rank(config: Mapping[str, Any], name: str) -> int:
    """r for this module: `rank_pattern` if a key matches, else `r`."""
    r = _pattern_value("rank_pattern", config.get("rank_pattern"), name, None)
    if r is not None:
        return _positive_int(f"rank_pattern (for {name!r})", r)
    return _positive_int("r", config.get("r", 8))


def module_scale(config: Mapping[str, Any], name: str, rank: Optional[int] = None) -> float:
    """The final scale of this module: alpha / r, or alpha / sqrt(r) with use_rslora.

    alpha comes from `alpha_pattern` if a key matches, else `lora_alpha`; r from `rank`
    (the stored tensors' rank) or the config.
    """
    r = module_rank(config, name) if rank is None else _positive_int("rank", rank)
    alpha = _pattern_value("alpha_pattern", config.get("alpha_pattern"), name, None)
    alpha = _finite(f"alpha_pattern (for {name!r})", alpha) if alpha is not None else _finite(
        "lora_alpha", config.get("lora_alpha", 8)
    )
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"use_rslora must be true or false, got {rslora!r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_targeting(config: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first targeting field of `config` that is malformed: r,
    lora_alpha, use_rslora, rank_pattern / alpha_pattern (keys and values), target_modules,
    exclude_modules (a regex, or a list of names), layers_to_transform, layers_pattern."""
    _positive_int("r", config.get("r", 8))
    _finite("lora_alpha", config.get("lora_alpha", 8))
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"use_rslora must be true or false, got {config.get('use_rslora')!r}")
    for field, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite)):
        for key, value in _mapping(field, config.get(field)).items():
            _pattern_key_regex(field, key)
            check(f"{field}[{key!r}]", value)
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            _whole_name_regex(field, value)
        elif value is not None:
            _strings(field, value)
    _layer_list(config.get("layers_to_transform"))
    for p in _layer_patterns(config.get("layers_pattern")):
        _layer_regex(p)
