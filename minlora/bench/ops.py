"""`minlora bench ops`: the LoRA op against the baselines, side by side, in one run.

Baselines (each computes the same delta y [T, out] from the same adapters):
  loop        PEFT's mixed-batch method: one masked matmul pair per adapter.
  gather_bmm  tokens grouped by adapter, padded to the longest group, two batched matmuls
              over dense per-adapter stacks (the Punica-style "gather + bmm").
  grouped_mm  torch.nn.functional.grouped_mm over tokens sorted by adapter (where available).
  simple      (CUDA) the op forced onto the one-block-per-token fallback kernels.
  minlora     the op, reading paged pools in place; the BatchPlan is built inside the timing.
  (op_us)     the op alone with a plan built beforehand, as each layer of a model runs it.
  (--backward) also fwd_op_us and bwd_op_us: the forward op and lora_backward (x, A and B
              gradients) alone with the plan prebuilt, and bwd_over_fwd, their ratio.

On CUDA minlora, op_us, fwd_op_us and bwd_op_us are timed with no host synchronisation: the
plan is built on the host beforehand (as a serving step does), a round of calls runs between
two CUDA events, and the rounds run under torch.cuda.set_sync_debug_mode("error"), so a
hidden synchronisation fails the benchmark instead of flattering or slowing it.  frac_copy*
are the bytes the op must move over its time, as a fraction of a device-to-device copy's
bandwidth measured once per run (1 GiB on CUDA, read and write counted).

On CUDA the op's kernels can be chosen with MINLORA_CUDA_KERNELS (auto, gather, grouped,
fallback; read on every call); `minlora` runs with the caller's setting, `simple` forces fallback.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import minlora

from ..command import EXIT_USAGE, CommandError, device_name, positive_int, require_device
from .cases import make_case
from .common import DTYPES, add_output_arguments, copy_bandwidth, format_table, progress, report, time_call

# Hidden, key/value and intermediate sizes of real model configs.
PRESETS: dict[str, dict[str, int]] = {
    "llama3-8b": {"hidden": 4096, "kv": 1024, "intermediate": 14336},
    "llama3-70b": {"hidden": 8192, "kv": 1024, "intermediate": 28672},
    "qwen2-7b": {"hidden": 3584, "kv": 512, "intermediate": 18944},
    "mixtral-8x7b": {"hidden": 4096, "kv": 1024, "intermediate": 14336},
}
# projection -> (in, out) in terms of the preset's sizes.
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q": ("hidden", "hidden"),
    "k": ("hidden", "kv"),
    "v": ("hidden", "kv"),
    "o": ("hidden", "hidden"),
    "gate": ("hidden", "intermediate"),
    "up": ("hidden", "intermediate"),
    "down": ("intermediate", "hidden"),
}
METHODS = ("minlora", "loop", "gather_bmm", "grouped_mm", "simple")


def projection_shape(preset: str, projection: str) -> tuple[int, int]:
    sizes = PRESETS[preset]
    src, dst = PROJECTIONS[projection]
    return sizes[src], sizes[dst]


@dataclass(frozen=True)
class OpsConfig:
    in_features: int
    out_features: int
    rank: int
    adapters: int
    tokens_per_adapter: int
    dtype: str = "float32"
    device: str = "cpu"
    backward: bool = False
    label: str = ""


class Problem:
    """One benchmark case in every representation the methods need.

    x [T, in]; dense per-adapter a [N, r, in], b [N, out, r]; the same weights in paged
    pools a_pool [N*r, in], b_pool [N*r, out] with shuffled pages; token_slot [T] unsorted.
    """

    def __init__(self, cfg: OpsConfig, seed: int):
        n, r = cfg.adapters, cfg.rank
        case = make_case(n * cfg.tokens_per_adapter, cfg.in_features, cfg.out_features, [r] * n,
                         getattr(torch, cfg.dtype), extra_rank_columns=0, spare_pages=0, balanced=True,
                         no_adapter_fraction=0.0, nan_unused=False,
                         generator=torch.Generator().manual_seed(seed)).to(cfg.device)
        (self.x, self.a_pool, self.b_pool, self.a_pages, self.b_pages, self.ranks, self.scales,
         self.token_slot) = case.args()
        self.a, self.b = case.dense_weights()
        self.plan = host_plan(self.token_slot, n)

    def weights(self) -> list[torch.Tensor]:
        return [self.a, self.b, self.a_pool, self.b_pool]

    def bytes_moved(self, backward: bool) -> int:
        """Bytes a kernel must move at least: x, the pages used (each once) and y."""
        e = self.x.element_size()
        n = self.x.shape[0] * (self.x.shape[1] + self.b.shape[1]) + self.a_pool.numel() + self.b_pool.numel()
        return n * e * (2 if backward else 1)


def host_plan(token_slot: torch.Tensor, num_slots: int) -> minlora.BatchPlan:
    """The plan of token_slot ([T] int32) built on the host, as a serving step builds it from
    what it knows, then moved to token_slot's device: it carries the longest segment, and its
    construction reads nothing back from the device."""
    plan = minlora.build_plan(token_slot.cpu(), num_slots)
    dev = token_slot.device
    return minlora.BatchPlan(plan.order.to(dev), plan.seg_offsets.to(dev),
                             None if plan.positions is None else plan.positions.to(dev), plan.max_segment)


def run_minlora(p: Problem) -> torch.Tensor:
    plan = minlora.build_plan(p.token_slot, p.ranks.shape[0])
    return minlora.lora(p.x, p.a_pool, p.b_pool, p.a_pages, p.b_pages, p.ranks, p.scales, p.token_slot, plan=plan)


def run_minlora_op(p: Problem) -> torch.Tensor:
    """The op alone, with the step's plan built beforehand (a model builds it once per step
    and every layer reuses it); reported as op_us beside minlora_us, which includes the build."""
    return minlora.lora(p.x, p.a_pool, p.b_pool, p.a_pages, p.b_pages, p.ranks, p.scales, p.token_slot, plan=p.plan)


def run_loop(p: Problem) -> torch.Tensor:
    y = p.x.new_zeros(p.x.shape[0], p.b.shape[1])
    for s in torch.unique(p.token_slot).tolist():
        rows = (p.token_slot == s).nonzero().flatten()
        y = y.index_add(0, rows, (p.x[rows] @ p.a[s].t()) @ p.b[s].t() * p.scales[s].to(p.x.dtype))
    return y


def run_gather_bmm(p: Problem) -> torch.Tensor:
    n = p.a.shape[0]
    slots = p.token_slot.long()
    order = torch.argsort(slots, stable=True)
    counts = torch.bincount(slots, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(slots.shape[0], device=slots.device) - starts[slots[order]]
    longest = int(counts.max())
    x_pad = p.x.new_zeros(n, longest, p.x.shape[1])
    x_pad[slots[order], position] = p.x[order]
    h = torch.bmm(x_pad, p.a.transpose(1, 2)) * p.scales.to(p.x.dtype)[:, None, None]
    y_pad = torch.bmm(h, p.b.transpose(1, 2))
    y = p.x.new_empty(p.x.shape[0], p.b.shape[1])
    y[order] = y_pad[slots[order], position]
    return y


def run_grouped_mm(p: Problem) -> torch.Tensor:
    slots = p.token_slot.long()
    order = torch.argsort(slots, stable=True)
    offs = torch.cumsum(torch.bincount(slots, minlength=p.a.shape[0]), 0).to(torch.int32)
    xs = p.x[order]
    h = torch.nn.functional.grouped_mm(xs, p.a.transpose(1, 2), offs=offs)
    h = h * p.scales.to(p.x.dtype)[slots[order]][:, None]
    ys = torch.nn.functional.grouped_mm(h, p.b.transpose(1, 2), offs=offs)
    y = torch.empty_like(ys)
    y[order] = ys
    return y


def run_simple(p: Problem) -> torch.Tensor:
    """The op on the fallback CUDA kernels (MINLORA_CUDA_KERNELS=fallback for this call).

    The variable is read by the extension at each call, forward and backward, so the
    autograd backward this output feeds must also run under it: see _timed_fn."""
    with kernels("fallback"):
        return run_minlora(p)


class kernels:
    """Context manager: MINLORA_CUDA_KERNELS=<choice> inside, the previous value after."""

    def __init__(self, choice: str):
        self.choice = choice

    def __enter__(self) -> None:
        self.saved = os.environ.get("MINLORA_CUDA_KERNELS")
        os.environ["MINLORA_CUDA_KERNELS"] = self.choice

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            os.environ.pop("MINLORA_CUDA_KERNELS", None)
        else:
            os.environ["MINLORA_CUDA_KERNELS"] = self.saved


RUNNERS: dict[str, Callable[[Problem], torch.Tensor]] = {
    "minlora": run_minlora,
    "loop": run_loop,
    "gather_bmm": run_gather_bmm,
    "grouped_mm": run_grouped_mm,
    "simple": run_simple,
}


def _grad_inputs(p: Problem) -> None:
    for t in [p.x, *p.weights()]:
        t.requires_grad_(True)


def _timed_fn(method: str, problems: Sequence[Problem], backward: bool,
              run: Optional[Callable[[Problem], torch.Tensor]] = None) -> Callable[[int], Any]:
    run = run or RUNNERS[method]
    grads = [torch.randn(p.x.shape[0], p.b.shape[1], device=p.x.device, dtype=p.x.dtype) for p in problems]

    def fn(i: int) -> Any:
        k = i % len(problems)
        if not backward:
            # inference_mode, as a server runs: under no_grad alone the autograd wrapper's
            # Python would be timed with every op (about 5 us a call, a decode kernel's order).
            with torch.inference_mode():
                return run(problems[k])
        p = problems[k]
        for t in [p.x, *p.weights()]:
            t.grad = None
        if method == "simple":
            with kernels("fallback"):
                run(p).backward(grads[k])
        else:
            run(p).backward(grads[k])

    return fn


@contextlib.contextmanager
def no_host_sync(device: torch.device) -> Iterator[None]:
    """Inside: any CUDA call that synchronises the host raises (torch.cuda.set_sync_debug_mode)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


def time_without_sync(fn: Callable[[int], Any], device: torch.device, *, repeats: int, calls: int = 10,
                      warmup: int = 3) -> float:
    """Median seconds of one fn(i) call (i counts calls, so fn can rotate inputs).

    On CUDA each of `repeats` rounds is `calls` back-to-back calls between two CUDA events, and
    all the rounds are issued under no_host_sync before the host waits once for the last event;
    a call that synchronises the host raises RuntimeError naming the benchmark's rule.  On the
    CPU it is common.time_call.
    """
    if device.type != "cuda":
        return time_call(fn, device, warmup=warmup, repeats=repeats)
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    i = warmup
    try:
        with no_host_sync(device):
            for start, end in events:
                start.record()
                for _ in range(calls):
                    fn(i)
                    i += 1
                end.record()
    except RuntimeError as exc:
        if "synchroniz" in str(exc).lower():
            raise RuntimeError(f"the timed op synchronised the host (no sync is allowed in a CUDA op): {exc}") from exc
        raise
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) / 1e3 / calls for start, end in events)


def _op_fn(problems: Sequence[Problem], backward_only: bool) -> Callable[[int], Any]:
    """The forward op (no autograd), or lora_backward alone (x, A and B gradients), with the
    problems' prebuilt plans and a fixed grad_y per problem."""
    grads = [torch.randn(p.x.shape[0], p.b.shape[1], device=p.x.device, dtype=p.x.dtype) for p in problems]

    def fn(i: int) -> Any:
        k = i % len(problems)
        p = problems[k]
        with torch.inference_mode():
            if backward_only:
                return minlora.ops.lora_backward(grads[k], p.x, p.a_pool, p.b_pool, p.a_pages, p.b_pages, p.ranks,
                                                 p.scales, p.token_slot, plan=p.plan)
            return run_minlora_op(p)

    return fn


def _copies(cfg: OpsConfig, problem_bytes: int) -> int:
    """How many independent copies to rotate through so caches do not flatter (at most 4)."""
    cache = 64 << 20 if cfg.device == "cpu" else 128 << 20
    return max(1, min(4, math.ceil(2 * cache / max(problem_bytes, 1))))


def _available(method: str, problem: Problem) -> Optional[str]:
    """None when `method` runs on this problem, else why not."""
    if method == "simple" and problem.x.device.type != "cuda":
        return "the simple kernels are CUDA only"
    if method == "grouped_mm":
        if not hasattr(torch.nn.functional, "grouped_mm"):
            return "torch has no grouped_mm"
        try:
            with torch.no_grad():
                run_grouped_mm(problem)
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            return f"grouped_mm unavailable here: {str(exc).splitlines()[0][:80]}"
    return None


def bench_config(cfg: OpsConfig, *, repeats: int, seed: int = 0, bandwidth: Optional[float] = None) -> dict[str, Any]:
    """Times every method on one configuration; returns one row (times in microseconds)."""
    device = torch.device(cfg.device)
    first = Problem(cfg, seed)
    problems = [first] + [Problem(cfg, seed + k) for k in range(1, _copies(cfg, first.bytes_moved(False)))]
    if cfg.backward:
        for p in problems:
            _grad_inputs(p)
    row: dict[str, Any] = {"config": asdict(cfg), "tokens": first.x.shape[0]}
    with torch.no_grad():
        want = run_minlora(first).double()
    for method in METHODS:
        why = _available(method, first)
        if why is not None:
            row[f"{method}_us"] = None
            row[f"{method}_note"] = why
            continue
        with torch.no_grad():
            err = ((RUNNERS[method](first).double() - want).norm() / want.norm()).item()
        tol = 1e-4 if cfg.dtype == "float32" else 3e-2
        if not err <= tol:
            raise AssertionError(f"{method} disagrees with minlora on {cfg}: relative error {err:.2e}")
        # The baselines synchronise the host by design (the loop's unique(), gather_bmm's longest
        # group); minlora's op must not, and is timed so that it cannot.
        timer = time_without_sync if method == "minlora" else time_call
        seconds = timer(_timed_fn(method, problems, cfg.backward), device, repeats=repeats)
        row[f"{method}_us"] = seconds * 1e6
    # The op alone, its plan built once outside the timing (see run_minlora_op).
    op_fn = _timed_fn("minlora", problems, cfg.backward, run=run_minlora_op)
    row["op_us"] = time_without_sync(op_fn, device, repeats=repeats) * 1e6
    if cfg.backward:
        row["fwd_op_us"] = time_without_sync(_op_fn(problems, False), device, repeats=repeats) * 1e6
        row["bwd_op_us"] = time_without_sync(_op_fn(problems, True), device, repeats=repeats) * 1e6
        row["bwd_over_fwd"] = row["bwd_op_us"] / row["fwd_op_us"]
    mine = row["minlora_us"]
    for method in METHODS[1:]:
        other = row.get(f"{method}_us")
        row[f"x_{method}"] = other / mine if other else None  # speed-up of minlora over the baseline
    moved = first.bytes_moved(cfg.backward)
    row["GB/s"] = moved / (mine * 1e-6) / 1e9
    if bandwidth:
        row["copy_GB/s"] = bandwidth / 1e9
        row["frac_copy"] = moved / (mine * 1e-6) / bandwidth
        row["frac_copy_op"] = moved / (row["op_us"] * 1e-6) / bandwidth
    return row


def run_configs(configs: Sequence[OpsConfig], *, repeats: int = 10, show_progress: bool = True) -> list[dict[str, Any]]:
    """Every config, in one process, with a copy bandwidth measured on the same device first."""
    devices = {c.device for c in configs}
    bandwidth = {d: copy_bandwidth(torch.device(d), **({"nbytes": 1 << 30} if d.startswith("cuda") else {}))
                 for d in devices}
    rows = []
    for cfg in progress(configs, len(configs), "bench ops", show_progress):
        rows.append(bench_config(cfg, repeats=repeats, bandwidth=bandwidth[cfg.device]))
    return rows


TABLE_COLUMNS = ["label", "in", "out", "r", "adapters", "tok/ad", "minlora_us", "op_us", "loop_us", "gather_bmm_us",
                 "grouped_mm_us", "simple_us", "fwd_op_us", "bwd_op_us", "bwd_over_fwd", "x_loop", "x_gather_bmm", "x_grouped_mm", "x_simple", "GB/s",
                 "frac_copy", "frac_copy_op"]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        c = r["config"]
        out.append({
            **r,
            "label": c["label"] + (" +bwd" if c["backward"] else ""),
            "in": c["in_features"],
            "out": c["out_features"],
            "r": c["rank"],
            "adapters": c["adapters"],
            "tok/ad": c["tokens_per_adapter"],
        })
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="llama3-8b", choices=list(PRESETS), help="model sizes")
    parser.add_argument("--proj", nargs="+", default=["q"], choices=[*PROJECTIONS, "all"], help="projections")
    parser.add_argument("--in", dest="in_features", type=positive_int,
                        help="explicit input size (with --out; overrides --preset)")
    parser.add_argument("--out", dest="out_features", type=positive_int, help="explicit output size")
    parser.add_argument("--ranks", type=positive_int, nargs="+", default=[16])
    parser.add_argument("--adapters", type=positive_int, nargs="+", default=[32])
    parser.add_argument("--tokens-per-adapter", type=positive_int, nargs="+", default=[1, 128],
                        help="1 = decode; many = prefill")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (x, A and B gradients)")
    parser.add_argument("--repeats", type=positive_int, default=10)
    add_output_arguments(parser, plot=True)


def run(args: argparse.Namespace) -> int:
    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    if (args.in_features is None) != (args.out_features is None):
        raise CommandError("--in and --out go together", EXIT_USAGE)
    if args.in_features is not None:
        shapes = [(f"{args.in_features}x{args.out_features}", args.in_features, args.out_features)]
    else:
        projs = list(PROJECTIONS) if "all" in args.proj else args.proj
        shapes = [(f"{args.preset}.{p}", *projection_shape(args.preset, p)) for p in projs]
    configs = [
        OpsConfig(i, o, r, n, t, dtype, str(device), args.backward, label)
        for (label, i, o), r, n, t in itertools.product(shapes, args.ranks, args.adapters, args.tokens_per_adapter)
    ]
    rows = run_configs(configs, repeats=args.repeats, show_progress=not args.no_progress)
    shown = table_rows(rows)
    columns = [c for c in TABLE_COLUMNS if any(r.get(c) is not None for r in shown)]
    lines = [format_table(shown, columns), "x_<baseline> = baseline time / minlora time (higher is better for minlora)"]
    lines += sorted({f"note: {k[:-5]}: {v}" for r in rows for k, v in r.items() if k.endswith("_note")})
    return report(args, "ops", rows, "\n".join(lines), device, plot=lambda path: plot(rows, path))


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
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
