"""`minlora bench serve`: the service under concurrent tinker clients, side by side in one run.

Sampling: `clients` sampling clients over `adapters` registry adapters (client i samples
adapter i mod adapters), each sending `requests_per_client` requests one after another, all
through the real tinker SDK over loopback.  The same workload runs twice on one server:
decode batches mixing every adapter (minlora's point), and batches of one adapter at a time
(what a server without mixed-adapter batching does).  Figure: generated tokens/s, and the ratio.

Training: `train_clients` training clients each running `train_steps` forward_backward +
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
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

from ..command import device_name, positive_int, require_device
from .common import add_output_arguments, format_table, report

__all__ = ["ServeBenchConfig", "add_arguments", "bench_serve", "run"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEY = "tml-bench-0123456789abcdef"


@dataclass
class ServeBenchConfig:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    heads: int = 8
    vocab: int = 2048
    adapters: int = 16
    rank: int = 8
    clients: int = 32
    requests_per_client: int = 2
    prompt_tokens: int = 16
    new_tokens: int = 64
    train_clients: int = 16
    train_steps: int = 3
    train_datums: int = 2
    train_tokens: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None  # torch's intra-op threads (None: torch's default)
    seed: int = 0


QUICK = dict(hidden=128, intermediate=344, layers=2, heads=4, vocab=512, adapters=4, clients=8, requests_per_client=1,
             new_tokens=8, train_clients=4, train_steps=2, train_tokens=16)


def _model_dir(cfg: ServeBenchConfig, work: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, vocab_size=cfg.vocab,
                         max_position_embeddings=max(512, cfg.prompt_tokens + cfg.new_tokens + 8),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = os.path.join(work, "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def _commit_adapters(service: Any, cfg: ServeBenchConfig) -> list[str]:
    """Random adapters in the service's registry; their tinker:// paths."""
    from ..formats import Adapter, LoraWeights

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    modules = {m: shape for m, shape in service.host.pool.modules.items() if m.rsplit(".", 1)[-1] in PROJECTIONS}
    paths = []
    for i in range(cfg.adapters):
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

    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    samplers = [sc.create_sampling_client(model_path=paths[i % len(paths)]) for i in range(cfg.clients)]
    params = types.SamplingParams(max_tokens=cfg.new_tokens, temperature=0.0, stop=[])

    def client(i: int, requests: int) -> None:
        for r in range(requests):
            prompt = [(3 + i * 31 + r * 7 + j) % cfg.vocab for j in range(cfg.prompt_tokens)]
            out = samplers[i].sample(types.ModelInput.from_ints(prompt), 1, params).result()
            if len(out.sequences[0].tokens) != cfg.new_tokens:
                raise RuntimeError("a sample came back short")

    _concurrently(cfg.clients, lambda i: client(i, 1))  # warm-up: every adapter loaded, every path taken
    rows = []
    tokens = cfg.clients * cfg.requests_per_client * cfg.new_tokens
    for mode, limit in (("mixed-adapter batches", None), ("one adapter at a time", 1)):
        service.engine.max_batch_adapters = limit
        log(f"sampling: {mode} ...")
        before = service.engine.stats()
        seconds = _concurrently(cfg.clients, lambda i: client(i, cfg.requests_per_client))
        after = service.engine.stats()
        steps = after["steps"] - before["steps"]
        rows.append({"workload": f"sampling, {mode}", "clients": cfg.clients, "tokens": tokens,
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

    sc = tinker.ServiceClient(base_url=url, api_key=KEY)
    per_client = cfg.train_steps * cfg.train_datums * cfg.train_tokens

    def data(i: int) -> list:
        seqs = [[(5 + i * 17 + d * 3 + j) % cfg.vocab for j in range(cfg.train_tokens + 1)]
                for d in range(cfg.train_datums)]
        return [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                            loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * cfg.train_tokens}) for s in seqs]

    def round_(n: int) -> float:
        clients = [sc.create_lora_training_client(base_model=service.host.name, rank=cfg.rank, seed=i)
                   for i in range(n)]

        def client(i: int) -> None:
            batch = data(i)
            for _ in range(cfg.train_steps):
                fb = clients[i].forward_backward(batch, "cross_entropy")
                opt = clients[i].optim_step(types.AdamParams(learning_rate=1e-3))
                fb.result()
                opt.result()

        return _concurrently(n, client)

    rows = []
    for n in (cfg.train_clients, 1):
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
            device=cfg.device, dtype=cfg.dtype, max_batch_rows=max(64, cfg.clients), pool_bytes=512 << 20,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeBenchConfig()
    parser.add_argument("--quick", action="store_true", help="a small model and workload (seconds, for smoke tests)")
    parser.add_argument("--clients", type=positive_int, default=d.clients, help="concurrent sampling clients")
    parser.add_argument("--adapters", type=positive_int, default=d.adapters, help="distinct adapters they sample")
    parser.add_argument("--requests-per-client", type=positive_int, default=d.requests_per_client)
    parser.add_argument("--new-tokens", type=positive_int, default=d.new_tokens, help="tokens generated per request")
    parser.add_argument("--prompt-tokens", type=positive_int, default=d.prompt_tokens)
    parser.add_argument("--train-clients", type=positive_int, default=d.train_clients, help="concurrent training clients")
    parser.add_argument("--train-steps", type=positive_int, default=d.train_steps)
    parser.add_argument("--hidden", type=positive_int, default=d.hidden)
    parser.add_argument("--intermediate", type=positive_int, default=d.intermediate)
    parser.add_argument("--vocab", type=positive_int, default=d.vocab)
    parser.add_argument("--layers", type=positive_int, default=d.layers)
    parser.add_argument("--rank", type=positive_int, default=d.rank)
    parser.add_argument("--device", type=device_name, default=d.device, help="cpu or cuda")
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a shared machine)")
    add_output_arguments(parser)


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    cfg = ServeBenchConfig(**(QUICK if args.quick else {}))
    defaults = ServeBenchConfig()
    for name in ("clients", "adapters", "requests_per_client", "new_tokens", "prompt_tokens", "train_clients",
                 "train_steps", "hidden", "intermediate", "vocab", "layers", "rank", "device", "dtype", "threads"):
        value = getattr(args, name)
        if value != getattr(defaults, name):  # an explicit option wins over --quick
            setattr(cfg, name, value)
    if cfg.hidden % cfg.heads:
        cfg.heads = 1
    return cfg


def run(args: argparse.Namespace) -> int:
    """The command: the table (or JSON) and the --json-out file; returns the exit status."""
    device = require_device(args.device)
    result = bench_serve(config_from_args(args), show_progress=not args.no_progress)
    return report(args, "serve", result, result.pop("table"), device)
