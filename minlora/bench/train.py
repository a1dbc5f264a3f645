"""`minlora bench train`: many adapters trained together in one batch vs PEFT.

Default shape: a small random Llama; 16 rank-16 adapters on all seven projections;
16 rows x 128 tokens per step, row i trained by adapter i (cross-entropy summed over tokens,
AdamW).  Side by side in one run, each in its own fresh process (so its peak memory is its own):

    minlora          the Trainer: one forward and one backward for all 16 rows, one optim_step
    peft_sequential  PEFT training the same 16 adapters one after another, each on its own row
                     (one PeftModel holding all 16, set_adapter, one torch.optim.AdamW each)
    peft_single      PEFT training one adapter on all 16 rows (the single-adapter ceiling)

Figures: median seconds per step (all 16 rows), tokens/s, peak resident memory during the steps
(Linux VmHWM, reset after set-up; on CUDA torch.cuda.max_memory_allocated) and the memory the
steps add to the set-up; ratios to minlora.  `--rounds N` repeats the three processes N times,
alternating, and keeps each one's median (a shared machine's load then drifts over all alike).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from ..command import device_name, positive_int, require_device
from .common import add_output_arguments, format_table, report
from .llama import PROJECTIONS, LlamaShape, add_shape_arguments, shape_from_args

__all__ = ["TrainBenchConfig", "add_arguments", "bench_train", "run"]

CONTENDERS = ("minlora", "peft_sequential", "peft_single")


@dataclass
class TrainBenchConfig:
    shape: LlamaShape = field(default_factory=lambda: LlamaShape(hidden=256, intermediate=688, layers=2, heads=4,
                                                                 kv_heads=4, vocab=2048))
    adapters: int = 16
    rank: int = 16
    rows: int = 16
    tokens: int = 128
    steps: int = 6  # timed steps per process (after `warmup`)
    warmup: int = 2
    rounds: int = 1
    lr: float = 1e-3
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    isolate: bool = True  # each contender in its own process (peak memory); False: in this one
    threads: Optional[int] = None  # torch threads (None: torch's default)


def _base_model(cfg: TrainBenchConfig) -> torch.nn.Module:
    model = cfg.shape.build(max_positions=max(256, cfg.tokens), seed=cfg.seed)
    return model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))


def _batch(cfg: TrainBenchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    seq = torch.randint(3, cfg.shape.vocab, (cfg.rows, cfg.tokens + 1), generator=g)
    ids, targets = seq[:, :-1].to(cfg.device), seq[:, 1:].to(cfg.device)
    return ids, targets, torch.ones(cfg.rows, cfg.tokens, device=cfg.device)


def _row_loss(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from ..train.losses import token_logprobs

    return -token_logprobs(model(input_ids=ids).logits, targets).sum()


def _minlora(cfg: TrainBenchConfig) -> Callable[[], None]:
    from ..pool import AdapterPool
    from ..targets import target_shapes
    from ..train import Trainer

    model = _base_model(cfg)
    shapes = target_shapes(model, [{"target_modules": list(PROJECTIONS)}])
    elem = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    per_adapter = sum(cfg.rank * (i + o) for i, o in shapes.values()) * elem
    capacity = int(per_adapter * cfg.adapters * 1.1) + (1 << 20)
    pool = AdapterPool(shapes, dtype=getattr(torch, cfg.dtype), device=cfg.device, capacity_bytes=capacity,
                       optimizer_state=True, max_slots=max(cfg.adapters, 1))
    trainer = Trainer(model, pool)
    ids = [f"u{i}" for i in range(cfg.adapters)]
    for i, aid in enumerate(ids):
        trainer.create(aid, rank=cfg.rank, alpha=2 * cfg.rank, seed=cfg.seed + i)
    x, targets, weights = _batch(cfg)
    assign = [ids[i % len(ids)] for i in range(cfg.rows)]

    def step() -> None:
        trainer.forward_backward(assign, x, targets, weights)
        trainer.optim_step(cfg.lr)

    return step


def _peft(cfg: TrainBenchConfig, names: list[str]) -> tuple[torch.nn.Module, dict[str, torch.optim.Optimizer]]:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(PROJECTIONS), lora_dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_base_model(cfg), lora, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, lora)
    model.eval()
    opts = {}
    for name in names:
        params = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
        opts[name] = torch.optim.AdamW(params, lr=cfg.lr)
    return model, opts


def _peft_sequential(cfg: TrainBenchConfig) -> Callable[[], None]:
    names = [f"u{i}" for i in range(cfg.adapters)]
    model, opts = _peft(cfg, names)
    x, targets, _ = _batch(cfg)

    def step() -> None:
        for i in range(cfg.rows):
            name = names[i % len(names)]
            model.set_adapter(name)  # the active adapter alone is trainable
            _row_loss(model, x[i : i + 1], targets[i : i + 1]).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

    return step


def _peft_single(cfg: TrainBenchConfig) -> Callable[[], None]:
    model, opts = _peft(cfg, ["u0"])
    x, targets, _ = _batch(cfg)
    opt = opts["u0"]

    def step() -> None:
        _row_loss(model, x, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


_BUILDERS = {"minlora": _minlora, "peft_sequential": _peft_sequential, "peft_single": _peft_single}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak resident set) to the current RSS
        return True
    except OSError:
        return False


def measure(name: str, cfg: TrainBenchConfig) -> dict[str, Any]:
    """One contender in this process (with cfg.threads torch threads): set-up, warm-up, timed
    steps; seconds and memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        return _measure(name, cfg)
    finally:
        torch.set_num_threads(threads)


def _measure(name: str, cfg: TrainBenchConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    step = _BUILDERS[name](cfg)
    for _ in range(cfg.warmup):
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup_bytes = torch.cuda.memory_allocated(device)
    else:
        reset = _reset_peak()
        setup_bytes = _rss_bytes("VmRSS")
    times = []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_bytes("VmHWM")
    if not cuda and not reset:
        peak = max(peak, setup_bytes)  # the peak since start-up (set-up included)
    return {"seconds_per_step": statistics.median(times), "step_seconds": times, "peak_bytes": peak,
            "setup_bytes": setup_bytes, "step_bytes": max(0, peak - setup_bytes)}


def _measure_in_child(args: tuple[str, TrainBenchConfig]) -> dict[str, Any]:
    return measure(*args)


def bench_train(cfg: Optional[TrainBenchConfig] = None, *, show_progress: bool = False) -> dict[str, Any]:
    """Runs the three contenders (see the module docstring); returns the configuration, the
    figures, the ratios and a text table."""
    cfg = cfg or TrainBenchConfig()
    if cfg.threads is None:
        cfg = replace(cfg, threads=torch.get_num_threads())
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in CONTENDERS}
    ctx = multiprocessing.get_context("spawn")
    for r in range(cfg.rounds):
        for name in CONTENDERS:
            if show_progress:
                print(f"round {r + 1}/{cfg.rounds}: {name}", flush=True)
            if cfg.isolate:
                with ctx.Pool(1) as pool:
                    got = pool.apply(_measure_in_child, ((name, cfg),))
            else:
                got = measure(name, cfg)
            samples[name].append(got)
    tokens = cfg.rows * cfg.tokens
    figures = {}
    for name, runs in samples.items():
        sec = statistics.median(t for s in runs for t in s["step_seconds"])  # over every timed step
        best = min(t for s in runs for t in s["step_seconds"])
        figures[name] = {
            "seconds_per_step": sec,
            "tokens_per_s": tokens / sec,
            "min_seconds_per_step": best,
            "tokens_per_s_best": tokens / best,
            "peak_bytes": max(s["peak_bytes"] for s in runs),
            "step_bytes": max(s["step_bytes"] for s in runs),
            "setup_bytes": max(s["setup_bytes"] for s in runs),
        }
    m = figures["minlora"]
    rows = []
    for name, f in figures.items():
        rows.append({
            "method": name,
            "s_per_step": f["seconds_per_step"],
            "tokens_per_s": f["tokens_per_s"],
            "minlora_speedup": m["tokens_per_s"] / f["tokens_per_s"],
            "min_s": f["min_seconds_per_step"],
            "speedup_min": m["tokens_per_s_best"] / f["tokens_per_s_best"],
            "peak_MiB": f["peak_bytes"] / 2**20,
            "step_MiB": f["step_bytes"] / 2**20,
            "peak_vs_minlora": f["peak_bytes"] / m["peak_bytes"],
        })
    ratios = {
        "speedup_vs_peft_sequential": m["tokens_per_s"] / figures["peft_sequential"]["tokens_per_s"],
        "throughput_vs_peft_single": m["tokens_per_s"] / figures["peft_single"]["tokens_per_s"],
        "peak_memory_vs_peft_sequential": m["peak_bytes"] / figures["peft_sequential"]["peak_bytes"],
        "peak_memory_vs_peft_single": m["peak_bytes"] / figures["peft_single"]["peak_bytes"],
        "speedup_vs_peft_sequential_min": m["tokens_per_s_best"] / figures["peft_sequential"]["tokens_per_s_best"],
        "throughput_vs_peft_single_min": m["tokens_per_s_best"] / figures["peft_single"]["tokens_per_s_best"],
    }
    table = format_table(rows, ["method", "s_per_step", "tokens_per_s", "minlora_speedup", "min_s", "speedup_min",
                                "peak_MiB", "step_MiB", "peak_vs_minlora"])
    table += (
        f"\n{cfg.shape.describe()}; "
        f"{cfg.adapters} rank-{cfg.rank} adapters on all 7 projections; {cfg.rows} rows x {cfg.tokens} tokens "
        f"per step; {cfg.dtype} on {cfg.device}, {cfg.threads} threads; median of {cfg.steps} steps"
        f" x {cfg.rounds} round(s)"
        f"\nminlora vs PEFT one adapter after another: {ratios['speedup_vs_peft_sequential']:.2f}x tokens/s "
        f"(fastest steps: {ratios['speedup_vs_peft_sequential_min']:.2f}x; target >= 8x on CPU)"
        f"\nminlora vs PEFT one adapter on all rows:   {ratios['throughput_vs_peft_single']:.2f}x tokens/s "
        f"(fastest steps: {ratios['throughput_vs_peft_single_min']:.2f}x; target >= 0.8x)"
        "\nminlora_speedup = minlora tokens/s / the method's (median steps; speedup_min: fastest steps, the "
        "least disturbed on a shared machine); peak = resident memory during the steps (step = what the "
        "steps add to the set-up)"
    )
    return {"config": asdict(cfg), "device": cfg.device, "figures": figures, "ratios": ratios,
            "samples": samples, "table": table}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainBenchConfig()
    add_shape_arguments(parser, d.shape)
    for name in ("adapters", "rank", "rows", "tokens", "steps", "rounds", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=positive_int, default=getattr(d, name))
    for name in ("warmup", "seed"):
        parser.add_argument(f"--{name}", dest=name, type=int, default=getattr(d, name))
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", type=device_name, default=d.device, help="cpu or cuda")
    parser.add_argument("--in-process", dest="isolate", action="store_false",
                        help="run the contenders in this process (faster start; peak memory then not per contender)")
    add_output_arguments(parser)


def _config(args: argparse.Namespace) -> TrainBenchConfig:
    names = TrainBenchConfig.__dataclass_fields__
    return TrainBenchConfig(shape=shape_from_args(args, TrainBenchConfig().shape),
                            **{k: getattr(args, k) for k in names if hasattr(args, k)})


def run(args: argparse.Namespace) -> int:
    """The command: the table (or JSON) and the --json-out file; returns the exit status."""
    device = require_device(args.device)
    result = bench_train(_config(args), show_progress=not args.no_progress)
    return report(args, "train", result, result.pop("table"), device)
