"""Scale benchmark of the adapter registry: N adapters (default 1,000,000) with one revision
each, tiny weights drawn from a small set of distinct blobs (so blobs deduplicate), in the
default SQLite registry.  Reports the time to register, the database and blob sizes, and
the latency of log / show / promote / commit / load at that size.

    python bench/bench_registry.py --adapters 1000000 --json bench/results/registry.json

Not a test: it takes minutes at full size.  Use --root to keep the registry somewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from minlora.formats import Adapter, LoraWeights
from minlora.registry import Gate, Registry


def tiny_adapters(n: int, seed: int = 0) -> list[Adapter]:
    """`n` distinct rank-1 adapters on one 16-wide module (96 bytes of weights each)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Adapter(
            {"q_proj": LoraWeights(torch.randn(1, 16, generator=g), torch.randn(16, 1, generator=g), 1.0)},
            {"r": 1},
        )
        for _ in range(n)
    ]


def dir_size(path: str) -> tuple[int, int]:
    total, files = 0, 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            total += os.path.getsize(os.path.join(dirpath, name))
            files += 1
    return total, files


def latency(fn: Callable[[str], Any], ids: list[str]) -> dict[str, float]:
    """Milliseconds per call over `ids` (one call each): mean and percentiles."""
    times = []
    for aid in ids:
        t0 = time.perf_counter()
        fn(aid)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return {
        "mean_ms": statistics.fmean(times),
        "p50_ms": pick(0.50),
        "p95_ms": pick(0.95),
        "p99_ms": pick(0.99),
        "n": len(times),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--adapters", type=int, default=1_000_000, help="adapters to register (one revision each)"
    )
    ap.add_argument("--distinct", type=int, default=1000, help="distinct weight blobs they share")
    ap.add_argument(
        "--batch", type=int, default=20_000, help="revisions per transaction in the bulk registration"
    )
    ap.add_argument("--samples", type=int, default=300, help="calls per latency measurement")
    ap.add_argument("--root", help="registry root (default: a temporary directory, removed at the end)")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.adapters < 1 or args.distinct < 1:
        ap.error("--adapters and --distinct must be >= 1")

    tmp = None
    root = args.root
    if root is None:
        tmp = root = tempfile.mkdtemp(prefix="minlora-bench-registry-")
    try:
        return run(args, root)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, root: str) -> int:
    rng = random.Random(args.seed)
    pool = tiny_adapters(args.distinct, args.seed)
    reg = Registry(root=root)
    n = args.adapters
    width = len(str(n))

    def items() -> Iterator[tuple[str, Adapter]]:
        for i in range(n):
            yield f"user-{i:0{width}d}", pool[i % len(pool)]

    bar = tqdm(total=n, desc="register", unit="adapter", unit_scale=True, mininterval=1.0)
    t0 = time.perf_counter()
    done = reg.commit_many(
        items(), batch_size=args.batch, message="initial", author="bench", progress=bar.update
    )
    t_register = time.perf_counter() - t0
    bar.close()
    assert done == n

    # Checkpoint the WAL so the database file holds everything, then measure.
    with reg.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db_path = reg.engine.url.database
    db_bytes = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    blob_bytes, blob_files = dir_size(reg.blobs.root)

    ids = [f"user-{rng.randrange(n):0{width}d}" for _ in range(args.samples)]
    counts = reg.count()
    lat = {
        "log": latency(lambda a: reg.log(a), ids),
        "show": latency(lambda a: reg.show(a, "head"), ids),
        "promote": latency(lambda a: reg.promote(a, 1, by="bench"), ids),
    }
    # Gated promotion: a second revision with an evaluation, against a stored gate.
    gated = ids[: max(1, args.samples // 3)]
    for a in gated:
        reg.set_gate(a, Gate("qa", "acc", tolerance=0.1))
        reg.record_evaluation(a, 1, "qa", {"acc": 0.5})
    lat["commit"] = latency(
        lambda a: reg.commit(a, pool[rng.randrange(len(pool))], message="update", author="bench"), gated
    )
    for a in gated:
        reg.record_evaluation(a, "head", "qa", {"acc": 0.55})
    lat["promote_gated"] = latency(lambda a: reg.promote(a, "head", by="bench"), gated)
    lat["load_verified"] = latency(lambda a: reg.load(a, "serving"), ids)
    lat["residency"] = latency(lambda a: reg.residency(a), ids)
    reg.close()

    results = {
        "adapters": n,
        "distinct_blobs": args.distinct,
        "batch": args.batch,
        "register_s": t_register,
        "register_per_s": n / t_register,
        "db_bytes": db_bytes,
        "db_bytes_per_adapter": db_bytes / n,
        "blob_bytes": blob_bytes,
        "blob_files": blob_files,
        "counts": counts,
        "latency": lat,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print_table(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return 0


def print_table(r: dict[str, Any]) -> None:
    mib = 1024 * 1024
    print()
    print(
        f"registry scale benchmark: {r['adapters']:,} adapters, {r['distinct_blobs']:,} distinct blobs (SQLite)"
    )
    print(
        f"  register      {r['register_s']:10.1f} s   ({r['register_per_s']:,.0f} adapters/s, batches of {r['batch']:,})"
    )
    print(f"  database      {r['db_bytes'] / mib:10.1f} MiB ({r['db_bytes_per_adapter']:.0f} bytes/adapter)")
    print(f"  blobs         {r['blob_bytes'] / mib:10.3f} MiB in {r['blob_files']:,} files")
    print(f"  {'operation':<14}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'calls':>8}")
    for name, s in r["latency"].items():
        print(
            f"  {name:<14}{s['mean_ms']:10.2f}{s['p50_ms']:10.2f}{s['p95_ms']:10.2f}{s['p99_ms']:10.2f}{s['n']:8d}"
        )


if __name__ == "__main__":
    sys.exit(main())
