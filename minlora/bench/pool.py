"""The AdapterPool scale benchmark: a million registered adapters, a Zipf trace of steps.

`run_pool_bench(...)` returns a dict of figures; `minlora bench pool` prints them
(`--preset full` for the million-adapter run).  Adapters are synthetic: ranks in min_rank..max_rank, weights
materialised lazily from a seed by the pool's fetch worker the first time (and every later time
they come back from "disk"), so registration stores only an id and a tiny loader object.
"""
from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from typing import Any

import numpy as np
import torch

from ..formats import Adapter, LoraWeights
from ..command import EXIT_USAGE, CommandError, device_name, non_negative_int, positive_int, require_device
from ..pool import AdapterPool
from .common import DTYPES, add_output_arguments, apply_preset, progress_bar, report

__all__ = ["PRESETS", "SeedSource", "add_arguments", "run", "run_pool_bench", "synthetic_modules"]


def synthetic_modules(layers: int, hidden: int, kv: int) -> dict[str, tuple[int, int]]:
    """q/k/v/o projections of `layers` layers (a small Llama-like shape)."""
    mods = {}
    for i in range(layers):
        p = f"model.layers.{i}.self_attn"
        mods[f"{p}.q_proj"] = (hidden, hidden)
        mods[f"{p}.k_proj"] = (hidden, kv)
        mods[f"{p}.v_proj"] = (hidden, kv)
        mods[f"{p}.o_proj"] = (hidden, hidden)
    return mods


class SeedSource:
    """A loader callable holding only a seed: the adapter's rank and weights derive from it.

    The shape spec lives on the class (set by configure()), so an instance costs one slot.
    """

    __slots__ = ("seed",)
    modules: dict[str, tuple[int, int]] = {}
    min_rank = 1
    max_rank = 16

    def __init__(self, seed: int) -> None:
        self.seed = seed

    _bank = torch.zeros(0)
    _row_elems = 0

    @classmethod
    def configure(cls, modules: dict[str, tuple[int, int]], min_rank: int, max_rank: int, seed: int = 0) -> None:
        cls.modules, cls.min_rank, cls.max_rank = dict(modules), min_rank, max_rank
        cls._row_elems = sum(fin + fout for fin, fout in modules.values())
        g = torch.Generator().manual_seed(seed)
        cls._bank = torch.randn(max(1 << 22, 4 * max_rank * cls._row_elems), generator=g)

    @classmethod
    def rank_of(cls, seed: int) -> int:
        # A cheap integer hash (Knuth's multiplicative) spreads ranks evenly over the seeds.
        return cls.min_rank + (seed * 2654435761 % (1 << 32)) % (cls.max_rank - cls.min_rank + 1)

    def __call__(self) -> Adapter:
        r = self.rank_of(self.seed)
        need = r * self._row_elems
        # The weights are a window of a shared bank of random numbers at an offset derived
        # from the seed: deterministic per adapter, distinct between adapters, and cheap (a
        # benchmark of the pool, not of a random number generator).
        bank = SeedSource._bank
        o = (self.seed * 0x9E3779B1) % (bank.numel() - need)
        mods = {}
        for name, (fin, fout) in self.modules.items():
            a = bank[o : o + r * fin].view(r, fin)
            o += r * fin
            b = bank[o : o + r * fout].view(fout, r)
            o += r * fout
            mods[name] = LoraWeights(a, b, 2.0 / r)
        return Adapter(mods)


def registration_bytes_per_adapter(pool: AdapterPool, n: int) -> float:
    """Host bytes each of n SeedSource registrations keeps (tracemalloc): the id string, the
    loader object and the pool's dict entry, everything registration stores."""
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(n):
        pool.register(f"adapter-{i:07d}", SeedSource(i))
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (after - before) / n


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _zipf_trace(n: int, s: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` draws of adapter indices with P(rank k) ~ k^-s, ranks shuffled over the indices."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(count), side="right")
    ranks = np.minimum(ranks, n - 1)
    perm = rng.permutation(n)
    return perm[ranks]


def run_pool_bench(
    num_adapters: int = 1_000_000,
    steps: int = 100_000,
    batch: int = 32,
    zipf_s: float = 1.1,
    fast_fraction: float = 0.01,
    host_fraction: float = 0.05,
    min_rank: int = 1,
    max_rank: int = 16,
    layers: int = 1,
    hidden: int = 64,
    kv: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    wait: bool = True,
    tables: bool = True,
    seed: int = 0,
    memory_sample: int = 100_000,
    progress: bool = True,
) -> dict[str, Any]:
    """Registers `num_adapters` synthetic adapters and runs a Zipf(zipf_s) trace of `steps`
    steps x `batch` requests with a fast tier holding `fast_fraction` of the adapters' total
    bytes (host tier: `host_fraction`).  Every step prepares its batch (wait=True: it waits for
    its loads), builds every module's tables and the decode plan, and releases.

    Returns the figures: registration time and host bytes per registered adapter, hit rate,
    steps per second, evictions and bytes moved per tier.
    """
    modules = synthetic_modules(layers, hidden, kv)
    SeedSource.configure(modules, min_rank, max_rank, seed)
    es = torch.empty((), dtype=dtype).element_size()
    row_elems = sum(fin + fout for fin, fout in modules.values())
    mean_rank = (min_rank + max_rank) / 2
    mean_bytes = mean_rank * row_elems * es
    fast_bytes = int(fast_fraction * num_adapters * mean_bytes)
    # At least two batches of the largest adapters, or a step could not fit (only tiny runs).
    fast_bytes = max(fast_bytes, 2 * batch * max_rank * row_elems * es)
    host_bytes = int(host_fraction * num_adapters * mean_bytes)
    out: dict[str, Any] = dict(
        num_adapters=num_adapters,
        steps=steps,
        batch=batch,
        zipf_s=zipf_s,
        fast_fraction=fast_fraction,
        host_fraction=host_fraction,
        ranks=f"{min_rank}..{max_rank}",
        modules=len(modules),
        module_shapes=sorted(set(modules.values())),
        dtype=str(dtype).replace("torch.", ""),
        device=device,
        wait=wait,
        mean_adapter_bytes=mean_bytes,
        fast_capacity_bytes=fast_bytes,
        host_capacity_bytes=host_bytes,
    )

    # Host memory per registered-but-unloaded adapter, with tracemalloc on a sample: the id
    # string, the loader object and the pool's dict entry (everything registration keeps).
    sample = min(memory_sample, num_adapters)
    if sample > 0:
        probe = AdapterPool(modules, dtype=dtype, device=device, capacity_bytes=max(fast_bytes, 1 << 20))
        out["host_bytes_per_adapter_tracemalloc"] = registration_bytes_per_adapter(probe, sample)
        out["memory_sample"] = sample
        probe.close()
        del probe
        gc.collect()

    pool = AdapterPool(
        modules, dtype=dtype, device=device, capacity_bytes=fast_bytes, host_capacity_bytes=host_bytes,
        max_slots=max(batch, 1),
    )
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    ids = []
    for i in range(num_adapters):
        aid = f"adapter-{i:07d}"
        pool.register(aid, SeedSource(i))
        ids.append(aid)
    reg_s = time.perf_counter() - t0
    rss1 = _rss_bytes()
    out["registration_s"] = reg_s
    out["registration_us_per_adapter"] = reg_s / max(num_adapters, 1) * 1e6
    # Includes the benchmark's own list of the ids (8 bytes a pointer).
    out["host_bytes_per_adapter_rss"] = (rss1 - rss0) / max(num_adapters, 1)

    rng = np.random.default_rng(seed)
    trace = _zipf_trace(num_adapters, zipf_s, steps * batch, rng).reshape(steps, batch) if steps else None
    names = pool.module_names
    not_ready = 0
    with progress_bar(steps, "pool trace", progress) as bar:
        t0 = time.perf_counter()
        for k in range(steps):
            req = [ids[j] for j in trace[k]]
            with pool.prepare(req, wait=wait) as step:
                not_ready += step.ready.count(False)
                if tables:
                    for m in names:
                        step.tables(m)
                    step.plan(1)
            if k % 100 == 99 or k == steps - 1:
                bar.update(k % 100 + 1)
        trace_s = time.perf_counter() - t0
    s = pool.stats()
    pool.close()
    out.update(
        trace_s=trace_s,
        steps_per_s=steps / trace_s if trace_s > 0 else float("nan"),
        requests_per_s=steps * batch / trace_s if trace_s > 0 else float("nan"),
        not_ready_requests=not_ready,
    )
    out.update({_REPORT_NAMES.get(name, name): s[name] for name in _REPORTED_STATS})
    return out


# The pool's stats() the report carries, and the two it names differently.
_REPORTED_STATS = ("hit_rate", "hits", "misses", "fetches", "promotions", "evictions", "host_evictions",
                   "bytes_disk_to_host", "bytes_host_to_fast", "bytes_fast_to_host", "resident",
                   "host_resident", "fast_used_bytes", "chunk_bytes")
_REPORT_NAMES = {"resident": "resident_adapters", "host_resident": "host_resident_adapters"}


def format_report(r: dict[str, Any]) -> str:
    """A short human-readable summary of run_pool_bench's dict."""
    gib = 1 << 30
    lines = [
        f"adapters registered:       {r['num_adapters']:,} (ranks {r['ranks']}, {r['modules']} modules, {r['dtype']})",
        f"registration:              {r['registration_s']:.2f} s ({r['registration_us_per_adapter']:.2f} us/adapter)",
        f"host bytes/adapter:        {r.get('host_bytes_per_adapter_tracemalloc', float('nan')):.0f} (tracemalloc, "
        f"{r.get('memory_sample', 0):,} sample), {r['host_bytes_per_adapter_rss']:.0f} (RSS delta, all)",
        f"fast tier:                 {r['fast_capacity_bytes'] / 2**20:.1f} MiB "
        f"({r['fast_fraction']:.1%} of all adapters' bytes), {r['resident_adapters']:,} resident at the end",
        f"trace:                     {r['steps']:,} steps x {r['batch']} requests, Zipf({r['zipf_s']})",
        f"hit rate:                  {r['hit_rate']:.4f} ({r['hits']:,} hits, {r['misses']:,} misses)",
        f"steps/s:                   {r['steps_per_s']:.1f} ({r['requests_per_s']:.0f} requests/s, {r['trace_s']:.1f} s)",
        f"evictions:                 {r['evictions']:,} fast, {r['host_evictions']:,} host",
        f"bytes moved:               disk->host {r['bytes_disk_to_host'] / gib:.3f} GiB, host->fast "
        f"{r['bytes_host_to_fast'] / gib:.3f} GiB, fast->host {r['bytes_fast_to_host'] / gib:.3f} GiB",
    ]
    return "\n".join(lines)


# Sizes the other options leave to the preset: "quick" finishes in about a minute on 2 cores;
# "full" is the million-adapter run.
PRESETS: dict[str, dict[str, int]] = {
    "quick": {"adapters": 100_000, "steps": 5_000},
    "full": {"adapters": 1_000_000, "steps": 100_000},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="quick: 100,000 adapters x 5,000 steps; full: 1,000,000 x 100,000 (--adapters, --steps override)")
    p.add_argument("--adapters", type=positive_int, default=None, help="adapters to register")
    p.add_argument("--steps", type=non_negative_int, default=None, help="steps of the Zipf trace")
    p.add_argument("--batch", type=positive_int, default=32, help="requests per step")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--fast-fraction", type=float, default=0.01, help="fast tier size, a fraction of all adapters' bytes")
    p.add_argument("--host-fraction", type=float, default=0.05, help="host tier size, likewise")
    p.add_argument("--min-rank", type=positive_int, default=1)
    p.add_argument("--max-rank", type=positive_int, default=16)
    p.add_argument("--layers", type=positive_int, default=1)
    p.add_argument("--hidden", type=positive_int, default=64)
    p.add_argument("--kv", type=positive_int, default=16)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--no-wait", action="store_true", help="prepare(wait=False): steps never block on loads")
    p.add_argument("--no-tables", action="store_true", help="skip building the page tables and plan each step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-sample", type=non_negative_int, default=100_000)
    add_output_arguments(p)


def run(a: argparse.Namespace) -> int:
    device = require_device(a.device)
    apply_preset(a, PRESETS)
    if a.min_rank > a.max_rank:
        raise CommandError(f"--min-rank {a.min_rank} is above --max-rank {a.max_rank}", EXIT_USAGE)
    for name in ("zipf", "fast_fraction", "host_fraction"):
        if not getattr(a, name) > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}", EXIT_USAGE)
    result = run_pool_bench(
        num_adapters=a.adapters,
        steps=a.steps,
        batch=a.batch,
        zipf_s=a.zipf,
        fast_fraction=a.fast_fraction,
        host_fraction=a.host_fraction,
        min_rank=a.min_rank,
        max_rank=a.max_rank,
        layers=a.layers,
        hidden=a.hidden,
        kv=a.kv,
        dtype=getattr(torch, a.dtype),
        device=str(device),
        wait=not a.no_wait,
        tables=not a.no_tables,
        seed=a.seed,
        memory_sample=min(a.memory_sample, a.adapters),
        progress=not a.no_progress,
    )
    return report(a, "pool", result, format_report(result), device)
