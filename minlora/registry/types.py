"""The registry's return values: plain dataclasses with `to_dict()` for the CLI's --json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["Diff", "Evaluation", "Gate", "GcReport", "Promotion", "Revision", "TensorChange", "VerifyReport"]


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _iso(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_iso(v) for v in value]
    return value


@dataclass
class Revision:
    """One revision of one adapter (immutable once committed)."""

    adapter_id: str
    number: int  # 1, 2, 3, ... per adapter
    content_hash: str  # sha256 of the canonical serialisation (minlora.formats.native.content_hash)
    parent: int | None  # the parent revision's number (same adapter), None for a root
    message: str
    author: str
    created_at: datetime
    size: int  # bytes of the stored blob
    provenance: dict[str, Any]  # base_model, training_data, training_config, versions, extra
    tags: list[str] = field(default_factory=list)
    serving: bool = False
    # The content hash of the revision's optimizer-state blob (minlora.formats.state), if any.
    state_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _iso(asdict(self))


@dataclass(frozen=True)
class Gate:
    """A promotion gate: the candidate must have `suite/metric`, and must not be worse than
    the serving revision's value by more than `tolerance` (absolute)."""

    suite: str
    metric: str
    higher_is_better: bool = True
    tolerance: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Promotion:
    """One move of the serving pointer (a promotion or a rollback), as recorded."""

    adapter_id: str
    action: str  # "promote" | "rollback"
    from_revision: int | None
    to_revision: int
    forced: bool
    actor: str
    reason: str | None
    at: datetime
    gate_report: list[dict[str, Any]] = field(default_factory=list)
    changed: bool = True  # False when the revision was already serving (nothing recorded)

    def to_dict(self) -> dict[str, Any]:
        return _iso(asdict(self))


@dataclass
class Evaluation:
    adapter_id: str
    revision: int
    suite: str
    metric: str
    value: float
    author: str
    recorded_at: datetime
    details: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _iso(asdict(self))


@dataclass
class TensorChange:
    """How one tensor (or a scale) differs between two revisions."""

    name: str  # "<module>.lora_A", "<module>.lora_B" or "<module>.scale"
    status: str  # "added" | "removed" | "changed" | "reshaped" | "unchanged"
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    max_abs_diff: float | None = None
    rel_norm_diff: float | None = None  # ||b - a|| / ||a||  (Frobenius; inf when a == 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Diff:
    adapter_id: str
    rev_a: int
    rev_b: int
    same_content: bool
    tensors: list[TensorChange]
    config_changes: dict[str, list[Any]]  # key -> [value in a, value in b] (None = absent)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


@dataclass
class VerifyReport:
    revisions_checked: int
    blobs_checked: int
    failures: list[dict[str, Any]]  # adapter_id, revision, content_hash, error

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class GcReport:
    deleted: list[str]  # paths
    bytes_freed: int
    kept_young: int  # unreferenced files younger than min_age (maybe a commit in flight)
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
