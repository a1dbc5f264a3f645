"""Timing, machine information, presets and output shared by every `minlora bench` command."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

import minlora

from ..command import output_file

DTYPES = ("float32", "float16", "bfloat16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[int], Any], device: torch.device, *, warmup: int = 3, repeats: int = 20,
              min_seconds: float = 0.0) -> float:
    """Median seconds of fn(i) over `repeats` calls (i counts calls, so fn can rotate inputs).

    CUDA calls are timed with events; CPU calls with perf_counter.
    """
    for i in range(warmup):
        fn(i)
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    i = warmup
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
        i += 1
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda i: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * src.nbytes / seconds


def git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, GPU (name and clocks through nvidia-ml-py), versions and commit, for --json output."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "minlora": minlora.__version__,
        "minlora_cuda_kernels": _cuda_kernels_built(),
        "commit": git_commit(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            info["gpu_clocks_mhz"] = {
                "sm": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "sm_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            }
            info["gpu_driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # nvml is optional: a report without clocks is still a report
            info["gpu_clocks_error"] = str(exc)
    return info


def _cuda_kernels_built() -> Optional[bool]:
    try:
        return bool(minlora._C.cuda_built())
    except ImportError:  # a registry-only install has no extension
        return None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned text table of the given columns."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def progress(items: Iterable[Any], total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar over items (on stderr), or the items alone."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm progress bar to `update(n)` by hand (on stderr), or one that shows nothing."""
    if not enabled:
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, leave=False, mininterval=1.0) as bar:
        yield bar

def add_output_arguments(parser: argparse.ArgumentParser, *, plot: bool = False) -> None:
    """The output options of every benchmark (see minlora.command for what they mean)."""
    parser.add_argument("--json", action="store_true",
                        help="print the results and machine info as JSON on stdout")
    parser.add_argument("--json-out", metavar="FILE", type=output_file,
                        help="write the results and machine info to FILE")
    if plot:
        parser.add_argument("--plot", metavar="FILE.png", type=output_file, help="write a plot to FILE.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def apply_preset(args: argparse.Namespace, presets: Mapping[str, Mapping[str, Any]]) -> None:
    """Fills every option left unset (None) from the preset `args.preset` names; options given
    on the command line win."""
    for name, value in presets[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def report(args: argparse.Namespace, benchmark: str, results: Any, table: str, device: torch.device, *,
           plot: Optional[Callable[[str], None]] = None) -> int:
    """A benchmark's output: the table (or, with --json, the results and machine info as JSON on
    stdout), the --json-out file and the --plot (drawn by `plot(path)`); returns the exit status."""
    payload = {"benchmark": benchmark, "machine": machine_info(device), "results": results}
    if args.json:
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(table)
    # What was written goes to stderr when stdout carries the JSON.
    notes = sys.stderr if args.json else sys.stdout
    if args.json_out:
        write_json(args.json_out, payload)
        print(f"wrote {args.json_out}", file=notes)
    if plot is not None and getattr(args, "plot", None):
        plot(args.plot)
        print(f"wrote {args.plot}", file=notes)
    return 0
