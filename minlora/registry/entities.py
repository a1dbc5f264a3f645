"""Database rows -> the registry's return values (minlora.registry.types), and the clock."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .types import Evaluation, Promotion, Revision

__all__ = ["evaluation", "now", "promotion", "revision", "utc"]


def now() -> datetime:
    return datetime.now(UTC)


def utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp the registry writes is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def revision(adapter_id: str, row: Any, tags: Sequence[str] = (), serving_pk: int | None = None) -> Revision:
    """A row of store.Store.revision_query() (a revision with its parent's number, blob size and
    optimizer-state hash)."""
    m = row._mapping
    created = utc(m["created_at"])
    return Revision(
        adapter_id=adapter_id,
        number=m["number"],
        content_hash=m["content_hash"],
        parent=m["parent_number"],
        message=m["message"],
        author=m["author"],
        created_at=created,  # type: ignore[arg-type]
        size=m["blob_size"],
        provenance={
            "base_model": m["base_model"],
            "parent": m["parent_number"],
            "training_data": m["training_data"],
            "training_config": m["training_config"],
            "author": m["author"],
            "created_at": created,
            "minlora_version": m["minlora_version"],
            "torch_version": m["torch_version"],
            "extra": m["extra"] or {},
        },
        tags=sorted(tags),
        serving=serving_pk is not None and m["pk"] == serving_pk,
        state_hash=m["state_hash"],
    )


def promotion(adapter_id: str, row: Any) -> Promotion:
    """A serving_events row joined with the numbers of its from / to revisions."""
    return Promotion(
        adapter_id,
        row.action,
        row.from_number,
        row.to_number,
        bool(row.forced),
        row.actor,
        row.reason,
        utc(row.at),  # type: ignore[arg-type]
        row.gate_report or [],
    )


def evaluation(adapter_id: str, number: int, row: Any) -> Evaluation:
    """An evaluations row of revision `number`."""
    return Evaluation(
        adapter_id,
        number,
        row.suite,
        row.metric,
        row.value,
        row.author,
        utc(row.recorded_at),  # type: ignore[arg-type]
        row.details,
    )
