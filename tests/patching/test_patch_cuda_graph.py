"""A patched model's decode step on a GPU: captured once in a CUDA graph and replayed after
refilling the step buffers with new adapter assignments (against PEFT), and run without any
host synchronisation after the first step."""
from __future__ import annotations

import copy

import pytest
import torch

import minlora
from helpers.cases import rel_error
from helpers.patching import VOCAB, build_family, patched_copy, peft_reference

pytestmark = pytest.mark.cuda

# Four requests; different adapters, ranks and slot counts per step, rows without an adapter.
STEPS = [["a0", "a1", None, "a2"], ["a3", "a3", "a4", "a1"], [None, "a2", "a0", None], ["a1", "a4", "a2", "a0"]]
PROMPT = 5
TOL = 1e-4


def _setup(tmp_path):
    fam = build_family("llama", str(tmp_path))
    ref = peft_reference(fam).cuda()
    model, pool = patched_copy(fam, device="cuda", capacity_bytes=1 << 24)
    return fam, ref, model, pool


def _tokens(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).cuda()


def test_decode_step_captured_once_replays_new_assignments(tmp_path):
    # DecodeStep (the benchmark's) holds the graph's fixed inputs: a StaticCache, the token,
    # position and mask tensors, refilled before each replay; its decode rewinds the cache's
    # write position, so the warm-ups and every replay write the same column.
    from minlora.bench.decode_graph import DecodeStep

    _, ref, model, pool = _setup(tmp_path)
    dec = DecodeStep(model, len(STEPS[0]), PROMPT, VOCAB, seed=0)
    with torch.no_grad():
        for k, assign in enumerate(STEPS):
            nxt = _tokens((len(assign), 1), 10 + k)
            with minlora.adapters(model, assign):
                # An eager prefill under this step's adapters fills the KV cache in place, then
                # plans the decode's token slots.
                dec.token.copy_(nxt)
                dec.prefill()
                if dec.graph is None:
                    dec.capture()
                got = dec.replay()[:, -1].clone()
                again = dec.replay()[:, -1].clone()
            want = ref(torch.cat([dec.prompt, nxt], 1), adapter_names=[a or "__base__" for a in assign]).logits[:, -1]
            assert torch.equal(got, again), k  # a replay leaves the cache where the next one expects it
            for row, a in enumerate(assign):
                assert rel_error(got[row], want[row]) <= TOL, (k, row, a)
    pool.close()


def test_decode_after_the_first_step_never_syncs(tmp_path):
    _, ref, model, pool = _setup(tmp_path)
    B = len(STEPS[0])
    prompt = _tokens((B, PROMPT), 1)
    tok = _tokens((B, 1), 2)
    with torch.no_grad():
        # The first step makes the step buffers and the staging; loads every adapter.
        with minlora.adapters(model, sorted({a for s in STEPS for a in s if a})):
            pass
        with minlora.adapters(model, STEPS[0]):
            cache = model(prompt, use_cache=True).past_key_values
            model(tok, past_key_values=cache)
        # One KV cache per decode (the prompt's), copied before the debug mode.
        caches = [copy.deepcopy(cache) for _ in range(2 * len(STEPS[1:]))]
        torch.cuda.synchronize()
        outs = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            for assign, kv in zip(STEPS[1:], caches):
                with minlora.adapters(model, assign):
                    outs.append(model(tok, past_key_values=kv).logits)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for assign, got, kv in zip(STEPS[1:], outs, caches[len(STEPS[1:]):]):
            # The same decode without the debug mode, and PEFT's.
            with minlora.adapters(model, assign):
                again = model(tok, past_key_values=kv).logits
            assert torch.equal(got, again)
        # The prompt's cache came from STEPS[0]'s adapters, so PEFT is compared on full sequences.
        full = torch.cat([prompt, tok], 1)
        for assign in STEPS[1:]:
            with minlora.adapters(model, assign):
                got = model(full).logits[:, -1]
            want = ref(full, adapter_names=[a or "__base__" for a in assign]).logits[:, -1]
            assert rel_error(got, want) <= TOL
    pool.close()
