"""The registry's one door to adapter I/O: the in-memory adapter types, the canonical
config, the content hash, the bytes of a blob, PEFT directories, the optimizer-state blob, and
reading a revision's weights (or state) back with its hash checked.

Every other module of the registry reaches adapter formats only through the names here, so
each use of a format module is written once.
"""

from __future__ import annotations

from typing import Any

from ..formats import native
from ..formats import state as state_format
from ..formats.adapter import Adapter, LoraWeights
from ..formats.load import load_adapter
from ..formats.peft import save_peft
from ..formats.state import AdapterState

from .blobs import BlobStore
from .errors import CorruptBlobError

__all__ = [
    "Adapter",
    "AdapterState",
    "LoraWeights",
    "canonical_config",
    "content_hash",
    "deserialize",
    "load_verified",
    "load_verified_state",
    "read_peft",
    "serialize",
    "serialize_state",
    "state_hash",
    "write_peft",
]

canonical_config = native.canonical_config  # JSON-safe, key-sorted copy (ValueError on NaN, ...)
content_hash = native.content_hash  # sha256 hex of the canonical serialisation
serialize = native.serialize  # Adapter -> the bytes of a blob
deserialize = native.deserialize  # the bytes of a blob -> Adapter (raises on garbage)
read_peft = load_adapter  # a PEFT adapter directory (or a minlora adapter file) -> Adapter
write_peft = save_peft  # Adapter -> a PEFT adapter directory
serialize_state = state_format.serialize_state  # AdapterState (optimizer moments) -> blob bytes
state_hash = state_format.state_hash  # sha256 hex of its canonical serialisation


def load_verified(blobs: BlobStore, adapter_id: str, number: int, h: str) -> Adapter:
    """The weights of revision `number` of `adapter_id`, whose content hash is `h`.

    Raises CorruptBlobError (naming the adapter and revision) when the blob is missing,
    unreadable, or its content does not hash to `h`."""
    return _verified(blobs, adapter_id, number, h, "", deserialize, content_hash)


def load_verified_state(blobs: BlobStore, adapter_id: str, number: int, h: str) -> AdapterState:
    """The optimizer state of revision `number`, whose state blob's hash is `h`; CorruptBlobError
    (naming the adapter, the revision and "optimizer state") like `load_verified`."""
    return _verified(blobs, adapter_id, number, h, "optimizer state ", state_format.deserialize_state,
                     state_hash)


def _verified(blobs: BlobStore, adapter_id: str, number: int, h: str, what: str, parse: Any, hash_of: Any) -> Any:
    def fail(why: str) -> CorruptBlobError:
        return CorruptBlobError(
            f"adapter {adapter_id!r} revision {number} ({what}content {h[:12]}): {why}",
            adapter_id=adapter_id,
            revision=number,
            content_hash=h,
        )

    try:
        data = blobs.get(h)
    except FileNotFoundError:
        raise fail(f"blob {blobs.path(h)} is missing") from None
    except OSError as exc:  # a directory in its place, no permission, an I/O error
        raise fail(f"blob {blobs.path(h)} is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        value = parse(data)
    except Exception as exc:  # safetensors raises its own types on garbage
        raise fail(f"blob {blobs.path(h)} is unreadable ({type(exc).__name__}: {exc})") from None
    actual = hash_of(value)
    if actual != h:
        raise fail(f"blob {blobs.path(h)} is corrupted: its content hashes to {actual[:12]}")
    return value
