"""The pool benchmark driver (minlora.bench.pool) at toy size, and the per-adapter memory bound."""
from __future__ import annotations

import importlib.util
import json
import os

import torch

from minlora.bench.pool import SeedSource, registration_bytes_per_adapter, run_pool_bench, synthetic_modules
from minlora.pool import AdapterPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registration_costs_at_most_256_bytes_per_adapter():
    """Registered-but-unloaded adapters keep only an id -> source entry: measured with
    tracemalloc, counting the id string, the loader object and the pool's dict entry."""
    mods = synthetic_modules(1, 64, 16)
    SeedSource.configure(mods, 1, 16)
    pool = AdapterPool(mods, capacity_bytes=1 << 20)
    n = 50_000
    per = registration_bytes_per_adapter(pool, n)
    assert per <= 256, f"{per:.0f} bytes per registered adapter"
    assert pool.residency("adapter-0000007") == "disk" and len(pool) == n
    pool.close()


def test_seed_source_is_deterministic_and_distinct():
    mods = synthetic_modules(1, 32, 8)
    SeedSource.configure(mods, 1, 16, seed=3)
    a, b, c = SeedSource(5)(), SeedSource(5)(), SeedSource(6)()
    for n in mods:
        assert torch.equal(a.modules[n].a, b.modules[n].a) and torch.equal(a.modules[n].b, b.modules[n].b)
        assert a.modules[n].a.abs().sum() > 0
    n = next(iter(mods))
    assert a.modules[n].a.shape != c.modules[n].a.shape or not torch.equal(a.modules[n].a, c.modules[n].a)
    assert {SeedSource.rank_of(i) for i in range(200)} == set(range(1, 17))


def test_bench_driver_small():
    r = run_pool_bench(num_adapters=3000, steps=120, batch=8, memory_sample=1000, progress=False, hidden=32, kv=8)
    assert r["hits"] + r["misses"] == 120 * 8 - 0  # no None requests in the trace
    assert 0 < r["hit_rate"] < 1 and r["steps_per_s"] > 0 and r["evictions"] > 0
    assert r["host_bytes_per_adapter_tracemalloc"] <= 256
    assert r["bytes_host_to_fast"] > 0 and r["not_ready_requests"] == 0
    r2 = run_pool_bench(num_adapters=1000, steps=60, batch=8, memory_sample=0, progress=False, hidden=32, kv=8,
                        wait=False)
    assert r2["hits"] + r2["misses"] == 60 * 8


def test_bench_script_writes_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pool", os.path.join(ROOT, "bench", "bench_pool.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "pool.json"
    rc = mod.main(["--adapters", "500", "--steps", "20", "--batch", "4", "--memory-sample", "100", "--hidden", "16",
                   "--kv", "8", "--no-progress", "--json", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "pool" and payload["machine"]["torch"]
    data = payload["results"]
    assert data["num_adapters"] == 500 and data["steps"] == 20 and "hit_rate" in data
