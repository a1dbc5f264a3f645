"""The registry's API on both backends (SQLite file; real PostgreSQL server): identity,
revisions, provenance, tags, evaluations and gates, serving, residency, PEFT, gc."""

from __future__ import annotations

import json
import os
import time
import unicodedata

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers.registry import assert_same_adapter, execute_sql, make_adapter

from minlora.formats import Adapter, LoraWeights
from minlora.formats import native as content
from minlora.registry import (
    AdapterNotFoundError,
    Gate,
    InvalidIdError,
    PromotionRefusedError,
    Registry,
    RegistryError,
    RevisionNotFoundError,
    TagExistsError,
    fingerprint_base_model,
    migrate,
    normalize_adapter_id,
)
from minlora.registry import schema as S

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------- schema


def test_migrations_create_exactly_the_schema(reg):
    with reg.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == migrate.head_revision()
        diff = compare_metadata(MigrationContext.configure(conn), S.metadata)
    assert diff == []


def test_reopen_runs_no_migration_and_keeps_data(registry_location):
    url, blobs = registry_location
    with Registry(url, blobs) as r:
        r.commit("a", make_adapter(1))
    with Registry(url, blobs) as r:
        assert [x.number for x in r.log("a")] == [1]


def test_newer_schema_is_refused(registry_location):
    url, blobs = registry_location
    Registry(url, blobs).close()
    execute_sql(url, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(RegistryError, match="9999.*upgrade minlora"):
        Registry(url, blobs)


# ---------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "a/b",
        "a\\b",
        "nul\x00",
        "line\nbreak",
        "tab\there",
        "del\x7f",
        "zero\u200bwidth",
        "x" * 129,
        ".",
        "..",
        " lead",
        "trail ",
        42,
        None,
    ],
)
def test_invalid_adapter_ids_are_refused(reg, bad):
    with pytest.raises(InvalidIdError):
        reg.commit(bad, make_adapter(1))
    assert reg.adapters() == []


def test_ids_are_nfc_normalised_and_unicode_is_fine(reg):
    decomposed = unicodedata.normalize("NFD", "josé-ü")
    composed = unicodedata.normalize("NFC", "josé-ü")
    assert decomposed != composed
    reg.commit(decomposed, make_adapter(1))
    reg.commit(composed, make_adapter(2))
    assert reg.adapters() == [composed]
    assert [r.number for r in reg.log(decomposed)] == [2, 1]
    assert normalize_adapter_id("x" * 128) == "x" * 128
    reg.commit("user@example.com:agent 7", make_adapter(3))
    assert reg.exists("user@example.com:agent 7")


def test_content_hash_is_canonical_and_deduplicates(reg):
    x = make_adapter(1)
    y = Adapter(
        modules=dict(reversed(list(x.modules.items()))), config=dict(reversed(list(x.config.items())))
    )
    assert content.content_hash(x) == content.content_hash(y)  # order of modules / keys is irrelevant
    r1 = reg.commit("u1", x)
    r2 = reg.commit("u2", y)
    assert r1.content_hash == r2.content_hash
    assert reg.count() == {"adapters": 2, "revisions": 2, "blobs": 1}
    assert len(list(reg.blobs.walk())) == 1  # stored once
    # Anything that changes the result changes the hash: weights, scale, dtype, config.
    base = content.content_hash(x)
    w = x.modules["layers.0.q_proj"]
    variants = [
        Adapter({**x.modules, "layers.0.q_proj": LoraWeights(w.a.clone(), w.b.clone(), 0.25)}, x.config),
        Adapter({k: LoraWeights(v.a.half(), v.b.half(), v.scale) for k, v in x.modules.items()}, x.config),
        Adapter(x.modules, {**x.config, "note": 1}),
    ]
    bumped = w.a.clone()
    bumped[0, 0] = torch.nextafter(bumped[0, 0], torch.tensor(10.0))
    variants.append(Adapter({**x.modules, "layers.0.q_proj": LoraWeights(bumped, w.b, w.scale)}, x.config))
    hashes = {content.content_hash(v) for v in variants}
    assert len(hashes) == len(variants) and base not in hashes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_commit_load_roundtrip_is_bit_exact(reg, dtype):
    x = make_adapter(3, dtype=dtype, rank=1, modules=("only",))
    rev = reg.commit("rt", x, message="rank 1")
    assert rev.number == 1 and rev.parent is None and rev.message == "rank 1"
    assert_same_adapter(reg.load("rt"), x)
    assert rev.content_hash == content.content_hash(x)


def test_bad_weights_and_configs_are_refused(reg):
    with pytest.raises(TypeError):
        reg.commit("a", {"m": "not weights"})
    with pytest.raises(TypeError):
        reg.commit("a", [1, 2, 3])
    with pytest.raises(ValueError, match="at least one module"):
        reg.commit("a", Adapter(modules={}))
    with pytest.raises(ValueError, match="JSON"):
        reg.commit("a", make_adapter(1), config={"bad": float("nan")})
    with pytest.raises(ValueError, match="not finite"):
        reg.commit("a", Adapter({"m": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), float("inf"))}))
    with pytest.raises(ValueError, match="fingerprint"):
        reg.commit("a", make_adapter(1), provenance={"base_model": "llama"})
    assert reg.adapters() == []


# ---------------------------------------------------------------------- revisions


def test_log_parents_refs_and_unknowns(reg):
    revs = [reg.commit("alice", make_adapter(i), message=f"m{i}") for i in range(1, 5)]
    log = reg.log("alice")
    assert [r.number for r in log] == [4, 3, 2, 1]
    assert [r.parent for r in log] == [3, 2, 1, None]
    assert [r.number for r in reg.log("alice", limit=2)] == [4, 3]
    # references: number (int or text), head, hash prefix, tag
    assert reg.show("alice", 2).content_hash == revs[1].content_hash
    assert reg.show("alice", "3").number == 3
    assert reg.show("alice", "head").number == reg.show("alice", "latest").number == 4
    assert reg.show("alice", revs[0].content_hash[:10]).number == 1
    reg.tag("alice", "stable", 2)
    assert reg.show("alice", "stable").number == 2
    # a root commit and an explicit parent
    root = reg.commit("alice", make_adapter(9), parent=None)
    assert root.parent is None and root.number == 5
    branch = reg.commit("alice", make_adapter(10), parent="stable")
    assert branch.parent == 2
    # unknowns
    with pytest.raises(RevisionNotFoundError, match="no revision 99"):
        reg.show("alice", 99)
    with pytest.raises(RevisionNotFoundError, match="nope"):
        reg.show("alice", "nope")
    with pytest.raises(RevisionNotFoundError):
        reg.load("alice", "deadbeefdeadbeef")
    with pytest.raises(RevisionNotFoundError):
        reg.show("alice", 1.5)
    with pytest.raises(AdapterNotFoundError, match="bob"):
        reg.log("bob")
    with pytest.raises(AdapterNotFoundError):
        reg.show("bob")
    with pytest.raises(RevisionNotFoundError, match="no revision is serving"):
        reg.show("alice", "serving")
    with pytest.raises(RevisionNotFoundError):
        reg.commit("alice", make_adapter(11), parent=42)
    assert len(reg.log("alice")) == 6  # the failed commit left nothing


def test_identical_recommit_is_a_new_revision_with_the_same_content(reg):
    a = reg.commit("same", make_adapter(1), message="first")
    b = reg.commit("same", make_adapter(1), message="again")
    assert (a.number, b.number) == (1, 2) and a.content_hash == b.content_hash
    assert reg.show("same", a.content_hash[:8]).number == 2
    assert reg.count()["blobs"] == 1
    assert reg.diff("same", 1, 2).same_content


def test_provenance_is_recorded(reg):
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fp = fingerprint_base_model(base, {"model_type": "toy"})
    before = time.time()
    r1 = reg.commit(
        "prov",
        make_adapter(1),
        author="trainer-7",
        provenance={
            "base_model": fp,
            "training_data": "s3://data/chats@v3",
            "training_config": {"lr": 1e-4, "steps": 100},
            "run_id": "r-42",
        },
    )
    r2 = reg.commit("prov", make_adapter(2), provenance={"base_model": base})
    p = reg.show("prov", 1).provenance
    assert p["base_model"] == fp and p["training_data"] == "s3://data/chats@v3"
    assert p["training_config"] == {"lr": 1e-4, "steps": 100}
    assert p["extra"] == {"run_id": "r-42"} and p["author"] == "trainer-7" and p["parent"] is None
    import minlora

    assert p["minlora_version"] == minlora.__version__ and p["torch_version"] == torch.__version__
    assert before - 5 <= p["created_at"].timestamp() <= time.time() + 5
    assert r2.provenance["base_model"] == fingerprint_base_model(base) and r2.provenance["parent"] == 1
    assert r1.author == "trainer-7"


def test_base_model_fingerprint():
    torch.manual_seed(0)
    m1 = torch.nn.Linear(8, 4)
    m2 = torch.nn.Linear(8, 4)
    m3 = torch.nn.Linear(8, 5)
    assert fingerprint_base_model(m1) == fingerprint_base_model(m2)  # same architecture
    assert fingerprint_base_model(m1) != fingerprint_base_model(m3)  # other shapes
    assert fingerprint_base_model(m1, {"a": 1}) != fingerprint_base_model(m1, {"a": 2})
    assert fingerprint_base_model(m1.half()) != fingerprint_base_model(m2)  # dtype
    w1 = fingerprint_base_model(m1.float(), include_weights=True)
    assert w1 != fingerprint_base_model(m2, include_weights=True)  # other weights
    assert w1 == fingerprint_base_model(dict(m1.state_dict()), include_weights=True)
    assert len(w1) == 64 and int(w1, 16) >= 0


def test_diff_reports_changes(reg):
    x = make_adapter(1)
    reg.commit("d", x)
    q = x.modules["layers.0.q_proj"]
    a2 = q.a.clone()
    a2[0, 3] += 0.5
    y = Adapter(
        {
            "layers.0.q_proj": LoraWeights(a2, q.b, 0.75),
            "layers.1.k_proj": LoraWeights(torch.ones(1, 4), torch.ones(4, 1), 1.0),
        },
        {**x.config, "r": 99},
    )
    reg.commit("d", y)
    d = reg.diff("d", 1, 2)
    by = {t.name: t for t in d.tensors}
    assert by["layers.0.q_proj.lora_A"].status == "changed"
    assert by["layers.0.q_proj.lora_A"].max_abs_diff == pytest.approx(0.5)
    assert by["layers.0.q_proj.lora_A"].rel_norm_diff == pytest.approx(0.5 / float(q.a.double().norm()))
    assert by["layers.0.q_proj.lora_B"].status == "unchanged"
    assert by["layers.0.q_proj.scale"].max_abs_diff == pytest.approx(0.25)
    assert by["layers.0.v_proj.lora_A"].status == "removed"
    assert by["layers.1.k_proj.lora_B"].status == "added"
    assert d.config_changes == {"r": [2, 99]}
    assert not d.same_content
    json.dumps(d.to_dict())


def test_tags_do_not_move_without_force(reg):
    for i in range(3):
        reg.commit("t", make_adapter(i))
    reg.tag("t", "v1", 1)
    reg.tag("t", "v1", 1)  # idempotent
    with pytest.raises(TagExistsError, match="revision 1"):
        reg.tag("t", "v1", 2)
    reg.tag("t", "v1", 2, force=True)
    reg.tag("t", "best")
    assert reg.tags("t") == {"best": 3, "v1": 2}
    assert reg.show("t", 3).tags == ["best"]
    for bad in ["12", "head", "serving", "has space", "a/b", ""]:
        with pytest.raises(InvalidIdError):
            reg.tag("t", bad)


# ---------------------------------------------------------------------- evaluations, gates, serving


def test_promotion_gates_and_forced_promotion(reg):
    for i in range(1, 5):
        reg.commit("g", make_adapter(i))
    reg.set_gate("g", Gate("qa", "accuracy", higher_is_better=True, tolerance=0.01))
    reg.set_gate("g", Gate("qa", "latency_ms", higher_is_better=False, tolerance=0.0))
    assert [g.metric for g in reg.gates("g")] == ["accuracy", "latency_ms"]
    # missing metrics
    with pytest.raises(PromotionRefusedError, match="no qa/accuracy") as info:
        reg.promote("g", 1)
    assert {e["status"] for e in info.value.report} == {"missing"}
    reg.record_evaluation("g", 1, "qa", {"accuracy": 0.80, "latency_ms": 10.0})
    p = reg.promote("g", 1, by="alice", reason="first")
    assert (p.from_revision, p.to_revision, p.forced, p.actor) == (None, 1, False, "alice")
    assert reg.serving("g").number == 1 and reg.show("g", 1).serving
    # within tolerance passes; a regression beyond it is refused
    reg.record_evaluation("g", 2, "qa", {"accuracy": 0.795, "latency_ms": 10.0})
    assert reg.promote("g", 2).to_revision == 2
    reg.record_evaluation("g", 3, "qa", {"accuracy": 0.70, "latency_ms": 9.0})
    with pytest.raises(PromotionRefusedError, match="accuracy is worse by 0.095"):
        reg.promote("g", 3)
    reg.record_evaluation("g", 4, "qa", {"accuracy": 0.9, "latency_ms": 12.0})
    with pytest.raises(PromotionRefusedError, match="latency_ms is worse by 2"):
        reg.promote("g", 4)
    assert reg.serving("g").number == 2  # refusals changed nothing
    # the latest evaluation of a metric counts
    reg.record_evaluation("g", 3, "qa", {"accuracy": 0.81})
    assert reg.promote("g", 3).to_revision == 3
    # forced: recorded with who and the failing report
    forced = reg.promote("g", 4, force=True, by="oncall-bob", reason="hotfix")
    assert forced.forced and forced.actor == "oncall-bob"
    hist = reg.serving_history("g")
    assert [(h.action, h.from_revision, h.to_revision, h.forced, h.actor) for h in hist] == [
        ("promote", None, 1, False, "alice"),
        ("promote", 1, 2, False, reg.serving_history("g")[1].actor),
        ("promote", 2, 3, False, hist[2].actor),
        ("promote", 3, 4, True, "oncall-bob"),
    ]
    assert hist[3].reason == "hotfix"
    assert [e["status"] for e in hist[3].gate_report] == ["pass", "regressed"]
    # promoting the serving revision again changes nothing
    assert not reg.promote("g", 4).changed
    assert len(reg.serving_history("g")) == 4
    # explicit gates override the stored ones
    reg.commit("g", make_adapter(5))
    with pytest.raises(PromotionRefusedError, match="other/x"):
        reg.promote("g", 5, gates=[Gate("other", "x")])
    assert reg.promote("g", 5, gates=[]).to_revision == 5
    assert reg.remove_gate("g", "qa", "latency_ms") and not reg.remove_gate("g", "qa", "latency_ms")


def test_rollback_walks_back_like_undo(reg):
    for i in range(1, 5):
        reg.commit("r", make_adapter(i))
    with pytest.raises(RegistryError, match="nothing is serving"):
        reg.rollback("r")
    reg.promote("r", 1)
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback("r")
    reg.promote("r", 2)
    reg.promote("r", 3)
    assert reg.rollback("r", by="ops").to_revision == 2
    assert reg.rollback("r").to_revision == 1
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback("r")
    reg.promote("r", 3)
    with pytest.raises(RegistryError, match="never served"):
        reg.rollback("r", to=4)
    assert reg.rollback("r", to=2).to_revision == 2
    hist = reg.serving_history("r")
    assert [h.action for h in hist] == [
        "promote",
        "promote",
        "promote",
        "rollback",
        "rollback",
        "promote",
        "rollback",
    ]
    assert hist[3].actor == "ops"
    assert reg.log("r")[0].number == 4  # history itself untouched


def test_rollback_stack_is_a_pure_function_of_the_event_log():
    from minlora.registry.serving import rollback_stack, rollback_target

    # promote 1, 2, 3; roll back to 2; roll back to 1; promote 3; roll back to 2
    events = [("promote", 1), ("promote", 2), ("promote", 3), ("rollback", 2), ("rollback", 1)]
    assert rollback_stack(events) == [1]
    assert rollback_target([1], 1) is None
    events += [("promote", 3)]
    assert rollback_stack(events) == [1, 3] and rollback_target([1, 3], 3) == 1
    # a rollback to a revision that is not on the stack starts it afresh
    assert rollback_stack([("promote", 1), ("promote", 2), ("rollback", 7)]) == [7]
    # the current revision is skipped even when it sits lower on the stack
    assert rollback_target([4, 5, 4], 4) == 5
    assert rollback_stack([]) == [] and rollback_target([], 1) is None


def test_gate_report_is_pure():
    from minlora.registry.gates import failures, gate_report

    acc = Gate("qa", "accuracy", higher_is_better=True, tolerance=0.01)
    lat = Gate("qa", "latency_ms", higher_is_better=False)
    cand = {("qa", "accuracy"): 0.795, ("qa", "latency_ms"): 12.0}
    cur = {("qa", "accuracy"): 0.80, ("qa", "latency_ms"): 10.0}
    report = gate_report([acc, lat], lambda s, m: cand.get((s, m)), lambda s, m: cur.get((s, m)))
    assert [g["status"] for g in report] == ["pass", "regressed"]
    assert report[1]["candidate"] == 12.0 and report[1]["serving"] == 10.0
    assert "latency_ms is worse by 2" in report[1]["why"]
    assert [g["metric"] for g in failures(report)] == ["latency_ms"]
    # nothing serving: every present metric passes, an absent one is missing
    first = gate_report([acc, Gate("qa", "f1")], lambda s, m: cand.get((s, m)), None)
    assert [g["status"] for g in first] == ["pass", "missing"]


def test_evaluations_and_runner(reg):
    for i in range(3):
        reg.commit(f"e{i}", make_adapter(i))
    with pytest.raises(ValueError, match="finite"):
        reg.record_evaluation("e0", "head", "s", {"m": float("nan")})
    with pytest.raises(ValueError, match="finite"):
        reg.record_evaluation("e0", "head", "s", {"m": "high"})
    with pytest.raises(ValueError):
        reg.record_evaluation("e0", "head", "", {"m": 1.0})
    seen = []

    def norm_of_delta(adapter, revision):
        seen.append((revision.adapter_id, revision.number))
        total = sum(float((w.b.double() @ w.a.double()).norm()) * w.scale for w in adapter.modules.values())
        return {"delta_norm": total, "modules": len(adapter.modules)}

    results = reg.evaluate(norm_of_delta, suite="stats")
    assert sorted(seen) == [("e0", 1), ("e1", 1), ("e2", 1)]
    assert len(results) == 6
    ev = {(e.metric): e.value for e in reg.evaluations("e1")}
    assert ev["modules"] == 2.0 and ev["delta_norm"] > 0

    def broken(adapter, revision):
        raise RuntimeError("eval server down")

    with pytest.raises(RegistryError, match="'e0' revision 1 failed: eval server down"):
        reg.evaluate(broken, adapters=["e0"])


# ---------------------------------------------------------------------- residency


def test_residency_from_a_real_adapter_pool(reg):
    from minlora.pool import AdapterPool

    x = make_adapter(1, features=16, rank=2)
    reg.commit("res", x)
    assert reg.residency("res") == "none"  # nothing serving yet
    reg.promote("res", 1)
    assert reg.residency("res") == "disk"  # no pool: only the blob store has it
    pool = AdapterPool({name: (16, 16) for name in x.modules}, capacity_bytes=1 << 20, device="cpu")
    try:
        reg.attach_pool(pool)
        assert reg.residency("res") == "unregistered"
        pool.register("res", reg.pool_source("res"))
        assert reg.residency("res") == "disk"
        step = pool.prepare(["res"], wait=True)
        assert reg.residency("res") == "gpu"  # the pool's fast tier (on this CPU-only pool, host memory)
        step.release()
        with pytest.raises(TypeError):
            reg.attach_pool(object())
    finally:
        pool.close()


# ---------------------------------------------------------------------- PEFT


def test_peft_export_import_roundtrip(reg, tmp_path):
    x = make_adapter(
        5, config={"r": 2, "lora_alpha": 1.0, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    )
    reg.commit("p", x)
    reg.export_peft("p", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    rev = reg.import_peft(str(tmp_path / "out"), "p2", message="imported")
    y = reg.load("p2", rev.number)
    assert sorted(y.modules) == sorted(x.modules)
    for name in x.modules:
        assert torch.equal(y.modules[name].a, x.modules[name].a)
        assert torch.equal(y.modules[name].b, x.modules[name].b)
        assert y.modules[name].scale == pytest.approx(x.modules[name].scale)
    with pytest.raises(FileNotFoundError):
        reg.import_peft(str(tmp_path / "missing"), "p3")


# ---------------------------------------------------------------------- bulk, gc, object store


def test_commit_many(reg):
    items = [(f"bulk-{i % 40}", make_adapter(i % 5)) for i in range(100)]
    seen = []
    n = reg.commit_many(items, batch_size=7, message="bulk", progress=seen.append)
    assert n == 100 and sum(seen) == 100
    assert reg.count() == {"adapters": 40, "revisions": 100, "blobs": 5}
    log = reg.log("bulk-3")
    assert [r.number for r in log] == [3, 2, 1] and [r.parent for r in log] == [2, 1, None]
    assert all(r.message == "bulk" for r in log)
    assert reg.verify().ok
    with pytest.raises(InvalidIdError):
        reg.commit_many([("ok", make_adapter(1)), ("bad/id", make_adapter(2))])


def test_gc_removes_only_old_orphans(reg):
    kept = reg.commit("keep", make_adapter(1))
    orphan = make_adapter(2)
    h = content.content_hash(orphan)
    reg.blobs.put(h, content.serialize(orphan))  # as if a commit died after writing its blob
    tmp = reg.blobs.path(h) + ".tmp-deadbeef"
    with open(tmp, "wb") as f:
        f.write(b"partial")
    young = make_adapter(3)
    hy = content.content_hash(young)
    reg.blobs.put(hy, content.serialize(young))
    old = time.time() - 7200
    for path in (reg.blobs.path(h), tmp, reg.blobs.path(kept.content_hash)):
        os.utime(path, (old, old))
    dry = reg.gc(dry_run=True)
    assert sorted(dry.deleted) == sorted([reg.blobs.path(h), tmp]) and os.path.exists(tmp)
    report = reg.gc()
    assert sorted(report.deleted) == sorted([reg.blobs.path(h), tmp]) and report.kept_young == 1
    assert not os.path.exists(tmp) and os.path.exists(reg.blobs.path(hy))
    assert reg.verify().ok and reg.load("keep").modules


def test_blobs_on_an_fsspec_object_store(registry_location):
    """The same code with an fsspec URL instead of a path (the in-process memory:// store)."""
    url, _ = registry_location
    root = f"memory://minlora-test-{os.getpid()}-{time.monotonic_ns()}"
    with Registry(url, root) as r:
        x = make_adapter(8)
        rev = r.commit("obj", x)
        assert not r.blobs.local
        assert r.blobs.exists(rev.content_hash)
        assert_same_adapter(r.load("obj"), x)
        r.blobs.fs.pipe_file(r.blobs.path(rev.content_hash), b"garbage")
        assert not r.verify().ok


# ---------------------------------------------------------------------- the PostgreSQL rule


def test_postgres_tests_skip_without_server_but_fail_under_ci(tmp_path, monkeypatch):
    """Without PostgreSQL binaries the postgres tests skip on a developer machine, and fail
    (never silently skip) when CI is set: the decision the postgres_server fixture makes."""
    from helpers.registry import require_postgres_bindir

    under_ci = bool(os.environ.get("CI"))
    monkeypatch.setenv("MINLORA_PG_BINDIR", str(tmp_path / "no-such-dir"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="initdb, postgres.*not found"):
        require_postgres_bindir()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set, so the PostgreSQL tests must run"):
        require_postgres_bindir()
    monkeypatch.delenv("MINLORA_PG_BINDIR")
    if under_ci:
        assert require_postgres_bindir()  # under CI the real binaries are there


def test_peft_export_is_read_back_by_the_one_reader(reg, tmp_path):
    """Export writes a directory (mixed ranks: rank_pattern) that minlora.formats' reader loads
    identically, and importing it back gives the same weights."""
    from minlora.formats import load_adapter, load_peft

    x = make_adapter(6, rank=3, scale=0.25, config={"r": 3, "lora_alpha": 0.75, "peft_type": "LORA"})
    x.modules["layers.1.q_proj"] = LoraWeights(torch.randn(1, 16), torch.randn(16, 1), 2.0)  # another rank
    reg.commit("x", x)
    reg.export_peft("x", str(tmp_path / "fb"))
    for read in (load_peft, load_adapter):
        y = read(str(tmp_path / "fb"))
        assert sorted(y.modules) == sorted(x.modules)
        for name, w in x.modules.items():
            assert torch.equal(y.modules[name].a, w.a) and torch.equal(y.modules[name].b, w.b)
            assert y.modules[name].scale == pytest.approx(w.scale), (read, name)
    z = reg.load("x2", reg.import_peft(str(tmp_path / "fb"), "x2").number)
    assert sorted(z.modules) == sorted(x.modules)
    assert all(torch.equal(z.modules[n].a, w.a) and torch.equal(z.modules[n].b, w.b) for n, w in x.modules.items())
