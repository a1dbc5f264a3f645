"""The README's "Serve PEFT adapters with vLLM" snippet runs as written, with minlora as vLLM's
LoRA backend, and generates what HF + PEFT would.

The test writes what the snippet names with save_pretrained (a tiny Llama with its tokenizer as
`base`, two PEFT adapters as `alice-lora` and `bob-lora`) and runs the snippet there.  It runs
in vLLM's default dtype (bfloat16 for this float32 model), so instead of token equality with
PEFT's float32 batch, each generated token is checked under teacher forcing: PEFT, given the
same prefix and adapter, ranks it first or within TIE_NATS of its best token.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from vllm_assets import NEEDS_VLLM, base_model, save_adapter, tokenizer

pytest.importorskip("vllm", reason=NEEDS_VLLM)

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "..", "README.md")
HEADING = "## Serve PEFT adapters with vLLM"
ADAPTERS = {"alice": dict(r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            "bob": dict(r=64, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])}
ROW_ADAPTERS = ["alice", None, "bob"]  # the snippet's lora_request list
TIE_NATS = 0.1  # bfloat16 vs float32 log-probability differences stay far below this


def readme_snippet() -> str:
    text = open(README, encoding="utf-8").read()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None and "\n## " not in section[: m.start()], "no ```python block under the heading"
    return m.group(1)


def peft_model(root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(root / "alice-lora"), adapter_name="alice")
    model.load_adapter(str(root / "bob-lora"), adapter_name="bob")
    return model.eval()


@pytest.mark.timeout(900)
def test_readme_snippet_serves_the_adapters(tmp_path):
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 15
    model = base_model("llama")
    model.save_pretrained(tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    for k, (name, spec) in enumerate(ADAPTERS.items()):
        save_adapter(model, spec, str(tmp_path / f"{name}-lora"), seed=200 + k)
    (tmp_path / "snippet.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "MINLORA_VLLM"}  # the snippet turns it on itself
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "run_readme.py"), "snippet.py", "out.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["wrappers"] == ["MinloraPunicaWrapper"]
    printed = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert printed and printed[-1] == repr([row["text"] for row in got["rows"]])

    ref = peft_model(tmp_path)
    worst = 0.0
    for row, adapter in zip(got["rows"], ROW_ADAPTERS):
        assert row["tokens"], row
        ids = torch.tensor([row["prompt"] + row["tokens"]])
        with torch.no_grad():
            logits = ref(ids, adapter_names=[adapter or "__base__"]).logits[0].double()
        logprobs = torch.log_softmax(logits[len(row["prompt"]) - 1:-1], -1)
        chosen = logprobs[torch.arange(len(row["tokens"])), torch.tensor(row["tokens"])]
        gap = float((logprobs.max(-1).values - chosen).max())
        worst = max(worst, gap)
        assert gap <= TIE_NATS, f"{adapter or 'base'} row: a generated token is {gap:.3f} nats below PEFT's best"
    print(f"largest gap to PEFT's best token: {worst:.4f} nats")
