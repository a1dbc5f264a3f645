"""`minlora bench vllm`: minlora as vLLM's LoRA backend against vLLM's own, side by side in one run.

1. The LoRA layer: vLLM's add_lora_linear at Llama-3-8B projection shapes (qkv, o, gate_up,
   down), 8 adapters of ranks 1 to 64 and base rows, decode and prefill steps: minlora's
   punica wrapper vs vLLM's PunicaWrapperCPU (vllm_layer.py).  Target on CPU: >= 10x.
2. End to end: vLLM's offline generation on a random Llama with the same 8 adapters, tokens/s
   with no LoRA, with vLLM's own LoRA and with minlora (vllm_e2e.py, one engine process per
   mode).  Target on CPU: minlora's tokens/s >= 0.85x the run without LoRA.

It runs in the vLLM environment (`bash scripts/bench_vllm.sh [options]` makes it when missing).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

from ..command import non_negative_int, output_file, positive_int
from .llama import SHAPES, add_shape_arguments, shape_from_args

__all__ = ["add_arguments", "run"]

DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64, 64]
E2E_SHAPE = SHAPES["small"]
HOW_TO_RUN = ("minlora bench vllm runs in the vLLM environment, which this one is not (vLLM is not installed): "
              "bash scripts/bench_vllm.sh [options] makes it when missing and runs the benchmark there")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .vllm_layer import LLAMA3_8B_LAYERS

    parser.add_argument("--part", choices=["all", "layer", "e2e"], default="all")
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=DEFAULT_RANKS, help="true rank of each adapter")
    parser.add_argument("--max-rank", type=positive_int, default=64, help="vLLM's max_lora_rank")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    group = parser.add_argument_group("the LoRA layer")
    group.add_argument("--layers", nargs="+", default=list(LLAMA3_8B_LAYERS), choices=list(LLAMA3_8B_LAYERS))
    group.add_argument("--decode-requests", type=positive_int, default=64, help="requests of a decode step (1 token each)")
    group.add_argument("--prefill-requests", type=non_negative_int, default=9, help="requests of a prefill step (0: none)")
    group.add_argument("--prefill-tokens", type=positive_int, default=32, help="tokens per prefill request")
    group.add_argument("--repeats", type=positive_int, default=5, help="timed calls of minlora's wrapper (best kept)")
    group.add_argument("--stock-repeats", type=positive_int, default=2, help="timed calls of vLLM's (it is slow)")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="torch threads for both wrappers (default: torch's; 1 steadies figures on a busy machine)")
    group = parser.add_argument_group("end to end")
    add_shape_arguments(group, E2E_SHAPE, layers_option="--model-layers")
    group.add_argument("--requests", type=positive_int, default=32)
    group.add_argument("--new-tokens", type=positive_int, default=32)
    group.add_argument("--prompt-len", type=positive_int, default=32)
    group.add_argument("--e2e-repeats", type=positive_int, default=3, help="timed generate calls per engine (fastest kept)")
    group.add_argument("--modes", nargs="+", default=["base", "stock", "minlora"], choices=["base", "stock", "minlora"])
    group.add_argument("--e2e-rounds", type=positive_int, default=2,
                       help="rounds of the engines, one mode after another in each, the fastest generate of each "
                            "mode kept (a shared machine's load drifts between engines); vLLM's own LoRA runs in "
                            "the first round only (it is ten times slower)")
    parser.add_argument("--json-out", metavar="FILE", type=output_file,
                        help="write the results and machine information to FILE")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("vllm") is None:
        print(HOW_TO_RUN, file=sys.stderr)
        return 1
    if args.max_rank < max(args.ranks):
        raise SystemExit(f"--max-rank {args.max_rank} is below the largest adapter rank {max(args.ranks)}")
    results: dict[str, Any] = {}
    if args.part in ("all", "layer"):
        results["layer"] = _layer_part(args)
    if args.part in ("all", "e2e"):
        results["e2e"] = _e2e_part(args)
    if args.json_out:
        import torch

        from .common import machine_info, write_json

        write_json(args.json_out, {"benchmark": "vllm", "machine": machine_info(torch.device("cpu")), "results": results})
        print(f"wrote {args.json_out}")
    return 0


def _layer_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .common import format_table
    from .vllm_layer import bench_layer, layer_cases

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = layer_cases(args.layers, args.ranks, args.max_rank, args.decode_requests, args.prefill_requests,
                        args.prefill_tokens, args.dtype)
    rows = []
    for case in cases:
        row = bench_layer(case, repeats=args.repeats, stock_repeats=args.stock_repeats)
        row["step"] = "decode" if case.tokens_per_request == 1 else f"prefill {case.tokens_per_request}/req"
        rows.append(row)
    print(f"add_lora_linear, {len(args.ranks)} adapters of ranks {args.ranks} + base rows, max_lora_rank "
          f"{args.max_rank}, {args.dtype}, {torch.get_num_threads()} threads")
    print(format_table(rows, ["layer", "step", "tokens", "stock_ms", "minlora_ms", "x_stock", "relerr_vs_stock",
                              "true_weight_mb", "padded_weight_mb", "base_rows_unchanged"]))
    print("x_stock = vLLM's PunicaWrapperCPU time / minlora's (target >= 10)")
    return rows


def _e2e_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .common import format_table
    from .vllm_e2e import write_model

    shape = shape_from_args(args, E2E_SHAPE)
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="minlora-bench-vllm-") as workdir:
        write_model(workdir, shape, ranks=args.ranks)
        for round_ in range(args.e2e_rounds):
            for mode in args.modes:
                if mode == "stock" and round_ > 0:
                    continue
                got = _engine_run(workdir, mode, args)
                best[mode] = _faster_run(best.get(mode), got)
    rows = [best[mode] for mode in args.modes]
    base = next((r["tokens_per_s"] for r in rows if r["mode"] == "base"), None)
    for r in rows:
        r["x_base"] = r["tokens_per_s"] / base if base else None
    print(f"vLLM generate, random {shape.describe()}, {args.requests} requests "
          f"x {args.new_tokens} new tokens (prompts of {args.prompt_len}), {len(args.ranks)} adapters + base rows, "
          f"{args.dtype}")
    print(format_table(rows, ["mode", "tokens", "seconds", "tokens_per_s", "x_base", "rounds", "startup_s"]))
    print("x_base = tokens/s / tokens/s without LoRA (target for minlora >= 0.85)")
    return rows


def _faster_run(kept: Optional[dict[str, Any]], new: dict[str, Any]) -> dict[str, Any]:
    """The faster of two engine runs of one mode, with every timed generate of both and the rounds."""
    if kept is None:
        return dict(new, rounds=1)
    fastest = dict(new if new["seconds"] < kept["seconds"] else kept)
    fastest["all_seconds"] = kept["all_seconds"] + new["all_seconds"]
    fastest["startup_s"] = min(kept["startup_s"], new["startup_s"])
    fastest["rounds"] = kept["rounds"] + 1
    return fastest


def _engine_run(workdir: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from .vllm_e2e import RESULT_PREFIX

    cmd = [sys.executable, "-P", "-m", "minlora.bench.vllm_e2e", workdir, mode, "--requests", str(args.requests),
           "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--dtype", args.dtype,
           "--repeats", str(args.e2e_repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {mode} engine run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])
