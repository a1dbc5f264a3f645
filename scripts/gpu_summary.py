"""The stage files of scripts/gpu_check.sh and the summary that merges them (standard library only:
it runs on the GPU machine whatever state the build is in, and here on what came back).

  gpu_summary.py stage --stage S --state running|done --steps TSV --budget N --elapsed N --out FILE
                 [--info FILE] [--junit FILE] [--commit SHA]      writes OUTDIR/<stage>.json
  gpu_summary.py merge-bench --out FILE IN.json...                merges `minlora bench ops` JSON files
  gpu_summary.py summarize --out summary.json [--markdown FILE] [--commit SHA] DIR_OR_FILE...
                 merges correct.json, perf.json, bench_ops.json and bench_model.json (later
                 arguments win) into
                 {"gpu_name", "commit", "date", "stages": {"correct", "perf"}, "targets": {NAME: {"value", "target", "met"}}}

A stage is "pass" when it finished and every step passed (or was "unsupported" / "not_needed" /
"rebuilt"), "fail" otherwise (a stage file still "running" was cut short), null when absent.
A target with no figure has value null and met false.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any, Callable, Iterable, Optional

STAGES = ("correct", "perf")
OK_STEP_STATUSES = {"pass", "unsupported", "not_needed", "rebuilt"}
# name -> (target, "min" | "max"): "min" means value >= target is met, "max" value <= target.
TARGETS: dict[str, tuple[float, str]] = {
    "decode_256_adapters_copy_fraction": (0.85, "min"),
    "decode_64_adapters_vs_loop": (20.0, "min"),
    "decode_64_adapters_vs_gather_bmm": (3.0, "min"),
    "prefill_512_copy_fraction": (0.70, "min"),
    "backward_over_forward": (2.0, "max"),
    "patched_decode_graph_over_floor": (1.10, "max"),
}
# Where `minlora bench model --device cuda --json-out` puts the CUDA-graph decode step's time
# over the memory-traffic floor: results[MODEL_GRAPH_KEY][MODEL_FLOOR_KEY].
MODEL_GRAPH_KEY = "decode_graph"
MODEL_FLOOR_KEY = "graph_over_floor"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # a reader (or a killed run) never sees half a file


# ---------------------------------------------------------------- stage files


def read_steps(path: str) -> list[dict[str, Any]]:
    """The steps gpu_check.sh recorded: name, limit, rc, seconds, status (one tab-separated line each)."""
    steps = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            name, limit, rc, seconds, status = line.rstrip("\n").split("\t")
            steps.append({"name": name, "limit_s": int(limit), "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                          "seconds": int(seconds), "status": status})
    return steps


def read_info(path: Optional[str]) -> dict[str, str]:
    info: dict[str, str] = {}
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                key, sep, value = line.rstrip("\n").partition("=")
                if sep:
                    info[key] = value.strip()
    return info


def read_junit(path: Optional[str]) -> Optional[dict[str, Any]]:
    if not path or not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed[:50]}


def stage_status(state: str, steps: list[dict[str, Any]]) -> str:
    if state != "done":
        return "running"
    return "pass" if steps and all(s["status"] in OK_STEP_STATUSES for s in steps) else "fail"


def stage_file(args: argparse.Namespace) -> dict[str, Any]:
    steps = read_steps(args.steps)
    info = read_info(args.info)
    payload = {
        "stage": args.stage,
        "status": stage_status(args.state, steps),
        "gpu_name": info.get("gpu_name") or None,
        "commit": args.commit or info.get("commit") or None,
        "date": now(),
        "budget_s": args.budget,
        "limits_total_s": sum(s["limit_s"] for s in steps),
        "elapsed_s": args.elapsed,
        "steps": steps,
    }
    tests = read_junit(args.junit)
    if tests is not None:
        payload["tests"] = tests
    return payload


# ---------------------------------------------------------------- bench files


def merge_bench(paths: Iterable[str]) -> dict[str, Any]:
    """One `bench ops` payload holding the rows of every file (each row keeps its machine's file)."""
    merged: dict[str, Any] = {"benchmark": "ops", "machine": None, "results": []}
    for path in paths:
        data = load(path)
        if data is None:
            continue
        merged["machine"] = merged["machine"] or data.get("machine")
        for row in data.get("results", []):
            merged["results"].append({**row, "run": os.path.basename(path)})
    return merged


def _figure(rows: list[dict[str, Any]], key: str, pick: Callable[[list[float]], float]) -> Optional[float]:
    """pick() of rows' `key`, or None when there is no row or one of them lacks the figure."""
    values = [r.get(key) for r in rows]
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return None
    return float(pick(values))


def target_values(ops: Optional[dict[str, Any]], model: Optional[dict[str, Any]]) -> dict[str, Optional[float]]:
    """The figure behind each target; each is the worst over the rows it covers."""
    rows = (ops or {}).get("results", [])

    def cfg(r: dict[str, Any], key: str) -> Any:
        return r.get("config", {}).get(key)

    fwd = [r for r in rows if not cfg(r, "backward")]
    decode = [r for r in fwd if cfg(r, "tokens_per_adapter") == 1 and cfg(r, "rank") == 16]
    dec256 = [r for r in decode if (cfg(r, "adapters") or 0) >= 256]
    dec64 = [r for r in decode if cfg(r, "adapters") == 64]
    prefill = [r for r in fwd if (cfg(r, "tokens_per_adapter") or 0) >= 512]
    bwd = [r for r in rows if cfg(r, "backward") and cfg(r, "adapters") == 64 and cfg(r, "tokens_per_adapter") == 128]
    results = (model or {}).get("results")
    graph = results.get(MODEL_GRAPH_KEY) if isinstance(results, dict) else None
    floor = graph.get(MODEL_FLOOR_KEY) if isinstance(graph, dict) else None
    return {
        "decode_256_adapters_copy_fraction": _figure(dec256, "frac_copy_op", min),
        "decode_64_adapters_vs_loop": _figure(dec64, "x_loop", min),
        "decode_64_adapters_vs_gather_bmm": _figure(dec64, "x_gather_bmm", min),
        "prefill_512_copy_fraction": _figure(prefill, "frac_copy_op", min),
        "backward_over_forward": _figure(bwd, "bwd_over_fwd", max),
        "patched_decode_graph_over_floor": float(floor) if isinstance(floor, (int, float)) else None,
    }


def targets(ops: Optional[dict[str, Any]], model: Optional[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, value in target_values(ops, model).items():
        goal, sense = TARGETS[name]
        met = value is not None and (value >= goal if sense == "min" else value <= goal)
        out[name] = {"value": value, "target": goal, "met": met}
    return out


# ---------------------------------------------------------------- the summary


def gather_inputs(paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{"correct", "perf", "bench_ops", "bench_model"} -> payload, from directories or files."""
    found: dict[str, dict[str, Any]] = {}
    names = {f"{s}.json": s for s in STAGES} | {"bench_ops.json": "bench_ops", "bench_model.json": "bench_model"}
    for path in paths:
        files = [os.path.join(path, n) for n in names] if os.path.isdir(path) else [path]
        for f in files:
            kind = names.get(os.path.basename(f))
            data = load(f) if kind else None
            if data is not None:
                found[kind] = data
    return found


def summarize(paths: Iterable[str], commit: Optional[str] = None) -> dict[str, Any]:
    found = gather_inputs(paths)
    stage_files = [found[s] for s in STAGES if s in found]
    machine = (found.get("bench_ops") or found.get("bench_model") or {}).get("machine") or {}

    def first(key: str) -> Optional[str]:
        return next((s[key] for s in stage_files if s.get(key)), None)

    stages = {}
    for s in STAGES:
        status = found[s].get("status") if s in found else None
        stages[s] = None if status is None else ("pass" if status == "pass" else "fail")
    return {
        "gpu_name": first("gpu_name") or machine.get("gpu"),
        "commit": commit or first("commit") or machine.get("commit"),
        "date": max((s["date"] for s in stage_files if s.get("date")), default=None) or now(),
        "stages": stages,
        "targets": targets(found.get("bench_ops"), found.get("bench_model")),
    }


def markdown(summary: dict[str, Any]) -> str:
    """The short table for the README."""

    def fmt(v: Any) -> str:
        return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    stages = ", ".join(f"{k}: **{v or 'not run'}**" for k, v in summary["stages"].items())
    lines = [f"GPU check on {summary['gpu_name'] or 'unknown GPU'}, commit {str(summary['commit'] or '?')[:10]}, "
             f"{summary['date']}: {stages}.", "",
             "| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in summary["targets"].items():
        sense = ">=" if TARGETS[name][1] == "min" else "<="
        lines.append(f"| {name} | {fmt(t['value'])} | {sense} {t['target']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--state", required=True, choices=("running", "done"))
    p.add_argument("--steps", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--info")
    p.add_argument("--junit")
    p.add_argument("--commit")
    p = sub.add_parser("merge-bench")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p = sub.add_parser("summarize")
    p.add_argument("--out", required=True)
    p.add_argument("--markdown")
    p.add_argument("--commit")
    p.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "stage":
        write(args.out, stage_file(args))
    elif args.command == "merge-bench":
        write(args.out, merge_bench(args.inputs))
    else:
        summary = summarize(args.inputs, args.commit)
        write(args.out, summary)
        table = markdown(summary)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
