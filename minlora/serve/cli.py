"""`minlora serve`: the Tinker/MinT-compatible HTTP service on a local base model."""
from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["add_arguments", "run"]

_MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the tinker SDK's HTTP API (tinker 0.22, mint 0.2) on a local HuggingFace model: "
        "many users' LoRA adapters trained and sampled in shared mixed-adapter batches, every "
        "checkpoint a registry revision.  Clients: tinker.ServiceClient(base_url=URL, api_key=KEY)."
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the base model: a local HuggingFace directory (save_pretrained); nothing is downloaded")
    parser.add_argument("--model-name", metavar="NAME",
                        help="what clients call the base model (default: the directory's name; the directory's "
                             "path is accepted too)")
    where = parser.add_argument_group("where adapters live (default: the registry under $MINLORA_HOME or ~/.minlora)")
    where.add_argument("--root", metavar="DIR", help="registry root: SQLite database and blobs under DIR")
    where.add_argument("--registry", metavar="URL", help="registry database URL (e.g. postgresql+psycopg://...)")
    where.add_argument("--blobs", metavar="URL", help="blob store path or fsspec URL (with --registry)")
    where.add_argument("--state", metavar="URL",
                       help="database of the service's own tables (default: sqlite under the root, serve.db)")
    net = parser.add_argument_group("network and access")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    net.add_argument("--api-keys", metavar="FILE",
                     help="API keys file: one 'KEY [OWNER]' per line, keys tml-... or sk-... (default: ROOT/api-keys, "
                          "created with one new key if missing); re-read when it changes")
    net.add_argument("--public-url", metavar="URL", help="base URL clients reach the server at (for download links)")
    comp = parser.add_argument_group("compute")
    comp.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    comp.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                      help="model and adapter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    comp.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads (default: torch's choice; fewer is steadier on a shared machine)")
    comp.add_argument("--pool-mib", type=int, default=1024, help="adapter memory (fast tier) in MiB (default: 1024)")
    comp.add_argument("--max-batch-rows", type=int, default=64, help="most sequences decoded at once (default: 64)")
    comp.add_argument("--max-batch-adapters", type=int, default=None,
                      help="most distinct adapters in one decode batch (default: no limit; 1 = one adapter at a time)")
    comp.add_argument("--max-new-tokens", type=int, default=4096, help="most tokens one sample may generate")
    train = parser.add_argument_group("training")
    train.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha of new training clients (default: 32)")
    train.add_argument("--max-lora-rank", type=int, default=128, help="largest LoRA rank a client may ask for")
    limits = parser.add_argument_group("limits and timeouts")
    limits.add_argument("--max-request-mib", type=int, default=64, help="largest request body in MiB (default: 64)")
    limits.add_argument("--session-timeout", type=float, default=120.0,
                        help="seconds without a heartbeat after which a session ends and its adapters are freed")
    limits.add_argument("--long-poll", type=float, default=10.0,
                        help="seconds a retrieve_future call waits for its result before 'try again'")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="what the server logs (default: info)")


def run(args: argparse.Namespace) -> int:
    import torch

    from .config import ServeConfig
    from .server import Server
    from .service import Service

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the registry's migrations at open
    if args.threads is not None:
        if args.threads < 1:
            print("minlora serve: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    config = ServeConfig(
        model_dir=args.model, model_name=args.model_name, root=args.root, registry_url=args.registry,
        blobs_url=args.blobs, state_url=args.state, host=args.host, port=args.port, api_keys_file=args.api_keys,
        device=device, dtype=dtype, pool_bytes=args.pool_mib * _MIB, max_batch_rows=args.max_batch_rows,
        max_batch_adapters=args.max_batch_adapters, max_new_tokens=args.max_new_tokens, lora_alpha=args.lora_alpha,
        max_lora_rank=args.max_lora_rank, max_request_bytes=args.max_request_mib * _MIB,
        session_timeout_s=args.session_timeout, long_poll_s=args.long_poll, public_url=args.public_url,
    )
    try:
        service = Service(config)
        server = Server(service, args.host, args.port, log_level="warning")
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"minlora serve: {exc}", file=sys.stderr)
        return 1
    host = service.host
    print(f"minlora serve: {server.url}", flush=True)
    print(f"  model     {host.name} ({host.directory}; {host.arch}, {host.device}, "
          f"{str(host.dtype).removeprefix('torch.')}, context {host.max_context})")
    print(f"  adapters  {service.registry!r}")
    print(f"  API keys  {config.resolved_keys_file}"
          f"{' (created with one new key)' if service.new_key else ''}")
    print(f"  training  LoRA ranks 1..{config.max_lora_rank}, alpha {config.lora_alpha:g}", flush=True)
    try:
        server.run()
    finally:
        service.close()
    return 0
