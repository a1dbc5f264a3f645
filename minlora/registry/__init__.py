"""minlora's adapter registry: identity, revisions, provenance, evaluations and residency.

    from minlora.registry import Registry, Gate
    reg = Registry()                      # ~/.minlora: SQLite + content-addressed blobs
    rev = reg.commit("alice", adapter, message="first", provenance={"base_model": fp})
    reg.record_evaluation("alice", rev.number, "helpfulness", {"score": 0.8})
    reg.promote("alice", rev.number)

The command line is `minlora adapters ...` (minlora.registry.cli).  Names are imported when
first used (PEP 562), so the command line's help and the errors module need no database
libraries and no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

# name -> the module (under minlora.registry) that defines it; the one place to change when
# a module moves.
_LAZY: dict[str, str] = {
    "AdapterNotFoundError": "errors",
    "AmbiguousRevisionError": "errors",
    "CorruptBlobError": "errors",
    "DamagedDatabaseError": "errors",
    "InvalidIdError": "errors",
    "PromotionRefusedError": "errors",
    "RegistryError": "errors",
    "RevisionNotFoundError": "errors",
    "TagExistsError": "errors",
    "fingerprint_base_model": "fingerprint",
    "normalize_adapter_id": "ids",
    "normalize_tag": "ids",
    "Registry": "registry",
    "default_actor": "registry",
    "default_root": "registry",
    "Diff": "types",
    "Evaluation": "types",
    "Gate": "types",
    "GcReport": "types",
    "Promotion": "types",
    "Revision": "types",
    "TensorChange": "types",
    "VerifyReport": "types",
}

if TYPE_CHECKING:
    from .errors import (
        AdapterNotFoundError,
        AmbiguousRevisionError,
        CorruptBlobError,
        DamagedDatabaseError,
        InvalidIdError,
        PromotionRefusedError,
        RegistryError,
        RevisionNotFoundError,
        TagExistsError,
    )
    from .fingerprint import fingerprint_base_model
    from .ids import normalize_adapter_id, normalize_tag
    from .registry import Registry, default_actor, default_root
    from .types import Diff, Evaluation, Gate, GcReport, Promotion, Revision, TensorChange, VerifyReport

__all__ = [
    "AdapterNotFoundError",
    "AmbiguousRevisionError",
    "CorruptBlobError",
    "DamagedDatabaseError",
    "Diff",
    "Evaluation",
    "Gate",
    "GcReport",
    "InvalidIdError",
    "Promotion",
    "PromotionRefusedError",
    "Registry",
    "RegistryError",
    "Revision",
    "RevisionNotFoundError",
    "TagExistsError",
    "TensorChange",
    "VerifyReport",
    "default_actor",
    "default_root",
    "fingerprint_base_model",
    "normalize_adapter_id",
    "normalize_tag",
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _LAZY)
