"""The base model the server hosts: loaded from a local HuggingFace directory, patched over one
AdapterPool that holds every adapter the server samples or trains.

The pool covers every linear layer of the model (attention, MLP and the output head), so any
PEFT adapter of the model fits and training can target any of them; `module_groups` says
which group (attn / mlp / unembed) each belongs to, for the train_attn / train_mlp /
train_unembed switches of a LoRA training client.  One forward runs at a time (`lock`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..patching import linear_shape, patch
from ..pool import AdapterPool
from ..registry import fingerprint_base_model
from .fairlock import FairLock

__all__ = ["HostedModel", "load_hosted_model", "module_groups"]

log = logging.getLogger("minlora.serve")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HostedModel:
    model: Any  # a patched HF causal LM
    pool: AdapterPool
    name: str  # what clients call it (capabilities, base_model)
    directory: str
    tokenizer: Any  # a HF tokenizer, or None (then only token ids are understood)
    vocab_size: int
    max_context: int
    eos_token_ids: frozenset[int]
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    module_groups: dict[str, str]  # pool module -> "attn" | "mlp" | "unembed" | "other"
    lock: FairLock = field(default_factory=FairLock)
    aliases: frozenset[str] = frozenset()

    def accepts_name(self, name: Optional[str]) -> bool:
        return name is not None and (name == self.name or name in self.aliases)

    @property
    def arch(self) -> str:
        return str(getattr(self.model.config, "model_type", "unknown"))


def module_groups(model: torch.nn.Module) -> dict[str, str]:
    """Every patchable linear layer of `model` -> its group: the output head is "unembed",
    layers under an attention block "attn", under an MLP / feed-forward / experts block "mlp"."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if linear_shape(module) is None:
            continue
        parts = name.lower().split(".")
        if module is head:
            out[name] = "unembed"
        elif any("attn" in p or "attention" in p for p in parts[:-1]):
            out[name] = "attn"
        elif any(k in p for p in parts[:-1] for k in ("mlp", "feed_forward", "ffn", "experts")):
            out[name] = "mlp"
        else:
            out[name] = "other"
    return out


def _eos_ids(model: Any) -> frozenset[int]:
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        value = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if isinstance(v, int))
    return frozenset(ids)


def _tokenizer(directory: str) -> Any:
    if not any(os.path.exists(os.path.join(directory, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # a broken tokenizer must not keep the model from serving token ids
        log.warning("the tokenizer in %s could not be loaded (%s); serving token ids only", directory, exc)
        return None


def load_hosted_model(directory: str, *, name: Optional[str] = None, device: str = "cpu", dtype: str = "float32",
                      pool_bytes: int = 1 << 30, max_slots: int = 256, max_rank: Optional[int] = None,
                      pool_options: Optional[dict[str, Any]] = None) -> HostedModel:
    """Loads a `save_pretrained` directory (no downloads), builds the pool and patches the model
    (max_rank: the largest adapter rank a step may hold; None = the patch's default)."""
    from transformers import AutoModelForCausalLM

    directory = os.path.abspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory} is not a HuggingFace model directory (no config.json)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, local_files_only=True)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    groups = module_groups(model)
    shapes = {m: linear_shape(mod) for m, mod in model.named_modules() if m in groups}
    pool = AdapterPool(shapes, dtype=torch_dtype, device=device, capacity_bytes=int(pool_bytes),
                       max_slots=max_slots, **(pool_options or {}))
    patch(model, pool, max_rank=max_rank)
    config = model.config
    max_context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    display = name or os.path.basename(directory.rstrip(os.sep)) or directory
    return HostedModel(
        model=model, pool=pool, name=display, directory=directory, tokenizer=_tokenizer(directory),
        vocab_size=int(config.vocab_size), max_context=max_context, eos_token_ids=_eos_ids(model),
        fingerprint=fingerprint_base_model(model), device=torch.device(device), dtype=torch_dtype,
        module_groups=groups, aliases=frozenset({directory, display}),
    )
