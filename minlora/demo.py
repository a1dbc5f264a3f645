"""`minlora demo`: one base model, several users' PEFT adapters, one mixed batch.

Builds a small Llama from a config (random weights: nothing is downloaded), makes a few
PEFT LoRA adapters of different ranks with PEFT itself, saves them as PEFT directories,
loads them into an AdapterPool, patches the model, and serves a batch in which every row
uses a different adapter (or none). It prints each row's greedy continuation, checks the
logits against PEFT's own mixed-batch forward, and times both.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from typing import Any

from .bench.cases import rel_error
from .command import CommandError, device_name, positive_int, require_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", type=positive_int, default=4,
                        help="how many users' adapters (ranks 2, 4, 8, 16, 2, ...)")
    parser.add_argument("--new-tokens", type=positive_int, default=8, help="greedy tokens generated per row")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda when present)")


def _median_seconds(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import minlora
    from minlora.targets import target_shapes

    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base = LlamaForCausalLM(cfg).eval().to(device)
    names = [f"user-{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dirs = {}
        for i, name in enumerate(names):
            rank = 2 << (i % 4)
            lora = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
            torch.manual_seed(100 + i)
            get_peft_model(copy.deepcopy(base), lora).save_pretrained(f"{work}/{name}")
            dirs[name] = f"{work}/{name}"
            print(f"made PEFT adapter {name}: rank {rank} on all 7 projections")

        # PEFT's own mixed batch: the reference.
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(dirs[name], adapter_name=name)
        peft_model.eval()

        model = copy.deepcopy(base)
        pool = minlora.AdapterPool(target_shapes(model, list(dirs.values())), device=device,
                                   capacity_bytes=64 << 20)
        for name, path in dirs.items():
            pool.register(name, path)
        minlora.patch(model, pool)

        rows = names + [None]
        torch.manual_seed(1)
        prompt = torch.randint(3, cfg.vocab_size, (len(rows), 12), device=device)
        with torch.no_grad():
            with minlora.adapters(model, rows):
                logits = model(prompt).logits
                mine = _median_seconds(lambda: model(prompt))
            want = peft_model(prompt, adapter_names=[r or "__base__" for r in rows]).logits
            theirs = _median_seconds(lambda: peft_model(prompt, adapter_names=[r or "__base__" for r in rows]))
            err = rel_error(logits, want)
            out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, adapters=rows,
                                 pad_token_id=0)
        print()
        for row, tokens in zip(rows, out[:, prompt.shape[1]:].tolist()):
            print(f"{row or '(no adapter)':>14}: {tokens}")
        print()
        print(f"logits vs PEFT's mixed batch: relative error {err:.2e}")
        print(f"forward of the mixed batch: minlora {mine * 1e3:.2f} ms, PEFT {theirs * 1e3:.2f} ms "
              f"({theirs / mine:.2f}x)")
        for name in names:
            print(f"residency({name!r}) = {pool.residency(name)}")
        pool.close()
    if not err < 1e-4:
        raise CommandError(f"the logits differ from PEFT's mixed batch (relative error {err:.2e})")
    return 0
