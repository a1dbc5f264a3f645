"""CPU benchmark of the LoRA op against the baselines, at the Llama-3-8B q_proj shape.

4096 -> 4096, rank 16, 32 distinct adapters; decode (one token per adapter) and prefill
(128 tokens per adapter); minlora vs PEFT's per-adapter loop, gather + bmm and
torch.nn.functional.grouped_mm, side by side as speed-ups, in one process.
Equivalent to `minlora bench ops --device cpu` with its defaults; extra arguments go there.
"""
from __future__ import annotations

import sys

from minlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", "--device", "cpu", *sys.argv[1:]]))
