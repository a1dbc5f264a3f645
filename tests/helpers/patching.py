"""Tiny HuggingFace models and real PEFT adapters for the patching and PEFT-format tests.

No downloads: models are built from configs with random weights, adapters are made by PEFT
itself (init_lora_weights=False so B is not zero) and saved with save_pretrained (safetensors).
Holds no tests; the patching, formats, train and serve tests import it.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import torch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_LLAMA = ATTN + MLP
VOCAB = 96


def tiny_model(family: str) -> torch.nn.Module:
    """A 2-layer causal LM of the family with random weights, in eval mode, fp32."""
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed({"llama": 1, "qwen2": 2, "gpt2": 3}[family])
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        # Qwen2's q/k/v projections carry a bias.
        cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def adapter_specs(family: str) -> dict[str, dict]:
    """Four or five LoraConfig keyword sets: different ranks and alphas, one rsLoRA, one
    rank_pattern/alpha_pattern, list/regex targets, exclude_modules, layers_to_transform."""
    if family == "gpt2":
        return {
            "a0": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
            "a1": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"]),
            "a2": dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_fc", "c_proj"],
                       rank_pattern={"h.0.attn.c_attn": 6}, alpha_pattern={"c_fc": 3}),
            "a3": dict(r=3, lora_alpha=4, target_modules=r".*\.h\.1\.mlp\.c_(fc|proj)"),
            "a4": dict(r=5, lora_alpha=7, target_modules=["c_attn", "c_proj"], layers_to_transform=[0],
                       layers_pattern="h", exclude_modules=["mlp.c_proj"]),
        }
    return {
        "a0": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "a1": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LLAMA),
        "a2": dict(r=2, lora_alpha=5, target_modules=ATTN + ["down_proj"],
                   rank_pattern={"k_proj": 6, "model.layers.1.self_attn.q_proj": 3},
                   alpha_pattern={"down_proj": 3}),
        "a3": dict(r=3, lora_alpha=4, target_modules=r".*\.layers\.1\..*(gate_proj|up_proj)"),
        "a4": dict(r=5, lora_alpha=7, target_modules=["o_proj", "gate_proj", "down_proj"],
                   layers_to_transform=[0],
                   exclude_modules=["gate_proj"]),
    }


def make_peft_adapter(base: torch.nn.Module, spec: dict, path: str, seed: int) -> None:
    """Makes one adapter with PEFT on a copy of `base` and saves it (safetensors) to `path`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on Conv1D and sets it
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
        # PEFT draws B like A (kaiming-uniform); shrink both so deltas are of the order of the base output.
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.mul_(0.5)
        peft_model.save_pretrained(path)


@dataclass
class Family:
    name: str
    model: torch.nn.Module  # the pristine base model (never patched by the fixtures)
    dirs: dict[str, str]  # adapter id -> PEFT directory


def build_family(name: str, root: str) -> Family:
    base = tiny_model(name)
    dirs = {}
    for i, (aid, spec) in enumerate(adapter_specs(name).items()):
        d = os.path.join(root, f"{name}-{aid}")
        make_peft_adapter(base, spec, d, seed=100 + i)
        dirs[aid] = d
    return Family(name, base, dirs)


def patched_copy(fam: Family, *, device: str = "cpu", capacity_bytes: int = 1 << 22, poison: bool = False,
                 target_modules=None, **capacities):
    """(a copy of the family's model on `device`, patched with a pool holding every adapter of the
    family from its PEFT directory, that pool).  capacities: the patch's max_slots / max_rank /
    max_tokens."""
    import minlora
    from minlora.pool import AdapterPool
    from minlora.targets import target_shapes

    model = copy.deepcopy(fam.model).to(device)
    pool = AdapterPool(target_shapes(model, list(fam.dirs.values())), device=device, capacity_bytes=capacity_bytes,
                       poison=poison)
    for aid, path in fam.dirs.items():
        pool.register(aid, path)  # PEFT directories, read by minlora.formats.peft
    minlora.patch(model, pool, target_modules=target_modules, **capacities)
    return model, pool


def peft_reference(fam: Family) -> torch.nn.Module:
    """One PeftModel holding all of the family's adapters (for its mixed-batch forward)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = list(fam.dirs)
        ref = PeftModel.from_pretrained(copy.deepcopy(fam.model), fam.dirs[ids[0]], adapter_name=ids[0])
        for aid in ids[1:]:
            ref.load_adapter(fam.dirs[aid], adapter_name=aid)
    return ref.eval()
