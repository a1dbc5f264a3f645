"""Evaluation records attached to revisions, the gates stored per adapter, and the runner
that evaluates revisions with a callable."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import entities
from . import schema as S
from .adapter_io import Adapter, load_verified
from .blobs import BlobStore
from .errors import RegistryError
from .ids import normalize_adapter_id
from .store import RevRef, Store
from .types import Evaluation, Gate, Revision

__all__ = [
    "evaluate",
    "gates",
    "latest_metric",
    "list_for",
    "record",
    "remove_gate",
    "set_gate",
    "stored_gates",
]


def record(
    store: Store,
    adapter_id: str,
    rev: RevRef,
    suite: str,
    metrics: dict[str, float],
    author: str,
    details: dict[str, Any] | None,
) -> list[Evaluation]:
    """Attach validated metric values to a revision."""

    def txn(conn: Connection) -> list[Evaluation]:
        pk = store.adapter_pk(conn, adapter_id)
        row = store.resolve(conn, pk, adapter_id, rev)._mapping
        now = entities.now()
        conn.execute(
            S.evaluations.insert(),
            [
                {
                    "revision_pk": row["pk"],
                    "suite": suite,
                    "metric": m,
                    "value": v,
                    "author": author,
                    "recorded_at": now,
                    "details": details,
                }
                for m, v in metrics.items()
            ],
        )
        return [
            Evaluation(adapter_id, row["number"], suite, m, v, author, now, details)
            for m, v in metrics.items()
        ]

    return store.write(txn)


def list_for(store: Store, adapter_id: str, rev: RevRef) -> list[Evaluation]:
    """Every evaluation recorded for a revision, oldest first."""

    def q(conn: Connection) -> list[Evaluation]:
        pk = store.adapter_pk(conn, adapter_id)
        row = store.resolve(conn, pk, adapter_id, rev)._mapping
        e = S.evaluations
        rows = conn.execute(sa.select(e).where(e.c.revision_pk == row["pk"]).order_by(e.c.pk))
        return [entities.evaluation(adapter_id, row["number"], x) for x in rows]

    return store.read(q)


def latest_metric(conn: Connection, revision_pk: int, suite: str, metric: str) -> float | None:
    """The newest value of suite/metric recorded for a revision."""
    e = S.evaluations
    return conn.execute(
        sa.select(e.c.value)
        .where(e.c.revision_pk == revision_pk, e.c.suite == suite, e.c.metric == metric)
        .order_by(e.c.pk.desc())
        .limit(1)
    ).scalar()


def stored_gates(conn: Connection, adapter_pk: int) -> list[Gate]:
    g = S.gates
    rows = conn.execute(sa.select(g).where(g.c.adapter_pk == adapter_pk).order_by(g.c.suite, g.c.metric))
    return [Gate(x.suite, x.metric, bool(x.higher_is_better), float(x.tolerance)) for x in rows]


def gates(store: Store, adapter_id: str) -> list[Gate]:
    return store.read(lambda conn: stored_gates(conn, store.adapter_pk(conn, adapter_id)))


def set_gate(store: Store, adapter_id: str, gate: Gate) -> None:
    """Store a validated gate (replacing one on the same suite/metric)."""

    def txn(conn: Connection) -> None:
        pk = store.adapter_pk(conn, adapter_id, lock=True)
        g = S.gates
        conn.execute(
            g.delete().where(g.c.adapter_pk == pk, g.c.suite == gate.suite, g.c.metric == gate.metric)
        )
        conn.execute(
            g.insert().values(
                adapter_pk=pk,
                suite=gate.suite,
                metric=gate.metric,
                higher_is_better=gate.higher_is_better,
                tolerance=gate.tolerance,
            )
        )

    store.write(txn)


def remove_gate(store: Store, adapter_id: str, suite: str, metric: str) -> bool:
    def txn(conn: Connection) -> bool:
        pk = store.adapter_pk(conn, adapter_id, lock=True)
        g = S.gates
        return (
            conn.execute(
                g.delete().where(g.c.adapter_pk == pk, g.c.suite == suite, g.c.metric == metric)
            ).rowcount
            > 0
        )

    return store.write(txn)


def evaluate(
    store: Store,
    blobs: BlobStore,
    fn: Callable[[Adapter, Revision], Mapping[str, float]],
    adapter_ids: Iterable[str],
    rev: RevRef,
    record_metrics: Callable[[Revision, dict[str, float]], list[Evaluation]],
) -> list[Evaluation]:
    """For each adapter: load revision `rev` (verified), call `fn(weights, revision)` and
    hand its metrics to `record_metrics`.  An exception from `fn` is re-raised as
    RegistryError naming the adapter and revision (what was recorded before stays)."""
    out: list[Evaluation] = []
    for aid in adapter_ids:
        info = store.show(normalize_adapter_id(aid), rev)
        weights = load_verified(blobs, info.adapter_id, info.number, info.content_hash)
        try:
            metrics = dict(fn(weights, info))
        except Exception as exc:
            raise RegistryError(
                f"evaluation of {info.adapter_id!r} revision {info.number} failed: {exc}"
            ) from exc
        out.extend(record_metrics(info, metrics))
    return out
