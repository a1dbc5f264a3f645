"""Reliability of the registry with real processes: kill -9 in the middle of commits, two
processes committing at once, corrupted and missing blobs.  Both backends (SQLite file,
real PostgreSQL server)."""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import time
import unicodedata
from collections import Counter
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from helpers import registry_worker
from helpers.registry import assert_same_adapter, execute_sql, make_adapter, run_workers, worker_context

from minlora.formats import native as content
from minlora.registry import (
    CorruptBlobError,
    DamagedDatabaseError,
    Gate,
    Registry,
    RegistryError,
    RevisionNotFoundError,
)

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
    got = dict(run_workers(procs, results, 200))
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


# ---------------------------------------------------------------------- damaged databases


def _cli(*argv: str) -> int:
    from minlora.cli import main

    return main(["adapters", *argv])


def _files(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def _replace_with_foreign_sqlite(path) -> None:
    import sqlite3

    os.remove(path)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", ["empty", "garbage", "foreign", "dropped-table"])
def test_damaged_database_is_refused_never_reinitialised(tmp_path, capsys, damage):
    """A registry database that was truncated to zero bytes, overwritten, swapped for another
    SQLite file or lost a table is reported (naming the file), never taken for a new
    registry: verify cannot say all good and gc deletes no blob."""
    db, blobs = tmp_path / "registry.db", tmp_path / "blobs"
    url = f"sqlite:///{db}"
    with Registry(url, str(blobs)) as reg:
        reg.commit("a", make_adapter(1))
        reg.commit("b", make_adapter(2))
    assert not os.path.exists(f"{db}-wal")  # closed cleanly: the file is the whole database
    old = time.time() - 7200
    for f in _files(blobs):
        os.utime(f, (old, old))
    before = _files(blobs)
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "garbage":
        with open(db, "r+b") as f:
            f.write(random.Random(0).randbytes(4096))
    elif damage == "foreign":
        _replace_with_foreign_sqlite(db)
    else:
        execute_sql(url, "DROP TABLE evaluations")
    damaged_bytes = db.read_bytes()
    with pytest.raises(DamagedDatabaseError, match=re.escape(str(db))) as info:
        Registry(url, str(blobs))
    assert info.value.database == str(db)
    capsys.readouterr()
    assert _cli("--url", url, "--blobs", str(blobs), "verify") != 0
    out, err = capsys.readouterr()
    assert "all good" not in out + err and str(db) in err
    assert _cli("--url", url, "--blobs", str(blobs), "gc", "--min-age", "0") != 0
    assert _files(blobs) == before  # gc deleted nothing
    assert db.read_bytes() == damaged_bytes  # and nothing re-initialised the file


def test_database_missing_registry_tables_is_refused(registry_location):
    """Both backends: a database whose schema version says "registry" but which lacks one of
    the registry's tables is damaged, not new."""
    url, blobs = registry_location
    with Registry(url, blobs) as reg:
        reg.commit("a", make_adapter(1))
    execute_sql(url, "DROP TABLE serving_events")
    with pytest.raises(DamagedDatabaseError, match="serving_events"):
        Registry(url, blobs)


def test_malformed_pages_are_reported_by_verify_and_stop_gc(tmp_path):
    """Damage inside the file (here: the revisions table's page overwritten) that opening
    does not touch: reads raise DamagedDatabaseError naming the file, verify reports it and
    finishes, gc refuses and deletes nothing."""
    db, blobs = tmp_path / "registry.db", tmp_path / "blobs"
    url = f"sqlite:///{db}"
    with Registry(url, str(blobs)) as reg:
        for i in range(3):
            reg.commit("a", make_adapter(i))
        orphan = make_adapter(9)
        reg.blobs.put(content.content_hash(orphan), content.serialize(orphan))
        with reg.engine.connect() as conn:
            page_size = conn.exec_driver_sql("PRAGMA page_size").scalar()
            root = conn.exec_driver_sql(
                "SELECT rootpage FROM sqlite_master WHERE name = 'revisions'"
            ).scalar()
    before = _files(blobs)
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * page_size)
    with Registry(url, str(blobs)) as reg:
        with pytest.raises(DamagedDatabaseError, match=re.escape(str(db))):
            reg.log("a")
        report = reg.verify()
        assert not report.ok
        assert report.failures and all(f["adapter_id"] is None for f in report.failures)
        assert all(str(db) in f["error"] for f in report.failures)
        with pytest.raises(DamagedDatabaseError, match="gc refused"):
            reg.gc(min_age_s=0)
    assert _files(blobs) == before


def test_several_processes_create_one_fresh_registry(tmp_path):
    """A new SQLite registry is created whole (schema built aside, then linked into place),
    also when several processes open it for the first time at once."""
    url, blobs = f"sqlite:///{tmp_path / 'fresh' / 'registry.db'}", str(tmp_path / "fresh" / "blobs")
    ctx = worker_context()
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(
            target=registry_worker.open_fresh_and_commit, args=(url, blobs, f"p{i}", barrier, results)
        )
        for i in range(n)
    ]
    got = dict(run_workers(procs, results, 120))
    assert got == {f"p{i}": 1 for i in range(n)}
    with Registry(url, blobs) as reg:
        assert reg.adapters() == sorted(got) and reg.verify().ok
    leftovers = [name for name in os.listdir(tmp_path / "fresh") if ".new-" in name]
    assert leftovers == []


# ---------------------------------------------------------------------- where blobs live


def test_blobs_default_beside_their_database_never_shared(tmp_path, monkeypatch):
    """Two registries given only their database URLs keep separate blob stores, so gc of one
    never deletes the other's weights; nothing lands in the shared default root."""
    home = tmp_path / "home"
    monkeypatch.setenv("MINLORA_HOME", str(home))
    one, two = Registry(f"sqlite:///{tmp_path / 'one.db'}"), Registry(f"sqlite:///{tmp_path / 'two.db'}")
    try:
        assert one.blobs.root != two.blobs.root
        assert one.blobs.root == str(tmp_path / "one.blobs")
        x, y = make_adapter(1), make_adapter(2)
        one.commit("x", x)
        two.commit("y", y)
        one.gc(min_age_s=0)
        two.gc(min_age_s=0)
        assert_same_adapter(two.load("y"), y)
        assert_same_adapter(one.load("x"), x)
    finally:
        one.close()
        two.close()
    assert not home.exists()
    # registry.db is the root layout: naming it by URL finds the same blobs as naming the root.
    with Registry(root=str(tmp_path / "root")) as by_root:
        by_root.commit("z", make_adapter(3))
    with Registry(f"sqlite:///{tmp_path / 'root' / 'registry.db'}") as by_url:
        assert by_url.blobs.root == str(tmp_path / "root" / "blobs")
        assert by_url.verify().ok


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://minlora:secret@127.0.0.1:1/registry", "sqlite://", "sqlite:///:memory:"]
)
def test_database_without_a_file_needs_a_blob_url(url):
    with pytest.raises(RegistryError, match="needs a blob store URL") as info:
        Registry(url)
    assert "secret" not in str(info.value)


# ---------------------------------------------------------------------- gc racing commit, lost blobs


@pytest.mark.parametrize("pause", ["commit-after-blob-write", "gc-before-delete"])
def test_gc_racing_a_commit_of_the_same_content_keeps_its_blob(registry_location, pause):
    """Two real processes: one commits content C, the other runs gc(min_age_s=0) while C has
    no revision row yet.  Each side is stopped at its worst moment (the committer after
    writing the blob, before its transaction; gc after deciding C is unreferenced, before
    deleting it) while the other runs.  The new revision must load afterwards."""
    url, blobs = registry_location
    with Registry(url, blobs) as reg:
        reg.commit("other", make_adapter(1))
        h = content.content_hash(registry_worker.race_weights(7))
        if pause == "gc-before-delete":
            # an orphan of C, as a commit that crashed after writing its blob leaves it
            reg.blobs.put(h, content.serialize(registry_worker.race_weights(7)))
    ctx = worker_context()
    paused, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    got: dict[str, list] = {}

    def collect(timeout: float) -> None:
        kind, *rest = results.get(timeout=timeout)
        got[kind] = rest

    if pause == "commit-after-blob-write":
        committer = ctx.Process(
            target=registry_worker.race_commit, args=(url, blobs, 7, "racer", paused, go, results)
        )
        committer.start()
        assert paused.wait(60), "the committer did not write its blob"
        collector = ctx.Process(target=registry_worker.race_gc, args=(url, blobs, None, None, results))
        collector.start()
        collect(120)
        assert any(h in p for p in got["gc"][0]), "gc did not take the unreferenced blob: no race"
        go.set()
    else:
        collector = ctx.Process(target=registry_worker.race_gc, args=(url, blobs, paused, go, results))
        collector.start()
        assert paused.wait(60), "gc did not reach its deletion"
        committer = ctx.Process(
            target=registry_worker.race_commit, args=(url, blobs, 7, "racer", None, None, results)
        )
        committer.start()
        try:
            # Let the commit finish, or block on gc's lock; either way it has had its chance.
            collect(5)
        except queue.Empty:
            pass
        go.set()
    while len(got) < 2:
        collect(120)
    for p in (committer, collector):
        p.join(60)
        assert p.exitcode == 0
    with Registry(url, blobs) as reg:
        rev = reg.show("racer", "head")
        assert rev.content_hash == h
        assert_same_adapter(reg.load("racer", rev.number), registry_worker.race_weights(7))
        assert reg.verify().ok


def test_recommitting_weights_whose_blob_was_lost_writes_it_again(reg):
    x = make_adapter(4)
    first = reg.commit("lost", x)
    os.remove(reg.blobs.path(first.content_hash))
    again = reg.commit("lost", x, message="again")
    assert again.content_hash == first.content_hash
    assert_same_adapter(reg.load("lost", again.number), x)
    assert_same_adapter(reg.load("lost", first.number), x)  # one blob serves both
    os.remove(reg.blobs.path(first.content_hash))
    assert reg.commit_many([("lost-bulk", x)]) == 1
    assert_same_adapter(reg.load("lost-bulk"), x)
    assert reg.verify().ok


# ---------------------------------------------------------------------- verify and gc


def test_verify_reports_every_bad_revision_and_finishes(reg, capsys, registry_location):
    """A directory where a blob should be, a missing blob, invalid content and a wrong hash:
    each revision is reported, the good one is not, and the CLI exits with its corruption
    code (4)."""
    revs = [reg.commit(f"v{i}", make_adapter(10 + i)) for i in range(5)]
    paths = [reg.blobs.path(r.content_hash) for r in revs]
    os.remove(paths[0])
    os.mkdir(paths[0])  # a directory where the blob should be
    os.remove(paths[1])  # missing
    with open(paths[2], "wb") as f:
        f.write(b"not a safetensors file at all")  # invalid content
    data = bytearray(open(paths[3], "rb").read())
    data[-1] ^= 0x01  # wrong hash
    with open(paths[3], "wb") as f:
        f.write(data)
    with pytest.raises(CorruptBlobError, match=r"'v0' revision 1 .*unreadable"):
        reg.load("v0")
    report = reg.verify()
    assert report.revisions_checked == 5 and not report.ok
    assert [(f["adapter_id"], f["revision"]) for f in report.failures] == [(f"v{i}", 1) for i in range(4)]
    for word, failure in zip(["unreadable", "missing", "unreadable", "corrupted"], report.failures):
        assert word in failure["error"], failure
    url, blobs = registry_location
    capsys.readouterr()
    assert _cli("--url", url, "--blobs", blobs, "verify") == 4
    out, _ = capsys.readouterr()
    assert all(f"'v{i}' revision 1" in out for i in range(4)) and "'v4'" not in out


def test_gc_deletes_only_the_files_it_writes(reg):
    """Files under the blob root that the store did not name (other tools' files, look-alike
    names in the wrong place) are never deleted, however old and unreferenced."""
    kept = reg.commit("k", make_adapter(1))
    orphan = make_adapter(2)
    h = content.content_hash(orphan)
    reg.blobs.put(h, content.serialize(orphan))
    ours = [reg.blobs.path(h), reg.blobs.path(h) + ".tmp-0123abcd"]
    with open(ours[1], "wb") as f:
        f.write(b"partial")
    root = reg.blobs.root
    other = "cd" + h[2:] if not h.startswith("cd") else "ab" + h[2:]
    foreign = [
        f"{root}/README.md",
        f"{root}/notes.safetensors",
        f"{root}/{h}.safetensors",  # a blob's name, but not where the store puts it
        f"{root}/{h[:2]}/mine.safetensors",
        f"{root}/{h[:2]}/{other}.safetensors",  # a hash under another hash's directory
        f"{root}/{h[:2]}/{h.upper()}.safetensors",
        f"{root}/{h[:2]}/{h}.safetensors.bak",
        f"{root}/{h[:2]}/{h}.safetensors.tmp-notes",
        f"{root}/x.tmp-1234",
        f"{root}/deep/{h[:2]}/{h}.safetensors",
    ]
    old = time.time() - 7200
    for path in foreign:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"someone else's file")
    for path in [*foreign, *ours, reg.blobs.path(kept.content_hash)]:
        os.utime(path, (old, old))
    report = reg.gc(min_age_s=0)
    assert sorted(report.deleted) == sorted(ours)
    assert all(os.path.exists(p) for p in foreign)
    assert reg.verify().ok


# ---------------------------------------------------------------------- references and constraints


def test_tag_lookup_is_nfc_and_digits_of_other_scripts_are_tags(reg):
    for i in range(1, 4):
        reg.commit("n", make_adapter(i))
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    reg.tag("n", decomposed, 2)
    assert reg.show("n", decomposed).number == 2 and reg.show("n", composed).number == 2
    reg.tag("n", "٣", 1)  # ARABIC-INDIC DIGIT THREE: a tag, not revision 3
    reg.tag("n", "²", 2)
    reg.tag("n", "３", 1)  # FULLWIDTH DIGIT THREE
    assert reg.show("n", "٣").number == 1
    assert reg.show("n", "²").number == 2
    assert reg.show("n", "３").number == 1
    assert reg.show("n", "3").number == 3 and reg.show("n", 3).number == 3
    assert reg.tags("n") == {composed: 2, "²": 2, "٣": 1, "３": 1}
    for huge in (10**30, 2**63, 2**31, -(10**30), 10**5000, "9" * 40, "2147483648", "9" * 5000):
        with pytest.raises(RevisionNotFoundError, match="no revision"):
            reg.show("n", huge)
    with pytest.raises(RevisionNotFoundError):
        reg.load("n", 10**30)
    with pytest.raises(RevisionNotFoundError):
        reg.commit("n", make_adapter(9), parent=10**30)
    assert len(reg.log("n")) == 3


def _count_transactions(engine) -> list[int]:
    attempts = [0]

    def on_begin(_conn) -> None:
        attempts[0] += 1

    sa.event.listen(engine, "begin", on_begin)
    return attempts


def test_deterministic_constraint_failures_are_not_retried(reg, backend):
    """A NOT NULL or foreign-key failure is the same on every attempt: one attempt, then the
    error.  Only a unique violation on PostgreSQL (two writers racing) is worth a retry."""
    from minlora.registry import schema as S
    from minlora.registry.db import is_transient, run_transaction

    reg.commit("c", make_adapter(1))
    attempts = _count_transactions(reg.engine)

    def insert(values):
        return lambda conn: conn.execute(S.adapters.insert().values(**values))

    for bad in (
        insert({"adapter_id": None, "created_at": datetime.now(UTC)}),
        lambda conn: conn.execute(
            S.tags.insert().values(
                adapter_pk=1, name="t", revision_pk=999999, author="x", created_at=datetime.now(UTC)
            )
        ),
    ):
        attempts[0] = 0
        with pytest.raises(sa.exc.IntegrityError) as info:
            run_transaction(reg.engine, bad)
        assert attempts[0] == 1 and not is_transient(info.value)
    with pytest.raises(sa.exc.IntegrityError) as info:
        run_transaction(reg.engine, insert({"adapter_id": "c", "created_at": datetime.now(UTC)}))
    assert is_transient(info.value) == (backend == "postgres")
    # the API refuses a gate without a suite or metric before any transaction starts
    for gate in (
        Gate(None, "accuracy"),
        Gate("", "accuracy"),
        Gate("qa", None),
        Gate("qa", "acc", tolerance=None),
    ):
        attempts[0] = 0
        with pytest.raises(ValueError, match="gate"):
            reg.set_gate("c", gate)
        assert attempts[0] == 0
    assert reg.gates("c") == []
