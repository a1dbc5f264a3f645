"""The serving pointer: promotion through gates, rollback, and the pointer's history.

Every move is appended to `serving_events`; the rollback stack is derived from that log by
a pure function, so "what would a rollback serve" never depends on hidden state."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import entities
from . import gates as G
from . import schema as S
from .errors import PromotionRefusedError, RegistryError
from .evaluations import latest_metric, stored_gates
from .store import RevRef, Store
from .types import Gate, Promotion

__all__ = ["history", "promote", "rollback", "rollback_stack", "rollback_target"]


def rollback_stack(events: Iterable[tuple[str, int]]) -> list[int]:
    """The undo stack of serving revisions after the (action, to_revision) events, oldest
    first: a promotion pushes its target; a rollback pops back down to its target."""
    stack: list[int] = []
    for action, to in events:
        if action == "rollback":
            while stack and stack[-1] != to:
                stack.pop()
            if not stack:
                stack.append(to)
        else:
            stack.append(to)
    return stack


def rollback_target(stack: Sequence[int], current: int) -> int | None:
    """What a plain rollback serves: the newest entry below the top that is not `current`."""
    earlier = [x for x in stack[:-1] if x != current]
    return earlier[-1] if earlier else None


def _move(
    conn: Connection,
    adapter_pk: int,
    from_pk: int | None,
    to_pk: int,
    action: str,
    forced: bool,
    actor: str,
    reason: str | None,
    report: list[dict[str, Any]],
    now: datetime,
) -> None:
    sv = S.serving
    if from_pk is None:
        conn.execute(sv.insert().values(adapter_pk=adapter_pk, revision_pk=to_pk, updated_at=now))
    else:
        conn.execute(
            sv.update().where(sv.c.adapter_pk == adapter_pk).values(revision_pk=to_pk, updated_at=now)
        )
    conn.execute(
        S.serving_events.insert().values(
            adapter_pk=adapter_pk, from_revision_pk=from_pk, to_revision_pk=to_pk, action=action,
            forced=forced, actor=actor, reason=reason, gate_report=report or None, at=now,
        )
    )


def promote(
    store: Store,
    adapter_id: str,
    rev: RevRef,
    *,
    force: bool,
    actor: str,
    reason: str | None,
    gates: Sequence[Gate] | None,
) -> Promotion:
    """Point the serving pointer at `rev` if it passes the gates (the stored ones unless
    `gates` is given); PromotionRefusedError otherwise, unless `force`."""

    def txn(conn: Connection) -> Promotion:
        pk = store.adapter_pk(conn, adapter_id, lock=True)
        cand = store.resolve(conn, pk, adapter_id, rev)._mapping
        current_pk = store.serving_pk(conn, pk)
        now = entities.now()
        if current_pk == cand["pk"]:
            n = cand["number"]
            return Promotion(adapter_id, "promote", n, n, False, actor, reason, now, [], changed=False)
        report = G.gate_report(
            stored_gates(conn, pk) if gates is None else list(gates),
            lambda suite, metric: latest_metric(conn, cand["pk"], suite, metric),
            None
            if current_pk is None
            else (lambda suite, metric: latest_metric(conn, current_pk, suite, metric)),
        )
        failed = G.failures(report)
        if failed and not force:
            raise PromotionRefusedError(G.refusal(adapter_id, cand["number"], failed), report)
        from_number = None if current_pk is None else store.numbers(conn, [current_pk])[current_pk]
        _move(conn, pk, current_pk, cand["pk"], "promote", bool(force), actor, reason, report, now)
        return Promotion(
            adapter_id, "promote", from_number, cand["number"], bool(force), actor, reason, now, report
        )

    return store.write(txn)


def rollback(
    store: Store, adapter_id: str, *, to: RevRef | None, actor: str, reason: str | None
) -> Promotion:
    """Serve again the revision that served before the current one (or `to`, which must
    have served before).  Gates are not applied: the target already served."""

    def txn(conn: Connection) -> Promotion:
        pk = store.adapter_pk(conn, adapter_id, lock=True)
        current_pk = store.serving_pk(conn, pk)
        if current_pk is None:
            raise RegistryError(f"{adapter_id}: nothing is serving, so there is nothing to roll back")
        ev = S.serving_events
        events = conn.execute(
            sa.select(ev.c.action, ev.c.to_revision_pk).where(ev.c.adapter_pk == pk).order_by(ev.c.pk)
        ).all()
        if to is not None:
            target_pk = store.resolve(conn, pk, adapter_id, to)._mapping["pk"]
            if target_pk not in {to_pk for _, to_pk in events}:
                raise RegistryError(
                    f"{adapter_id}: revision {to} never served; use promote (with its gates) instead"
                )
            if target_pk == current_pk:
                raise RegistryError(f"{adapter_id}: revision {to} is already serving")
        else:
            found = rollback_target(rollback_stack((a, t) for a, t in events), current_pk)
            if found is None:
                raise RegistryError(f"{adapter_id}: no earlier serving revision to roll back to")
            target_pk = found
        num = store.numbers(conn, [current_pk, target_pk])
        now = entities.now()
        _move(conn, pk, current_pk, target_pk, "rollback", False, actor, reason, [], now)
        return Promotion(
            adapter_id, "rollback", num[current_pk], num[target_pk], False, actor, reason, now, []
        )

    return store.write(txn)


def history(store: Store, adapter_id: str) -> list[Promotion]:
    """Every move of the serving pointer, oldest first."""

    def q(conn: Connection) -> list[Promotion]:
        pk = store.adapter_pk(conn, adapter_id)
        ev = S.serving_events
        fr, to = S.revisions.alias("fr"), S.revisions.alias("to")
        rows = conn.execute(
            sa.select(ev, fr.c.number.label("from_number"), to.c.number.label("to_number"))
            .select_from(
                ev.outerjoin(fr, fr.c.pk == ev.c.from_revision_pk).join(to, to.c.pk == ev.c.to_revision_pk)
            )
            .where(ev.c.adapter_pk == pk)
            .order_by(ev.c.pk)
        )
        return [entities.promotion(adapter_id, x) for x in rows]

    return store.read(q)
