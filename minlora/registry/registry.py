"""The adapter registry: identity, revisions, provenance, evaluations, serving, residency.

Storage is split in two: metadata in a SQL database (SQLite file by default, PostgreSQL
at scale; SQLAlchemy Core, alembic migrations run at open) and weights as content-addressed
safetensors blobs (a local directory or an object store, through fsspec).

Commit protocol (why a crash never leaves half a revision): the blob is written first,
atomically and durably; then one database transaction inserts the blob row (if new) and
the revision row.  A crash before that transaction commits leaves at most an unreferenced
blob, which `gc` removes; a revision row is only ever visible with its blob in place.
"""

from __future__ import annotations

import getpass
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Union

import sqlalchemy as sa
import torch
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from ..formats import native as content
from ..formats.adapter import Adapter, LoraWeights
from ..formats.load import load_adapter
from ..formats.peft import save_peft
from . import migrate
from . import schema as S
from .blobs import BlobStore
from .db import make_engine, run_transaction
from .errors import (
    AdapterNotFoundError,
    AmbiguousRevisionError,
    CorruptBlobError,
    PromotionRefusedError,
    RegistryError,
    RevisionNotFoundError,
    TagExistsError,
)
from .fingerprint import fingerprint_base_model
from .ids import normalize_adapter_id, normalize_tag
from .types import Diff, Evaluation, Gate, GcReport, Promotion, Revision, TensorChange, VerifyReport

__all__ = ["Registry", "RevRef", "default_actor", "default_root"]

RevRef = Union[int, str]
_HEX = re.compile(r"^[0-9a-f]{4,64}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_HEAD = object()  # default `parent`: the adapter's newest revision at commit time


def default_root() -> str:
    """$MINLORA_HOME, else ~/.minlora."""
    return os.environ.get("MINLORA_HOME") or os.path.join(os.path.expanduser("~"), ".minlora")


def default_actor() -> str:
    """Who is acting, for authorship and promotion records: $MINLORA_USER, else the OS user."""
    env = os.environ.get("MINLORA_USER")
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp we write is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _versions() -> tuple[str, str]:
    from .. import __version__

    return __version__, torch.__version__


class Registry:
    """An adapter registry.

    Registry()                                  -> ~/.minlora/registry.db + ~/.minlora/blobs
    Registry(root="/data/minlora")              -> same layout under that root
    Registry("postgresql+psycopg://...", "s3://bucket/minlora")   -> the cluster form
    """

    def __init__(
        self, url: str | None = None, blobs: str | None = None, *, root: str | None = None
    ) -> None:
        if url is None or blobs is None:
            root = root or default_root()
        if url is None:
            url = "sqlite:///" + os.path.join(os.path.abspath(root), "registry.db")  # type: ignore[arg-type]
        if blobs is None:
            blobs = os.path.join(root, "blobs")  # type: ignore[arg-type]
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        migrate.upgrade(self.engine)
        self.blobs = BlobStore(blobs)
        self._pool: Any = None
        self._pool_key: Callable[[str, Revision | None], Any] = lambda adapter_id, _rev: adapter_id

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.engine.url.render_as_string(hide_password=True)!r}, {self.blobs.url!r})"

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: sa.Table) -> Any:
        # INSERT ... ON CONFLICT DO NOTHING is spelled per dialect.
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        if self.dialect == "sqlite":
            return sqlite_dialect.insert(table)
        raise RegistryError(f"unsupported database dialect {self.dialect!r} (use SQLite or PostgreSQL)")

    def _adapter_pk(self, conn: Connection, adapter_id: str, *, lock: bool = False) -> int:
        q = sa.select(S.adapters.c.pk).where(S.adapters.c.adapter_id == adapter_id)
        if lock:
            # Serialises writers of one adapter on PostgreSQL (SQLite's BEGIN IMMEDIATE already
            # serialises all writers; SQLAlchemy omits FOR UPDATE there).
            q = q.with_for_update()
        pk = conn.execute(q).scalar()
        if pk is None:
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in the registry")
        return pk

    def _revision_query(self) -> sa.Select:
        r = S.revisions
        parent = S.revisions.alias("parent")
        return sa.select(
            r, parent.c.number.label("parent_number"), S.blobs.c.size.label("blob_size")
        ).select_from(
            r.outerjoin(parent, parent.c.pk == r.c.parent_pk).join(
                S.blobs, S.blobs.c.content_hash == r.c.content_hash
            )
        )

    @staticmethod
    def _to_revision(
        adapter_id: str, row: Any, tags: Sequence[str] = (), serving_pk: int | None = None
    ) -> Revision:
        m = row._mapping
        return Revision(
            adapter_id=adapter_id,
            number=m["number"],
            content_hash=m["content_hash"],
            parent=m["parent_number"],
            message=m["message"],
            author=m["author"],
            created_at=_utc(m["created_at"]),  # type: ignore[arg-type]
            size=m["blob_size"],
            provenance={
                "base_model": m["base_model"],
                "parent": m["parent_number"],
                "training_data": m["training_data"],
                "training_config": m["training_config"],
                "author": m["author"],
                "created_at": _utc(m["created_at"]),
                "minlora_version": m["minlora_version"],
                "torch_version": m["torch_version"],
                "extra": m["extra"] or {},
            },
            tags=sorted(tags),
            serving=serving_pk is not None and m["pk"] == serving_pk,
        )

    def _resolve(self, conn: Connection, adapter_pk: int, adapter_id: str, ref: RevRef) -> Any:
        """The revision row that `ref` names: a number, "head"/"latest", "serving", a tag, or a
        content-hash prefix (at least 4 hex digits)."""
        r = S.revisions
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise RevisionNotFoundError(
                f"{adapter_id}: a revision is a number, tag, hash prefix, 'head' or 'serving', got {ref!r}"
            )
        base = self._revision_query().where(r.c.adapter_pk == adapter_pk)
        text = str(ref).strip()
        if isinstance(ref, int) or text.isdigit():
            row = conn.execute(base.where(r.c.number == int(text))).first()
            if row is None:
                raise RevisionNotFoundError(f"{adapter_id}: no revision {text}")
            return row
        low = text.lower()
        if low in ("head", "latest"):
            row = conn.execute(base.order_by(r.c.number.desc()).limit(1)).first()
            if row is None:
                raise RevisionNotFoundError(f"{adapter_id}: has no revisions yet")
            return row
        if low == "serving":
            pk = conn.execute(
                sa.select(S.serving.c.revision_pk).where(S.serving.c.adapter_pk == adapter_pk)
            ).scalar()
            if pk is None:
                raise RevisionNotFoundError(f"{adapter_id}: no revision is serving (promote one first)")
            return conn.execute(base.where(r.c.pk == pk)).first()
        tag_pk = conn.execute(
            sa.select(S.tags.c.revision_pk).where(S.tags.c.adapter_pk == adapter_pk, S.tags.c.name == text)
        ).scalar()
        if tag_pk is not None:
            return conn.execute(base.where(r.c.pk == tag_pk)).first()
        if _HEX.match(low):
            rows = conn.execute(
                base.where(r.c.content_hash.startswith(low, autoescape=True)).order_by(r.c.number.desc())
            ).all()
            hashes = {row._mapping["content_hash"] for row in rows}
            if len(hashes) > 1:
                raise AmbiguousRevisionError(
                    f"{adapter_id}: hash prefix {text!r} matches {len(hashes)} different contents"
                )
            if rows:
                return rows[0]  # identical content committed more than once: the newest
        raise RevisionNotFoundError(f"{adapter_id}: no revision, tag or hash prefix {text!r}")

    def _tags_by_revision(self, conn: Connection, adapter_pk: int) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name, rpk in conn.execute(
            sa.select(S.tags.c.name, S.tags.c.revision_pk).where(S.tags.c.adapter_pk == adapter_pk)
        ):
            out.setdefault(rpk, []).append(name)
        return out

    def _serving_pk(self, conn: Connection, adapter_pk: int) -> int | None:
        return conn.execute(
            sa.select(S.serving.c.revision_pk).where(S.serving.c.adapter_pk == adapter_pk)
        ).scalar()

    def _revision_obj(self, conn: Connection, adapter_pk: int, adapter_id: str, row: Any) -> Revision:
        tags = self._tags_by_revision(conn, adapter_pk).get(row._mapping["pk"], [])
        return self._to_revision(adapter_id, row, tags, self._serving_pk(conn, adapter_pk))

    def _read(self, fn: Callable[[Connection], Any]) -> Any:
        return run_transaction(self.engine, fn, write=False)

    def _write(self, fn: Callable[[Connection], Any]) -> Any:
        return run_transaction(self.engine, fn, write=True)

    # ------------------------------------------------------------------ adapters

    def exists(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is registered."""
        aid = normalize_adapter_id(adapter_id)
        return self._read(
            lambda c: (
                c.execute(sa.select(S.adapters.c.pk).where(S.adapters.c.adapter_id == aid)).first()
                is not None
            )
        )

    def adapters(
        self, *, prefix: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[str]:
        """Adapter ids in sorted order; `after` and `limit` page through a large registry."""

        def q(conn: Connection) -> list[str]:
            a = S.adapters.c.adapter_id
            stmt = sa.select(a).order_by(a)
            if prefix:
                stmt = stmt.where(a.startswith(prefix, autoescape=True))
            if after is not None:
                stmt = stmt.where(a > after)
            if limit is not None:
                stmt = stmt.limit(limit)
            return list(conn.execute(stmt).scalars())

        return self._read(q)

    def count(self) -> dict[str, int]:
        """Numbers of adapters, revisions and distinct blobs."""

        def q(conn: Connection) -> dict[str, int]:
            n = lambda t: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            return {"adapters": n(S.adapters), "revisions": n(S.revisions), "blobs": n(S.blobs)}

        return self._read(q)

    # ------------------------------------------------------------------ commit

    def _prepare(
        self, weights: Adapter | Mapping[str, LoraWeights], config: Mapping[str, Any] | None
    ) -> Adapter:
        if isinstance(weights, Adapter):
            adapter = weights if config is None else Adapter(modules=weights.modules, config=dict(config))
        elif isinstance(weights, Mapping):
            adapter = Adapter(modules=dict(weights), config=dict(config or {}))
        else:
            raise TypeError(
                f"weights must be an Adapter or a dict of LoraWeights, got {type(weights).__name__}"
            )
        return Adapter(modules=adapter.modules, config=content.canonical_config(adapter.config))

    @staticmethod
    def _provenance(provenance: Mapping[str, Any] | None) -> dict[str, Any]:
        prov = dict(provenance or {})
        base = prov.pop("base_model", None)
        if isinstance(base, torch.nn.Module):
            base = fingerprint_base_model(base)
        if base is not None:
            if not isinstance(base, str) or not _FINGERPRINT.match(base.lower()):
                raise ValueError(
                    "provenance['base_model'] must be a base-model fingerprint (64 hex digits, "
                    "see minlora.registry.fingerprint_base_model) or an nn.Module"
                )
            base = base.lower()
        training_data = prov.pop("training_data", None)
        if training_data is not None and not isinstance(training_data, str):
            raise ValueError(
                "provenance['training_data'] must be a string (a dataset reference: URL, path, name@version)"
            )
        training_config = prov.pop("training_config", None)
        if training_config is not None:
            training_config = content.canonical_config(training_config)
        extra = content.canonical_config(prov) if prov else None
        return {
            "base_model": base,
            "training_data": training_data,
            "training_config": training_config,
            "extra": extra,
        }

    def _store_blob(self, conn_check: Callable[[], bool], h: str, data: bytes) -> None:
        # A blob row in the database means the file was durably written before that row
        # committed.  Without a row we (re)write it: a file found without a row is an orphan
        # of a crashed commit, and rewriting refreshes its age so a concurrent gc keeps it.
        if not conn_check():
            self.blobs.put(h, data)

    def commit(
        self,
        adapter_id: str,
        weights: Adapter | Mapping[str, LoraWeights],
        config: Mapping[str, Any] | None = None,
        *,
        parent: Any = _HEAD,
        message: str = "",
        author: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Revision:
        """Record a new revision of `adapter_id` (created on first commit) and return it.

        weights: an Adapter (its config is used unless `config` is given) or a dict of LoraWeights.
        parent: a revision reference; by default the adapter's newest revision, None for a root.
        provenance: base_model (fingerprint or nn.Module), training_data (a reference),
            training_config (dict), and any other JSON keys (kept under `extra`).  The author,
            time, parent, minlora and torch versions are always recorded.
        """
        aid = normalize_adapter_id(adapter_id)
        adapter = self._prepare(weights, config)
        prov = self._provenance(provenance)
        h = content.content_hash(adapter)
        data = content.serialize(adapter)
        who = author or default_actor()
        self._store_blob(lambda: self._blob_known(h), h, data)
        minlora_version, torch_version = _versions()

        def txn(conn: Connection) -> Revision:
            now = _now()
            pk = conn.execute(
                sa.select(S.adapters.c.pk).where(S.adapters.c.adapter_id == aid).with_for_update()
            ).scalar()
            if pk is None:
                # A concurrent creator makes this fail with IntegrityError; run_transaction retries.
                pk = conn.execute(
                    S.adapters.insert().values(adapter_id=aid, created_at=now)
                ).inserted_primary_key[0]
            if parent is _HEAD:
                parent_pk = conn.execute(
                    sa.select(S.revisions.c.pk)
                    .where(S.revisions.c.adapter_pk == pk)
                    .order_by(S.revisions.c.number.desc())
                    .limit(1)
                ).scalar()
            elif parent is None:
                parent_pk = None
            else:
                parent_pk = self._resolve(conn, pk, aid, parent)._mapping["pk"]
            number = (
                conn.execute(
                    sa.select(sa.func.max(S.revisions.c.number)).where(S.revisions.c.adapter_pk == pk)
                ).scalar()
                or 0
            ) + 1
            conn.execute(
                self._insert(S.blobs)
                .values(content_hash=h, size=len(data), created_at=now)
                .on_conflict_do_nothing()
            )
            rpk = conn.execute(
                S.revisions.insert().values(
                    adapter_pk=pk,
                    number=number,
                    content_hash=h,
                    parent_pk=parent_pk,
                    message=message,
                    author=who,
                    created_at=now,
                    minlora_version=minlora_version,
                    torch_version=torch_version,
                    **prov,
                )
            ).inserted_primary_key[0]
            row = conn.execute(self._revision_query().where(S.revisions.c.pk == rpk)).first()
            return self._revision_obj(conn, pk, aid, row)

        return self._write(txn)

    def _blob_known(self, h: str) -> bool:
        return self._read(
            lambda c: (
                c.execute(sa.select(S.blobs.c.content_hash).where(S.blobs.c.content_hash == h)).first()
                is not None
            )
        )

    def commit_many(
        self,
        items: Iterable[tuple[str, Adapter | Mapping[str, LoraWeights]]],
        *,
        message: str = "",
        author: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        batch_size: int = 5000,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Bulk registration: commit one revision for each (adapter_id, weights), `batch_size`
        per transaction.  The same guarantees as `commit` (blobs first, then the rows
        atomically per batch); parents are each adapter's newest revision.  Returns the number
        of revisions committed; `progress(n)` is called after each batch."""
        who = author or default_actor()
        prov = self._provenance(provenance)
        minlora_version, torch_version = _versions()
        known: set[str] = set()
        total = 0
        batch: list[tuple[str, str, int]] = []

        def flush() -> None:
            nonlocal total
            if not batch:
                return
            rows = list(batch)
            self._write(
                lambda conn: self._commit_batch(
                    conn, rows, message, who, prov, minlora_version, torch_version
                )
            )
            total += len(rows)
            if progress is not None:
                progress(len(rows))
            batch.clear()

        for adapter_id, weights in items:
            aid = normalize_adapter_id(adapter_id)
            adapter = self._prepare(weights, None)
            h = content.content_hash(adapter)
            if h in known:
                size = -1  # already stored (or written earlier in this call)
            else:
                data = content.serialize(adapter)
                self._store_blob(lambda h=h: self._blob_known(h), h, data)
                known.add(h)
                size = len(data)
            batch.append((aid, h, size))
            if len(batch) >= batch_size:
                flush()
        flush()
        return total

    def _commit_batch(
        self,
        conn: Connection,
        rows: list[tuple[str, str, int]],
        message: str,
        who: str,
        prov: dict[str, Any],
        minlora_version: str,
        torch_version: str,
    ) -> None:
        now = _now()
        ids = sorted({aid for aid, _, _ in rows})
        existing: dict[str, int] = {}
        for chunk in range(0, len(ids), 900):  # SQLite caps bound parameters per statement
            part = ids[chunk : chunk + 900]
            existing.update(
                conn.execute(
                    sa.select(S.adapters.c.adapter_id, S.adapters.c.pk).where(
                        S.adapters.c.adapter_id.in_(part)
                    )
                ).all()
            )
        new = [aid for aid in ids if aid not in existing]
        new_set = set(new)
        if new:
            conn.execute(S.adapters.insert(), [{"adapter_id": aid, "created_at": now} for aid in new])
            for chunk in range(0, len(new), 900):
                part = new[chunk : chunk + 900]
                existing.update(
                    conn.execute(
                        sa.select(S.adapters.c.adapter_id, S.adapters.c.pk).where(
                            S.adapters.c.adapter_id.in_(part)
                        )
                    ).all()
                )
        heads: dict[int, tuple[int, int]] = {}  # adapter pk -> (newest number, its pk)
        old = [existing[aid] for aid in ids if aid not in new_set]
        for chunk in range(0, len(old), 900):
            part = old[chunk : chunk + 900]
            r = S.revisions
            newest = (
                sa.select(r.c.adapter_pk, sa.func.max(r.c.number).label("n"))
                .where(r.c.adapter_pk.in_(part))
                .group_by(r.c.adapter_pk)
            ).subquery()
            for apk, n, rpk in conn.execute(
                sa.select(newest.c.adapter_pk, newest.c.n, r.c.pk).join(
                    r, sa.and_(r.c.adapter_pk == newest.c.adapter_pk, r.c.number == newest.c.n)
                )
            ):
                heads[apk] = (n, rpk)
        blob_rows = {h: size for _, h, size in rows if size >= 0}
        if blob_rows:
            conn.execute(
                self._insert(S.blobs).on_conflict_do_nothing(),
                [{"content_hash": h, "size": size, "created_at": now} for h, size in blob_rows.items()],
            )
        values = []
        chained: list[dict[str, Any]] = []  # rows whose parent is an earlier row of this batch
        for aid, h, _ in rows:
            apk = existing[aid]
            n, parent_pk = heads.get(apk, (0, None))
            if parent_pk == -1:
                parent_pk = None
                chained.append({"adapter_pk": apk, "number": n + 1})
            values.append(
                {
                    "adapter_pk": apk,
                    "number": n + 1,
                    "content_hash": h,
                    "parent_pk": parent_pk,
                    "message": message,
                    "author": who,
                    "created_at": now,
                    "minlora_version": minlora_version,
                    "torch_version": torch_version,
                    **prov,
                }
            )
            # An adapter listed twice in one batch: its second revision's parent is the first,
            # whose pk we do not know yet; chain by number and fix parents below.
            heads[apk] = (n + 1, -1)
        conn.execute(S.revisions.insert(), values)
        for v in chained:
            r = S.revisions
            parent_pk = conn.execute(
                sa.select(r.c.pk).where(r.c.adapter_pk == v["adapter_pk"], r.c.number == v["number"] - 1)
            ).scalar()
            # Still inside the inserting transaction, so this is part of creating the row, not
            # a change to history.
            conn.execute(
                r.update()
                .where(r.c.adapter_pk == v["adapter_pk"], r.c.number == v["number"])
                .values(parent_pk=parent_pk)
            )

    # ------------------------------------------------------------------ reading

    def log(self, adapter_id: str, *, limit: int | None = None) -> list[Revision]:
        """The adapter's revisions, newest first."""
        aid = normalize_adapter_id(adapter_id)

        def q(conn: Connection) -> list[Revision]:
            pk = self._adapter_pk(conn, aid)
            stmt = (
                self._revision_query()
                .where(S.revisions.c.adapter_pk == pk)
                .order_by(S.revisions.c.number.desc())
            )
            if limit is not None:
                stmt = stmt.limit(limit)
            tags = self._tags_by_revision(conn, pk)
            serving_pk = self._serving_pk(conn, pk)
            return [
                self._to_revision(aid, row, tags.get(row._mapping["pk"], []), serving_pk)
                for row in conn.execute(stmt)
            ]

        return self._read(q)

    def show(self, adapter_id: str, rev: RevRef = "head") -> Revision:
        """One revision with its provenance, tags and serving flag."""
        aid = normalize_adapter_id(adapter_id)

        def q(conn: Connection) -> Revision:
            pk = self._adapter_pk(conn, aid)
            return self._revision_obj(conn, pk, aid, self._resolve(conn, pk, aid, rev))

        return self._read(q)

    def serving(self, adapter_id: str) -> Revision | None:
        """The serving revision, or None when none was promoted."""
        try:
            return self.show(adapter_id, "serving")
        except RevisionNotFoundError:
            return None

    def load(self, adapter_id: str, rev: RevRef = "head") -> Adapter:
        """The revision's weights, verified against its content hash.

        Raises CorruptBlobError (naming the adapter and revision) when the blob is missing,
        unreadable, or its content does not hash to the recorded value."""
        info = self.show(adapter_id, rev)
        return self._load_blob(info.adapter_id, info.number, info.content_hash)

    def _load_blob(self, adapter_id: str, number: int, h: str) -> Adapter:
        def fail(why: str) -> CorruptBlobError:
            return CorruptBlobError(
                f"adapter {adapter_id!r} revision {number} (content {h[:12]}): {why}",
                adapter_id=adapter_id,
                revision=number,
                content_hash=h,
            )

        try:
            data = self.blobs.get(h)
        except FileNotFoundError:
            raise fail(f"blob {self.blobs.path(h)} is missing") from None
        try:
            adapter = content.deserialize(data)
        except Exception as exc:  # safetensors raises its own types on garbage
            raise fail(f"blob {self.blobs.path(h)} is unreadable ({type(exc).__name__}: {exc})") from None
        actual = content.content_hash(adapter)
        if actual != h:
            raise fail(f"blob {self.blobs.path(h)} is corrupted: its content hashes to {actual[:12]}")
        return adapter

    def diff(self, adapter_id: str, rev_a: RevRef, rev_b: RevRef = "head") -> Diff:
        """Which tensors (and scales, config keys) changed between two revisions, and by how much."""
        a_info = self.show(adapter_id, rev_a)
        b_info = self.show(adapter_id, rev_b)
        a = self._load_blob(a_info.adapter_id, a_info.number, a_info.content_hash)
        b = self._load_blob(b_info.adapter_id, b_info.number, b_info.content_hash)
        changes: list[TensorChange] = []
        for module in sorted(set(a.modules) | set(b.modules)):
            wa, wb = a.modules.get(module), b.modules.get(module)
            for suffix, ta, tb in (
                ("lora_A", wa.a if wa else None, wb.a if wb else None),
                ("lora_B", wa.b if wa else None, wb.b if wb else None),
            ):
                changes.append(_tensor_change(f"{module}.{suffix}", ta, tb))
            if wa is not None and wb is not None and wa.scale != wb.scale:
                changes.append(
                    TensorChange(
                        name=f"{module}.scale",
                        status="changed",
                        max_abs_diff=abs(wb.scale - wa.scale),
                        rel_norm_diff=abs(wb.scale - wa.scale) / abs(wa.scale) if wa.scale else math.inf,
                    )
                )
        config_changes = {
            k: [a.config.get(k), b.config.get(k)]
            for k in sorted(set(a.config) | set(b.config))
            if a.config.get(k) != b.config.get(k)
        }
        return Diff(
            adapter_id=a_info.adapter_id,
            rev_a=a_info.number,
            rev_b=b_info.number,
            same_content=a_info.content_hash == b_info.content_hash,
            tensors=changes,
            config_changes=config_changes,
        )

    # ------------------------------------------------------------------ tags

    def tag(
        self,
        adapter_id: str,
        name: str,
        rev: RevRef = "head",
        *,
        force: bool = False,
        author: str | None = None,
    ) -> Revision:
        """Name a revision.  Tags do not move unless `force` (then the old target is replaced)."""
        aid = normalize_adapter_id(adapter_id)
        tag = normalize_tag(name)

        def txn(conn: Connection) -> Revision:
            pk = self._adapter_pk(conn, aid, lock=True)
            row = self._resolve(conn, pk, aid, rev)
            rpk = row._mapping["pk"]
            current = conn.execute(
                sa.select(S.tags.c.revision_pk).where(S.tags.c.adapter_pk == pk, S.tags.c.name == tag)
            ).scalar()
            if current is not None and current != rpk:
                if not force:
                    num = conn.execute(
                        sa.select(S.revisions.c.number).where(S.revisions.c.pk == current)
                    ).scalar()
                    raise TagExistsError(
                        f"{aid}: tag {tag!r} already names revision {num} (use force to move it)"
                    )
                conn.execute(
                    S.tags.update()
                    .where(S.tags.c.adapter_pk == pk, S.tags.c.name == tag)
                    .values(revision_pk=rpk, author=author or default_actor(), created_at=_now())
                )
            elif current is None:
                conn.execute(
                    S.tags.insert().values(
                        adapter_pk=pk,
                        name=tag,
                        revision_pk=rpk,
                        author=author or default_actor(),
                        created_at=_now(),
                    )
                )
            return self._revision_obj(conn, pk, aid, row)

        return self._write(txn)

    def tags(self, adapter_id: str) -> dict[str, int]:
        """Tag name -> revision number."""
        aid = normalize_adapter_id(adapter_id)

        def q(conn: Connection) -> dict[str, int]:
            pk = self._adapter_pk(conn, aid)
            return dict(
                conn.execute(
                    sa.select(S.tags.c.name, S.revisions.c.number)
                    .join(S.revisions, S.revisions.c.pk == S.tags.c.revision_pk)
                    .where(S.tags.c.adapter_pk == pk)
                    .order_by(S.tags.c.name)
                ).all()
            )

        return self._read(q)

    # ------------------------------------------------------------------ evaluations and gates

    def record_evaluation(
        self,
        adapter_id: str,
        rev: RevRef,
        suite: str,
        metrics: Mapping[str, float],
        *,
        author: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> list[Evaluation]:
        """Attach metric values (suite/metric -> value) to a revision."""
        aid = normalize_adapter_id(adapter_id)
        if not isinstance(suite, str) or not suite or len(suite) > 128:
            raise ValueError("suite must be a non-empty string of at most 128 characters")
        clean: dict[str, float] = {}
        for metric, value in metrics.items():
            if not isinstance(metric, str) or not metric or len(metric) > 128:
                raise ValueError(
                    f"metric names must be non-empty strings of at most 128 characters, got {metric!r}"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(float(value))
            ):
                raise ValueError(f"metric {metric!r}: value must be a finite number, got {value!r}")
            clean[metric] = float(value)
        if not clean:
            raise ValueError("no metrics given")
        who = author or default_actor()
        det = content.canonical_config(details) if details else None

        def txn(conn: Connection) -> list[Evaluation]:
            pk = self._adapter_pk(conn, aid)
            row = self._resolve(conn, pk, aid, rev)
            now = _now()
            conn.execute(
                S.evaluations.insert(),
                [
                    {
                        "revision_pk": row._mapping["pk"],
                        "suite": suite,
                        "metric": m,
                        "value": v,
                        "author": who,
                        "recorded_at": now,
                        "details": det,
                    }
                    for m, v in clean.items()
                ],
            )
            return [
                Evaluation(aid, row._mapping["number"], suite, m, v, who, now, det) for m, v in clean.items()
            ]

        return self._write(txn)

    def evaluations(self, adapter_id: str, rev: RevRef = "head") -> list[Evaluation]:
        """Every evaluation recorded for a revision, oldest first."""
        aid = normalize_adapter_id(adapter_id)

        def q(conn: Connection) -> list[Evaluation]:
            pk = self._adapter_pk(conn, aid)
            row = self._resolve(conn, pk, aid, rev)
            e = S.evaluations
            return [
                Evaluation(
                    aid,
                    row._mapping["number"],
                    x.suite,
                    x.metric,
                    x.value,
                    x.author,
                    _utc(x.recorded_at),
                    x.details,
                )  # type: ignore[arg-type]
                for x in conn.execute(
                    sa.select(e).where(e.c.revision_pk == row._mapping["pk"]).order_by(e.c.pk)
                )
            ]

        return self._read(q)

    @staticmethod
    def _latest_metric(conn: Connection, revision_pk: int, suite: str, metric: str) -> float | None:
        e = S.evaluations
        return conn.execute(
            sa.select(e.c.value)
            .where(e.c.revision_pk == revision_pk, e.c.suite == suite, e.c.metric == metric)
            .order_by(e.c.pk.desc())
            .limit(1)
        ).scalar()

    def set_gate(self, adapter_id: str, gate: Gate) -> None:
        """Require `gate` for every later promotion of this adapter (replaces a gate on the same metric)."""
        aid = normalize_adapter_id(adapter_id)
        if not math.isfinite(gate.tolerance) or gate.tolerance < 0:
            raise ValueError(f"gate tolerance must be a finite number >= 0, got {gate.tolerance!r}")

        def txn(conn: Connection) -> None:
            pk = self._adapter_pk(conn, aid, lock=True)
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

        self._write(txn)

    def remove_gate(self, adapter_id: str, suite: str, metric: str) -> bool:
        aid = normalize_adapter_id(adapter_id)

        def txn(conn: Connection) -> bool:
            pk = self._adapter_pk(conn, aid, lock=True)
            g = S.gates
            return (
                conn.execute(
                    g.delete().where(g.c.adapter_pk == pk, g.c.suite == suite, g.c.metric == metric)
                ).rowcount
                > 0
            )

        return self._write(txn)

    def gates(self, adapter_id: str) -> list[Gate]:
        aid = normalize_adapter_id(adapter_id)
        return self._read(lambda conn: self._gates(conn, self._adapter_pk(conn, aid)))

    @staticmethod
    def _gates(conn: Connection, adapter_pk: int) -> list[Gate]:
        g = S.gates
        return [
            Gate(x.suite, x.metric, bool(x.higher_is_better), float(x.tolerance))
            for x in conn.execute(
                sa.select(g).where(g.c.adapter_pk == adapter_pk).order_by(g.c.suite, g.c.metric)
            )
        ]

    def _gate_report(
        self, conn: Connection, gates: Sequence[Gate], candidate_pk: int, current_pk: int | None
    ) -> list[dict[str, Any]]:
        report = []
        for gate in gates:
            cand = self._latest_metric(conn, candidate_pk, gate.suite, gate.metric)
            cur = (
                self._latest_metric(conn, current_pk, gate.suite, gate.metric)
                if current_pk is not None
                else None
            )
            entry: dict[str, Any] = {**gate.to_dict(), "candidate": cand, "serving": cur}
            if cand is None:
                entry["status"] = "missing"
                entry["why"] = f"the candidate has no {gate.suite}/{gate.metric} evaluation"
            elif cur is None:
                entry["status"] = "pass"
                entry["why"] = "nothing to compare against (no serving revision or it lacks the metric)"
            else:
                worse_by = (cur - cand) if gate.higher_is_better else (cand - cur)
                if worse_by > gate.tolerance:
                    entry["status"] = "regressed"
                    entry["why"] = (
                        f"{gate.suite}/{gate.metric} is worse by {worse_by:.6g} (tolerance {gate.tolerance:.6g})"
                    )
                else:
                    entry["status"] = "pass"
                    entry["why"] = f"within tolerance ({-worse_by:+.6g})"
            report.append(entry)
        return report

    def evaluate(
        self,
        fn: Callable[[Adapter, Revision], Mapping[str, float]],
        *,
        adapters: Iterable[str] | None = None,
        rev: RevRef = "head",
        suite: str = "default",
        author: str | None = None,
        progress: bool = False,
    ) -> list[Evaluation]:
        """The evaluation runner: for each adapter (all when None), load revision `rev`, call
        `fn(adapter_weights, revision) -> {metric: value}` and record the values under `suite`.
        An exception from `fn` is re-raised as RegistryError naming the adapter and revision
        (the results recorded before it stay recorded)."""
        ids = list(adapters) if adapters is not None else self.adapters()
        out: list[Evaluation] = []
        it: Iterable[str] = ids
        if progress:
            from tqdm import tqdm

            it = tqdm(ids, desc=f"evaluate {suite}", unit="adapter")
        for aid in it:
            info = self.show(aid, rev)
            weights = self._load_blob(info.adapter_id, info.number, info.content_hash)
            try:
                metrics = dict(fn(weights, info))
            except Exception as exc:
                raise RegistryError(
                    f"evaluation of {info.adapter_id!r} revision {info.number} failed: {exc}"
                ) from exc
            out.extend(self.record_evaluation(info.adapter_id, info.number, suite, metrics, author=author))
        return out

    # ------------------------------------------------------------------ serving

    def promote(
        self,
        adapter_id: str,
        rev: RevRef = "head",
        *,
        force: bool = False,
        by: str | None = None,
        reason: str | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> Promotion:
        """Point the adapter's serving pointer at `rev`, if it passes the gates.

        Gates are the adapter's stored ones (set_gate) unless `gates` is given.  A gate fails
        when the candidate lacks the metric or is worse than the serving revision's value by
        more than its tolerance; then PromotionRefusedError, unless `force`, in which case
        the promotion is recorded as forced, with `by` (default: the acting user) and the
        failing report."""
        aid = normalize_adapter_id(adapter_id)
        actor = (by or default_actor()).strip()
        if not actor:
            raise ValueError("`by` must name who promotes")

        def txn(conn: Connection) -> Promotion:
            pk = self._adapter_pk(conn, aid, lock=True)
            cand = self._resolve(conn, pk, aid, rev)._mapping
            current_pk = self._serving_pk(conn, pk)
            now = _now()
            if current_pk == cand["pk"]:
                return Promotion(
                    aid,
                    "promote",
                    cand["number"],
                    cand["number"],
                    False,
                    actor,
                    reason,
                    now,
                    [],
                    changed=False,
                )
            report = self._gate_report(
                conn, self._gates(conn, pk) if gates is None else list(gates), cand["pk"], current_pk
            )
            failed = [g for g in report if g["status"] != "pass"]
            if failed and not force:
                raise PromotionRefusedError(
                    f"{aid}: promotion of revision {cand['number']} refused: "
                    + "; ".join(g["why"] for g in failed),
                    report,
                )
            from_number = (
                conn.execute(sa.select(S.revisions.c.number).where(S.revisions.c.pk == current_pk)).scalar()
                if current_pk is not None
                else None
            )
            self._move_serving(
                conn, pk, current_pk, cand["pk"], "promote", bool(force), actor, reason, report, now
            )
            return Promotion(
                aid, "promote", from_number, cand["number"], bool(force), actor, reason, now, report
            )

        return self._write(txn)

    def _move_serving(
        self,
        conn: Connection,
        pk: int,
        from_pk: int | None,
        to_pk: int,
        action: str,
        forced: bool,
        actor: str,
        reason: str | None,
        report: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        if from_pk is None:
            conn.execute(S.serving.insert().values(adapter_pk=pk, revision_pk=to_pk, updated_at=now))
        else:
            conn.execute(
                S.serving.update()
                .where(S.serving.c.adapter_pk == pk)
                .values(revision_pk=to_pk, updated_at=now)
            )
        conn.execute(
            S.serving_events.insert().values(
                adapter_pk=pk,
                from_revision_pk=from_pk,
                to_revision_pk=to_pk,
                action=action,
                forced=forced,
                actor=actor,
                reason=reason,
                gate_report=report or None,
                at=now,
            )
        )

    def rollback(
        self,
        adapter_id: str,
        *,
        to: RevRef | None = None,
        by: str | None = None,
        reason: str | None = None,
    ) -> Promotion:
        """Serve again the revision that served before the current one (or `to`, which must
        have served before).  Gates are not applied: the target already served.  Repeated
        rollbacks walk further back, like an undo stack."""
        aid = normalize_adapter_id(adapter_id)
        actor = (by or default_actor()).strip()

        def txn(conn: Connection) -> Promotion:
            pk = self._adapter_pk(conn, aid, lock=True)
            current_pk = self._serving_pk(conn, pk)
            if current_pk is None:
                raise RegistryError(f"{aid}: nothing is serving, so there is nothing to roll back")
            ev = S.serving_events
            stack: list[int] = []
            served: set[int] = set()
            for action, to_pk in conn.execute(
                sa.select(ev.c.action, ev.c.to_revision_pk).where(ev.c.adapter_pk == pk).order_by(ev.c.pk)
            ):
                served.add(to_pk)
                if action == "rollback":
                    # A rollback pops back to its target: drop everything above it.
                    while stack and stack[-1] != to_pk:
                        stack.pop()
                    if not stack:
                        stack.append(to_pk)
                else:
                    stack.append(to_pk)
            if to is not None:
                target_pk = self._resolve(conn, pk, aid, to)._mapping["pk"]
                if target_pk not in served:
                    raise RegistryError(
                        f"{aid}: revision {to} never served; use promote (with its gates) instead"
                    )
                if target_pk == current_pk:
                    raise RegistryError(f"{aid}: revision {to} is already serving")
            else:
                earlier = [x for x in stack[:-1] if x != current_pk]
                if not earlier:
                    raise RegistryError(f"{aid}: no earlier serving revision to roll back to")
                target_pk = earlier[-1]
            num = dict(
                conn.execute(
                    sa.select(S.revisions.c.pk, S.revisions.c.number).where(
                        S.revisions.c.pk.in_([current_pk, target_pk])
                    )
                ).all()
            )
            now = _now()
            self._move_serving(conn, pk, current_pk, target_pk, "rollback", False, actor, reason, [], now)
            return Promotion(aid, "rollback", num[current_pk], num[target_pk], False, actor, reason, now, [])

        return self._write(txn)

    def serving_history(self, adapter_id: str) -> list[Promotion]:
        """Every move of the serving pointer, oldest first."""
        aid = normalize_adapter_id(adapter_id)

        def q(conn: Connection) -> list[Promotion]:
            pk = self._adapter_pk(conn, aid)
            ev = S.serving_events
            fr, to = S.revisions.alias("fr"), S.revisions.alias("to")
            rows = conn.execute(
                sa.select(ev, fr.c.number.label("from_number"), to.c.number.label("to_number"))
                .select_from(
                    ev.outerjoin(fr, fr.c.pk == ev.c.from_revision_pk).join(
                        to, to.c.pk == ev.c.to_revision_pk
                    )
                )
                .where(ev.c.adapter_pk == pk)
                .order_by(ev.c.pk)
            )
            return [
                Promotion(
                    aid,
                    x.action,
                    x.from_number,
                    x.to_number,
                    bool(x.forced),
                    x.actor,
                    x.reason,
                    _utc(x.at),
                    x.gate_report or [],
                )  # type: ignore[arg-type]
                for x in rows
            ]

        return self._read(q)

    # ------------------------------------------------------------------ residency

    def attach_pool(self, pool: Any, key: Callable[[str, Revision | None], Any] | None = None) -> None:
        """Report residency from `pool` (any object with `residency(key) -> str`, such as
        minlora.pool.AdapterPool).  `key(adapter_id, serving_revision)` gives the name the
        pool knows the adapter by; by default the adapter id."""
        if not callable(getattr(pool, "residency", None)):
            raise TypeError("the pool must have a residency(adapter_id) method")
        self._pool = pool
        if key is not None:
            self._pool_key = key

    def pool_source(self, adapter_id: str, rev: RevRef = "serving") -> Callable[[], Adapter]:
        """A loader to hand to AdapterPool.register: the revision is resolved now (so the pool
        holds exactly that revision even if the serving pointer moves later) and its weights
        are read and verified when the pool fetches them."""
        info = self.show(adapter_id, rev)
        return lambda: self._load_blob(info.adapter_id, info.number, info.content_hash)

    def residency(self, adapter_id: str) -> str:
        """Where the adapter's serving revision lives now: "gpu", "host" or "disk" (or what
        the pool says, e.g. "unregistered").  "none" when no revision is serving.  Without an
        attached pool a serving revision is only in the blob store: "disk"."""
        rev = self.serving(adapter_id)
        if rev is None:
            return "none"
        if self._pool is None:
            return "disk"
        return str(self._pool.residency(self._pool_key(rev.adapter_id, rev)))

    # ------------------------------------------------------------------ PEFT

    def import_peft(self, path: str, adapter_id: str, **commit_kwargs: Any) -> Revision:
        """Commit the PEFT adapter directory `path` (or a minlora adapter file: whatever
        `minlora.formats.load_adapter` reads) as a new revision of `adapter_id`."""
        return self.commit(adapter_id, load_adapter(path), **commit_kwargs)

    def export_peft(self, adapter_id: str, path: str, rev: RevRef = "head") -> Revision:
        """Write a (verified) revision as a PEFT adapter directory."""
        info = self.show(adapter_id, rev)
        save_peft(self._load_blob(info.adapter_id, info.number, info.content_hash), path)
        return info

    # ------------------------------------------------------------------ maintenance

    def _iter_revisions(self, adapter_id: str | None) -> Iterator[tuple[str, int, str]]:
        """(adapter_id, number, content_hash) for every revision, in keyset-paged chunks so a
        million rows never sit in memory at once."""
        r, a = S.revisions, S.adapters
        last = 0
        apk = None
        if adapter_id is not None:
            aid = normalize_adapter_id(adapter_id)
            apk = self._read(lambda c: self._adapter_pk(c, aid))
        while True:
            stmt = (
                sa.select(r.c.pk, a.c.adapter_id, r.c.number, r.c.content_hash)
                .join(a, a.c.pk == r.c.adapter_pk)
                .where(r.c.pk > last)
                .order_by(r.c.pk)
                .limit(10000)
            )
            if apk is not None:
                stmt = stmt.where(r.c.adapter_pk == apk)
            rows = self._read(lambda c, stmt=stmt: c.execute(stmt).all())
            if not rows:
                return
            for pk, aid_, number, h in rows:
                yield aid_, number, h
            last = rows[-1][0]

    def verify(self, adapter_id: str | None = None, *, progress: bool = False) -> VerifyReport:
        """Load and re-hash the blob of every revision (of one adapter, or all).  Each distinct
        blob is read once; a failure is reported for every revision that uses it."""
        bad: dict[str, str] = {}
        good: set[str] = set()
        failures: list[dict[str, Any]] = []
        n = 0
        total = None
        if progress:
            from tqdm import tqdm

            total = tqdm(desc="verify", unit="rev")
        for aid, number, h in self._iter_revisions(adapter_id):
            n += 1
            if total is not None:
                total.update(1)
            if h not in good and h not in bad:
                try:
                    self._load_blob(aid, number, h)
                    good.add(h)
                except CorruptBlobError as exc:
                    bad[h] = str(exc)
            if h in bad:
                failures.append(
                    {
                        "adapter_id": aid,
                        "revision": number,
                        "content_hash": h,
                        "error": _reword(bad[h], aid, number, h),
                    }
                )
        if total is not None:
            total.close()
        return VerifyReport(revisions_checked=n, blobs_checked=len(good) + len(bad), failures=failures)

    def gc(self, *, min_age_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete blob files that no revision references (orphans of crashed commits) and
        leftover temporary files, if older than `min_age_s` (a younger one may belong to a
        commit in flight, whose row is not yet visible)."""
        files = list(self.blobs.walk())
        known: set[str] = set()

        def q(conn: Connection) -> None:
            known.update(conn.execute(sa.select(S.blobs.c.content_hash)).scalars())

        # Read the referenced set *after* listing: a blob committed in between is then known.
        self._read(q)
        now = self.blobs.now()
        deleted: list[str] = []
        freed = 0
        young = 0
        for f in files:
            if f.content_hash is not None and f.content_hash in known:
                continue
            if now - f.mtime < min_age_s:
                young += 1
                continue
            if not dry_run:
                try:
                    self.blobs.delete(f.path)
                except FileNotFoundError:
                    continue
            deleted.append(f.path)
            freed += f.size
        return GcReport(deleted=deleted, bytes_freed=freed, kept_young=young, dry_run=dry_run)


def _reword(message: str, adapter_id: str, number: int, h: str) -> str:
    # The first revision found with a bad blob names itself; restate for the others sharing it.
    prefix = f"adapter {adapter_id!r} revision {number} (content {h[:12]}): "
    return prefix + message.split("): ", 1)[-1]


def _tensor_change(name: str, ta: torch.Tensor | None, tb: torch.Tensor | None) -> TensorChange:
    if ta is None:
        return TensorChange(name, "added", shape_b=list(tb.shape))  # type: ignore[union-attr]
    if tb is None:
        return TensorChange(name, "removed", shape_a=list(ta.shape))
    if ta.shape != tb.shape:
        return TensorChange(name, "reshaped", shape_a=list(ta.shape), shape_b=list(tb.shape))
    a64, b64 = ta.detach().to(torch.float64), tb.detach().to(torch.float64)
    d = b64 - a64
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    norm_a = float(a64.norm())
    rel = float(d.norm()) / norm_a if norm_a else (0.0 if max_abs == 0 else math.inf)
    status = "unchanged" if max_abs == 0 and ta.dtype == tb.dtype else "changed"
    return TensorChange(name, status, list(ta.shape), list(tb.shape), max_abs, rel)
