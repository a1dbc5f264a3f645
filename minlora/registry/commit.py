"""Writing revisions: one at a time (`commit`) or in bulk (`commit_many`).

Protocol (why a crash never leaves half a revision, and gc never takes a blob that a new
revision needs): the blob is written first, atomically and durably, unless a file of the
right size is already under its name; then one database transaction takes the lock of the
content hash (Store.lock_blobs, which gc's deletion also holds), checks again that the file
is in place (rewriting it if gc removed it in between), and inserts the blob row (if new)
and the revision row.  A revision's optimizer-state blob, when it has one, goes the same way
beside the weights' (its row in `blobs`, then its `revision_states` row, in that transaction).  A crash before that transaction commits leaves at most an
unreferenced blob, which `gc` removes; a revision row is only ever visible with its blob in
place, and once it is visible gc keeps the blob.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import entities
from . import schema as S
from .adapter_io import (
    Adapter,
    AdapterState,
    LoraWeights,
    canonical_config,
    content_hash,
    serialize,
    serialize_state,
    state_hash,
)
from .blobs import BlobStore
from .ids import normalize_adapter_id
from .store import Store
from .types import Revision

__all__ = ["HEAD", "Weights", "commit", "commit_many", "prepare"]

Weights = Adapter | Mapping[str, LoraWeights]
HEAD: Any = object()  # default `parent`: the adapter's newest revision at commit time
_PARAMS = 900  # SQLite caps the bound parameters of one statement
_BATCH_BYTES = 256 << 20  # new blob bytes one bulk batch holds for its in-lock check


def _recorded(message: str, author: str, prov: dict[str, Any]) -> dict[str, Any]:
    """The columns every revision row of one call shares: message, author, provenance and
    the minlora and torch versions."""
    import torch

    from .. import __version__

    return {
        "message": message,
        "author": author,
        "minlora_version": __version__,
        "torch_version": torch.__version__,
        **prov,
    }


def prepare(weights: Weights, config: Mapping[str, Any] | None) -> Adapter:
    """An Adapter with its config in canonical form (`config`, when given, replaces it)."""
    if isinstance(weights, Adapter):
        adapter = weights if config is None else Adapter(modules=weights.modules, config=dict(config))
    elif isinstance(weights, Mapping):
        adapter = Adapter(modules=dict(weights), config=dict(config or {}))
    else:
        raise TypeError(f"weights must be an Adapter or a dict of LoraWeights, got {type(weights).__name__}")
    return Adapter(modules=adapter.modules, config=canonical_config(adapter.config))


def _ensure_blob(blobs: BlobStore, h: str, data: bytes) -> None:
    # The file, not the blob row, is what a reader needs: a blob lost since its row was
    # written (deleted by hand, a restore without the blob store) is written again here.
    if blobs.size(h) != len(data):
        blobs.put(h, data)


def commit(
    store: Store,
    blobs: BlobStore,
    adapter_id: str,
    adapter: Adapter,
    prov: dict[str, Any],
    *,
    parent: Any,
    message: str,
    author: str,
    state: AdapterState | None = None,
) -> Revision:
    """Record `adapter` (prepared) as the next revision of `adapter_id` (validated), with its
    optimizer-state blob when `state` is given (written and locked like the weights' blob)."""
    h = content_hash(adapter)
    data = serialize(adapter)
    new_blobs = {h: data}
    sh = None
    if state is not None:
        sh = state_hash(state)
        new_blobs[sh] = serialize_state(state)
    for bh, bdata in new_blobs.items():
        _ensure_blob(blobs, bh, bdata)
    common = _recorded(message, author, prov)

    def txn(conn: Connection) -> Revision:
        store.lock_blobs(conn, new_blobs)
        for bh, bdata in new_blobs.items():
            _ensure_blob(blobs, bh, bdata)
        now = entities.now()
        pk = conn.execute(
            sa.select(S.adapters.c.pk).where(S.adapters.c.adapter_id == adapter_id).with_for_update()
        ).scalar()
        if pk is None:
            # A concurrent creator makes this fail with IntegrityError; run_transaction retries.
            pk = conn.execute(
                S.adapters.insert().values(adapter_id=adapter_id, created_at=now)
            ).inserted_primary_key[0]
        if parent is HEAD:
            parent_pk = conn.execute(
                sa.select(S.revisions.c.pk)
                .where(S.revisions.c.adapter_pk == pk)
                .order_by(S.revisions.c.number.desc())
                .limit(1)
            ).scalar()
        elif parent is None:
            parent_pk = None
        else:
            parent_pk = store.resolve(conn, pk, adapter_id, parent)._mapping["pk"]
        number = (
            conn.execute(
                sa.select(sa.func.max(S.revisions.c.number)).where(S.revisions.c.adapter_pk == pk)
            ).scalar()
            or 0
        ) + 1
        for bh, bdata in new_blobs.items():
            conn.execute(
                store.insert(S.blobs)
                .values(content_hash=bh, size=len(bdata), created_at=now)
                .on_conflict_do_nothing()
            )
        rpk = conn.execute(
            S.revisions.insert().values(
                adapter_pk=pk, number=number, content_hash=h, parent_pk=parent_pk, created_at=now, **common
            )
        ).inserted_primary_key[0]
        if sh is not None:
            conn.execute(S.revision_states.insert().values(revision_pk=rpk, content_hash=sh, created_at=now))
        row = conn.execute(store.revision_query().where(S.revisions.c.pk == rpk)).first()
        return store.revision(conn, pk, adapter_id, row)

    return store.write(txn)


def commit_many(
    store: Store,
    blobs: BlobStore,
    items: Iterable[tuple[str, Weights]],
    prov: dict[str, Any],
    *,
    message: str,
    author: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Commit one revision for each (adapter_id, weights), `batch_size` per transaction
    (fewer when the batch's new blobs pass _BATCH_BYTES); parents are each adapter's newest
    revision.  Returns the number of revisions."""
    common = _recorded(message, author, prov)
    known: set[str] = set()  # content hashes whose blob rows an earlier batch committed
    total = 0
    batch: list[tuple[str, str]] = []
    pending: dict[str, bytes] = {}  # this batch's new contents, held for the in-lock check
    pending_bytes = 0

    def flush() -> None:
        nonlocal total, pending_bytes
        if not batch:
            return
        rows, blobs_of_batch = list(batch), dict(pending)
        store.write(lambda conn: _insert_batch(store, blobs, conn, rows, blobs_of_batch, common))
        total += len(rows)
        known.update(blobs_of_batch)
        if progress is not None:
            progress(len(rows))
        batch.clear()
        pending.clear()
        pending_bytes = 0

    for adapter_id, weights in items:
        aid = normalize_adapter_id(adapter_id)
        adapter = prepare(weights, None)
        h = content_hash(adapter)
        if h not in known and h not in pending:
            data = serialize(adapter)
            _ensure_blob(blobs, h, data)
            pending[h] = data
            pending_bytes += len(data)
        batch.append((aid, h))
        if len(batch) >= batch_size or pending_bytes >= _BATCH_BYTES:
            flush()
    flush()
    return total


def _select_in(conn: Connection, column: Any, values: list[Any], *selected: Any) -> list[Any]:
    # `column IN (values)` in chunks that stay under SQLite's parameter limit.
    out: list[Any] = []
    for start in range(0, len(values), _PARAMS):
        out.extend(
            conn.execute(sa.select(*selected).where(column.in_(values[start : start + _PARAMS]))).all()
        )
    return out


def _heads(conn: Connection, adapter_pks: list[int]) -> dict[int, tuple[int, int]]:
    """Adapter pk -> (its newest revision number, that revision's pk)."""
    r = S.revisions
    out: dict[int, tuple[int, int]] = {}
    for start in range(0, len(adapter_pks), _PARAMS):
        newest = (
            sa.select(r.c.adapter_pk, sa.func.max(r.c.number).label("n"))
            .where(r.c.adapter_pk.in_(adapter_pks[start : start + _PARAMS]))
            .group_by(r.c.adapter_pk)
        ).subquery()
        for apk, n, rpk in conn.execute(
            sa.select(newest.c.adapter_pk, newest.c.n, r.c.pk).join(
                r, sa.and_(r.c.adapter_pk == newest.c.adapter_pk, r.c.number == newest.c.n)
            )
        ):
            out[apk] = (n, rpk)
    return out


def _insert_batch(
    store: Store,
    blobs: BlobStore,
    conn: Connection,
    rows: list[tuple[str, str]],
    new_blobs: dict[str, bytes],
    common: dict[str, Any],
) -> None:
    """Insert the revisions (adapter_id, content_hash) of one batch; `new_blobs` are the
    contents first seen in this batch (content hash -> blob bytes)."""
    store.lock_blobs(conn, new_blobs)
    for h, data in new_blobs.items():
        _ensure_blob(blobs, h, data)
    now = entities.now()
    a = S.adapters.c
    ids = sorted({aid for aid, _ in rows})
    existing: dict[str, int] = dict(_select_in(conn, a.adapter_id, ids, a.adapter_id, a.pk))
    new = [aid for aid in ids if aid not in existing]
    if new:
        conn.execute(S.adapters.insert(), [{"adapter_id": aid, "created_at": now} for aid in new])
        existing.update(_select_in(conn, a.adapter_id, new, a.adapter_id, a.pk))
    new_set = set(new)
    heads = _heads(conn, [existing[aid] for aid in ids if aid not in new_set])
    if new_blobs:
        conn.execute(
            store.insert(S.blobs).on_conflict_do_nothing(),
            [{"content_hash": h, "size": len(data), "created_at": now} for h, data in new_blobs.items()],
        )
    values = []
    chained: list[tuple[int, int]] = []  # (adapter pk, number) whose parent is earlier in this batch
    for aid, h in rows:
        apk = existing[aid]
        n, parent_pk = heads.get(apk, (0, None))
        if parent_pk == -1:
            parent_pk = None
            chained.append((apk, n + 1))
        values.append(
            {
                "adapter_pk": apk,
                "number": n + 1,
                "content_hash": h,
                "parent_pk": parent_pk,
                "created_at": now,
                **common,
            }
        )
        # An adapter listed twice in one batch: its second revision's parent is the first,
        # whose pk is not known yet; chain by number and fix parents below.
        heads[apk] = (n + 1, -1)
    conn.execute(S.revisions.insert(), values)
    r = S.revisions
    for apk, number in chained:
        parent_pk = conn.execute(
            sa.select(r.c.pk).where(r.c.adapter_pk == apk, r.c.number == number - 1)
        ).scalar()
        # Still inside the inserting transaction, so this is part of creating the row, not a
        # change to history.
        conn.execute(
            r.update().where(r.c.adapter_pk == apk, r.c.number == number).values(parent_pk=parent_pk)
        )
