"""Maintenance of a registry's stored weights: `verify` re-hashes every revision's blob (and
its optimizer-state blob), `gc` deletes blob files no revision references (orphans of crashed
commits; a state blob is referenced through its `blobs` row like the weights')."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from .adapter_io import load_verified, load_verified_state
from .blobs import BlobFile, BlobStore
from .errors import CorruptBlobError, DamagedDatabaseError
from .store import Store
from .types import GcReport, VerifyReport

__all__ = ["gc", "verify"]

_GC_CHUNK = 100  # files deleted per locking transaction
_STATE = "optimizer state "  # how messages name a revision's optimizer-state blob


def _reword(message: str, adapter_id: str, number: int, h: str, what: str = "") -> str:
    # The first revision found with a bad blob names itself; restate for the others sharing it.
    prefix = f"adapter {adapter_id!r} revision {number} ({what}content {h[:12]}): "
    return prefix + message.split("): ", 1)[-1]


def _database_failure(store: Store, why: str) -> dict[str, Any]:
    return {
        "adapter_id": None,
        "revision": None,
        "content_hash": None,
        "error": f"database {store.name()}: {why}",
    }


def _check_blob(blobs: BlobStore, aid: str, number: int, h: str, what: str = "") -> str | None:
    """Why revision `number`'s blob (what="optimizer state ": its state blob) fails, or None
    when it loads and hashes right."""
    try:
        (load_verified_state if what else load_verified)(blobs, aid, number, h)
    except CorruptBlobError as exc:
        return str(exc)
    except Exception as exc:  # the store itself failed (permissions, network): not verified either
        where = f"adapter {aid!r} revision {number} ({what}content {h[:12]})"
        return f"{where}: blob could not be read ({type(exc).__name__}: {exc})"
    return None


def verify(store: Store, blobs: BlobStore, adapter_id: str | None, *, progress: bool) -> VerifyReport:
    """Check the database's structure, then load and re-hash the blob of every revision (of
    one adapter, or all).  Each distinct blob is read once; a failure is reported for every
    revision that uses it, and every failure is reported: one bad blob never ends the run."""
    failures: list[dict[str, Any]] = [_database_failure(store, why) for why in store.problems()]
    bad: dict[str, str] = {}
    good: set[str] = set()
    n = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="verify", unit="rev")
    try:
        for aid, number, h, state_h in store.iter_revisions(adapter_id):
            n += 1
            if bar is not None:
                bar.update(1)
            checks = [(h, "")] + ([(state_h, _STATE)] if state_h is not None else [])
            for bh, what in checks:
                if bh not in good and bh not in bad:
                    why = _check_blob(blobs, aid, number, bh, what)
                    if why is None:
                        good.add(bh)
                    else:
                        bad[bh] = why
                if bh in bad:
                    error = _reword(bad[bh], aid, number, bh, what)
                    failures.append({"adapter_id": aid, "revision": number, "content_hash": bh, "error": error})
    except DamagedDatabaseError as exc:
        failures.append(_database_failure(store, f"reading the revisions failed after {n}: {exc}"))
    finally:
        if bar is not None:
            bar.close()
    return VerifyReport(revisions_checked=n, blobs_checked=len(good) + len(bad), failures=failures)


def gc(store: Store, blobs: BlobStore, *, min_age_s: float, dry_run: bool) -> GcReport:
    """Delete the store's blob files that no revision references, and its leftover
    temporary files, if older than `min_age_s` (a younger one may belong to a commit in
    flight, whose row is not yet visible).  Files of other names are never touched.

    Each deletion happens under the content hash's lock (see commit.py) after checking,
    there, that the hash is still unreferenced and the file still old: a commit of the same
    content either became visible first (the blob is kept) or waits and rewrites the blob.
    A damaged database deletes nothing (DamagedDatabaseError)."""
    problems = store.problems()
    if problems:
        raise DamagedDatabaseError(
            f"gc refused: the registry database {store.name()} is damaged ({'; '.join(problems[:3])})",
            database=store.name(),
        )
    files = list(blobs.walk())
    # Read the referenced set *after* listing: a blob committed in between is then known.
    known = store.blob_hashes()
    candidates = [f for f in files if f.content_hash is None or f.content_hash not in known]
    deleted: dict[str, int] = {}  # path -> size, kept across retried transactions
    young = 0
    for start in range(0, len(candidates), _GC_CHUNK):
        chunk = candidates[start : start + _GC_CHUNK]

        def txn(conn: Connection, chunk: list[BlobFile] = chunk) -> int:
            return _delete_unreferenced(store, blobs, conn, chunk, min_age_s, dry_run, deleted)

        young += store.write(txn)
    return GcReport(
        deleted=list(deleted), bytes_freed=sum(deleted.values()), kept_young=young, dry_run=dry_run
    )


def _delete_unreferenced(
    store: Store,
    blobs: BlobStore,
    conn: Connection,
    files: list[BlobFile],
    min_age_s: float,
    dry_run: bool,
    deleted: dict[str, int],
) -> int:
    """Delete (or, dry, count) the files still unreferenced and old; returns how many were
    kept for being young."""
    hashes = sorted({f.content_hash for f in files if f.content_hash is not None})
    store.lock_blobs(conn, hashes)
    referenced = store.referenced(conn, hashes) if hashes else set()
    now = blobs.now()
    young = 0
    for f in files:
        if f.path in deleted or (f.content_hash is not None and f.content_hash in referenced):
            continue
        mtime = blobs.mtime(f.path)
        if mtime is None:
            continue  # already gone
        if now - mtime < min_age_s:
            young += 1
            continue
        if not dry_run:
            try:
                blobs.delete(f.path)
            except FileNotFoundError:
                continue
        deleted[f.path] = f.size
    return young
