"""Optimizer-state blobs of registry revisions (the checkpoints of minlora.train): stored
content-addressed beside the weights, read back verified, checked by verify, kept by gc, and
added to existing databases by migration 0002; on SQLite and PostgreSQL."""
from __future__ import annotations

import os
import time

import pytest
import sqlalchemy as sa
import torch
from alembic import command
from helpers.registry import execute_sql, make_adapter

from minlora.formats import AdapterState, deserialize_state, serialize_state, state_hash
from minlora.registry import CorruptBlobError, Registry, migrate
from minlora.registry import schema as S

pytestmark = pytest.mark.timeout(120)


def make_state(seed: int, adapter, step: int = 3) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    mods = {
        n: {k: (torch.randn(w.a.shape, generator=g), torch.randn(w.b.shape, generator=g))
            for k in ("exp_avg", "exp_avg_sq")}
        for n, w in adapter.modules.items()
    }
    return AdapterState(mods, {"steps": step, "betas": [0.9, 0.999]})


def assert_same_state(x: AdapterState, y: AdapterState) -> None:
    assert x.meta == y.meta and sorted(x.modules) == sorted(y.modules)
    for n in x.modules:
        assert sorted(x.modules[n]) == sorted(y.modules[n])
        for k, (a, b) in x.modules[n].items():
            assert torch.equal(a, y.modules[n][k][0]) and torch.equal(b, y.modules[n][k][1]), (n, k)


def test_state_file_format_round_trip_and_hash():
    ad = make_adapter(1)
    st = make_state(1, ad)
    back = deserialize_state(serialize_state(st))
    assert_same_state(back, st)
    assert state_hash(back) == state_hash(st)
    other = make_state(1, ad, step=4)
    assert state_hash(other) != state_hash(st)  # the step count is part of the content
    with pytest.raises(ValueError, match="not a minlora-state-v1"):
        deserialize_state(serialize_state(st).replace(b"minlora-state-v1", b"minlora-state-v9"))
    with pytest.raises(ValueError):
        deserialize_state(b"garbage")


def test_commit_with_state_loads_bit_exact(reg):
    ad = make_adapter(2)
    st = make_state(2, ad)
    rev = reg.commit("alice", ad, optimizer_state=st)
    assert rev.state_hash == state_hash(st)
    assert reg.show("alice").state_hash == rev.state_hash
    assert reg.log("alice")[0].state_hash == rev.state_hash
    assert_same_state(reg.load_optimizer_state("alice"), st)
    plain = reg.commit("alice", make_adapter(3))
    assert plain.state_hash is None and reg.load_optimizer_state("alice") is None
    assert_same_state(reg.load_optimizer_state("alice", rev.number), st)
    assert reg.count()["blobs"] == 3  # weights x2 + one state blob
    assert reg.verify().ok and reg.verify().blobs_checked == 3
    with pytest.raises(TypeError, match="optimizer_state"):
        reg.commit("alice", ad, optimizer_state={"exp_avg": 1})
    bad = AdapterState({"m": {"exp_avg": (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 2))}})
    with pytest.raises(ValueError, match="float32"):
        reg.commit("alice", ad, optimizer_state=bad)
    assert len(reg.log("alice")) == 2  # the refused commits left nothing


def test_corrupt_or_missing_state_blob_is_reported(reg):
    ad = make_adapter(4)
    st = make_state(4, ad)
    rev = reg.commit("bob", ad, optimizer_state=st)
    path = reg.blobs.path(rev.state_hash)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # flip bits of a tensor: still parses, hashes differently
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CorruptBlobError, match="optimizer state.*corrupted"):
        reg.load_optimizer_state("bob")
    report = reg.verify()
    assert not report.ok and len(report.failures) == 1
    fail = report.failures[0]
    assert fail["revision"] == rev.number and fail["content_hash"] == rev.state_hash
    assert "optimizer state" in fail["error"]
    reg.load("bob")  # the weights are fine
    os.remove(path)
    with pytest.raises(CorruptBlobError, match="missing"):
        reg.load_optimizer_state("bob")
    assert "missing" in reg.verify().failures[0]["error"]
    # Committing the same state again writes its lost blob back.
    reg.commit("bob", ad, optimizer_state=st)
    assert reg.verify().ok


def test_gc_keeps_state_blobs_and_removes_orphaned_ones(reg):
    ad = make_adapter(5)
    st = make_state(5, ad)
    rev = reg.commit("carol", ad, optimizer_state=st)
    orphan = make_state(6, ad)
    oh = state_hash(orphan)
    reg.blobs.put(oh, serialize_state(orphan))  # as if a commit died after writing its blobs
    old = time.time() - 7200
    for h in (rev.content_hash, rev.state_hash, oh):
        os.utime(reg.blobs.path(h), (old, old))
    report = reg.gc()
    assert report.deleted == [reg.blobs.path(oh)]
    assert os.path.exists(reg.blobs.path(rev.state_hash))
    assert_same_state(reg.load_optimizer_state("carol"), st)
    assert reg.verify().ok


def test_migration_0002_adds_states_to_an_existing_registry(registry_location):
    """A database made by the first schema version (before optimizer states) is upgraded at
    open; its revisions keep everything and have no state."""
    url, blobs = registry_location
    engine = sa.create_engine(url)
    cfg = migrate._config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        # What dbcheck requires of a database before migrating it: what version 0001 made.
        assert set(sa.inspect(conn).get_table_names()) == set(S.INITIAL_TABLES) | {"alembic_version"}
    engine.dispose()
    # A revision written with the old schema (its blob is the adapter file of the weights).
    from minlora.formats import content_hash, serialize

    ad = make_adapter(7)
    h = content_hash(ad)
    os.makedirs(os.path.join(blobs, h[:2]), exist_ok=True)
    with open(os.path.join(blobs, h[:2], h + ".safetensors"), "wb") as f:
        f.write(serialize(ad))
    now = "2026-01-01 00:00:00"
    execute_sql(
        url,
        f"INSERT INTO adapters (adapter_id, created_at) VALUES ('old', '{now}')",
        f"INSERT INTO blobs (content_hash, size, created_at) VALUES ('{h}', 1, '{now}')",
        "INSERT INTO revisions (adapter_pk, number, content_hash, message, author, created_at, "
        f"minlora_version, torch_version) VALUES (1, 1, '{h}', 'm', 'me', '{now}', '0', '0')",
    )
    with Registry(url, blobs) as r:
        with r.engine.connect() as conn:
            assert migrate.current_revision(r.engine) == "0002"
            assert "revision_states" in sa.inspect(conn).get_table_names()
        info = r.show("old")
        assert info.state_hash is None and r.load_optimizer_state("old") is None
        rev = r.commit("old", ad, optimizer_state=make_state(7, ad))
        assert rev.parent == 1 and rev.state_hash is not None
        assert r.verify().ok


def test_rank1_factors_with_transposed_strides_hash_and_commit(reg):
    """A rank-1 B read back from pages (B^T rows, transposed) is [out, 1] with strides (1, out):
    "contiguous" to torch, yet its bytes need copying before they can be hashed."""
    from minlora.formats import Adapter, LoraWeights, content_hash, deserialize, serialize

    b = torch.randn(1, 16).t()
    assert b.is_contiguous() and b.stride() == (1, 16)
    ad = Adapter({"m": LoraWeights(torch.randn(1, 8), b, 0.5)})
    plain = Adapter({"m": LoraWeights(ad.modules["m"].a, b.clone(memory_format=torch.contiguous_format), 0.5)})
    assert content_hash(ad) == content_hash(plain)
    assert torch.equal(deserialize(serialize(ad)).modules["m"].b, b)
    st = AdapterState({"m": {"exp_avg": (torch.randn(1, 8), b)}})
    assert state_hash(st) == state_hash(AdapterState({"m": {"exp_avg": (st.modules["m"]["exp_avg"][0], b.contiguous().clone(memory_format=torch.contiguous_format))}}))
    rev = reg.commit("r1", ad, optimizer_state=st)
    assert rev.content_hash == content_hash(plain)
