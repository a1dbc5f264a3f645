"""Read and write the PEFT LoRA adapter format (adapter_config.json + adapter_model.safetensors).

`load_peft(path)` gives an `Adapter` keyed by the model's module names
("model.layers.0.self_attn.q_proj"), each with its final scale (alpha / r, or alpha / sqrt(r)
for rsLoRA, after `rank_pattern` / `alpha_pattern`).  `save_peft(adapter, path)` writes one that
PEFT's `PeftModel.from_pretrained` loads with the same per-module ranks and scales.

Only safetensors is read: a pickled `adapter_model.bin` is refused, never unpickled.
Variants whose forward is not plain `y += scale * B A x` (DoRA, LoRA bias, modules_to_save,
embedding LoRA, bias != "none", ...) are refused with an `UnsupportedAdapterError` (a
ValueError) naming the field; a malformed config or weights file gives a ValueError naming the
file and what is wrong (the config's rules: peft_config.py and targeting.py).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from .adapter import Adapter, LoraWeights, check_adapter
from .atomic import write_atomic
from .peft_config import CONFIG_NAME, UnsupportedAdapterError, check_config, check_supported, read_config
from .targeting import module_rank, module_scale, targets_module

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "UnsupportedAdapterError", "check_config", "check_supported", "load_peft",
           "read_config", "save_peft"]

WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# PeftModel saves its state dict from PeftModel -> LoraModel -> the wrapped model.
_KEY_PREFIX = "base_model.model."

PathLike = Union[str, "os.PathLike[str]"]


# Tensor name parts that mark a variant, checked over the whole file first so the refusal names
# the feature rather than whatever odd tensor comes first.
_REFUSED_TENSORS = (
    ("lora_embedding_A", "embedding LoRA (a target is an nn.Embedding)"),
    ("lora_embedding_B", "embedding LoRA (a target is an nn.Embedding)"),
    ("lora_magnitude_vector", "use_dora"),
    ("modules_to_save", "modules_to_save"),
)


def _check_tensor_names(keys: Iterable[str]) -> None:
    keys = list(keys)
    for part, what in _REFUSED_TENSORS:
        hit = next((k for k in keys if f".{part}." in k or k.endswith(f".{part}")), None)
        if hit is not None:
            raise UnsupportedAdapterError(f"{what}: tensor {hit!r} is not supported")
    hit = next((k for k in keys if ".base_layer." in k), None)
    if hit is not None:
        raise UnsupportedAdapterError(
            f"save_embedding_layers: tensor {hit!r} is a base-model weight saved with the adapter"
        )


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', 'lora_A')."""
    if not key.startswith(_KEY_PREFIX):
        raise ValueError(f"unexpected tensor {key!r}: PEFT keys start with {_KEY_PREFIX!r}")
    rest = key[len(_KEY_PREFIX):]
    m = re.fullmatch(r"(?P<module>.+)\.(?P<kind>lora_[AB])\.(?P<param>weight|bias)", rest)
    if m is None:
        raise ValueError(f"unexpected tensor {key!r} in a PEFT LoRA adapter")
    if m["param"] == "bias":
        raise UnsupportedAdapterError(f"lora_bias: tensor {key!r} is a bias on {m['kind']}")
    return m["module"], m["kind"]


def _read_tensors(weights_file: str, device: Union[str, torch.device]) -> dict[str, torch.Tensor]:
    try:
        return load_file(weights_file, device=str(device))
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, KeyError) as exc:
        raise ValueError(
            f"{weights_file!r} is not a readable safetensors file ({type(exc).__name__}: {exc})"
        ) from None


def _modules(
    config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]
) -> dict[str, LoraWeights]:
    """module name -> LoraWeights from the file's tensors, checked against the config."""
    _check_tensor_names(tensors)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, kind = _split_key(key)
        if t.dim() != 2:
            raise UnsupportedAdapterError(
                f"target_modules: {module!r} has a {t.dim()}-D {kind} (convolution LoRA is not supported)"
            )
        factors.setdefault(module, {})[kind] = t if dtype is None else t.to(dtype)

    targets = config.get("target_modules")
    check_targets = targets is not None and targets != "all-linear"
    modules: dict[str, LoraWeights] = {}
    for module in sorted(factors):
        pair = factors[module]
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"module {module!r} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} differ in rank"
            )
        rank = a.shape[0]
        want = module_rank(config, module)
        if rank != want:
            raise ValueError(
                f"r / rank_pattern: module {module!r} stores rank {rank} but the config gives {want}"
            )
        if check_targets and not targets_module(config, module):
            raise ValueError(
                f"target_modules / exclude_modules / layers_to_transform: the file holds {module!r}, "
                "which the config does not target"
            )
        scale = module_scale(config, module, rank)
        modules[module] = LoraWeights(a=a.contiguous(), b=b.contiguous(), scale=scale)
    if not modules:
        raise ValueError("it holds no LoRA weights")
    return modules


def _naming(file: str, exc: Exception) -> ValueError:
    """`exc` (a refusal of what `file` holds) as a ValueError (or UnsupportedAdapterError) naming the file."""
    kind = UnsupportedAdapterError if isinstance(exc, UnsupportedAdapterError) else ValueError
    return kind(f"{file!r}: {exc}")


def load_peft(
    path: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
) -> Adapter:
    """Reads a PEFT LoRA adapter directory into an `Adapter`.

    Each module's LoraWeights holds a [r, in] (PEFT's lora_A.weight), b [out, r] (lora_B.weight)
    and the final scale.  `fan_in_fan_out` (GPT-2's Conv1D) changes only how PEFT merges the
    delta into the transposed base weight, not the stored factors, so a and b are read as they are.
    The config is kept in `Adapter.config`.

    Raises FileNotFoundError for a missing file, UnsupportedAdapterError for a variant minlora
    does not implement, and ValueError naming the file and the field for anything malformed.
    """
    path = os.fspath(path)
    config = read_config(path)
    try:
        check_config(config)
    except ValueError as exc:
        raise _naming(os.path.join(path, CONFIG_NAME), exc) from None
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        pickled = [n for n in _PICKLED_NAMES if os.path.isfile(os.path.join(path, n))]
        if pickled:
            raise ValueError(
                f"{pickled[0]} is a pickle; minlora reads only {WEIGHTS_NAME} and never unpickles "
                "(convert it with safetensors first)"
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in the PEFT adapter directory {path!r}")
    tensors = _read_tensors(weights_file, device)
    try:
        adapter = Adapter(modules=_modules(config, tensors, dtype), config=config)
        check_adapter(adapter, "the adapter")
    except (ValueError, TypeError) as exc:
        raise _naming(weights_file, exc) from None
    return adapter


def _round_alpha(alpha: float) -> Union[int, float]:
    # alpha = scale * r comes back with rounding noise; PEFT's configs carry integers as a rule.
    near = round(alpha)
    return int(near) if abs(alpha - near) <= 1e-9 * max(1.0, abs(alpha)) else alpha


# Fields of the source config that describe the model and task, not the weights; kept on write.
_KEPT_FIELDS = ("base_model_name_or_path", "task_type", "revision", "auto_mapping", "fan_in_fan_out")
# Fields every written config sets the same way: targets are full names, and none of the refused
# variants is on.
_WRITTEN_FIXED: dict[str, Any] = {
    "peft_type": "LORA", "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    "lora_dropout": 0.0, "bias": "none", "use_dora": False, "lora_bias": False, "modules_to_save": None,
    "init_lora_weights": True, "inference_mode": True,
}


def save_peft(adapter: Adapter, path: PathLike, *, config: Optional[Mapping[str, Any]] = None) -> None:
    """Writes `adapter` as a PEFT LoRA adapter directory (created if missing).

    The written config targets exactly the adapter's modules (by full name) and reproduces each
    module's rank and scale through r / lora_alpha plus rank_pattern / alpha_pattern.  `config`
    (default: `adapter.config`) supplies use_rslora and the descriptive fields (base model name,
    task type, fan_in_fan_out for Conv1D models).
    """
    check_adapter(adapter)
    source = dict(adapter.config if config is None else config)
    rslora = bool(source.get("use_rslora", False))
    names = sorted(adapter.modules)

    def alpha_of(w: LoraWeights) -> float:
        return w.scale * (math.sqrt(w.rank) if rslora else w.rank)

    r = Counter(adapter.modules[n].rank for n in names).most_common(1)[0][0]
    lora_alpha = _round_alpha(Counter(alpha_of(adapter.modules[n]) for n in names).most_common(1)[0][0])
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Union[int, float]] = {}
    for n in names:
        w = adapter.modules[n]
        key = re.escape(n)  # pattern keys are regexes matched against the full name
        if w.rank != r:
            rank_pattern[key] = w.rank
        alpha = _round_alpha(alpha_of(w))
        if alpha != lora_alpha:
            alpha_pattern[key] = alpha

    out: dict[str, Any] = {k: source[k] for k in _KEPT_FIELDS if k in source}
    out.update(_WRITTEN_FIXED)
    out.update(r=r, lora_alpha=lora_alpha, use_rslora=rslora, rank_pattern=rank_pattern,
               alpha_pattern=alpha_pattern, target_modules=names)
    out.setdefault("fan_in_fan_out", False)

    tensors: dict[str, torch.Tensor] = {}
    for n in names:
        w = adapter.modules[n]
        tensors[f"{_KEY_PREFIX}{n}.lora_A.weight"] = w.a.detach().to("cpu").contiguous()
        tensors[f"{_KEY_PREFIX}{n}.lora_B.weight"] = w.b.detach().to("cpu").contiguous()
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    # Each file is replaced whole; the weights go first, so a reader that finds the new
    # config also finds the weights it describes.
    write_atomic(os.path.join(path, WEIGHTS_NAME), st_save(tensors, metadata={"format": "pt"}))
    write_atomic(os.path.join(path, CONFIG_NAME), json.dumps(out, indent=2, sort_keys=True).encode())
