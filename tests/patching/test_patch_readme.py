"""The README's "Patch a HuggingFace model" snippet runs as written, and gives PEFT's logits.

The test writes what the snippet names with save_pretrained: a tiny Llama as `base` and two
PEFT LoRA adapters for it as `alice-lora` and `bob-lora`, in a fresh directory it runs from.
"""
from __future__ import annotations

import copy
import warnings

import torch

from helpers.cases import rel_error
from helpers.patching import Family, adapter_specs, make_peft_adapter, peft_reference, tiny_model
from helpers.readme import readme_snippet

HEADING = "## Patch a HuggingFace model"


def test_readme_snippet_runs_and_matches_peft(tmp_path, monkeypatch):
    code = readme_snippet(HEADING)
    assert len(code.strip().splitlines()) < 15
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    specs = adapter_specs("llama")
    make_peft_adapter(base, specs["a1"], str(tmp_path / "alice-lora"), seed=1)
    make_peft_adapter(base, specs["a2"], str(tmp_path / "bob-lora"), seed=2)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), namespace)

    ref = peft_reference(Family("llama", copy.deepcopy(base), {"alice": "alice-lora", "bob": "bob-lora"}))
    with torch.no_grad():
        want = ref(namespace["input_ids"], adapter_names=["alice", "__base__", "bob"]).logits
    got = namespace["logits"]
    for row in range(3):
        assert rel_error(got[row], want[row]) <= 1e-5
