"""`minlora bench model`: a patched HuggingFace Llama vs PEFT's mixed-batch forward vs the base model.

Default shape: Llama with hidden 1024, intermediate 2816, 4 layers; 32 rank-16 PEFT
adapters on all seven projections; a batch of 32 requests x 1 token, every request its own
adapter.  All three run in one process on the same weights; the figures are median forward
times and their ratios to the base model (the target: patched <= 1.3x base).

The adapters are made by PEFT (init_lora_weights=False, so B is not zero), saved with
save_pretrained, and read by the pool through minlora.formats (load_adapter), the path a user takes.

With --no-peft the adapters are random minlora Adapters made in memory and PEFT is not run
(its setup takes minutes at hundreds of adapters): base and patched model only.

On CUDA it also times the patched decode step (one token per request, a KV cache of
`--context` tokens) captured once as a CUDA graph and replayed after refilling the step with
new assignments, against the memory-traffic floor (minlora/bench/decode_graph.py).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

import minlora

from ..command import device_name, positive_int, require_device
from .cases import rel_error
from .common import DTYPES, add_output_arguments, format_table, report, time_call
from .llama import PROJECTIONS, SHAPES, LlamaShape, add_shape_arguments, shape_from_args

__all__ = ["ModelBenchConfig", "add_arguments", "bench_model", "run"]


@dataclass
class ModelBenchConfig:
    shape: LlamaShape = field(default_factory=lambda: SHAPES["small"])
    adapters: int = 32
    rank: int = 16
    batch: int = 32
    tokens: int = 1  # tokens per request (1 = one decode-sized forward, no KV cache)
    context: int = 128  # on CUDA: KV-cache length of the decode step captured as a CUDA graph
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 20
    warmup: int = 3
    seed: int = 0
    profile: bool = False
    peft: bool = True  # False: no PEFT model (no comparison); adapters made in memory


def _random_adapters(base: torch.nn.Module, cfg: ModelBenchConfig, ids: list[str], dtype: torch.dtype):
    """{id: Adapter} of random rank-cfg.rank factors on every projection, and the pool's shapes."""
    from ..formats import Adapter, LoraWeights

    shapes = {n: (m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    adapters = {}
    for aid in ids:
        modules = {}
        for n, (i, o) in shapes.items():
            # Scaled like the PEFT path's factors, so the adapted logits stay of the base's order.
            a = (torch.randn(cfg.rank, i, generator=g) * 0.1 / i ** 0.5).to(dtype)
            b = (torch.randn(o, cfg.rank, generator=g) * 0.1 / cfg.rank ** 0.5).to(dtype)
            modules[n] = LoraWeights(a=a, b=b, scale=2.0)
        adapters[aid] = Adapter(modules, {"r": cfg.rank, "lora_alpha": 2 * cfg.rank})
    return adapters, shapes


def _build(cfg: ModelBenchConfig, workdir: str):
    """(base model, PEFT model holding every adapter (None without PEFT), patched model, pool, adapter ids)."""
    dtype = getattr(torch, cfg.dtype)
    base = cfg.shape.build(max_positions=max(128, cfg.tokens, cfg.context + 1), seed=cfg.seed)
    base = base.to(device=cfg.device, dtype=dtype)

    ids = [f"u{i}" for i in range(cfg.adapters)]
    if not cfg.peft:
        sources, shapes = _random_adapters(base, cfg, ids, dtype)
        return base, None, *_patched(base, cfg, dtype, shapes, sources), ids
    from peft import LoraConfig, get_peft_model

    from ..targets import target_shapes

    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(PROJECTIONS),
                      init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), lora, adapter_name=ids[0])
        for aid in ids[1:]:
            peft_model.add_adapter(aid, lora)
        # PEFT draws B like A; shrink so the adapted logits stay of the base's order.
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.mul_(0.1)
        peft_model.save_pretrained(workdir, selected_adapters=ids)
    peft_model.eval()
    # save_pretrained puts an adapter not named "default" in workdir/<name>.
    dirs = {aid: f"{workdir}/{aid}" for aid in ids}

    shapes = target_shapes(base, list(dirs.values()))
    return base, peft_model, *_patched(base, cfg, dtype, shapes, dirs), ids


def _patched(base: torch.nn.Module, cfg: ModelBenchConfig, dtype: torch.dtype, shapes: dict, sources: dict):
    """(a patched copy of base, its pool holding every adapter of `sources`: id -> dir or Adapter)."""
    from ..pool import AdapterPool

    patched = copy.deepcopy(base)
    elem = torch.empty((), dtype=dtype).element_size()
    per_adapter = sum(cfg.rank * (i + o) for i, o in shapes.values()) * elem
    # Room for every adapter at once, plus slack for the allocator's chunking.
    capacity = int(per_adapter * cfg.adapters * 1.25) + (8 << 20)
    pool = AdapterPool(shapes, dtype=dtype, device=cfg.device, capacity_bytes=capacity,
                       max_slots=max(cfg.adapters, 1))
    for aid, src in sources.items():
        pool.register(aid, src)
    minlora.patch(patched, pool, max_rank=cfg.rank, max_tokens=cfg.batch * max(cfg.tokens, cfg.context))
    return patched, pool


def bench_model(cfg: Optional[ModelBenchConfig] = None, *, show_progress: bool = False) -> dict[str, Any]:
    """Runs the benchmark; returns the configuration, times (seconds), ratios and a text table."""
    cfg = cfg or ModelBenchConfig()
    device = torch.device(cfg.device)
    with tempfile.TemporaryDirectory(prefix="minlora-bench-model-") as workdir:
        t0 = time.perf_counter()
        base, peft_model, patched, pool, ids = _build(cfg, workdir)
        build_s = time.perf_counter() - t0
        assign = [ids[i % len(ids)] for i in range(cfg.batch)]
        x = torch.randint(3, cfg.shape.vocab, (cfg.batch, cfg.tokens), device=device,
                          generator=torch.Generator(device=device).manual_seed(cfg.seed))

        def log(msg: str) -> None:
            if show_progress:
                print(msg, file=sys.stderr, flush=True)  # stdout carries the results

        times: dict[str, float] = {}
        with torch.inference_mode():
            rel = None
            if peft_model is not None:
                # Agreement first (one forward each): the benchmark times the right thing.
                want = peft_model(x, adapter_names=assign).logits
                with minlora.adapters(patched, assign):
                    got = patched(x).logits
                rel = rel_error(got, want)

            def with_prepare() -> Any:
                # What a server pays per step: the pool's prepare and page tables, then the forward.
                with minlora.adapters(patched, assign):
                    return patched(x)

            calls = {"base": lambda: base(x)}
            if peft_model is not None:
                calls["peft_mixed"] = lambda: peft_model(x, adapter_names=assign)
            calls["minlora"] = lambda: patched(x)  # inside the step opened below
            calls["minlora_with_prepare"] = with_prepare  # a nested step, closed after each call
            log(f"timing {', '.join(calls)}, interleaved, {cfg.repeats} rounds")
            with minlora.adapters(patched, assign):
                times, best = _interleaved(calls, device, cfg.warmup, cfg.repeats)

            profile_rows = None
            if cfg.profile:
                profile_rows = _profile(patched, assign, x)
        decode_graph = None
        if device.type == "cuda":
            from .decode_graph import bench_decode_graph

            log(f"decode step as a CUDA graph, KV cache of {cfg.context} tokens")
            # New adapter assignments replayed through the one captured graph.
            rotations = [assign[k:] + assign[:k] for k in range(min(3, len(assign)))]
            decode_graph = bench_decode_graph(patched, dict(pool.modules), rotations, cfg.context, cfg.shape.vocab,
                                              repeats=max(cfg.repeats, 10), seed=cfg.seed)

    ratios = {k: v / times["base"] for k, v in times.items()}
    ratios_best = {k: v / best["base"] for k, v in best.items()}
    rows = [
        {"method": k, "median_ms": 1e3 * v, "x_base": ratios[k], "min_ms": 1e3 * best[k],
         "x_base_min": ratios_best[k],
         "peft_over_this": times["peft_mixed"] / v if "peft_mixed" in times else None}
        for k, v in times.items()
    ]
    table = format_table(rows, ["method", "median_ms", "x_base", "min_ms", "x_base_min", "peft_over_this"])
    table += (
        f"\n{cfg.shape.describe()}; {cfg.adapters} rank-{cfg.rank} adapters on all 7 projections; "
        f"batch {cfg.batch} x {cfg.tokens} token(s); "
        f"{cfg.dtype} on {cfg.device}, {torch.get_num_threads()} threads"
        "\nx_base = median time / the base model's; x_base_min: the same with minimum times"
        + (f"\nminlora vs PEFT logits: relative error {rel:.2e}" if rel is not None else "\nPEFT not run (--no-peft)")
    )
    if decode_graph is not None:
        t = decode_graph["traffic_bytes"]
        table += (
            f"\n\ndecode step as one CUDA graph (batch {cfg.batch}, KV cache {cfg.context}): "
            f"{1e3 * decode_graph['graph_s']:.3f} ms, eager {1e3 * decode_graph['eager_s']:.3f} ms"
            f"\nmemory-traffic floor {1e3 * decode_graph['floor_s']:.3f} ms ({t['total'] / 1e9:.3f} GB: base "
            f"{t['base_weights'] / 1e9:.3f}, adapter pages {t['adapter_pages'] / 1e9:.3f}, KV {t['kv_cache'] / 1e9:.3f}"
            f" at {decode_graph['copy_bandwidth_Bps'] / 1e9:.0f} GB/s copy bandwidth); "
            f"graph / floor = {decode_graph['graph_over_floor']:.2f}"
        )
    if profile_rows:
        table += "\n\nprofile of the patched forward (self CPU time):\n" + format_table(
            profile_rows, ["op", "calls", "self_ms", "share"]
        )
    return {
        "config": asdict(cfg),
        "device": cfg.device,
        "times_s": times,
        "ratios_to_base": ratios,
        "min_times_s": best,
        "min_ratios_to_base": ratios_best,
        "peft_over_minlora": times["peft_mixed"] / times["minlora"] if "peft_mixed" in times else None,
        "rel_err_vs_peft": rel,
        "setup_s": build_s,
        "profile": profile_rows,
        "decode_graph": decode_graph,
        "table": table,
    }


def _interleaved(
    calls: dict[str, Any], device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """(median, minimum) seconds per call of each method, timed round-robin so that a shared machine's load
    drifts over all methods alike rather than penalising whichever ran during a busy spell."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            samples[k].append(time_call(lambda i: fn(), device, warmup=0, repeats=1))
    return {k: statistics.median(v) for k, v in samples.items()}, {k: min(v) for k, v in samples.items()}


def _profile(
    patched: torch.nn.Module, assign: list, x: torch.Tensor, iters: int = 10
) -> list[dict[str, Any]]:
    """Self time per op of the patched forward (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with minlora.adapters(patched, assign):
        patched(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                patched(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = [
        {"op": e.key, "calls": e.count // iters, "self_ms": e.self_cpu_time_total / 1e3 / iters,
         "share": e.self_cpu_time_total / total}
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    ]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ModelBenchConfig()
    parser.add_argument("--preset", default="small", choices=list(SHAPES),
                        help="model shape (random weights, built from a config); the size options below override it")
    add_shape_arguments(parser)
    parser.add_argument("--adapters", type=positive_int, default=d.adapters,
                        help="distinct adapters (rows cycle through them)")
    parser.add_argument("--rank", type=positive_int, default=d.rank)
    parser.add_argument("--batch", type=positive_int, default=d.batch)
    parser.add_argument("--tokens", type=positive_int, default=d.tokens, help="tokens per request")
    parser.add_argument("--context", type=positive_int, default=d.context,
                        help="on CUDA: KV-cache length of the decode step timed as a CUDA graph")
    parser.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    parser.add_argument("--device", type=device_name, default=d.device, help="cpu or cuda")
    parser.add_argument("--repeats", type=positive_int, default=d.repeats)
    parser.add_argument("--no-peft", dest="peft", action="store_false",
                        help="skip PEFT (no comparison; random adapters made in memory): for hundreds of adapters")
    parser.add_argument("--profile", action="store_true",
                        help="also print a torch.profiler table of the patched forward")
    add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    device = require_device(args.device)
    cfg = ModelBenchConfig(shape=shape_from_args(args, SHAPES[args.preset]), adapters=args.adapters, rank=args.rank,
                           batch=args.batch, tokens=args.tokens, context=args.context, dtype=args.dtype, device=str(device),
                           repeats=args.repeats, profile=args.profile, peft=args.peft)
    result = bench_model(cfg, show_progress=not args.no_progress)
    result["preset"] = args.preset
    return report(args, "model", result, result.pop("table"), device)
