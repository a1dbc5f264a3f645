"""minlora's own adapter file: one safetensors file holding a whole Adapter, and its content hash.

Tensors "<module>.lora_A" [r, in] and "<module>.lora_B" [out, r]; metadata: the format name,
the canonical config and the per-module scales (all JSON).  The registry stores revisions in
this form (content-addressed) and the AdapterPool spills to it and registers from it, so a
file written by either is read by both.

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
import json
import math
import os
import struct
from typing import Any, Callable, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .adapter import Adapter, LoraWeights, check_adapter
from .atomic import write_atomic

__all__ = ["FORMAT", "canonical_config", "canonical_json", "content_hash", "deserialize", "load_adapter_file",
           "safetensors_elements", "save_adapter_file", "serialize"]

FORMAT = "minlora-adapter-v1"
_SUFFIX_A = ".lora_A"
_SUFFIX_B = ".lora_B"


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON; NaN/inf are refused (they have no JSON spelling)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_config(config: Any) -> dict[str, Any]:
    """The config as it will be stored and hashed: a JSON round trip (tuples become lists)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(canonical_json(config))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise ValueError("config is not JSON-serialisable: it nests too deeply") from None


def tensor_cpu(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU with row-major strides.  contiguous() alone is not enough: a [n, 1] tensor
    with strides (1, n) counts as contiguous, yet its bytes cannot be viewed as uint8."""
    t = t.detach().to("cpu")
    if t.dim() and (not t.is_contiguous() or t.stride(-1) != 1):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def serialize(adapter: Adapter) -> bytes:
    """The blob: a safetensors file with tensors `<module>.lora_A`/`.lora_B` and metadata
    holding the format, the canonical config and the per-module scales."""
    check_adapter(adapter)
    config = canonical_config(adapter.config)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for name in sorted(adapter.modules):
        w = adapter.modules[name]
        tensors[name + _SUFFIX_A] = tensor_cpu(w.a)
        tensors[name + _SUFFIX_B] = tensor_cpu(w.b)
        scales[name] = float(w.scale)
    metadata = {"format": FORMAT, "config": canonical_json(config), "scales": canonical_json(scales)}
    return st_save(tensors, metadata=metadata)


# safetensors' own limit on the JSON header.
_MAX_HEADER_BYTES = 100_000_000


def _json(what: str, text: Union[str, bytes]) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nests its JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{what} is not valid JSON ({exc})") from None


def _header(head: bytes, read: Callable[[int], bytes]) -> dict[str, Any]:
    """The JSON header of a safetensors file: u64 little-endian length, then that much JSON.
    head: the file's first 8 bytes; read(n): its next n bytes."""
    if len(head) < 8:
        raise ValueError(f"{len(head)} bytes is shorter than a safetensors header (a truncated file?)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER_BYTES:
        raise ValueError(f"the safetensors header declares {n} bytes, over the {_MAX_HEADER_BYTES} allowed")
    raw = read(n)
    if len(raw) < n:
        raise ValueError(f"the header declares {n} bytes but {len(raw)} follow (a truncated file?)")
    header = _json("the safetensors header", bytes(raw))
    if not isinstance(header, dict):
        raise ValueError(f"the safetensors header is not a JSON object but a {type(header).__name__}")
    return header


def _metadata(data: bytes) -> dict[str, str]:
    header = _header(data[:8], lambda n: data[8 : 8 + n])
    meta = header.get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("the safetensors metadata is not an object of strings")
    return meta


def safetensors_elements(path: Union[str, "os.PathLike[str]"]) -> int:
    """The total number of elements a safetensors file's tensors declare, read from its
    header only (whatever the file's size); ValueError if the header is malformed."""
    with open(path, "rb") as f:
        header = _header(f.read(8), f.read)
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{os.fspath(path)!r}: tensor {name!r} has no valid shape in the header")
        total += math.prod(shape)
    return total


def _read_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(data))
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, KeyError) as exc:
        raise ValueError(f"its tensors cannot be read ({type(exc).__name__}: {exc})") from None


def deserialize(data: bytes) -> Adapter:
    """Inverse of `serialize`.  Raises ValueError for anything malformed: a truncated or garbled
    file, missing or extra tensors, a config or scales that are not what serialize writes, no
    module, a non-finite scale, or factors that check_adapter refuses (A/B dtypes differ, ...)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} blob (format={meta.get('format')!r})")
    missing = [k for k in ("config", "scales") if k not in meta]
    if missing:
        raise ValueError(f"the metadata has no {missing[0]!r}")
    config = _json("the config", meta["config"])
    scales = _json("the scales", meta["scales"])
    if not isinstance(config, dict):
        raise ValueError(f"the config is a {type(config).__name__}, not a JSON object")
    if not isinstance(scales, dict):
        raise ValueError(f"the scales are a {type(scales).__name__}, not a JSON object")
    tensors = _read_tensors(data)
    modules: dict[str, LoraWeights] = {}
    for name, scale in scales.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"module {name!r}: the scale {scale!r} is not a number")
        try:
            a = tensors.pop(name + _SUFFIX_A)
            b = tensors.pop(name + _SUFFIX_B)
        except KeyError:
            raise ValueError(f"module {name!r} is missing a tensor") from None
        try:
            modules[name] = LoraWeights(a=a, b=b, scale=float(scale))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"module {name!r}: {exc}") from None
    if tensors:
        raise ValueError(f"unexpected tensors in blob: {sorted(tensors)[:5]}")
    adapter = Adapter(modules=modules, config=config)
    try:
        check_adapter(adapter, "the file")
    except TypeError as exc:  # e.g. integer factors: still a malformed file
        raise ValueError(str(exc)) from None
    return adapter


def save_adapter_file(adapter: Adapter, path: Union[str, "os.PathLike[str]"]) -> None:
    """Writes `adapter` to `path` atomically (readers never see half a file)."""
    write_atomic(path, serialize(adapter))


def read_parsed(path: Union[str, "os.PathLike[str]"], parse: Any, refusal: str) -> Any:
    """parse(the bytes of the file at `path`); its ValueError comes back naming the file:
    "<path>: " + refusal with {why} replaced by the parser's message."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse(data)
    except ValueError as exc:
        raise ValueError(f"{path!r}: " + refusal.format(why=exc)) from None


def load_adapter_file(path: Union[str, "os.PathLike[str]"]) -> Adapter:
    """Reads a file written by save_adapter_file (or a registry blob); ValueError if it is not one."""
    return read_parsed(path, deserialize, "not a minlora adapter file ({why}), and not a PEFT directory "
                       "(a PEFT adapter is the directory holding adapter_config.json)")


# ----------------------------------------------------------------------------- content hash

_MAGIC = FORMAT.encode() + b"\0"


def _hash_header(adapter: Adapter, config: dict[str, Any]) -> bytes:
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
    header = _hash_header(adapter, config)
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
