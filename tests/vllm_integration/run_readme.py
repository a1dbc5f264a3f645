"""Runs the README's vLLM snippet as written (a subprocess of test_vllm_readme.py, in the
folder holding what the snippet names), then writes what it generated and which LoRA
backend vLLM's worker used.

    python run_readme.py SNIPPET.py OUT.json
"""
from __future__ import annotations

import json
import sys

from worker_probe import inspect_lora_layers


def main(snippet_path: str, out_path: str) -> None:
    with open(snippet_path) as f:
        code = f.read()
    namespace = {"__name__": "__main__"}  # the snippet's own main guard runs
    exec(compile(code, "README.md", "exec"), namespace)
    outputs = namespace["outputs"]
    layers = namespace["llm"].apply_model(inspect_lora_layers)[0]
    rows = [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
            for o in outputs]
    with open(out_path, "w") as f:
        json.dump({"rows": rows, "wrappers": sorted({v["wrapper"] for v in layers.values()})}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
