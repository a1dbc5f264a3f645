"""`minlora bench {ops,model,pool}`: argument parsing and output (table, --json, --plot)."""
from __future__ import annotations

import argparse
import importlib
import itertools
from typing import Any, Optional, Sequence

import torch

from .common import format_table, machine_info, write_json


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="microbenchmarks against the baselines")
    sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

    ops = sub.add_parser("ops", help="the LoRA op vs a per-adapter loop, gather + bmm and grouped_mm")
    ops.add_argument("--preset", default="llama3-8b", help="model sizes: llama3-8b, llama3-70b, qwen2-7b, mixtral-8x7b")
    ops.add_argument("--proj", nargs="+", default=["q"], help="projections: q k v o gate up down, or 'all'")
    ops.add_argument("--in", dest="in_features", type=int, help="explicit input size (with --out; overrides --preset)")
    ops.add_argument("--out", dest="out_features", type=int, help="explicit output size")
    ops.add_argument("--ranks", type=int, nargs="+", default=[16])
    ops.add_argument("--adapters", type=int, nargs="+", default=[32])
    ops.add_argument("--tokens-per-adapter", type=int, nargs="+", default=[1, 128],
                     help="1 = decode; many = prefill")
    ops.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    ops.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ops.add_argument("--backward", action="store_true", help="time forward + backward (x, A and B gradients)")
    ops.add_argument("--repeats", type=int, default=10)
    _add_output_args(ops)
    ops.set_defaults(func=_run_ops)

    # The model and pool benchmarks live in their own drivers; they add their own arguments.
    for name, help_text in (("model", "a patched HF model vs PEFT's mixed batch vs the base model"),
                            ("pool", "the AdapterPool at scale: registration, Zipf trace, hit rate"),
                            ("serve", "the service under concurrent tinker clients: mixed vs one adapter at a time")):
        parser = sub.add_parser(name, help=help_text)
        try:
            driver = __import__(f"minlora.bench.{name}", fromlist=["add_arguments"])
            if not (hasattr(driver, "add_arguments") and hasattr(driver, "run_from_args")):
                raise ImportError(f"minlora.bench.{name} has no add_arguments / run_from_args")
        except ImportError as exc:  # only while a driver is missing
            parser.set_defaults(func=lambda args, exc=exc: _missing(exc))
            continue
        driver.add_arguments(parser)
        _add_output_args(parser)
        parser.set_defaults(func=lambda args, driver=driver: _run_driver(driver, args))


def script_main(name: str, argv: Optional[Sequence[str]], description: str, **defaults: Any) -> int:
    """The bench/bench_<name>.py scripts: the driver's options (with `defaults` overriding the
    CLI's), the same table / --json / --plot output as `minlora bench <name>`."""
    driver = importlib.import_module(f"minlora.bench.{name}")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver.add_arguments(parser)
    _add_output_args(parser)
    parser.set_defaults(**defaults)
    return _run_driver(driver, parser.parse_args(argv))


def _missing(exc: Exception) -> int:
    print(f"this benchmark is not available: {exc}")
    return 1


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write results and machine info to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="write a plot to FILE.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_ops(args: argparse.Namespace) -> int:
    from . import ops

    device = args.device or _default_device()
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    if args.in_features or args.out_features:
        if not (args.in_features and args.out_features):
            raise SystemExit("--in and --out go together")
        shapes = [(f"{args.in_features}x{args.out_features}", args.in_features, args.out_features)]
    else:
        if args.preset not in ops.PRESETS:
            raise SystemExit(f"unknown preset {args.preset!r}; choose from {', '.join(ops.PRESETS)}")
        projs = list(ops.PROJECTIONS) if args.proj == ["all"] else args.proj
        for p in projs:
            if p not in ops.PROJECTIONS:
                raise SystemExit(f"unknown projection {p!r}; choose from {', '.join(ops.PROJECTIONS)} or all")
        shapes = [(f"{args.preset}.{p}", *ops.projection_shape(args.preset, p)) for p in projs]
    configs = [
        ops.OpsConfig(i, o, r, n, t, dtype, device, args.backward, label)
        for (label, i, o), r, n, t in itertools.product(shapes, args.ranks, args.adapters, args.tokens_per_adapter)
    ]
    rows = ops.run(configs, repeats=args.repeats, show_progress=not args.no_progress)
    shown = ops.table_rows(rows)
    columns = [c for c in ops.TABLE_COLUMNS if any(r.get(c) is not None for r in shown)]
    print(format_table(shown, columns))
    print("x_<baseline> = baseline time / minlora time (higher is better for minlora)")
    notes = {f"note: {k[:-5]}: {v}" for r in rows for k, v in r.items() if k.endswith("_note")}
    for note in sorted(notes):
        print(note)
    _write_outputs(args, "ops", rows, torch.device(device))
    if args.plot:
        _plot_ops(rows, args.plot)
    return 0


def _run_driver(driver: Any, args: argparse.Namespace) -> int:
    result = driver.run_from_args(args)
    print(result["table"])
    device = torch.device(result.get("device", "cpu"))
    _write_outputs(args, driver.__name__.rsplit(".", 1)[-1], result, device)
    if args.plot:
        if hasattr(driver, "plot"):
            driver.plot(result, args.plot)
        else:
            print("note: --plot: this benchmark has no plot (its figures are in the table and --json)")
    return 0


def _write_outputs(args: argparse.Namespace, what: str, results: Any, device: torch.device) -> None:
    if args.json:
        write_json(args.json, {"benchmark": what, "machine": machine_info(device), "results": results})
        print(f"wrote {args.json}")


def _plot_ops(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Speed-up over each baseline, and fraction of copy bandwidth, against the number of adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        c = r["config"]
        groups.setdefault((c["label"], c["rank"], c["tokens_per_adapter"], c["backward"]), []).append(r)
    for (label, rank, tpa, bwd), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["config"]["adapters"])
        n = [r["config"]["adapters"] for r in rs]
        name = f"{label} r{rank} {'decode' if tpa == 1 else f'{tpa} tok/ad'}{' +bwd' if bwd else ''}"
        for base, marker in (("loop", "o"), ("gather_bmm", "s"), ("grouped_mm", "^")):
            ys = [r.get(f"x_{base}") for r in rs]
            if any(y is not None for y in ys):
                ax1.plot(n, [y if y is not None else float("nan") for y in ys], marker=marker,
                         label=f"vs {base}: {name}")
        ax2.plot(n, [r.get("frac_copy") or float("nan") for r in rs], marker="o", label=name)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("distinct adapters in the batch")
    ax1.set_ylabel("speed-up of minlora (baseline time / minlora time)")
    ax1.legend(fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("distinct adapters in the batch")
    ax2.set_ylabel("fraction of measured copy bandwidth")
    ax2.legend(fontsize=7)
    fig.suptitle(f"minlora bench ops ({rows[0]['config']['device']}, {rows[0]['config']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
