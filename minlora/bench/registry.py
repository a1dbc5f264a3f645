"""`minlora bench registry`: the adapter registry at scale, through its public API only.

N adapters with one revision each (bulk `commit_many`), tiny rank-1 weights drawn from a
small set of distinct blobs (so blobs deduplicate), in the default SQLite layout under one
root (registry.db + blobs).  Reports the time to register, the database and blob sizes, and
the latency of log / show / promote / commit / gated promote / verified load / residency at
that size.  `--preset full` is the million-adapter run (minutes); the quick preset is 10,000.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..formats import Adapter, LoraWeights
from ..command import CommandError, positive_int
from .common import add_output_arguments, apply_preset, progress_bar, report

__all__ = ["PRESETS", "add_arguments", "run", "run_registry_bench", "tiny_adapters"]

PRESETS: dict[str, dict[str, int]] = {
    "quick": {"adapters": 10_000},
    "full": {"adapters": 1_000_000},
}
# The database file of a registry opened with root= (Registry's documented layout).
_DB_NAME = "registry.db"


def tiny_adapters(n: int, seed: int = 0) -> list[Adapter]:
    """`n` distinct rank-1 adapters on one 16-wide module (96 bytes of weights each)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Adapter({"q_proj": LoraWeights(torch.randn(1, 16, generator=g), torch.randn(16, 1, generator=g), 1.0)},
                {"r": 1})
        for _ in range(n)
    ]


def _sizes(root: str) -> tuple[int, int, int]:
    """(database bytes, blob bytes, blob files) under a registry root."""
    db = blobs = files = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            size = os.path.getsize(os.path.join(dirpath, name))
            if dirpath == root and name.startswith(_DB_NAME):
                db += size  # the database and its -wal / -shm files
            else:
                blobs += size
                files += 1
    return db, blobs, files


def latency(fn: Callable[[str], Any], ids: list[str]) -> dict[str, float]:
    """Milliseconds per call over `ids` (one call each): mean and percentiles."""
    times = []
    for aid in ids:
        t0 = time.perf_counter()
        fn(aid)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"mean_ms": statistics.fmean(times), "p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99),
            "n": len(times)}


def run_registry_bench(root: str, *, adapters: int, distinct: int = 1000, batch: int = 20_000,
                       samples: int = 300, seed: int = 0, show_progress: bool = True) -> dict[str, Any]:
    """Registers `adapters` adapters in a fresh registry under `root`, then times the
    per-adapter operations on `samples` random ones; returns the figures."""
    from ..registry import Gate, Registry

    rng = random.Random(seed)
    weights = tiny_adapters(min(distinct, adapters), seed)
    width = len(str(adapters))

    def items() -> Iterator[tuple[str, Adapter]]:
        for i in range(adapters):
            yield f"user-{i:0{width}d}", weights[i % len(weights)]

    with Registry(root=root) as reg, progress_bar(adapters, "register", show_progress) as bar:
        t0 = time.perf_counter()
        done = reg.commit_many(items(), batch_size=batch, message="initial", author="bench",
                               progress=bar.update)
        register_s = time.perf_counter() - t0
        counts = reg.count()
    if done != adapters:
        raise RuntimeError(f"commit_many registered {done} of {adapters} adapters")
    # Closed, the database holds everything (SQLite folds its write-ahead log in on close).
    db_bytes, blob_bytes, blob_files = _sizes(root)

    ids = [f"user-{rng.randrange(adapters):0{width}d}" for _ in range(samples)]
    with Registry(root=root) as reg:
        lat = {
            "log": latency(lambda a: reg.log(a), ids),
            "show": latency(lambda a: reg.show(a, "head"), ids),
            "promote": latency(lambda a: reg.promote(a, 1, by="bench"), ids),
        }
        # Gated promotion: a second revision with an evaluation, against a stored gate.
        gated = ids[: max(1, samples // 3)]
        for a in gated:
            reg.set_gate(a, Gate("qa", "acc", tolerance=0.1))
            reg.record_evaluation(a, 1, "qa", {"acc": 0.5})
        lat["commit"] = latency(
            lambda a: reg.commit(a, rng.choice(weights), message="update", author="bench"), gated
        )
        for a in gated:
            reg.record_evaluation(a, "head", "qa", {"acc": 0.55})
        lat["promote_gated"] = latency(lambda a: reg.promote(a, "head", by="bench"), gated)
        lat["load_verified"] = latency(lambda a: reg.load(a, "serving"), ids)
        lat["residency"] = latency(lambda a: reg.residency(a), ids)
    return {
        "adapters": adapters,
        "distinct_blobs": len(weights),
        "batch": batch,
        "register_s": register_s,
        "register_per_s": adapters / register_s,
        "db_bytes": db_bytes,
        "db_bytes_per_adapter": db_bytes / adapters,
        "blob_bytes": blob_bytes,
        "blob_files": blob_files,
        "counts": counts,
        "latency": lat,
    }


def format_report(r: dict[str, Any]) -> str:
    mib = 1024 * 1024
    lines = [
        f"registry scale benchmark: {r['adapters']:,} adapters, {r['distinct_blobs']:,} distinct blobs (SQLite)",
        f"  register      {r['register_s']:10.1f} s   ({r['register_per_s']:,.0f} adapters/s, "
        f"batches of {r['batch']:,})",
        f"  database      {r['db_bytes'] / mib:10.1f} MiB ({r['db_bytes_per_adapter']:.0f} bytes/adapter)",
        f"  blobs         {r['blob_bytes'] / mib:10.3f} MiB in {r['blob_files']:,} files",
        f"  {'operation':<14}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'calls':>8}",
    ]
    for name, s in r["latency"].items():
        lines.append(f"  {name:<14}{s['mean_ms']:10.2f}{s['p50_ms']:10.2f}{s['p95_ms']:10.2f}{s['p99_ms']:10.2f}"
                     f"{s['n']:8d}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS), default="quick",
                        help="quick: 10,000 adapters; full: 1,000,000 (--adapters overrides)")
    parser.add_argument("--adapters", type=positive_int, default=None,
                        help="adapters to register (one revision each)")
    parser.add_argument("--distinct", type=positive_int, default=1000, help="distinct weight blobs they share")
    parser.add_argument("--batch", type=positive_int, default=20_000,
                        help="revisions per transaction in the bulk registration")
    parser.add_argument("--samples", type=positive_int, default=300, help="calls per latency measurement")
    parser.add_argument("--root", help="registry root, which must not hold a registry yet "
                                       "(default: a temporary folder, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    apply_preset(args, PRESETS)
    if args.root is not None and os.path.exists(os.path.join(args.root, _DB_NAME)):
        raise CommandError(f"--root {args.root}: already holds a registry (the benchmark needs a fresh one)")
    root = args.root or tempfile.mkdtemp(prefix="minlora-bench-registry-")
    try:
        result = run_registry_bench(root, adapters=args.adapters, distinct=args.distinct, batch=args.batch,
                                    samples=args.samples, seed=args.seed, show_progress=not args.no_progress)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    return report(args, "registry", result, format_report(result), torch.device("cpu"))
