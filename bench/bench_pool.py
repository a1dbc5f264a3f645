"""AdapterPool scale benchmark at full size: `python bench/bench_pool.py [--json FILE]`.

Defaults are issue 4's sizes: 1,000,000 registered adapters (ranks 1..16, weights made lazily
from a seed), a Zipf(1.1) trace of 100,000 steps x 32 requests, a fast tier holding 1% of the
adapters.  Prints registration time, host bytes per adapter, hit rate, steps/s and bytes moved.
Same options as `minlora bench pool` (whose defaults are smaller, to finish in a minute or so).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minlora.bench.common import machine_info, write_json  # noqa: E402
from minlora.bench.pool import FULL_SCALE, add_arguments, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(**FULL_SCALE)
    parser.add_argument("--json", metavar="FILE", help="write the figures and machine info to FILE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_from_args(args)
    print(result["table"])
    if args.json:
        import torch

        write_json(args.json, {"benchmark": "pool", "machine": machine_info(torch.device(args.device)),
                               "results": result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
