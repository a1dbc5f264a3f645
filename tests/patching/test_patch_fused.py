"""Fused projections are ordinary targets: GPT-NeoX's query_key_value, Phi-3's qkv_proj and
gate_up_proj, against PEFT's mixed-batch forward."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import minlora
from minlora.targets import target_shapes
from minlora.pool import AdapterPool
from helpers.cases import rel_error
from helpers.patching import VOCAB, Family, make_peft_adapter, peft_reference


def _model(family: str) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(7)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  max_position_embeddings=128)
    if family == "phi3":
        return Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, **common)).eval()


SPECS = {
    "phi3": [dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]),
             dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["qkv_proj", "o_proj", "down_proj"])],
    "gpt_neox": [dict(r=4, lora_alpha=8, target_modules=["query_key_value"]),
                 dict(r=3, lora_alpha=5,
                      target_modules=["query_key_value", "dense_h_to_4h", "dense_4h_to_h"])],
}


@pytest.mark.parametrize("family", sorted(SPECS))
def test_fused_projections_equal_peft(tmp_path, family):
    base = _model(family)
    dirs = {}
    for i, spec in enumerate(SPECS[family]):
        dirs[f"f{i}"] = os.path.join(tmp_path, f"f{i}")
        make_peft_adapter(base, spec, dirs[f"f{i}"], seed=i)
    ref = peft_reference(Family(family, base, dirs))
    model = copy.deepcopy(base)
    pool = AdapterPool(target_shapes(model, list(dirs.values())), capacity_bytes=1 << 22)
    for aid, d in dirs.items():
        pool.register(aid, d)
    minlora.patch(model, pool)
    assign = ["f0", None, "f1", "f0"]
    ids = torch.randint(3, VOCAB, (len(assign), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids, adapter_names=[a or "__base__" for a in assign]).logits
        got = model(ids, adapters=assign).logits
    for row in range(len(assign)):
        assert rel_error(got[row], want[row]) <= 1e-5, (family, row)
