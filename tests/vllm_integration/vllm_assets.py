"""Offline assets for the vLLM tests: a tiny random causal LM (Llama or Qwen2) saved with
save_pretrained, a local word-level tokenizer, real PEFT adapters of several ranks, and the
external oracle (HF + PEFT's mixed-batch greedy generation).

No downloads.  The model's weights are drawn larger than transformers' default so greedy
decoding is not flat, and each adapter's B is scaled up so its delta changes the tokens.
This file holds no tests.
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

NEEDS_VLLM = "runs in the vLLM environment: bash scripts/test_vllm.sh"
VOCAB = 1000
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LORA_RANK = 64

# name -> LoraConfig keywords: ranks 1 to 64, rsLoRA, rank_pattern / alpha_pattern, targets
# that leave some slices of the packed qkv / gate_up layers without an adapter.
ADAPTERS: dict[str, dict[str, Any]] = {
    "r1": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_MODULES),
    "r16": dict(r=16, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "rp": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
               rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 7},
               alpha_pattern={"v_proj": 3}),
    "r64": dict(r=64, lora_alpha=32, target_modules=ALL_MODULES),
}


@dataclass
class Assets:
    """What write_assets made: the base model directory and each adapter's PEFT directory."""

    arch: str
    base: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT directory

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, path: str) -> "Assets":
        with open(path) as f:
            return cls(**json.load(f))


def tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer: ids 0..3 are <unk> <s> </s> <pad>, id i >= 4 is the word "w{i}"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def base_model(arch: str, *, hidden: int = 128, intermediate: int = 256, layers: int = 2, seed: int = 0):
    """A random fp32 causal LM of the architecture (Qwen2's q/k/v projections carry a bias)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="float32")
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()


def save_adapter(model, spec: dict[str, Any], path: str, seed: int) -> None:
    """One PEFT LoRA adapter with random A and B for `model`, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  **spec))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(path)


def write_assets(root: str, arch: str, adapters: Optional[dict[str, dict[str, Any]]] = None) -> Assets:
    """Writes root/base (model + tokenizer) and root/<name> for each adapter."""
    os.makedirs(root, exist_ok=True)
    assets = Assets(arch, os.path.join(root, "base"))
    model = base_model(arch)
    model.save_pretrained(assets.base)
    tokenizer().save_pretrained(assets.base)
    for k, (name, spec) in enumerate((adapters or ADAPTERS).items()):
        path = os.path.join(root, name)
        save_adapter(model, spec, path, seed=100 + k)
        assets.adapters[name] = path
    return assets


@dataclass
class Row:
    """One request: its adapter (None = the base model), prompt token ids, new tokens."""

    adapter: Optional[str]
    prompt: list[int]
    max_tokens: int


def mixed_rows(adapters: list[str], *, seed: int, lengths: tuple[int, ...] = (5, 8, 13),
               new_tokens: tuple[int, ...] = (6, 8, 10), base_rows: int = 2) -> list[Row]:
    """For each prompt length, one row per adapter and `base_rows` rows without one, shuffled;
    rows of one length share max_tokens (so PEFT's mixed batch needs no padding)."""
    rng = random.Random(seed)
    rows = []
    for length, n_new in zip(lengths, new_tokens):
        for name in adapters + [None] * base_rows:
            rows.append(Row(name, [rng.randrange(4, VOCAB) for _ in range(length)], n_new))
    rng.shuffle(rows)
    return rows


def peft_greedy(assets: Assets, rows: list[Row]) -> list[dict[str, list]]:
    """HF + PEFT's mixed batch, fp32: per row the greedy tokens and their log-probabilities.

    One PeftModel holds every adapter; rows of one prompt length run as one batch with
    `adapter_names` (PEFT's own mixed-batch forward, "__base__" = no adapter).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    names = list(assets.adapters)
    model = PeftModel.from_pretrained(base, assets.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(assets.adapters[name], adapter_name=name)
    model.eval()
    out: list[Optional[dict[str, list]]] = [None] * len(rows)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((len(row.prompt), row.max_tokens), []).append(i)
    for (length, n_new), idx in groups.items():
        ids = torch.tensor([rows[i].prompt for i in idx])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                                 min_new_tokens=n_new, adapter_names=[rows[i].adapter or "__base__" for i in idx],
                                 output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                 pad_token_id=3)
        new = gen.sequences[:, length:]
        logprobs = torch.log_softmax(torch.stack(gen.logits, 1).double(), -1)
        chosen = torch.gather(logprobs, 2, new[..., None])[..., 0]
        for k, i in enumerate(idx):
            out[i] = {"tokens": new[k].tolist(), "logprobs": chosen[k].tolist()}
    return out  # type: ignore[return-value]


def compare(rows: list[Row], want: list[dict[str, list]], got: list[dict[str, list]],
            logprob_tol: float = 1e-4) -> list[str]:
    """The rows where vLLM and the oracle differ (tokens, or a logprob by more than the tolerance)."""
    bad = []
    for i, (row, w, g) in enumerate(zip(rows, want, got)):
        if g["tokens"] != w["tokens"]:
            bad.append(f"row {i} ({row.adapter or 'base'}): tokens {g['tokens']} != PEFT's {w['tokens']}")
            continue
        diff = max((abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])), default=0.0)
        if len(g["logprobs"]) != len(w["logprobs"]) or diff > logprob_tol:
            bad.append(f"row {i} ({row.adapter or 'base'}): logprobs differ by {diff:.2e}")
    return bad
