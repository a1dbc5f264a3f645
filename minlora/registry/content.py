"""Content identity of an adapter revision (its on-disk form is minlora/adapter_file.py).

The content hash is defined over a canonical serialisation that we own, not over the bytes
of a safetensors file: a future safetensors version may order or pad its header
differently, and the same weights must keep the same hash.  The canonical form is

    b"minlora-adapter-v1\\0" + len(header) (8 bytes LE) + header + tensor bytes

where `header` is compact, key-sorted JSON of the config and, for each module in sorted
order, the dtype and shape of A and B and the scale; the tensor bytes follow in the same
order (A then B per module), as little-endian row-major data.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch

from ..adapter import Adapter
from ..adapter_file import FORMAT, canonical_config, canonical_json, check_adapter, deserialize, serialize, tensor_cpu

__all__ = ["FORMAT", "canonical_config", "content_hash", "deserialize", "serialize"]

_MAGIC = FORMAT.encode() + b"\0"


def _header(adapter: Adapter, config: dict[str, Any]) -> bytes:
    modules = {}
    for name in sorted(adapter.modules):
        w = adapter.modules[name]
        modules[name] = {
            "a": [str(w.a.dtype).removeprefix("torch."), list(w.a.shape)],
            "b": [str(w.b.dtype).removeprefix("torch."), list(w.b.shape)],
            "scale": float(w.scale),
        }
    return canonical_json({"config": config, "modules": modules}).encode()


def content_hash(adapter: Adapter) -> str:
    """sha256 (hex) of the canonical serialisation of the adapter's tensors, scales and config."""
    check_adapter(adapter)
    config = canonical_config(adapter.config)
    header = _header(adapter, config)
    h = hashlib.sha256()
    h.update(_MAGIC)
    h.update(struct.pack("<Q", len(header)))
    h.update(header)
    for name in sorted(adapter.modules):
        w = adapter.modules[name]
        for t in (w.a, w.b):
            # Raw bytes via a uint8 view: works for bfloat16, which numpy cannot represent.
            # x86 and ARM are little-endian, which is what the canonical form specifies.
            h.update(tensor_cpu(t).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


