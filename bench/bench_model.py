"""A patched HuggingFace Llama vs PEFT's mixed-batch forward vs the base model, on CPU, one run.

Llama hidden 1024, intermediate 2816, 4 layers; 32 rank-16 PEFT adapters on all seven
projections; batch 32 x 1 token, every row its own adapter.  Prints median forward times and
their ratios to the base model (target for the patched model: at most 1.3x).
The same driver backs `minlora bench model`; every size is an argument (see --help).
"""
from __future__ import annotations

import argparse
import sys

from minlora.bench.common import machine_info, write_json
from minlora.bench.model import add_arguments, run_from_args


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--json", metavar="FILE", help="write results and machine info to FILE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run_from_args(args)
    print(result["table"])
    if args.json:
        import torch

        write_json(args.json, {"benchmark": "model", "machine": machine_info(torch.device(args.device)),
                               "results": result})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
