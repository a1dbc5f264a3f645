"""`minlora bench vllm`, the end-to-end part: vLLM's offline generation throughput on a random
Llama, in one mode per process (vLLM's plugins are chosen when its processes start):

    base     no LoRA
    stock    vLLM's own LoRA (MINLORA_VLLM=0)
    minlora  minlora as vLLM's LoRA backend (MINLORA_VLLM=1)

    python -P -m minlora.bench.vllm_e2e WORKDIR MODE [--requests N] [--new-tokens N] ...

WORKDIR holds what `write_model` made (the model and its PEFT adapters, manifest.json).  The
requests cycle over the adapters and the base model; one warm-up generate loads the adapters,
the next `--repeats` are timed and the fastest kept.  Prints one line: RESULT_PREFIX and a JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Any, Optional, Sequence

from .llama import PROJECTIONS, LlamaShape

__all__ = ["MODES", "RESULT_PREFIX", "main", "write_model"]

MODES = ("base", "stock", "minlora")
RESULT_PREFIX = "minlora-bench-vllm-result:"  # vLLM logs to stdout too


def write_model(workdir: str, shape: LlamaShape, ranks: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """A random Llama of `shape` (save_pretrained) and one PEFT adapter per rank on all seven projections."""
    from peft import LoraConfig, get_peft_model

    model = shape.build(max_positions=1024, seed=seed, tie_word_embeddings=False, torch_dtype="bfloat16")
    base = os.path.join(workdir, "base")
    model.save_pretrained(base)
    adapters = []
    for i, r in enumerate(ranks):
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                                     target_modules=list(PROJECTIONS)))
        path = os.path.join(workdir, f"adapter{i}-r{r}")
        peft_model.save_pretrained(path)
        adapters.append({"name": f"adapter{i}-r{r}", "path": path, "rank": r})
    manifest = {"base": base, "adapters": adapters}
    with open(os.path.join(workdir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls (the fastest is kept)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Before vLLM starts: its processes read the switch when they load their plugins.
    os.environ["MINLORA_VLLM"] = "1" if args.mode == "minlora" else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(os.path.join(args.workdir, "manifest.json")) as f:
        manifest = json.load(f)
    adapters = manifest["adapters"]
    engine: dict[str, Any] = dict(model=manifest["base"], dtype=args.dtype, max_model_len=args.prompt_len +
                                  args.new_tokens + 16, max_num_seqs=max(args.requests, 1), enforce_eager=True,
                                  skip_tokenizer_init=True, seed=0, kv_cache_memory_bytes=args.kv_cache_mb << 20)
    if args.mode != "base":
        engine.update(enable_lora=True, max_loras=len(adapters), max_cpu_loras=len(adapters),
                      max_lora_rank=max(a["rank"] for a in adapters))
    t0 = time.perf_counter()
    llm = LLM(**engine)
    startup_s = time.perf_counter() - t0

    rng = random.Random(0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(4, vocab) for _ in range(args.prompt_len)])
               for _ in range(args.requests)]
    loras = None
    if args.mode != "base":
        cycle: list[Optional[LoRARequest]] = [None] + [LoRARequest(a["name"], i + 1, a["path"])
                                                       for i, a in enumerate(adapters)]
        loras = [cycle[i % len(cycle)] for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # warm-up: loads the adapters
    times = []
    for _ in range(args.repeats):
        t1 = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        times.append(time.perf_counter() - t1)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    seconds = min(times)  # the least disturbed run (a shared machine's load comes and goes)
    print(RESULT_PREFIX, json.dumps({"mode": args.mode, "tokens": tokens, "seconds": seconds,
                                     "tokens_per_s": tokens / seconds, "all_seconds": times,
                                     "startup_s": startup_s}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
