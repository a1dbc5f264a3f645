"""vLLM's offline LLM on a mixed batch of adapter and base rows; run as a subprocess by
test_vllm_offline.py (vLLM starts its engine in new processes, so this is a main script).

    python run_offline.py ASSETS.json ROWS.json OUT.json [--max-loras N] [--last ADAPTER ...]

Writes OUT.json: per row the greedy tokens and their log-probabilities; then, after one more
batch that uses exactly the `--last` adapters (so the slots hold them), what the worker's
model holds: each LoRA layer's class, its punica wrapper's class and, with minlora, the
rank recorded for every slot of every slice.  MINLORA_VLLM=1 in the environment makes
minlora vLLM's LoRA backend; without it this runs stock vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from worker_probe import inspect_lora_layers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# apply_model sends a function to the worker process (pickled by reference: it lives in a
# module of this folder, which vLLM's spawned processes can import).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("assets")
    parser.add_argument("rows")
    parser.add_argument("out")
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--last", nargs="*", default=[])
    args = parser.parse_args()
    with open(args.assets) as f:
        assets = json.load(f)
    with open(args.rows) as f:
        rows = json.load(f)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    names = list(assets["adapters"])
    requests = {n: LoRARequest(n, i + 1, assets["adapters"][n]) for i, n in enumerate(names)}
    t0 = time.time()
    llm = LLM(model=assets["base"], enable_lora=True, max_loras=args.max_loras, max_lora_rank=64,
              max_cpu_loras=len(names), dtype="float32", max_model_len=256, max_num_seqs=32,
              enforce_eager=True, seed=0, kv_cache_memory_bytes=256 << 20)
    startup_s = time.time() - t0

    def generate(batch):
        params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], logprobs=0, ignore_eos=True,
                                 detokenize=False) for r in batch]
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in batch]
        loras = [requests[r["adapter"]] if r["adapter"] else None for r in batch]
        return llm.generate(prompts, params, lora_request=loras, use_tqdm=False)

    t1 = time.time()
    outputs = generate(rows)
    generate_s = time.time() - t1
    results = []
    for out in outputs:
        done = out.outputs[0]
        tokens = list(done.token_ids)
        results.append({"tokens": tokens, "logprobs": [lp[t].logprob for lp, t in zip(done.logprobs, tokens)]})
    layers = None
    if args.last:
        generate([{"adapter": n, "prompt": [5, 6, 7], "max_tokens": 2} for n in args.last]
                 + [{"adapter": None, "prompt": [8, 9], "max_tokens": 2}])
        layers = llm.apply_model(inspect_lora_layers)[0]
    with open(args.out, "w") as f:
        json.dump({"rows": results, "layers": layers, "startup_s": startup_s, "generate_s": generate_s}, f)


if __name__ == "__main__":
    main()
