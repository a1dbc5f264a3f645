"""minlora's adapter registry: identity, revisions, provenance, evaluations and residency.

    from minlora.registry import Registry, Gate
    reg = Registry()                      # ~/.minlora: SQLite + content-addressed blobs
    rev = reg.commit("alice", adapter, message="first", provenance={"base_model": fp})
    reg.record_evaluation("alice", rev.number, "helpfulness", {"score": 0.8})
    reg.promote("alice", rev.number)

The command line is `minlora adapters ...` (minlora.registry.cli).
"""

from __future__ import annotations

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
