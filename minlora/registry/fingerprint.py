"""Base-model fingerprints: which base an adapter was trained on, as one sha256.

An adapter is only meaningful on top of the base it was trained against, so every revision
records this.  By default the fingerprint covers the model's config and the names, shapes
and dtypes of its tensors (fast, no weights read); `include_weights=True` also hashes the
weights, which tells apart two checkpoints of the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["fingerprint_base_model"]


def _config_dict(model: Any, config: Mapping[str, Any] | None) -> dict[str, Any]:
    if config is not None:
        return dict(config)
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_diff_dict"):
        # transformers: only the values that differ from the defaults, so the fingerprint does
        # not change when a transformers upgrade adds a new default field.
        return cfg.to_diff_dict()
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


def fingerprint_base_model(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    include_weights: bool = False,
) -> str:
    """sha256 (hex) over the base model's config and tensor names / shapes / dtypes.

    `model` is an nn.Module (its state_dict is used; `model.config` is used as the config
    when none is given) or a mapping of names to tensors.  Keys volatile across runs (such as
    transformers' `_name_or_path` and `transformers_version`) are dropped from the config.
    """
    state = model.state_dict() if isinstance(model, torch.nn.Module) else dict(model)
    cfg = {
        k: v
        for k, v in _config_dict(model, config).items()
        if k not in ("_name_or_path", "transformers_version")
    }
    h = hashlib.sha256(b"minlora-base-v1\0")
    # default=str: configs may hold values JSON has no type for (a torch.dtype, say).
    header = json.dumps(
        {
            "config": cfg,
            "tensors": [
                [name, list(t.shape), str(t.dtype).removeprefix("torch.")]
                for name, t in sorted(state.items())
            ],
            "weights": include_weights,
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    ).encode()
    h.update(struct.pack("<Q", len(header)))
    h.update(header)
    if include_weights:
        for _, t in sorted(state.items()):
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
