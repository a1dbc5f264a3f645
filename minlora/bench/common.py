"""Timing, machine information and output shared by every `minlora bench` command."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

import minlora


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
        "minlora_cuda_kernels": bool(minlora._C.cuda_built()),
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
