"""AdapterPool scale benchmark at full size: `python bench/bench_pool.py [--json FILE]`.

Defaults are issue 4's sizes: 1,000,000 registered adapters (ranks 1..16, weights made lazily
from a seed), a Zipf(1.1) trace of 100,000 steps x 32 requests, a fast tier holding 1% of the
adapters.  Prints registration time, host bytes per adapter, hit rate, steps/s and bytes moved.
Same options as `minlora bench pool` (whose defaults are smaller, to finish in a minute or so).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minlora.bench.cli import script_main  # noqa: E402
from minlora.bench.pool import FULL_SCALE  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return script_main("pool", argv, __doc__, **FULL_SCALE)


if __name__ == "__main__":
    sys.exit(main())
