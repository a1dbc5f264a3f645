"""The pool benchmark driver (minlora.bench.pool) at toy size, and the per-adapter memory bound."""
from __future__ import annotations

import json

import torch

from minlora.bench.common import apply_preset
from minlora.bench.pool import PRESETS, SeedSource, registration_bytes_per_adapter, run_pool_bench, synthetic_modules
from minlora.cli import build_parser, main
from minlora.pool import AdapterPool


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


def test_bench_pool_full_preset_writes_json(tmp_path):
    """`--preset full` is the million-adapter run; explicit sizes override it."""
    args = build_parser().parse_args(["bench", "pool", "--preset", "full"])
    apply_preset(args, PRESETS)
    assert (args.adapters, args.steps) == (1_000_000, 100_000)
    out = tmp_path / "pool.json"
    rc = main(["bench", "pool", "--preset", "full", "--adapters", "500", "--steps", "20", "--batch", "4",
               "--memory-sample", "100", "--hidden", "16", "--kv", "8", "--no-progress", "--json-out", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "pool" and payload["machine"]["torch"]
    data = payload["results"]
    assert data["num_adapters"] == 500 and data["steps"] == 20 and "hit_rate" in data
