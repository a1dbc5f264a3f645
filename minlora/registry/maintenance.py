"""Maintenance of a registry's stored weights: `verify` re-hashes every revision's blob,
`gc` deletes blob files no revision references (orphans of crashed commits)."""

from __future__ import annotations

from typing import Any

from .adapter_io import load_verified
from .blobs import BlobStore
from .errors import CorruptBlobError
from .store import Store
from .types import GcReport, VerifyReport

__all__ = ["gc", "verify"]


def _reword(message: str, adapter_id: str, number: int, h: str) -> str:
    # The first revision found with a bad blob names itself; restate for the others sharing it.
    prefix = f"adapter {adapter_id!r} revision {number} (content {h[:12]}): "
    return prefix + message.split("): ", 1)[-1]


def verify(store: Store, blobs: BlobStore, adapter_id: str | None, *, progress: bool) -> VerifyReport:
    """Load and re-hash the blob of every revision (of one adapter, or all).  Each distinct
    blob is read once; a failure is reported for every revision that uses it."""
    bad: dict[str, str] = {}
    good: set[str] = set()
    failures: list[dict[str, Any]] = []
    n = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="verify", unit="rev")
    for aid, number, h in store.iter_revisions(adapter_id):
        n += 1
        if bar is not None:
            bar.update(1)
        if h not in good and h not in bad:
            try:
                load_verified(blobs, aid, number, h)
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
    if bar is not None:
        bar.close()
    return VerifyReport(revisions_checked=n, blobs_checked=len(good) + len(bad), failures=failures)


def gc(store: Store, blobs: BlobStore, *, min_age_s: float, dry_run: bool) -> GcReport:
    """Delete blob files that no revision references and leftover temporary files, if older
    than `min_age_s` (a younger one may belong to a commit in flight, whose row is not yet
    visible)."""
    files = list(blobs.walk())
    # Read the referenced set *after* listing: a blob committed in between is then known.
    known = store.blob_hashes()
    now = blobs.now()
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
                blobs.delete(f.path)
            except FileNotFoundError:
                continue
        deleted.append(f.path)
        freed += f.size
    return GcReport(deleted=deleted, bytes_freed=freed, kept_young=young, dry_run=dry_run)
