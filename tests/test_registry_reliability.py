"""Reliability of the registry with real processes: kill -9 in the middle of commits, two
processes committing at once, corrupted and missing blobs.  Both backends (SQLite file,
real PostgreSQL server)."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter

import pytest
import registry_worker
import sqlalchemy as sa
from registry_fixtures import (  # noqa: F401  (fixtures)
    backend,
    make_adapter,
    postgres_server,
    reg,
    registry_location,
    worker_context,
)

from minlora.registry import CorruptBlobError, Registry

pytestmark = pytest.mark.timeout(240)


def _check_consistent(reg: Registry) -> int:
    """Every listed revision loads and verifies, numbers are 1..n with parent n-1, and every
    bulk batch is complete.  Returns the number of revisions."""
    report = reg.verify()
    assert report.ok, report.failures
    batches: Counter = Counter()
    sizes: dict[str, int] = {}
    n = 0
    for aid in reg.adapters():
        log = reg.log(aid)
        numbers = [r.number for r in reversed(log)]
        assert numbers == list(range(1, len(log) + 1)), (aid, numbers)
        for r in log:
            assert r.parent == (r.number - 1 if r.number > 1 else None), (aid, r.number, r.parent)
            m = re.fullmatch(r"batch (\S+) of (\d+)", r.message)
            if m:
                batches[m[1]] += 1
                sizes[m[1]] = int(m[2])
        n += len(log)
    # One batch's items may land on the same adapter more than once; count revisions per batch.
    for name, count in batches.items():
        assert count == sizes[name], (
            f"batch {name}: {count} of {sizes[name]} revisions present (half a batch)"
        )
    return n


def test_kill9_mid_commit_leaves_no_half_revision(registry_location):
    url, blobs = registry_location
    Registry(url, blobs).close()  # create the schema once, up front
    ctx = worker_context()
    committed = ctx.Value("q", 0)
    rng = random.Random(1234)
    rounds = 6
    for i in range(rounds):
        ready = ctx.Event()
        p = ctx.Process(target=registry_worker.crash_loop, args=(url, blobs, i, ready, committed))
        p.start()
        assert ready.wait(60), "worker did not start"
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
    with Registry(url, blobs) as reg:
        n = _check_consistent(reg)
        acknowledged = committed.value
        assert acknowledged > rounds, "the workers hardly committed anything; the test proves nothing"
        # Every commit whose call returned is durable (a kill can only lose one in flight).
        assert n >= acknowledged
        assert n <= acknowledged + rounds * 11
        if url.startswith("sqlite"):
            with reg.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        # Orphans of killed commits (blobs without rows, temporary files) are gc's to remove,
        # and removing them takes nothing that a revision needs.
        gc = reg.gc(min_age_s=0)
        assert all(".tmp-" in p or p.endswith(".safetensors") for p in gc.deleted)
        assert reg.verify().ok
        for aid in reg.adapters():
            reg.load(aid, "head")


@pytest.mark.parametrize("moment", ["blob", "row"])
def test_kill9_at_the_worst_moment(registry_location, moment):
    """Deterministic variant: kill -9 exactly between writing the blob and publishing it, and
    exactly between inserting the rows and committing them.  Nothing of that commit may be
    visible, the database lock must be released, and the next commit must just work."""
    url, blobs = registry_location
    with Registry(url, blobs) as reg:
        first = reg.commit("stall", make_adapter(1), message="committed")
    ctx = worker_context()
    ready = ctx.Event()
    p = ctx.Process(target=registry_worker.stall_commit, args=(url, blobs, moment, ready))
    p.start()
    assert ready.wait(60), "worker did not reach the point to be killed at"
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    with Registry(url, blobs) as reg:
        assert [(r.number, r.content_hash) for r in reg.log("stall")] == [(1, first.content_hash)]
        assert reg.count() == {"adapters": 1, "revisions": 1, "blobs": 1}
        leftovers = [f for f in reg.blobs.walk() if f.content_hash != first.content_hash]
        if moment == "blob":
            assert len(leftovers) == 1 and leftovers[0].content_hash is None  # the temporary file
        else:
            assert len(leftovers) == 1 and leftovers[0].content_hash is not None  # an orphan blob
        t0 = time.time()
        second = reg.commit("stall", make_adapter(2), message="after the crash")
        assert second.number == 2 and second.parent == 1
        assert time.time() - t0 < 10  # no stale lock to wait out
        assert len(reg.gc(min_age_s=0).deleted) == 1
        assert reg.verify().ok


def test_two_processes_commit_at_once_lose_nothing(registry_location):
    url, blobs = registry_location
    with Registry(url, blobs) as reg:
        reg.commit("shared", make_adapter(0), message="root")
    ctx = worker_context()
    n = 25
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=registry_worker.concurrent_committer, args=(url, blobs, f"p{i}", n, barrier, results)
        )
        for i in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=200) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    with Registry(url, blobs) as reg:
        total = _check_consistent(reg)
        shared = reg.log("shared")
        assert len(shared) == 1 + 2 * n
        claimed = []
        for name, out in got.items():
            commits = [x for x in out if x[0] != "bulk"]
            bulk = [x for x in out if x[0] == "bulk"]
            assert len(commits) == 2 * n and bulk[0][1] == 30
            own = reg.log(f"own-{name}")
            assert [r.number for r in reversed(own)] == list(range(1, n + 1))
            for aid, number, h, parent in commits:
                assert reg.show(aid, number).content_hash == h
                assert parent == (number - 1 if number > 1 else None)
                if aid == "shared":
                    claimed.append(number)
            assert sum(len(reg.log(f"bulk-{name}-{j}")) for j in range(7)) == 30
        # Each process got distinct revision numbers: nothing overwritten, nothing lost.
        assert sorted(claimed) == list(range(2, 2 + 2 * n))
        assert total == (1 + 2 * n) + 2 * n + 60
        assert len(reg.tags("shared")) == 2 * len(range(0, n, 5))


def _blob_path(reg: Registry, h: str) -> str:
    return reg.blobs.path(h)


def test_corrupted_blob_names_the_revision(reg):
    good = reg.commit("victim", make_adapter(1), message="good")
    bad = reg.commit("victim", make_adapter(2), message="will rot")
    path = _blob_path(reg, bad.content_hash)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40  # one flipped bit in the last tensor's data
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CorruptBlobError, match=r"'victim' revision 2 .*corrupted") as info:
        reg.load("victim", 2)
    assert (
        info.value.revision == 2
        and info.value.adapter_id == "victim"
        and info.value.content_hash == bad.content_hash
    )
    reg.load("victim", good.number)  # the other revision is untouched
    report = reg.verify()
    assert not report.ok
    assert [(f["adapter_id"], f["revision"]) for f in report.failures] == [("victim", 2)]
    # diff and export refuse to use corrupted weights too
    with pytest.raises(CorruptBlobError, match="revision 2"):
        reg.diff("victim", 1, 2)


def test_truncated_and_missing_blobs(reg):
    a = reg.commit("t", make_adapter(1))
    b = reg.commit("t", make_adapter(2))
    # A second adapter sharing the first blob: both revisions are reported.
    reg.commit("t2", make_adapter(1))
    with open(_blob_path(reg, a.content_hash), "r+b") as f:
        f.truncate(40)
    with pytest.raises(CorruptBlobError, match=r"'t' revision 1 .*unreadable"):
        reg.load("t", 1)
    os.remove(_blob_path(reg, b.content_hash))
    with pytest.raises(CorruptBlobError, match=r"'t' revision 2 .*missing"):
        reg.load("t", "head")
    report = reg.verify()
    failed = sorted((f["adapter_id"], f["revision"]) for f in report.failures)
    assert failed == [("t", 1), ("t", 2), ("t2", 1)]
    assert all(
        f"revision {f['revision']}" in f["error"] and repr(f["adapter_id"]) in f["error"]
        for f in report.failures
    )


def test_blob_write_is_atomic_no_partial_file_visible(reg, monkeypatch):
    """A write that dies half-way (here: the disk fills up) leaves no file under the final
    name and no revision row."""
    calls = {"n": 0}
    real_write = os.write

    def failing_write(fd, data):
        calls["n"] += 1
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        reg.commit("atomic", make_adapter(7))
    monkeypatch.undo()
    assert calls["n"] == 1
    assert not reg.exists("atomic")
    files = [f for f in reg.blobs.walk()]
    assert files == []  # the temporary file was removed too
    rev = reg.commit("atomic", make_adapter(7))
    assert reg.verify().ok and rev.number == 1


def test_sqlite_uses_wal(tmp_path):
    with Registry(f"sqlite:///{tmp_path / 'r.db'}", str(tmp_path / "b")) as reg:
        with reg.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # A reader can read while another connection holds the write lock.
        reg.commit("w", make_adapter(1))
        writer = reg.engine.connect()
        writer.info["write"] = True
        tx = writer.begin()
        writer.execute(sa.text("UPDATE adapters SET created_at = created_at"))
        try:
            assert [r.number for r in reg.log("w")] == [1]
        finally:
            tx.rollback()
            writer.info["write"] = False
            writer.close()
