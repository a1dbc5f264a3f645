"""PEFT's default LoRA initialisation, drawn from a seed the way PEFT draws it.

PEFT (peft.tuners.lora.layer.LoraLayer) adds to each target layer, in the model's module order,
lora_A = nn.Linear(in, r, bias=False) and lora_B = nn.Linear(r, out, bias=False): constructing
them draws their default init (Kaiming-uniform with a = sqrt(5), A then B); then
reset_lora_parameters draws A again with nn.init.kaiming_uniform_(A, a=math.sqrt(5)) and sets
B = 0.  So `torch.manual_seed(seed); get_peft_model(model, LoraConfig(r=..., target_modules=...))`
and `peft_default_init(shapes, r, seed)` give identical A and B: three draws per module from
one generator seeded with `seed`, in module order.  The global RNG is not touched.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["peft_default_init"]


def peft_default_init(
    shapes: Sequence[tuple[str, int, int]], rank: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [rank, in] Kaiming-uniform, B [out, rank] zeros), float32, for the modules
    `shapes` = [(name, in_features, out_features)] in the model's module order."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, fin, fout in shapes:
        a = torch.empty(rank, fin)
        scratch_b = torch.empty(fout, rank)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)  # nn.Linear(in, r)'s own init
        torch.nn.init.kaiming_uniform_(scratch_b, a=math.sqrt(5), generator=g)  # nn.Linear(r, out)'s
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)  # reset_lora_parameters
        out[name] = (a, torch.zeros(fout, rank))
    return out
