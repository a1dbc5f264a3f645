"""scripts/gpu_check.sh and scripts/gpu_summary.py, on the CPU: the plan fits each stage's budget,
a dry run writes its logs and a valid stage file, and the collector's summary has the exact
schema with the right met flags.  (The GPU run itself is the script's job on a GPU machine.)"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
SUMMARY = REPO / "scripts" / "gpu_summary.py"
STAGE_STEPS = {
    "correct": ["info", "deps", "headers", "build", "import", "tests", "keep_build"],
    "perf": ["info", "deps", "reuse", "memcheck", "racecheck", "bench_decode", "bench_prefill", "bench_backward", "bench_model"],
}


def gpu_summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=full)


def parse_plan(text: str) -> list[dict]:
    """[{"variant", "budget", "total", "steps": [(name, limit)]}] from `gpu_check.sh --plan`."""
    plans = []
    for line in text.splitlines():
        words = line.split()
        if words[0] == "stage":
            variant = words[2] if words[2] != "budget" else ""
            plans.append({"variant": variant, "budget": int(words[words.index("budget") + 1]),
                          "total": int(words[words.index("total") + 1]), "steps": []})
        elif words[0] == "step":
            plans[-1]["steps"].append((words[1], int(words[2])))
    return plans


def test_script_syntax():
    for script in ("gpu_check.sh", "prepare_gpu_carry.sh"):
        done = subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("stage", ["correct", "perf"])
def test_step_limits_fit_each_stage_budget(stage):
    done = run_script("--plan", stage)
    assert done.returncode == 0, done.stderr
    plans = parse_plan(done.stdout)
    assert [p["variant"] for p in plans] == ([""] if stage == "correct" else ["", "with_build"])
    for plan in plans:
        limits = [limit for _, limit in plan["steps"]]
        assert sum(limits) == plan["total"] <= plan["budget"] <= 570, plan
        assert all(limit > 0 for limit in limits)
    # A stage is one device call of about 5 minutes; perf on a machine without the build is the exception.
    assert plans[0]["budget"] <= 300
    names = [name for name, _ in plans[0]["steps"]]
    assert names == STAGE_STEPS[stage] + ["collect"]
    if stage == "perf":
        assert [n for n, _ in plans[1]["steps"]] == ["info", "deps", "reuse", "headers", "build", "import", *names[3:]]


def test_plan_over_budget_is_refused(tmp_path):
    done = run_script("--plan", "correct", env={"GPU_CHECK_BUDGET_S": "120"})
    assert done.returncode == 3
    assert "step limits add up to 300s, over the 120s budget" in done.stderr
    # A run is refused before it starts anything.
    out = tmp_path / "out"
    done = run_script(str(out), "correct", env={"GPU_CHECK_BUDGET_S": "120", "GPU_CHECK_DRY_RUN": "1"})
    assert done.returncode == 3 and "over the 120s budget" in done.stderr and not out.exists()


def test_bad_arguments_print_usage(tmp_path):
    for args in ([], [str(tmp_path)], [str(tmp_path), "bench"], ["--plan", "nope"]):
        done = run_script(*args)
        assert done.returncode == 2 and "usage:" in done.stderr, args


def dry_run(tmp_path: Path, stage: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / stage
    env = {"GPU_CHECK_DRY_RUN": "1", "CUTLASS_DIR": str(tmp_path), "GPU_CARRY_DIR": str(tmp_path / "carry"), **env}
    done = run_script(str(out), stage, env=env)
    return done, out


def test_carried_wheels_install_into_their_own_folder_and_every_import_is_checked(tmp_path):
    wheels = tmp_path / "carry" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "google_re2-1.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"PK")
    done, out = dry_run(tmp_path, "correct")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "correct.log").read_text()
    deps = next(line for line in log.splitlines() if "] deps: start" in line)
    assert "scripts/gpu_deps.py --target" in deps
    assert f"--wheel {wheels / 'google_re2-1.1-cp312-cp312-manylinux_2_28_x86_64.whl'}" in deps
    for module in ("torch", "transformers", "peft", "safetensors", "re2", "hypothesis", "pytest_timeout"):
        assert f" {module}" in deps, module


def test_deps_installs_wheels_into_the_target_and_names_what_does_not_import(tmp_path):
    script = REPO / "scripts" / "gpu_deps.py"
    wheel = make_wheel(tmp_path, "carried_probe", "VALUE = 42\n")
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, str(script), "--target", str(target), "--wheel", str(wheel),
                           "json", "carried_probe"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "carried_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    assert "these import: json carried_probe" in done.stdout
    done = subprocess.run([sys.executable, str(script), "--target", str(target), "json", "no_such_module_here"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "missing on this machine: no_such_module_here (ModuleNotFoundError" in done.stderr
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    done = subprocess.run([sys.executable, str(script), "--target", str(target), "--wheel", str(tmp_path / "broken.whl"),
                           "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "installing the carried wheels failed" in done.stderr


def make_wheel(folder: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel holding the package `name` with __init__.py = source."""
    import zipfile
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_time_a_step_leaves_unused_goes_to_the_steps_after_it(tmp_path):
    # In a dry run every step takes about no time, so the tests get the budget less what the
    # steps after them need (keep_build 5 + collect 5), not only their own limit.
    done, out = dry_run(tmp_path, "correct")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "correct.log").read_text()
    limits = dict(re.findall(r"\] (\w+): start \(limit (\d+)s\)", log))
    plan = dict(parse_plan(run_script("--plan", "correct").stdout)[0]["steps"])
    assert plan["info"] - 2 <= int(limits["info"]) <= plan["info"]  # the stage's start-up may cross a second
    assert 280 <= int(limits["tests"]) <= 300 - plan["keep_build"] - plan["collect"]
    assert int(limits["tests"]) > plan["tests"]


@pytest.mark.parametrize("stage", ["correct", "perf"])
def test_dry_run_writes_logs_and_a_valid_stage_file(tmp_path, stage):
    done, out = dry_run(tmp_path, stage, GPU_CHECK_COMMIT="abc123")
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # a device call returns at most 8 files
    assert {f"{stage}.json", f"{stage}.log", "summary.json", "summary.md"} <= set(files)
    data = json.loads((out / f"{stage}.json").read_text())
    assert data["stage"] == stage and data["status"] == "pass"
    assert data["commit"] == "abc123" and data["gpu_name"] == "dry run"
    plan = dict(parse_plan(run_script("--plan", stage).stdout)[0]["steps"])
    assert [s["name"] for s in data["steps"]] == STAGE_STEPS[stage]
    for step in data["steps"]:
        assert step["limit_s"] == plan[step["name"]]
        assert step["status"] in ("pass", "not_needed"), step
    assert data["budget_s"] == 300 and data["limits_total_s"] <= data["budget_s"]
    log = (out / f"{stage}.log").read_text()
    for name in STAGE_STEPS[stage]:
        assert f"] {name}: " in log, name
    # Each step's command went to its own log (in a dry run, as the command line).
    step_log = out / ("pytest.log" if stage == "correct" else "bench.log")
    assert "[dry run]" in step_log.read_text()
    if stage == "correct":
        assert "-m pytest -m cuda -rfE -v" in (out / "pytest.log").read_text()
        assert "tests/ops/test_ops_cuda.py" in (out / "pytest.log").read_text()
    else:
        text = (out / "bench.log").read_text()
        assert "--adapters 64 256 --tokens-per-adapter 1" in text and "--backward" in text
        assert "bench model --device cuda" in text
        sanitizer = (out / "sanitizer.log").read_text()
        assert "compute-sanitizer --tool racecheck" in sanitizer and "gpu_sanitize_case.py cuda --light" in sanitizer
        assert "env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck" in sanitizer
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"gpu_name", "commit", "date", "stages", "targets"}
    assert summary["stages"][stage] == "pass"


def test_dry_run_failing_step_fails_the_stage(tmp_path):
    done, out = dry_run(tmp_path, "correct", GPU_CHECK_DRY_FAIL="tests")
    assert done.returncode == 1
    data = json.loads((out / "correct.json").read_text())
    assert data["status"] == "fail"
    assert {s["name"]: s["status"] for s in data["steps"]}["tests"] == "fail"
    assert json.loads((out / "summary.json").read_text())["stages"] == {"correct": "fail", "perf": None}


def test_dry_run_perf_without_a_build_builds_first(tmp_path):
    done, out = dry_run(tmp_path, "perf", GPU_CHECK_DRY_FAIL="reuse memcheck")
    assert done.returncode == 1
    data = json.loads((out / "perf.json").read_text())
    steps = {s["name"]: s["status"] for s in data["steps"]}
    assert steps["reuse"] == "rebuilt" and steps["build"] == "pass" and steps["memcheck"] == "fail"
    assert data["budget_s"] == 445 and data["limits_total_s"] <= data["budget_s"]
    # The build logs into perf.log: with the two benchmark files a real run adds, at most 8.
    files = {p.name for p in out.iterdir()}
    assert "build.log" not in files and len(files | {"bench_ops.json", "bench_model.json"}) <= 8, files
    assert "==== build: " in (out / "perf.log").read_text()


def test_sanitizer_case_runs_on_the_cpu_kernels():
    """The case compute-sanitizer runs on the GPU computes what the reference does (here on the CPU)."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_sanitize_case.py"), "cpu"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("cases pass") == 4 and "sanitize case done" in done.stdout
    assert "mode grouped: 6 cases pass" in done.stdout
    # racecheck's lighter run: the bfloat16 cases only, no one-token segments forced through the grouped GEMM.
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_sanitize_case.py"), "cpu", "--light"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mode auto: 4 cases pass" in done.stdout and "mode grouped: 3 cases pass" in done.stdout


# ---------------------------------------------------------------- the collector


def ops_row(adapters, tokens, *, backward=False, rank=16, **figures):
    return {"config": {"adapters": adapters, "tokens_per_adapter": tokens, "backward": backward, "rank": rank,
                       "label": "llama3-8b.q"}, **figures}


def write_inputs(directory: Path, *, perf_status="pass", model=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stage = {"gpu_name": "NVIDIA H200", "commit": "c0ffee", "steps": []}
    (directory / "correct.json").write_text(json.dumps({**stage, "stage": "correct", "status": "pass",
                                                        "date": "2026-12-01T10:00:00+00:00"}))
    (directory / "perf.json").write_text(json.dumps({**stage, "stage": "perf", "status": perf_status,
                                                     "date": "2026-12-01T10:06:00+00:00"}))
    rows = [
        ops_row(64, 1, x_loop=25.0, x_gather_bmm=2.5, frac_copy_op=0.5),
        ops_row(256, 1, x_loop=90.0, x_gather_bmm=4.0, frac_copy_op=0.86),
        ops_row(256, 1, frac_copy_op=0.90),          # a second shape: the worst one counts
        ops_row(4, 512, frac_copy_op=0.69),
        ops_row(4, 512, frac_copy_op=0.75),
        ops_row(64, 128, backward=True, bwd_over_fwd=1.7),
        ops_row(64, 1, rank=8, x_gather_bmm=0.1),  # not rank 16: no target looks at it
    ]
    (directory / "bench_ops.json").write_text(json.dumps({"benchmark": "ops", "results": rows}))
    if model is not None:
        (directory / "bench_model.json").write_text(json.dumps({"benchmark": "model", "results": model}))


def test_collector_summary_schema_and_met_flags(tmp_path):
    write_inputs(tmp_path / "run", model={"decode_graph": {"graph_over_floor": 1.08}})
    out = tmp_path / "results" / "summary.json"
    md = tmp_path / "summary.md"
    done = subprocess.run([sys.executable, str(SUMMARY), "summarize", "--out", str(out), "--markdown", str(md),
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert set(summary) == {"gpu_name", "commit", "date", "stages", "targets"}
    assert summary["gpu_name"] == "NVIDIA H200" and summary["commit"] == "c0ffee"
    assert summary["date"] == "2026-12-01T10:06:00+00:00"
    assert summary["stages"] == {"correct": "pass", "perf": "pass"}
    targets = summary["targets"]
    assert all(set(t) == {"value", "target", "met"} for t in targets.values())
    assert targets == {
        "decode_256_adapters_copy_fraction": {"value": 0.86, "target": 0.85, "met": True},
        "decode_64_adapters_vs_loop": {"value": 25.0, "target": 20.0, "met": True},
        "decode_64_adapters_vs_gather_bmm": {"value": 2.5, "target": 3.0, "met": False},
        "prefill_512_copy_fraction": {"value": 0.69, "target": 0.70, "met": False},
        "backward_over_forward": {"value": 1.7, "target": 2.0, "met": True},
        "patched_decode_graph_over_floor": {"value": 1.08, "target": 1.10, "met": True},
    }
    table = md.read_text()
    assert "| decode_64_adapters_vs_gather_bmm | 2.5 | >= 3.0 | no |" in table
    assert "| backward_over_forward | 1.7 | <= 2.0 | yes |" in table
    assert table == done.stdout


def test_collector_missing_figures_and_unfinished_stages(tmp_path):
    m = gpu_summary()
    write_inputs(tmp_path / "a", perf_status="running")
    (tmp_path / "a" / "bench_ops.json").write_text(json.dumps({"results": [ops_row(256, 1, frac_copy_op=None)]}))
    summary = m.summarize([str(tmp_path / "a")], commit="given")
    assert summary["commit"] == "given"
    assert summary["stages"] == {"correct": "pass", "perf": "fail"}  # a stage cut short failed
    for t in summary["targets"].values():
        assert t["value"] is None and t["met"] is False
    # Nothing at all: no stages, no figures.
    empty = m.summarize([str(tmp_path / "nothing")])
    assert empty["stages"] == {"correct": None, "perf": None} and empty["gpu_name"] is None


def test_collector_later_inputs_win_and_bench_files_merge(tmp_path):
    m = gpu_summary()
    write_inputs(tmp_path / "correct_call")
    write_inputs(tmp_path / "perf_call", perf_status="fail")
    (tmp_path / "perf_call" / "correct.json").unlink()
    summary = m.summarize([str(tmp_path / "correct_call"), str(tmp_path / "perf_call")])
    assert summary["stages"] == {"correct": "pass", "perf": "fail"}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"machine": {"gpu": "X"}, "results": [ops_row(64, 1)]}))
    b.write_text(json.dumps({"machine": {"gpu": "Y"}, "results": [ops_row(4, 512), ops_row(4, 1024)]}))
    merged = m.merge_bench([str(a), str(b), str(tmp_path / "missing.json")])
    assert merged["machine"] == {"gpu": "X"} and [r["run"] for r in merged["results"]] == ["a.json", "b.json", "b.json"]


def test_stage_file_from_recorded_steps(tmp_path):
    m = gpu_summary()
    steps = tmp_path / "steps.tsv"
    steps.write_text("info\t10\t0\t1\tpass\nmemcheck\t60\tmissing\t0\tunsupported\nbench_decode\t55\t124\t55\ttimeout\n")
    info = tmp_path / "info.txt"
    info.write_text("gpu_name=NVIDIA H200\ncommit=\n")
    args = m.argparse.Namespace(stage="perf", state="done", steps=str(steps), budget=300, elapsed=70, info=str(info),
                                junit=str(tmp_path / "none.xml"), commit=None)
    data = m.stage_file(args)
    assert data["status"] == "fail" and data["gpu_name"] == "NVIDIA H200" and data["commit"] is None
    assert [s["rc"] for s in data["steps"]] == [0, "missing", 124] and data["limits_total_s"] == 125
    steps.write_text("info\t10\t0\t1\tpass\nmemcheck\t60\tmissing\t0\tunsupported\n")
    assert m.stage_file(args)["status"] == "pass"  # an unsupported sanitizer does not fail the stage
    args.state = "running"
    assert m.stage_file(args)["status"] == "running"
