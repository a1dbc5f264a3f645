"""An adapter's companion state (optimizer moments, gradient accumulators) and its file format.

`AdapterState.modules[module][kind]` is a pair (a [r, in], b [out, r]) of float32 tensors with
the shapes of that module's LoRA factors, e.g. kind "exp_avg" holds Adam's first moment of A and
of B.  `meta` is JSON (step counts, hyperparameters).  The pool keeps these as float32 pages
beside the weights; the registry stores them as an optional blob per revision; the trainer
reads and writes them.

File (a safetensors file): tensors "<module>.<kind>.lora_A" and "<module>.<kind>.lora_B",
metadata {"format": "minlora-state-v1", "meta": canonical JSON}.  Like the adapter file, the
content hash is defined over a canonical serialisation of our own (format name, a key-sorted
JSON header of meta and the tensors' dtypes and shapes, then the tensors' bytes in that order),
not over the safetensors bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import write_atomic
from .native import _metadata as safetensors_metadata
from .native import canonical_config, canonical_json, read_parsed, tensor_cpu

__all__ = [
    "STATE_FORMAT",
    "AdapterState",
    "check_state",
    "deserialize_state",
    "load_state_file",
    "save_state_file",
    "serialize_state",
    "state_hash",
]

STATE_FORMAT = "minlora-state-v1"
_KIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
StatePair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AdapterState:
    """modules: module name -> kind -> (a [r, in], b [out, r]) float32; meta: JSON-able dict."""

    modules: dict[str, dict[str, StatePair]]
    meta: dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> set[str]:
        return {k for kinds in self.modules.values() for k in kinds}

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for kinds in self.modules.values() for a, b in kinds.values())


def check_state(state: object, what: str = "state") -> None:
    """TypeError / ValueError (naming `what`, the module and the kind) unless `state` is an
    AdapterState of 2-D float32 pairs whose ranks agree and whose kinds are identifiers."""
    if not isinstance(state, AdapterState):
        raise TypeError(f"{what} must be a minlora.formats.AdapterState, got {type(state).__name__}")
    if not isinstance(state.modules, dict) or not isinstance(state.meta, dict):
        raise TypeError(f"{what}: modules and meta must be dicts")
    for name, kinds in state.modules.items():
        if not isinstance(name, str) or not name or not isinstance(kinds, dict):
            raise ValueError(f"{what}: modules must map module names to {{kind: (a, b)}}, got {name!r}")
        for kind, pair in kinds.items():
            where = f"{what}: module {name!r} kind {kind!r}"
            if not isinstance(kind, str) or not _KIND.fullmatch(kind):
                raise ValueError(f"{what}: module {name!r}: kind {kind!r} must be an identifier")
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"{where} must be a pair (a [r, in], b [out, r])")
            a, b = pair
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
                raise TypeError(f"{where}: a and b must be tensors")
            if a.dtype != torch.float32 or b.dtype != torch.float32:
                raise ValueError(f"{where}: state tensors are float32, got {a.dtype}/{b.dtype}")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{where}: a {tuple(a.shape)} and b {tuple(b.shape)} are not [r, in], [out, r]")


def _ordered(state: AdapterState) -> list[tuple[str, str, StatePair]]:
    return [(m, k, state.modules[m][k]) for m in sorted(state.modules) for k in sorted(state.modules[m])]


def serialize_state(state: AdapterState) -> bytes:
    """The bytes of a state file (see the module docstring)."""
    check_state(state)
    tensors = {}
    for m, k, (a, b) in _ordered(state):
        tensors[f"{m}.{k}.lora_A"] = tensor_cpu(a)
        tensors[f"{m}.{k}.lora_B"] = tensor_cpu(b)
    meta = canonical_json(canonical_config(state.meta))
    return st_save(tensors, metadata={"format": STATE_FORMAT, "meta": meta})


def deserialize_state(data: bytes) -> AdapterState:
    """Inverse of `serialize_state`; ValueError on anything malformed."""
    try:
        meta = safetensors_metadata(data)
    except (ValueError, struct.error) as exc:
        raise ValueError(f"not a safetensors file ({exc})") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"not a {STATE_FORMAT} file (format={meta.get('format')!r})")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own types on garbage
        raise ValueError(f"unreadable state tensors ({type(exc).__name__}: {exc})") from None
    modules: dict[str, dict[str, list]] = {}
    for key, t in tensors.items():
        parts = key.rsplit(".", 2)
        if len(parts) != 3 or parts[2] not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected tensor {key!r} in a state file")
        pair = modules.setdefault(parts[0], {}).setdefault(parts[1], [None, None])
        pair[0 if parts[2] == "lora_A" else 1] = t
    out: dict[str, dict[str, StatePair]] = {}
    for m, kinds in modules.items():
        for k, (a, b) in kinds.items():
            if a is None or b is None:
                raise ValueError(f"module {m!r} kind {k!r} is missing a tensor")
            out.setdefault(m, {})[k] = (a, b)
    state = AdapterState(out, json.loads(meta.get("meta", "{}")))
    check_state(state, "the state file")
    return state


_MAGIC = STATE_FORMAT.encode() + b"\0"


def state_hash(state: AdapterState) -> str:
    """sha256 (hex) of the canonical serialisation of the state's meta and tensors."""
    check_state(state)
    order = _ordered(state)
    header = canonical_json(
        {
            "meta": canonical_config(state.meta),
            "tensors": [[m, k, list(a.shape), list(b.shape)] for m, k, (a, b) in order],
        }
    ).encode()
    h = hashlib.sha256()
    h.update(_MAGIC)
    h.update(struct.pack("<Q", len(header)))
    h.update(header)
    for _, _, (a, b) in order:
        for t in (a, b):
            h.update(tensor_cpu(t).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_state_file(state: AdapterState, path: Union[str, "os.PathLike[str]"]) -> None:
    """Writes `state` to `path` atomically."""
    write_atomic(path, serialize_state(state))


def load_state_file(path: Union[str, "os.PathLike[str]"]) -> AdapterState:
    """Reads a file written by save_state_file; ValueError naming the file if it is not one."""
    return read_parsed(path, deserialize_state, "not a minlora state file ({why})")
