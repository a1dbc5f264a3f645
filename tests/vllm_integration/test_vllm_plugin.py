"""The plugin's entry point, opt-in switch and version gate, in fresh processes (what vLLM runs
in each of its own)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from vllm_assets import NEEDS_VLLM

pytest.importorskip("vllm", reason=NEEDS_VLLM)

from minlora.integrations.vllm import SUPPORTED_VLLM_VERSION, check_vllm_version, enabled, register  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MINLORA_VLLM"}
    done = subprocess.run([sys.executable, os.path.join(HERE, "register_probe.py"), mode],
                          env={**environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_point_is_installed():
    points = {p.name: p for p in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert points["minlora"].value == "minlora.integrations.vllm:register"
    assert points["minlora"].load() is register


def test_does_nothing_unless_opted_in_and_refuses_bad_settings():
    report = probe("off")
    stock = report["before"]
    assert stock["wrapper"] == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    assert stock["lm_head"] == "LogitsProcessorWithLoRA"
    assert report["unset"] == report["zero"] == report["after_refusals"] == stock
    assert "ValueError: MINLORA_VLLM='maybe' is not understood" in report["bad_value"]
    assert "RuntimeError" in report["other_version"]
    assert f"supports vLLM {SUPPORTED_VLLM_VERSION} only" in report["other_version"]
    assert "vLLM 0.33.0 is installed" in report["other_version"]


def test_opted_in_through_vllms_plugin_loader():
    report = probe("on", MINLORA_VLLM="1")
    assert report["first"] == report["again"]  # idempotent
    assert report["first"]["wrapper"] == "minlora.integrations.vllm.wrapper.MinloraPunicaWrapper"
    classes = report["first"]["classes"]
    for name in ("MergedQKVParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA",
                 "RowParallelLinearWithLoRA", "ColumnParallelLinearWithLoRA", "ReplicatedLinearWithLoRA"):
        assert f"Paged{name}" in classes and name not in classes
    # Embedding and lm_head stay on vLLM's computation, with the slots that hold weights tracked.
    assert "TrackedVocabParallelEmbeddingWithLoRA" in classes
    assert report["first"]["lm_head"] == "TrackedLogitsProcessorWithLoRA"
    assert "RowParallelLinearWithShardedLoRA" in classes and "FusedMoEWithLoRA" in classes


@pytest.mark.parametrize("value, want", [("1", True), ("true", True), (" ON ", True), ("", False), ("0", False),
                                         ("off", False)])
def test_switch_values(value, want):
    assert enabled({"MINLORA_VLLM": value}) is want
    assert enabled({}) is False


def test_version_gate():
    check_vllm_version()  # the installed one is the supported one
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.0 only .* vLLM 0\.32\.1 is installed"):
        check_vllm_version("0.32.1")
