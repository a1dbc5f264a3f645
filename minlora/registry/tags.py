"""Tags: names for revisions, fixed unless moved on purpose."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import entities
from . import schema as S
from .errors import TagExistsError
from .store import RevRef, Store
from .types import Revision

__all__ = ["list_tags", "tag"]


def tag(store: Store, adapter_id: str, name: str, rev: RevRef, *, force: bool, author: str) -> Revision:
    """Point tag `name` (validated) at `rev`; an existing tag moves only with `force`."""

    def txn(conn: Connection) -> Revision:
        pk = store.adapter_pk(conn, adapter_id, lock=True)
        row = store.resolve(conn, pk, adapter_id, rev)
        rpk = row._mapping["pk"]
        t = S.tags
        current = conn.execute(
            sa.select(t.c.revision_pk).where(t.c.adapter_pk == pk, t.c.name == name)
        ).scalar()
        if current is not None and current != rpk:
            if not force:
                num = store.numbers(conn, [current])[current]
                raise TagExistsError(
                    f"{adapter_id}: tag {name!r} already names revision {num} (use force to move it)"
                )
            conn.execute(
                t.update()
                .where(t.c.adapter_pk == pk, t.c.name == name)
                .values(revision_pk=rpk, author=author, created_at=entities.now())
            )
        elif current is None:
            conn.execute(
                t.insert().values(
                    adapter_pk=pk, name=name, revision_pk=rpk, author=author, created_at=entities.now()
                )
            )
        return store.revision(conn, pk, adapter_id, row)

    return store.write(txn)


def list_tags(store: Store, adapter_id: str) -> dict[str, int]:
    """Tag name -> revision number."""

    def q(conn: Connection) -> dict[str, int]:
        pk = store.adapter_pk(conn, adapter_id)
        return dict(
            conn.execute(
                sa.select(S.tags.c.name, S.revisions.c.number)
                .join(S.revisions, S.revisions.c.pk == S.tags.c.revision_pk)
                .where(S.tags.c.adapter_pk == pk)
                .order_by(S.tags.c.name)
            ).all()
        )

    return store.read(q)
