"""vLLM's offline LLM with minlora as its LoRA backend equals HF + PEFT's mixed batch (fp32):
greedy tokens and log-probabilities of every row, adapter rows and base rows alike, on Llama
and Qwen2, with six adapters of ranks 1 to 64 (rsLoRA, rank_pattern, alpha_pattern, some
slices not targeted) through four slots, so the scheduler batches rows of different lengths
and adapters continuously and slots change adapters between steps.  The worker's layers
record each slot's true rank on each slice."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import pytest

from vllm_assets import ADAPTERS, NEEDS_VLLM, Assets, compare, mixed_rows, peft_greedy

pytest.importorskip("vllm", reason=NEEDS_VLLM)

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_LORAS = 4
LAST = ["r1", "r64", "rp", "r16"]  # the adapters of the run's final batch, so they hold the four slots
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def run_vllm(assets: Assets, rows, workdir, **env: str) -> dict:
    assets.save(str(workdir / "assets.json"))
    (workdir / "rows.json").write_text(json.dumps([asdict(r) for r in rows]))
    out = workdir / "out.json"
    cmd = [sys.executable, os.path.join(HERE, "run_offline.py"), str(workdir / "assets.json"),
           str(workdir / "rows.json"), str(out), "--max-loras", str(MAX_LORAS), "--last", *LAST]
    done = subprocess.run(cmd, env={**os.environ, **env}, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def true_rank(adapter: str, module: str) -> int:
    """The rank PEFT gives `adapter` on `module` (e.g. model.layers.1.self_attn.q_proj)."""
    spec = ADAPTERS[adapter]
    if module.rsplit(".", 1)[-1] not in spec["target_modules"]:
        return 0
    for key, rank in spec.get("rank_pattern", {}).items():
        if re.search(rf"(^|\.){re.escape(key)}$", module):
            return rank
    return spec["r"]


def expected_slot_ranks(layer_name: str) -> Counter:
    """The multiset of per-slice rank columns the four slots must hold for one vLLM layer."""
    prefix, packed = layer_name.rsplit(".", 1)
    subs = PACKED.get(packed, [packed])
    return Counter(tuple(true_rank(a, f"{prefix}.{s}") for s in subs) for a in LAST)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_offline_mixed_batch_matches_peft(arch, request, tmp_path):
    assets: Assets = request.getfixturevalue(f"{arch}_assets")
    rows = mixed_rows(list(assets.adapters), seed={"llama": 1, "qwen2": 2}[arch])
    want = peft_greedy(assets, rows)
    got = run_vllm(assets, rows, tmp_path, MINLORA_VLLM="1")

    assert len(rows) == 24 and sum(r.adapter is None for r in rows) == 6
    assert compare(rows, want, got["rows"]) == []

    layers = got["layers"]
    linear = {n: v for n, v in layers.items() if n.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))}
    assert len(linear) == 4 * 2
    assert {v["wrapper"] for v in layers.values()} == {"MinloraPunicaWrapper"}
    # No LoRA layer of vLLM's own is left: linear ones are paged, embedding and lm_head tracked.
    assert all(v["layer"].startswith(("Paged", "Tracked")) for v in layers.values()), layers
    if arch == "llama":  # vLLM wraps Llama's embedding and lm_head too (not Qwen2's)
        assert layers["model.embed_tokens"]["layer"] == "TrackedVocabParallelEmbeddingWithLoRA"
        assert layers["logits_processor"]["layer"] == "TrackedLogitsProcessorWithLoRA"
    for name, info in linear.items():
        assert info["layer"].startswith("Paged"), name
        columns = Counter(tuple(col) for col in zip(*info["ranks"]))
        assert columns == expected_slot_ranks(name), name
