"""AdapterPool scale benchmark: `python bench/bench_pool.py [--json FILE]`.

Defaults are issue 4's sizes: 1,000,000 registered adapters (ranks 1..16, weights made lazily
from a seed), a Zipf(1.1) trace of 100,000 steps x 32 requests, a fast tier holding 1% of the
adapters.  Prints registration time, host bytes per adapter, hit rate, steps/s and bytes moved.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minlora.bench.pool import format_report, main_args, run_pool_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = main_args(argv)
    result = run_pool_bench(**args["kwargs"])
    print(format_report(result))
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
