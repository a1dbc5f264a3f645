"""The patched model on a GPU (pool and model on CUDA) against PEFT on the same GPU."""
from __future__ import annotations

import pytest
import torch

import minlora
from helpers.cases import rel_error
from helpers.patching import VOCAB, build_family, patched_copy, peft_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cuda_mixed_batch_and_generate_equal_peft(tmp_path, family):
    fam = build_family(family, str(tmp_path))
    ref = peft_reference(fam).cuda()
    model, pool = patched_copy(fam, device="cuda", capacity_bytes=1 << 24)
    assign = ["a0", None, "a1", "a2", "a3", "a4"]
    ids = torch.randint(3, VOCAB, (len(assign), 7), generator=torch.Generator().manual_seed(0)).cuda()
    names = [a or "__base__" for a in assign]
    with torch.no_grad():
        want = ref(ids, adapter_names=names).logits
        with minlora.adapters(model, assign):
            got = model(ids).logits
            tokens = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        want_tokens = ref.generate(input_ids=ids, adapter_names=names, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    for row in range(len(assign)):
        assert rel_error(got[row], want[row]) <= 1e-5, (family, row)
    assert torch.equal(tokens, want_tokens)
