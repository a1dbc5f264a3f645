"""PEFT's adapter_config.json: reading it safely, and refusing what minlora cannot honour.

A config is a file anyone can write: it is read only up to MAX_CONFIG_BYTES, must be UTF-8
JSON holding an object, and every value minlora uses is checked (check_config) before it
steers anything, so a malformed one gives a ValueError naming the field instead of a crash
or a wrong adapter later.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

from .targeting import check_targeting

__all__ = ["CONFIG_NAME", "MAX_CONFIG_BYTES", "UnsupportedAdapterError", "check_config", "check_supported",
           "read_config"]

CONFIG_NAME = "adapter_config.json"
# Real configs are a few KiB; this leaves room for long rank/alpha patterns and refuses the rest.
MAX_CONFIG_BYTES = 16 << 20

PathLike = Union[str, "os.PathLike[str]"]


class UnsupportedAdapterError(ValueError):
    """The adapter uses a PEFT feature minlora does not implement; the message names the field."""


# field -> predicate on its value that means "this adapter needs a forward minlora does not have".
# Fields not listed are either inference no-ops (lora_dropout, inference_mode) or only steer
# initialisation (init_lora_weights, loftq/eva/corda/lora_ga configs), which the saved weights already hold.
def _truthy(v: Any) -> bool:
    return bool(v)


_REFUSED_FIELDS: dict[str, tuple[Any, str]] = {
    "use_dora": (_truthy, "DoRA (weight-decomposed LoRA) is not supported"),
    "lora_bias": (_truthy, "a bias on lora_B is not supported"),
    "modules_to_save": (_truthy, "fully trained extra modules are not supported"),
    "bias": (lambda v: v not in (None, "none"), "training the base layers' biases is not supported"),
    "target_parameters": (_truthy, "LoRA on bare parameters is not supported"),
    "trainable_token_indices": (_truthy, "trainable token embeddings are not supported"),
    "alora_invocation_tokens": (_truthy, "activated LoRA (aLoRA) is not supported"),
    "use_qalora": (_truthy, "QA-LoRA is not supported"),
    "layer_replication": (_truthy, "layer replication is not supported"),
    "use_bdlora": (_truthy, "block-diagonal LoRA is not supported"),
    "arrow_config": (_truthy, "Arrow routing is not supported"),
    "kasa_config": (_truthy, "KaSA is not supported"),
    "velora_config": (_truthy, "VeLoRA is not supported"),
    "monteclora_config": (_truthy, "MonteCLoRA is not supported"),
}


def check_supported(config: Mapping[str, Any]) -> None:
    """Raises UnsupportedAdapterError naming the first config field minlora cannot honour."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(f"peft_type={peft_type!r}: only LORA adapters are supported")
    for name, (bad, why) in _REFUSED_FIELDS.items():
        if name in config and bad(config[name]):
            raise UnsupportedAdapterError(f"{name}={config[name]!r}: {why}")


def read_config(path: PathLike) -> dict[str, Any]:
    """The adapter's adapter_config.json as a dict (its values not yet checked: check_config).

    Raises FileNotFoundError when there is none, ValueError naming the file when it is larger
    than MAX_CONFIG_BYTES (refused before it is read), not UTF-8, not JSON (or nested past
    what the parser recurses through), or not a JSON object.
    """
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in the PEFT adapter directory {os.fspath(path)!r}")
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{file!r} is {size} bytes; a config larger than {MAX_CONFIG_BYTES} bytes is refused")
        data = f.read(MAX_CONFIG_BYTES + 1)  # bounded even if the file grows meanwhile
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{file!r} is larger than {MAX_CONFIG_BYTES} bytes; refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file!r} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{file!r} nests its JSON too deeply to be a PEFT config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file!r} must hold a JSON object, got {type(config).__name__}")
    return config


def check_config(config: Mapping[str, Any]) -> None:
    """Raises UnsupportedAdapterError for a variant minlora does not implement, ValueError
    naming the field for a malformed value (r, lora_alpha, patterns, targets, layers: see
    minlora.formats.targeting.check_targeting)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"a PEFT config must be a mapping, got {type(config).__name__}")
    check_supported(config)
    check_targeting(config)
