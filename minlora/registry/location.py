"""Where a registry's two halves live: the database URL and the blob store URL.

Blobs belong to one database: gc deletes every blob its own database does not reference,
so two databases sharing a blob store would delete each other's weights.  Hence the
default blob store is derived from the database, never a store shared by all of them:

- no URL: the root layout, <root>/registry.db and <root>/blobs (root: the `root` argument,
  else $MINLORA_HOME, else ~/.minlora);
- a URL and a root: the root's blobs/;
- a SQLite file alone: beside it, <dir>/blobs for a file named registry.db (the root
  layout, so both ways of naming one registry agree), <dir>/<name>.blobs for <name>.<ext>;
- any other database alone (PostgreSQL, in-memory SQLite): refused; give the blob URL.
"""

from __future__ import annotations

import os

import sqlalchemy as sa

from .db import database_name
from .errors import RegistryError

__all__ = ["default_root", "locate"]

ROOT_DATABASE = "registry.db"
ROOT_BLOBS = "blobs"


def default_root() -> str:
    """$MINLORA_HOME, else ~/.minlora."""
    return os.environ.get("MINLORA_HOME") or os.path.join(os.path.expanduser("~"), ".minlora")


def _beside(url: str) -> str:
    u = sa.engine.make_url(url)
    database = u.database or ""
    if u.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        raise RegistryError(
            f"a registry on {database_name(url)} needs a blob store URL (the `blobs` argument, "
            "--blobs or $MINLORA_BLOBS): a default one would be shared with other databases, "
            "and each one's gc would delete the others' weights"
        )
    path = os.path.abspath(database)
    directory, name = os.path.split(path)
    if name == ROOT_DATABASE:
        return os.path.join(directory, ROOT_BLOBS)
    return os.path.join(directory, os.path.splitext(name)[0] + ".blobs")


def locate(url: str | None, blobs: str | None, root: str | None) -> tuple[str, str]:
    """(database URL, blob store URL) from what the caller gave (see the module docstring)."""
    if url is None:
        base = os.path.abspath(root or default_root())
        return "sqlite:///" + os.path.join(base, ROOT_DATABASE), blobs or os.path.join(base, ROOT_BLOBS)
    if blobs is not None:
        return url, blobs
    if root is not None:
        return url, os.path.join(root, ROOT_BLOBS)
    return url, _beside(url)
