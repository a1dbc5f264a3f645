"""`minlora bench serve`: the service under concurrent tinker clients, side by side in one run.

Sampling (`SamplingLoad`): `clients` sampling clients over `adapters` registry adapters (client i
samples adapter i mod adapters), each sending `requests_per_client` requests one after another, all
through the real tinker SDK over loopback.  The same workload runs twice on one server:
decode batches mixing every adapter (minlora's point), and batches of one adapter at a time
(what a server without mixed-adapter batching does).  Figure: generated tokens/s, and the ratio.

Training (`TrainingLoad`): `clients` training clients each running `steps` forward_backward +
optim_step steps, concurrently (their requests coalesced into shared Trainer calls) vs one
client alone.  Figure: aggregate training tokens/s, and the ratio.  Needs minlora.train.

The model is a random Llama built from a config (nothing downloaded); adapters are random
rank-`rank` LoRA weights on all seven projections, committed to a throwaway registry.

Columns besides the figures: rows_per_step (sequences per decode step), forward_s (seconds in
decode forwards / in Trainer.forward_backward calls), prefill_s, engine_busy_s (all of the
decode engine's work / all Trainer calls): what the wall time was spent on.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from ..command import device_name, positive_int, require_device
from .common import add_output_arguments, format_table, report
from .llama import PROJECTIONS, LlamaShape, add_shape_arguments, shape_from_args

__all__ = ["ServeBenchConfig", "add_arguments", "bench_serve", "run"]

KEY = "tml-bench-0123456789abcdef"


@dataclass
class SamplingLoad:
    """`clients` sampling clients over `adapters` adapters, `requests_per_client` requests each."""

    clients: int = 32
    adapters: int = 16
    requests_per_client: int = 2
    prompt_tokens: int = 16
    new_tokens: int = 64


@dataclass
class TrainingLoad:
    """`clients` training clients, each `steps` steps of forward_backward (`loss_fn` over `datums`
    sequences of `tokens` tokens) and optim_step (Adam at `learning_rate`)."""

    loss_fn: str = "cross_entropy"
    clients: int = 16
    steps: int = 3
    datums: int = 2
    tokens: int = 64
    learning_rate: float = 1e-3


@dataclass
class ServeBenchConfig:
    shape: LlamaShape = field(default_factory=lambda: LlamaShape(hidden=256, intermediate=688, layers=4, heads=8,
                                                                 kv_heads=8, vocab=2048))
    sampling: SamplingLoad = field(default_factory=SamplingLoad)
    training: TrainingLoad = field(default_factory=TrainingLoad)
    rank: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None  # torch's intra-op threads (None: torch's default)
    seed: int = 0


def quick_config() -> ServeBenchConfig:
    """`--quick`: a small model and workload (seconds, for smoke tests)."""
    return ServeBenchConfig(shape=LlamaShape(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=4, vocab=512),
                            sampling=SamplingLoad(clients=8, adapters=4, requests_per_client=1, new_tokens=8),
                            training=TrainingLoad(clients=4, steps=2, tokens=16))


def _model_dir(cfg: ServeBenchConfig, work: str) -> str:
    model = cfg.shape.build(max_positions=max(512, cfg.sampling.prompt_tokens + cfg.sampling.new_tokens + 8), seed=cfg.seed,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = os.path.join(work, "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def _commit_adapters(service: Any, cfg: ServeBenchConfig) -> list[str]:
    """Random adapters in the service's registry; their tinker:// paths."""
    from ..formats import Adapter, LoraWeights

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    modules = {m: shape for m, shape in service.host.pool.modules.items() if m.rsplit(".", 1)[-1] in PROJECTIONS}
    paths = []
    for i in range(cfg.sampling.adapters):
        weights = {m: LoraWeights(a=torch.randn(cfg.rank, fin, generator=gen) * 0.02,
                                  b=torch.randn(fout, cfg.rank, generator=gen) * 0.02, scale=2.0)
                   for m, (fin, fout) in modules.items()}
        adapter = Adapter(weights, {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": 2 * cfg.rank})
        service.registry.commit(f"bench:u{i}", adapter, provenance={"base_model": service.host.fingerprint})
        paths.append(f"tinker://bench:u{i}/sampler_weights/1")
    return paths


def _concurrently(n: int, fn: Callable[[int], None]) -> float:
    """Runs fn(0..n-1) on n threads started together; the seconds until the last one ends."""
    errors: list[BaseException] = []
    start = threading.Barrier(n + 1)

    def body(i: int) -> None:
        start.wait()
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def _sampling(service: Any, url: str, paths: list[str], cfg: ServeBenchConfig, log: Callable[[str], None]) -> list:
    import tinker
    from tinker import types

    load = cfg.sampling
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    samplers = [sc.create_sampling_client(model_path=paths[i % len(paths)]) for i in range(load.clients)]
    params = types.SamplingParams(max_tokens=load.new_tokens, temperature=0.0, stop=[])

    def client(i: int, requests: int) -> None:
        for r in range(requests):
            prompt = [(3 + i * 31 + r * 7 + j) % cfg.shape.vocab for j in range(load.prompt_tokens)]
            out = samplers[i].sample(types.ModelInput.from_ints(prompt), 1, params).result()
            if len(out.sequences[0].tokens) != load.new_tokens:
                raise RuntimeError("a sample came back short")

    _concurrently(load.clients, lambda i: client(i, 1))  # warm-up: every adapter loaded, every path taken
    rows = []
    tokens = load.clients * load.requests_per_client * load.new_tokens
    for mode, limit in (("mixed-adapter batches", None), ("one adapter at a time", 1)):
        service.engine.max_batch_adapters = limit
        log(f"sampling: {mode} ...")
        before = service.engine.stats()
        seconds = _concurrently(load.clients, lambda i: client(i, load.requests_per_client))
        after = service.engine.stats()
        steps = after["steps"] - before["steps"]
        rows.append({"workload": f"sampling, {mode}", "clients": load.clients, "tokens": tokens,
                     "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "rows_per_step": (after["row_steps"] - before["row_steps"]) / max(steps, 1),
                     "forward_s": (after["decode_s_x1000"] - before["decode_s_x1000"]) / 1000,
                     "prefill_s": (after["prefill_s_x1000"] - before["prefill_s_x1000"]) / 1000,
                     "engine_busy_s": (after["busy_s_x1000"] - before["busy_s_x1000"]) / 1000})
    service.engine.max_batch_adapters = None
    rows[0]["x"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[1]["x"] = 1.0
    return rows


def _training(service: Any, url: str, cfg: ServeBenchConfig, log: Callable[[str], None]) -> list:
    import tinker
    from tinker import types

    load = cfg.training
    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    per_client = load.steps * load.datums * load.tokens

    def data(i: int) -> list:
        seqs = [[(5 + i * 17 + d * 3 + j) % cfg.shape.vocab for j in range(load.tokens + 1)]
                for d in range(load.datums)]
        ones = [1.0] * load.tokens
        # cross_entropy weighs target tokens; the policy losses take sampling logprobs and advantages
        extra = {"weights": ones} if load.loss_fn == "cross_entropy" else {"logprobs": [-1.0] * load.tokens,
                                                                           "advantages": ones}
        return [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                            loss_fn_inputs={"target_tokens": s[1:], **extra}) for s in seqs]

    def round_(n: int) -> float:
        clients = [sc.create_lora_training_client(base_model=service.host.name, rank=cfg.rank, seed=i)
                   for i in range(n)]

        def client(i: int) -> None:
            batch = data(i)
            for _ in range(load.steps):
                fb = clients[i].forward_backward(batch, load.loss_fn)
                opt = clients[i].optim_step(types.AdamParams(learning_rate=load.learning_rate))
                fb.result()
                opt.result()

        return _concurrently(n, client)

    rows = []
    for n in (load.clients, 1):
        log(f"training: {n} client(s) ...")
        before = service.training.scheduler.stats()["seconds"]
        seconds = round_(n)
        after = service.training.scheduler.stats()["seconds"]
        spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("forward_backward", "optim_step")}
        rows.append({"workload": f"training, {n} client{'s' if n > 1 else ''}", "clients": n,
                     "tokens": n * per_client, "seconds": seconds, "tokens_per_s": n * per_client / seconds,
                     "forward_s": spent["forward_backward"], "engine_busy_s": sum(spent.values())})
    rows[0]["x"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    rows[1]["x"] = 1.0
    return rows


def bench_serve(cfg: Optional[ServeBenchConfig] = None, *, show_progress: bool = False) -> dict[str, Any]:
    from ..serve import ServeConfig, Server, Service

    cfg = cfg or ServeBenchConfig()
    # the SDK warns on every long-poll that comes back empty (requests queued behind others do)
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    log = (lambda msg: print(msg, flush=True)) if show_progress else (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="minlora-bench-serve-") as work:
        service = Service(ServeConfig(
            model_dir=_model_dir(cfg, work), root=os.path.join(work, "home"), api_keys={KEY: "bench"},
            device=cfg.device, dtype=cfg.dtype, max_batch_rows=max(64, cfg.sampling.clients), pool_bytes=512 << 20,
            long_poll_s=30.0, session_timeout_s=600.0,
        ))
        with Server(service, "127.0.0.1", 0) as server:
            paths = _commit_adapters(service, cfg)
            rows = _sampling(service, server.url, paths, cfg, log)
            rows += _training(service, server.url, cfg, log)
            stats = service.stats()
    columns = ["workload", "clients", "tokens", "seconds", "tokens_per_s", "x", "rows_per_step", "forward_s", "prefill_s",
               "engine_busy_s"]
    table = format_table(rows, columns)
    table += "\nx = tokens/s relative to the row below it (one adapter at a time / one client)"
    return {"config": dict(asdict(cfg), threads=torch.get_num_threads()), "rows": rows, "table": table,
            "device": cfg.device,
            "engine": stats["engine"], "training_scheduler": stats["training"]}


# The workload options: (option, the part of the config, its field, help).
_LOAD_OPTIONS = (
    ("--clients", "sampling", "clients", "concurrent sampling clients"),
    ("--adapters", "sampling", "adapters", "distinct adapters they sample"),
    ("--requests-per-client", "sampling", "requests_per_client", "requests each sampling client sends"),
    ("--new-tokens", "sampling", "new_tokens", "tokens generated per request"),
    ("--prompt-tokens", "sampling", "prompt_tokens", "prompt tokens per request"),
    ("--train-clients", "training", "clients", "concurrent training clients"),
    ("--train-steps", "training", "steps", "forward_backward + optim_step steps per training client"),
)
LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeBenchConfig()
    parser.add_argument("--quick", action="store_true", help="a small model and workload (seconds, for smoke tests)")
    for option, part, name, text in _LOAD_OPTIONS:
        parser.add_argument(option, dest=f"{part}_{name}", type=positive_int, default=None,
                            help=f"{text} (default {getattr(getattr(d, part), name)})")
    parser.add_argument("--train-loss", choices=LOSS_FNS, default=None,
                        help=f"the training clients' loss (default {d.training.loss_fn})")
    add_shape_arguments(parser, d.shape)
    parser.add_argument("--rank", type=positive_int, default=d.rank)
    parser.add_argument("--device", type=device_name, default=d.device, help="cpu or cuda")
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    add_output_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    """The options' config: --quick's or the default, with every option given on the command line."""
    cfg = quick_config() if args.quick else ServeBenchConfig()
    for _, part, name, _ in _LOAD_OPTIONS:
        value = getattr(args, f"{part}_{name}")
        if value is not None:
            setattr(getattr(cfg, part), name, value)
    if args.train_loss is not None:
        cfg.training.loss_fn = args.train_loss
    defaults = ServeBenchConfig()
    for name in ("rank", "device", "dtype", "threads"):
        value = getattr(args, name)
        if value != getattr(defaults, name):  # an explicit option wins over --quick
            setattr(cfg, name, value)
    cfg.shape = shape_from_args(args, cfg.shape)
    return cfg


def run(args: argparse.Namespace) -> int:
    """The command: the table (or JSON) and the --json-out file; returns the exit status."""
    device = require_device(args.device)
    result = bench_serve(config_from_args(args), show_progress=not args.no_progress)
    return report(args, "serve", result, result.pop("table"), device)
