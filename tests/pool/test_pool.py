"""AdapterPool on CPU: registration, steps, tiers, eviction, exhaustion, errors."""
from __future__ import annotations

import os
import time

import pytest
import torch

from minlora.formats import Adapter, LoraWeights
from minlora.pool import (
    AdapterLoadError,
    AdapterPool,
    ModuleTables,
    PoolExhaustedError,
    load_adapter_file,
    save_adapter_file,
)
from helpers.pool import MODULES, adapter_bytes, assert_bit_exact, check_step_against_reference, make_adapter


def new_pool(capacity: int = 40_000, **kw) -> AdapterPool:
    kw.setdefault("poison", True)
    return AdapterPool(MODULES, capacity_bytes=capacity, **kw)


def wait_ready(pool: AdapterPool, ids, timeout: float = 30.0):
    """prepare(wait=False) until every request is ready (loads are asynchronous)."""
    end = time.monotonic() + timeout
    while True:
        step = pool.prepare(ids)
        if all(step.ready) or time.monotonic() > end:
            return step
        step.release()
        time.sleep(0.002)


def test_tables_and_plan_match_reference_all_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pool = new_pool(dtype=dtype)
        ads = {f"u{i}": make_adapter(i) for i in range(6)}
        for k, v in ads.items():
            pool.register(k, v)
        ids = ["u3", None, "u1", "u3", "u5", "u0", None]
        with pool.prepare(ids, wait=True) as step:
            assert step.ready == [True] * len(ids)
            assert step.num_slots == 4
            assert step.request_slot.dtype == torch.int32 and step.request_slot.shape == (7,)
            rs = step.request_slot.tolist()
            assert rs[1] == rs[6] == -1 and rs[0] == rs[3]
            assert step.adapter_ids[rs[0]] == "u3"
            for m in MODULES:
                t = step.tables(m)
                assert isinstance(t, ModuleTables)
                assert t.a_pages.dtype == t.b_pages.dtype == t.ranks.dtype == torch.int32
                assert t.scales.dtype == torch.float32
                assert t.a_pages.shape[0] == t.ranks.shape[0] == step.num_slots
                assert t.a_pool.shape[1] == MODULES[m][0] and t.b_pool.shape[1] == MODULES[m][1]
                assert t.a_pool.dtype == dtype and t.a_pool.is_contiguous()
            check_step_against_reference(pool, step, ids, ads, tokens_per_request=3)
        pool.check_invariants()
        pool.close()


def test_modules_with_same_row_length_share_one_pool_tensor():
    pool = new_pool()
    with pool.prepare([]) as step:
        q0, q1, down = step.tables("layers.0.q"), step.tables("layers.1.q"), step.tables("layers.1.down")
        # in = 24 for q (A rows) and out = 24 for down (B columns): one tensor.
        assert q0.a_pool.data_ptr() == q1.a_pool.data_ptr() == down.b_pool.data_ptr()
        assert q0.a_pool is pool.pool_tensor(24)
        # Every pool is a view of the same arena: one budget.
        assert q0.b_pool.untyped_storage().data_ptr() == down.a_pool.untyped_storage().data_ptr()


def test_empty_and_none_only_steps():
    pool = new_pool()
    pool.register("a", make_adapter(1))
    for ids in ([], [None, None]):
        with pool.prepare(ids) as step:
            assert step.num_slots == 0 and step.ready == [True] * len(ids)
            t = step.tables("layers.0.q")
            assert t.a_pages.shape == (0, 0) and t.ranks.shape == (0,)
            ts, plan = step.plan(4)
            assert ts.shape == (4 * len(ids),) and (ts == -1).all()
            assert plan.num_slots == 0


def test_partial_targeting_gives_rank_zero():
    pool = new_pool()
    g = torch.Generator().manual_seed(0)
    ad = Adapter({"layers.0.v": LoraWeights(torch.randn(2, 24, generator=g), torch.randn(8, 2, generator=g), 1.5)})
    pool.register("only_v", ad)
    pool.register("full", make_adapter(3, subset=False))
    ads = {"only_v": ad, "full": make_adapter(3, subset=False)}
    ids = ["only_v", "full"]
    with pool.prepare(ids, wait=True) as step:
        s = step.request_slot.tolist()
        t = step.tables("layers.0.q")
        assert t.ranks[s[0]].item() == 0 and t.ranks[s[1]].item() > 0
        assert step.tables("layers.0.v").ranks[s[0]].item() == 2
        check_step_against_reference(pool, step, ids, ads)


def test_async_load_then_ready():
    pool = new_pool()
    pool.register("slow", lambda: (time.sleep(0.2), make_adapter(7))[1])
    t0 = time.monotonic()
    step = pool.prepare(["slow", None])
    assert time.monotonic() - t0 < 0.15, "prepare(wait=False) must not block on the load"
    assert step.ready == [False, True] and step.request_slot.tolist() == [-1, -1] and step.num_slots == 0
    step.release()
    assert pool.residency("slow") in ("disk", "host")
    step = wait_ready(pool, ["slow"])
    assert step.ready == [True]
    assert pool.residency("slow") == "gpu"
    step.release()
    s = pool.stats()
    assert s["misses"] >= 1 and s["fetches"] == 1


def test_residency_lifecycle_and_bit_exact_reload():
    ads = {f"a{i}": make_adapter(10 + i, subset=False) for i in range(8)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = new_pool(capacity=6 * one, host_capacity_bytes=None)
    assert pool.residency("nope") == "unregistered"
    for k, v in ads.items():
        pool.register(k, v)
        assert pool.residency(k) == "disk"
    for k in ads:  # more than fit: early ones get evicted to the host tier
        with pool.prepare([k], wait=True):
            assert pool.residency(k) == "gpu"
            assert_bit_exact(pool, k, ads[k])
    res = {k: pool.residency(k) for k in ads}
    assert "host" in res.values() and "gpu" in res.values(), res
    assert pool.stats()["evictions"] > 0
    for k in ads:  # reload from the host tier, bit-exact
        with pool.prepare([k], wait=True) as step:
            assert_bit_exact(pool, k, ads[k])
            check_step_against_reference(pool, step, [k], ads)
    assert pool.stats()["bytes_fast_to_host"] > 0 or pool.stats()["bytes_host_to_fast"] > 0
    pool.check_invariants()


def test_no_host_tier_reloads_from_source():
    ads = {f"a{i}": make_adapter(20 + i, subset=False) for i in range(5)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = new_pool(capacity=3 * one, host_capacity_bytes=0)
    for k, v in ads.items():
        pool.register(k, v)
    for _ in range(2):
        for k in ads:
            with pool.prepare([k], wait=True):
                assert_bit_exact(pool, k, ads[k])
    assert {pool.residency(k) for k in ads} <= {"gpu", "disk"}
    assert pool.stats()["host_resident"] == 0
    assert pool.stats()["fetches"] > len(ads)  # went back to the source


def test_pinned_and_referenced_are_never_evicted():
    ads = {f"a{i}": make_adapter(30 + i, subset=False) for i in range(10)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = new_pool(capacity=5 * one)
    for k, v in ads.items():
        pool.register(k, v)
    pool.pin("a0")
    with pool.prepare(["a0"], wait=True):
        pass
    held = pool.prepare(["a1"], wait=True)
    for k in list(ads)[2:]:
        with pool.prepare([k], wait=True):
            assert pool.residency("a0") == "gpu" and pool.residency("a1") == "gpu"
    assert_bit_exact(pool, "a0", ads["a0"])
    check_step_against_reference(pool, held, ["a1"], ads)
    held.release()
    held.release()  # idempotent
    pool.unpin("a0")
    with pytest.raises(ValueError, match="not pinned"):
        pool.unpin("a0")
    for k in list(ads)[2:]:
        with pool.prepare([k], wait=True):
            pass
    assert pool.residency("a0") != "gpu" or pool.residency("a1") != "gpu"
    pool.check_invariants()


def snapshot(pool: AdapterPool, ids) -> tuple:
    """Counters, the residency of every registered adapter (`ids`: all of them), the fast
    tier's allocated pages and its LRU order."""
    s = pool.stats()
    snap = pool.snapshot()
    assert snap.registered == len(ids)
    keys = ("hits", "misses", "evictions", "promotions", "fast_used_bytes", "steps_in_flight", "resident")
    return (
        tuple(s[k] for k in keys),
        tuple(sorted((k, pool.residency(k)) for k in ids)),
        snap.used_pages,
        snap.lru,
    )


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    ads = {f"a{i}": make_adapter(40 + i, subset=False) for i in range(8)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    pool = new_pool(capacity=4 * one)
    for k, v in ads.items():
        pool.register(k, v)
    with pool.prepare(["a5"], wait=True):
        pass
    held = pool.prepare(["a0", "a1"], wait=True)
    pool.pin("a2")
    with pool.prepare(["a2"], wait=True):
        pass
    before = snapshot(pool, ads)
    weights_before = {k: pool.read_adapter(k) for k in ("a0", "a1", "a2")}
    with pytest.raises(PoolExhaustedError, match="cannot hold"):
        pool.prepare(["a3", "a4", "a6", "a7"], wait=True)
    assert snapshot(pool, ads)[:3] == before[:3] and snapshot(pool, ads)[3] == before[3]
    for k, w in weights_before.items():
        for n, lw in pool.read_adapter(k).items():
            assert torch.equal(lw.a, w[n].a) and torch.equal(lw.b, w[n].b)
    pool.check_invariants()
    # After releasing, it fits.
    held.release()
    pool.unpin("a2")
    with pool.prepare(["a3", "a4", "a6"], wait=True) as step:
        assert all(step.ready)
        check_step_against_reference(pool, step, ["a3", "a4", "a6"], ads)


def test_one_adapter_larger_than_the_fast_tier():
    pool = new_pool(capacity=8192)
    big = make_adapter(1, subset=False, max_rank=64)
    pool.register("big", big)
    before = snapshot(pool, ["big"])
    with pytest.raises(PoolExhaustedError):
        pool.prepare(["big"], wait=True)
    assert snapshot(pool, ["big"])[0] == before[0]
    pool.check_invariants()


def test_file_sources_and_spill_to_disk(tmp_path):
    ads = {f"a{i}": make_adapter(50 + i, subset=False) for i in range(6)}
    one = max(adapter_bytes(a, torch.float32) for a in ads.values())
    path = tmp_path / "file_adapter.safetensors"
    save_adapter_file(ads["a0"], path)
    back = load_adapter_file(path)
    for n, w in ads["a0"].modules.items():
        assert torch.equal(back.modules[n].a, w.a) and torch.equal(back.modules[n].b, w.b)
    spill = tmp_path / "spill"
    pool = new_pool(capacity=2 * one, host_capacity_bytes=one, disk_dir=spill)
    pool.register("a0", str(path))
    for k in list(ads)[1:]:
        v = ads[k]
        pool.register(k, (lambda v=v: v))  # a loader callable
    for _ in range(2):
        for k in ads:
            with pool.prepare([k], wait=True) as step:
                assert_bit_exact(pool, k, ads[k])
                check_step_against_reference(pool, step, [k], ads)
    s = pool.stats()
    assert s["spills"] > 0 and s["host_evictions"] > 0
    assert len(os.listdir(spill)) > 0
    assert "disk" in {pool.residency(k) for k in ads}
    for k in list(ads)[1:]:
        pool.unregister(k)
    assert os.listdir(spill) == []  # spilled files go with their adapter


def test_peft_directory_source(tmp_path):
    peft_io = pytest.importorskip("minlora.formats.peft")
    ad = make_adapter(60, subset=False)
    d = tmp_path / "peft"
    try:
        peft_io.save_peft(ad, d)
    except Exception as e:  # the writer may refuse these toy module names
        pytest.skip(f"save_peft refused the test adapter: {e}")
    pool = new_pool()
    pool.register("p", d)
    with pool.prepare(["p"], wait=True) as step:
        got = pool.read_adapter("p")
        for n, w in ad.modules.items():
            assert torch.allclose(got[n].a, w.a) and torch.allclose(got[n].b, w.b)
            assert got[n].scale == pytest.approx(w.scale)
        check_step_against_reference(pool, step, ["p"], {"p": ad})


def test_load_errors_are_reported_and_retried():
    pool = new_pool()
    calls = {"n": 0}

    def flaky() -> Adapter:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("object store unavailable")
        return make_adapter(70)

    pool.register("f", flaky)
    with pytest.raises(AdapterLoadError, match="'f'") as ei:
        pool.prepare(["f"], wait=True)
    assert isinstance(ei.value.__cause__, OSError)
    with pool.prepare(["f"], wait=True) as step:  # retried
        assert step.ready == [True]
    # wait=False: the error shows on the next prepare naming it
    pool.register("bad", lambda: "not an adapter")
    pool.prepare(["bad"]).release()
    end = time.monotonic() + 10
    while pool.stats()["fetching"] and time.monotonic() < end:
        time.sleep(0.01)
    with pytest.raises(AdapterLoadError, match="'bad'"):
        pool.prepare(["bad", "f"])
    pool.register("unknown_module", lambda: Adapter({"nope": LoraWeights(torch.ones(1, 3), torch.ones(3, 1), 1.0)}))
    with pytest.raises(AdapterLoadError, match="does not know"):
        pool.prepare(["unknown_module"], wait=True)
    assert pool.stats()["steps_in_flight"] == 0
    pool.check_invariants()


def test_unregister():
    pool = new_pool()
    ad = make_adapter(80)
    pool.register("x", ad)
    step = pool.prepare(["x"], wait=True)
    with pytest.raises(ValueError, match="unreleased"):
        pool.unregister("x")
    step.release()
    used = pool.stats()["fast_used_bytes"]
    assert used > 0
    pool.unregister("x")
    assert pool.residency("x") == "unregistered"
    assert pool.stats()["fast_used_bytes"] == 0
    with pytest.raises(KeyError, match="unknown adapter"):
        pool.unregister("x")
    pool.register("x", make_adapter(81))  # the id can be reused
    with pool.prepare(["x"], wait=True):
        assert_bit_exact(pool, "x", make_adapter(81))
    pool.check_invariants()


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="non-empty mapping"):
        AdapterPool({}, capacity_bytes=1 << 16)
    with pytest.raises(ValueError, match="in_features"):
        AdapterPool({"m": (0, 4)}, capacity_bytes=1 << 16)
    with pytest.raises(ValueError, match="in_features"):
        AdapterPool({"m": (4,)}, capacity_bytes=1 << 16)
    with pytest.raises(TypeError, match="dtype"):
        AdapterPool({"m": (4, 4)}, capacity_bytes=1 << 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="capacity_bytes"):
        AdapterPool({"m": (4, 4)}, capacity_bytes=0)
    with pytest.raises(ValueError, match="less than one allocator chunk"):
        AdapterPool({"m": (4096, 4096)}, capacity_bytes=1000)
    with pytest.raises(ValueError, match="max_slots"):
        AdapterPool({"m": (4, 4)}, capacity_bytes=1 << 16, max_slots=0)
    pool = new_pool(max_slots=3)
    ad = make_adapter(1)
    pool.register("a", ad)
    with pytest.raises(ValueError, match="already registered"):
        pool.register("a", ad)
    with pytest.raises(TypeError, match="adapter_id"):
        pool.register(5, ad)
    with pytest.raises(TypeError, match="adapter_id"):
        pool.register("", ad)
    with pytest.raises(TypeError, match="source"):
        pool.register("b", 42)
    with pytest.raises(FileNotFoundError):
        pool.register("b", "/nonexistent/adapter.safetensors")
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="does not know"):
        pool.register("b", Adapter({"other": LoraWeights(torch.randn(2, 24, generator=g), torch.randn(8, 2), 1.0)}))
    with pytest.raises(ValueError, match="expected a"):
        pool.register("b", Adapter({"layers.0.v": LoraWeights(torch.randn(2, 25), torch.randn(8, 2), 1.0)}))
    with pytest.raises(ValueError, match="expected a"):
        pool.register("b", Adapter({"layers.0.v": LoraWeights(torch.randn(2, 24), torch.randn(9, 2), 1.0)}))
    with pytest.raises(TypeError, match="floating"):
        pool.register("b", Adapter({"layers.0.v": LoraWeights(torch.ones(2, 24, dtype=torch.int64), torch.ones(8, 2), 1.0)}))
    with pytest.raises(ValueError, match="scale"):
        pool.register("b", Adapter({"layers.0.v": LoraWeights(torch.randn(2, 24), torch.randn(8, 2), float("nan"))}))
    assert "b" not in pool
    with pytest.raises(KeyError, match="unknown adapter"):
        pool.prepare(["a", "zzz"])
    with pytest.raises(TypeError, match="sequence"):
        pool.prepare("a")
    with pytest.raises(TypeError, match="str or None"):
        pool.prepare([1])
    for i in range(4):
        pool.register(f"m{i}", make_adapter(i))
    with pytest.raises(ValueError, match="max_slots"):
        pool.prepare([f"m{i}" for i in range(4)])
    with pytest.raises(KeyError, match="unknown adapter"):
        pool.pin("zzz")
    with pytest.raises(KeyError):
        pool.residency("zzz") == "unregistered" and pool.unpin("zzz")
    with pool.prepare(["a"], wait=True) as step:
        with pytest.raises(KeyError, match="unknown module"):
            step.tables("nope")
        with pytest.raises(ValueError, match="tokens_per_request"):
            step.plan(-1)
    with pytest.raises(RuntimeError, match="released"):
        step.tables("layers.0.v")
    assert pool.stats()["steps_in_flight"] == 0
    with pytest.raises(ValueError, match="not in the fast tier"):
        pool.read_adapter("m3")
    with pytest.raises(ValueError, match="row length"):
        pool.pool_tensor(7)


def test_stats_counts():
    pool = new_pool()
    for i in range(3):
        pool.register(f"s{i}", make_adapter(90 + i))
    with pool.prepare(["s0", "s1", None], wait=True):
        pass
    with pool.prepare(["s0", "s1", "s2"], wait=True):
        pass
    s = pool.stats()
    assert s["hits"] == 2 and s["misses"] == 3 and s["requests"] == 6 and s["steps"] == 2
    assert s["registered"] == 3 and s["resident"] == 3 and s["fetches"] == 3
    assert s["bytes_host_to_fast"] == s["fast_used_bytes"] > 0
    assert 0 < s["hit_rate"] < 1


def test_one_budget_for_all_row_lengths():
    """Adapters of one row length can fill the whole fast tier, and after they go, adapters
    of other row lengths can fill it again: no per-module partition strands memory."""
    mods = {"x": (64, 64), "y": (96, 40), "z": (40, 96)}
    cap = 96 * 1024
    pool = AdapterPool(mods, capacity_bytes=cap, poison=True)
    g = torch.Generator().manual_seed(0)

    def fill(prefix: str, names: list[str]) -> int:
        held = []
        i = 0
        while True:
            aid = f"{prefix}{i}"
            ws = {n: LoraWeights(torch.randn(4, mods[n][0], generator=g), torch.randn(mods[n][1], 4, generator=g), 1.0)
                  for n in names}
            pool.register(aid, Adapter(ws))
            try:
                held.append(pool.prepare([aid], wait=True))
            except PoolExhaustedError:
                break
            i += 1
        used = pool.stats()["fast_used_bytes"]
        pool.check_invariants()
        for s in held:
            s.release()
        for j in range(i + 1):
            pool.unregister(f"{prefix}{j}")
        s = pool.stats()
        assert s["fast_used_bytes"] == 0 and s["fast_free_chunks"] == s["fast_chunks"]
        return used

    for names in (["x"], ["y"], ["z", "x"], ["y", "z"]):
        used = fill("".join(names), names)
        assert used >= 0.85 * cap, (names, used, cap)
    pool.check_invariants()


def test_chunk_size_for_real_model_shapes():
    # Llama-3-8B: hidden 4096, kv 1024, intermediate 14336; rows in bf16.
    mods = {"q": (4096, 4096), "k": (4096, 1024), "up": (4096, 14336), "down": (14336, 4096)}
    pool = AdapterPool(mods, dtype=torch.bfloat16, capacity_bytes=1 << 28)
    c = pool.chunk_bytes
    for d in (4096, 1024, 14336):
        assert c % (2 * d) == 0, (c, d)  # chunks hold whole rows of every length: no edge waste
    assert pool.stats()["fast_capacity_bytes"] >= (1 << 28) - c
