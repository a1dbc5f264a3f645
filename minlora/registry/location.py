"""Where a registry's two halves live: the database URL and the blob store URL."""

from __future__ import annotations

import os

__all__ = ["default_root", "locate"]


def default_root() -> str:
    """$MINLORA_HOME, else ~/.minlora."""
    return os.environ.get("MINLORA_HOME") or os.path.join(os.path.expanduser("~"), ".minlora")


def locate(url: str | None, blobs: str | None, root: str | None) -> tuple[str, str]:
    """(database URL, blob store URL) from what the caller gave: a root directory holds
    registry.db and blobs/ (the default root when neither URL is given)."""
    if url is None or blobs is None:
        root = root or default_root()
    if url is None:
        url = "sqlite:///" + os.path.join(os.path.abspath(root), "registry.db")  # type: ignore[arg-type]
    if blobs is None:
        blobs = os.path.join(root, "blobs")  # type: ignore[arg-type]
    return url, blobs
