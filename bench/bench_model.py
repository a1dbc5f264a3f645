"""A patched HuggingFace Llama vs PEFT's mixed-batch forward vs the base model, on CPU, one run.

Llama hidden 1024, intermediate 2816, 4 layers; 32 rank-16 PEFT adapters on all seven
projections; batch 32 x 1 token, every row its own adapter.  Prints median forward times and
their ratios to the base model (target for the patched model: at most 1.3x).
The same driver backs `minlora bench model`; every size is an argument (see --help).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minlora.bench.cli import script_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(script_main("model", sys.argv[1:], __doc__))
