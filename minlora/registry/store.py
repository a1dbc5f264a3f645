"""The registry's SQL store: the engine, transactions, dialect helpers, revision
resolution and the reads that return entities.  Policy (gates, the rollback stack, the
commit protocol) lives in the modules that use it; this one only speaks SQL."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, Union

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from . import dbcheck, entities
from . import schema as S
from .db import database_name, run_transaction
from .errors import AdapterNotFoundError, AmbiguousRevisionError, RegistryError, RevisionNotFoundError
from .types import Revision

__all__ = ["RevRef", "Store"]

T = TypeVar("T")
RevRef = Union[int, str]
_HEX = re.compile(r"^[0-9a-f]{4,64}$")
_NUMBER = re.compile(r"[0-9]+")
MAX_REVISION = (1 << 31) - 1  # the revision number column is a 32-bit integer on PostgreSQL
_PAGE = 10000  # rows per keyset page of a full scan
# The two-key advisory locks are a key space apart from migrate's one-key lock.
_BLOB_LOCK_NS = 0x6D6C6F72  # "mlor"
_LOCK = sa.text("SELECT pg_advisory_xact_lock(:ns, :key)")


class Store:
    """The metadata database of one registry (SQLite or PostgreSQL), migrated at open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = dbcheck.open_checked(url)
        self.dialect = self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def display_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def name(self) -> str:
        """The database as messages name it (a SQLite file's path, or the URL without password)."""
        return database_name(self.engine.url)

    def problems(self) -> list[str]:
        """Structural damage the database reports about itself ([] when none)."""
        return dbcheck.problems(self.engine)

    # ------------------------------------------------------------------ transactions

    def read(self, fn: Callable[[Connection], T]) -> T:
        return run_transaction(self.engine, fn, write=False)

    def write(self, fn: Callable[[Connection], T]) -> T:
        return run_transaction(self.engine, fn, write=True)

    def insert(self, table: sa.Table) -> Any:
        """An INSERT that supports `.on_conflict_do_nothing()` (spelled per dialect)."""
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        if self.dialect == "sqlite":
            return sqlite_dialect.insert(table)
        raise RegistryError(f"unsupported database dialect {self.dialect!r} (use SQLite or PostgreSQL)")

    # ------------------------------------------------------------------ lookups inside a transaction

    @staticmethod
    def adapter_pk(conn: Connection, adapter_id: str, *, lock: bool = False) -> int:
        q = sa.select(S.adapters.c.pk).where(S.adapters.c.adapter_id == adapter_id)
        if lock:
            # Serialises writers of one adapter on PostgreSQL (SQLite's BEGIN IMMEDIATE already
            # serialises all writers; SQLAlchemy omits FOR UPDATE there).
            q = q.with_for_update()
        pk = conn.execute(q).scalar()
        if pk is None:
            raise AdapterNotFoundError(f"no adapter {adapter_id!r} in the registry")
        return pk

    @staticmethod
    def revision_query() -> sa.Select:
        """Revision rows with their parent's number, their blob's size and their optimizer-state
        blob's hash (NULL when they have none)."""
        r = S.revisions
        parent = S.revisions.alias("parent")
        st = S.revision_states
        return sa.select(
            r,
            parent.c.number.label("parent_number"),
            S.blobs.c.size.label("blob_size"),
            st.c.content_hash.label("state_hash"),
        ).select_from(
            r.outerjoin(parent, parent.c.pk == r.c.parent_pk)
            .join(S.blobs, S.blobs.c.content_hash == r.c.content_hash)
            .outerjoin(st, st.c.revision_pk == r.c.pk)
        )

    def resolve(self, conn: Connection, adapter_pk: int, adapter_id: str, ref: RevRef) -> Any:
        """The revision row that `ref` names: a number, "head"/"latest", "serving", a tag, or a
        content-hash prefix (at least 4 hex digits)."""
        r = S.revisions
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise RevisionNotFoundError(
                f"{adapter_id}: a revision is a number, tag, hash prefix, 'head' or 'serving', got {ref!r}"
            )
        base = self.revision_query().where(r.c.adapter_pk == adapter_pk)
        if isinstance(ref, int):
            return self._numbered(conn, base, adapter_id, ref)
        # Tags are stored NFC (ids.normalize_tag), so a reference is compared in NFC too.
        text = unicodedata.normalize("NFC", ref.strip())
        # A number is ASCII digits; other scripts' digits ('٣', '²') are tag names.
        if _NUMBER.fullmatch(text):
            return self._numbered(conn, base, adapter_id, int(text) if len(text) <= 18 else None, text)
        low = text.lower()
        if low in ("head", "latest"):
            row = conn.execute(base.order_by(r.c.number.desc()).limit(1)).first()
            if row is None:
                raise RevisionNotFoundError(f"{adapter_id}: has no revisions yet")
            return row
        if low == "serving":
            pk = self.serving_pk(conn, adapter_pk)
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

    @staticmethod
    def _numbered(
        conn: Connection, base: sa.Select, adapter_id: str, number: int | None, text: str | None = None
    ) -> Any:
        # `number` None: more digits than any revision number has.
        row = None
        if number is not None and 1 <= number <= MAX_REVISION:
            row = conn.execute(base.where(S.revisions.c.number == number)).first()
        if row is None:
            if text is None:
                text = str(number) if abs(number or 0).bit_length() < 64 else "beyond 2**63"
            raise RevisionNotFoundError(f"{adapter_id}: no revision {text}")
        return row

    @staticmethod
    def serving_pk(conn: Connection, adapter_pk: int) -> int | None:
        return conn.execute(
            sa.select(S.serving.c.revision_pk).where(S.serving.c.adapter_pk == adapter_pk)
        ).scalar()

    @staticmethod
    def tags_by_revision(conn: Connection, adapter_pk: int) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for name, rpk in conn.execute(
            sa.select(S.tags.c.name, S.tags.c.revision_pk).where(S.tags.c.adapter_pk == adapter_pk)
        ):
            out.setdefault(rpk, []).append(name)
        return out

    @staticmethod
    def numbers(conn: Connection, revision_pks: Sequence[int]) -> dict[int, int]:
        """Revision pk -> its number."""
        r = S.revisions
        return dict(conn.execute(sa.select(r.c.pk, r.c.number).where(r.c.pk.in_(list(revision_pks)))).all())

    def revision(self, conn: Connection, adapter_pk: int, adapter_id: str, row: Any) -> Revision:
        """The entity of a revision_query() row, with its tags and serving flag."""
        tags = self.tags_by_revision(conn, adapter_pk).get(row._mapping["pk"], [])
        return entities.revision(adapter_id, row, tags, self.serving_pk(conn, adapter_pk))

    # ------------------------------------------------------------------ reads

    def exists(self, adapter_id: str) -> bool:
        a = S.adapters.c
        return self.read(
            lambda c: c.execute(sa.select(a.pk).where(a.adapter_id == adapter_id)).first() is not None
        )

    def adapter_ids(self, prefix: str | None, after: str | None, limit: int | None) -> list[str]:
        a = S.adapters.c.adapter_id
        stmt = sa.select(a).order_by(a)
        if prefix:
            stmt = stmt.where(a.startswith(prefix, autoescape=True))
        if after is not None:
            stmt = stmt.where(a > after)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self.read(lambda c: list(c.execute(stmt).scalars()))

    def count(self) -> dict[str, int]:
        def q(conn: Connection) -> dict[str, int]:
            n = lambda t: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            return {"adapters": n(S.adapters), "revisions": n(S.revisions), "blobs": n(S.blobs)}

        return self.read(q)

    def log(self, adapter_id: str, limit: int | None) -> list[Revision]:
        def q(conn: Connection) -> list[Revision]:
            pk = self.adapter_pk(conn, adapter_id)
            stmt = (
                self.revision_query()
                .where(S.revisions.c.adapter_pk == pk)
                .order_by(S.revisions.c.number.desc())
            )
            if limit is not None:
                stmt = stmt.limit(limit)
            tags = self.tags_by_revision(conn, pk)
            serving_pk = self.serving_pk(conn, pk)
            return [
                entities.revision(adapter_id, row, tags.get(row._mapping["pk"], []), serving_pk)
                for row in conn.execute(stmt)
            ]

        return self.read(q)

    def show(self, adapter_id: str, ref: RevRef) -> Revision:
        def q(conn: Connection) -> Revision:
            pk = self.adapter_pk(conn, adapter_id)
            return self.revision(conn, pk, adapter_id, self.resolve(conn, pk, adapter_id, ref))

        return self.read(q)

    def iter_revisions(self, adapter_id: str | None) -> Iterator[tuple[str, int, str, str | None]]:
        """(adapter_id, number, content_hash, state hash or None) of every revision (of one
        adapter, or all), in keyset-paged chunks so a million rows never sit in memory at once."""
        r, a, st = S.revisions, S.adapters, S.revision_states
        apk = None if adapter_id is None else self.read(lambda c: self.adapter_pk(c, adapter_id))
        last = 0
        while True:
            stmt = (
                sa.select(r.c.pk, a.c.adapter_id, r.c.number, r.c.content_hash, st.c.content_hash)
                .join(a, a.c.pk == r.c.adapter_pk)
                .outerjoin(st, st.c.revision_pk == r.c.pk)
                .where(r.c.pk > last)
                .order_by(r.c.pk)
                .limit(_PAGE)
            )
            if apk is not None:
                stmt = stmt.where(r.c.adapter_pk == apk)
            rows = self.read(lambda c, stmt=stmt: c.execute(stmt).all())
            if not rows:
                return
            for _pk, aid, number, h, state in rows:
                yield aid, number, h, state
            last = rows[-1][0]

    def lock_blobs(self, conn: Connection, hashes: Iterable[str]) -> None:
        """Hold, until the transaction ends, the lock that commit and gc take on these
        content hashes, so gc's "unreferenced, so delete" and commit's "referenced, and the
        file is in place" never interleave.  SQLite's write transaction already holds the
        database's one write lock; PostgreSQL takes one advisory lock per hash (sorted, so
        two holders of several never deadlock)."""
        if self.dialect != "postgresql":
            return
        for key in sorted({int(h[:8], 16) - (1 << 31) for h in hashes}):
            conn.execute(_LOCK, {"ns": _BLOB_LOCK_NS, "key": key})

    @staticmethod
    def referenced(conn: Connection, hashes: Sequence[str]) -> set[str]:
        """Which of `hashes` have a blob row."""
        b = S.blobs.c
        return set(conn.execute(sa.select(b.content_hash).where(b.content_hash.in_(list(hashes)))).scalars())

    def blob_hashes(self) -> set[str]:
        """Every content hash with a blob row."""
        return self.read(lambda c: set(c.execute(sa.select(S.blobs.c.content_hash)).scalars()))
