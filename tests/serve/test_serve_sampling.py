"""Sampling through the real SDKs (tinker 0.22.0 and mint) over loopback, checked against PEFT.

The server hosts a tiny random Llama; PEFT adapters are imported into its registry as users'
adapters (`alice:<name>`), sampled through `tinker://` paths, and every token's logprob is
compared with PEFT's own model on the same context.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
import warnings

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from helpers import REPO  # noqa: E402
from helpers.serve import (ALICE, ALICE_MINT, BOB, in_process_server, model_dir, peft_dir,  # noqa: E402
                            peft_model, teacher_logprobs)

TOL = 2e-4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve-sampling"))
    model = model_dir(root, tokenizer=True)
    with in_process_server(model, os.path.join(root, "home"), max_batch_rows=64) as server:
        reg, fp = server.service.registry, server.service.host.fingerprint
        dirs = {}
        for i in range(16):  # 16 adapters, ranks 1..16, half alice's and half bob's
            owner = "alice" if i % 2 == 0 else "bob"
            dirs[f"{owner}:u{i}"] = peft_dir(root, f"u{i}", rank=i + 1, seed=100 + i)
            reg.import_peft(dirs[f"{owner}:u{i}"], f"{owner}:u{i}", provenance={"base_model": fp})
        yield {"server": server, "url": server.url, "root": root, "model": model, "dirs": dirs}


@pytest.fixture(scope="module")
def oracles(env):
    cache = {}

    def get(adapter):
        if adapter not in cache:
            cache[adapter] = peft_model(env["dirs"][adapter] if adapter else None)
        return cache[adapter]

    return get


def client(env, key=ALICE):
    return tinker.ServiceClient(base_url=env["url"], api_key=key)


def assert_matches(oracle, prompt, seq, *, temperature=1.0, greedy=False):
    _, _, rows = teacher_logprobs(oracle, prompt, list(seq.tokens))
    scaled = torch.log_softmax(rows / temperature, dim=-1) if temperature > 0 else rows
    for i, tok in enumerate(seq.tokens):
        assert abs(seq.logprobs[i] - float(scaled[i, tok])) <= TOL, (i, seq.logprobs[i], float(scaled[i, tok]))
        if greedy:
            assert scaled[i, tok] >= scaled[i].max() - TOL


def test_sample_logprobs_and_prompt_logprobs_match_peft(env, oracles):
    sc = client(env)
    sampler = sc.create_sampling_client(model_path="tinker://alice:u0/sampler_weights/head")
    prompt = [5, 17, 3, 44, 42, 7, 11]
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=3, stop=[])
    r = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params,
                       include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    assert len(r.sequences) == 2 and all(len(s.tokens) == 12 and s.stop_reason == "length" for s in r.sequences)
    for seq in r.sequences:
        assert_matches(oracles("alice:u0"), prompt, seq)
    want, _, _ = teacher_logprobs(oracles("alice:u0"), prompt, [])
    assert r.prompt_logprobs[0] is None and np.allclose(r.prompt_logprobs[1:], want.numpy(), atol=TOL)
    assert r.topk_prompt_logprobs[0] is None and len(r.topk_prompt_logprobs[1]) == 3
    again = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()
    assert [s.tokens for s in again.sequences] == [s.tokens for s in r.sequences]  # the seed reproduces
    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert logprobs[0] is None and np.allclose(logprobs[1:], want.numpy(), atol=TOL)
    base = sc.create_sampling_client(base_model=sampler.get_base_model())
    seq = base.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result()
    assert_matches(oracles(None), prompt, seq.sequences[0], temperature=0.0, greedy=True)


def test_mint_client_samples_with_its_sk_key(env, oracles):
    code = f"""
import os, json
os.environ["MINT_BASE_URL"] = {env['url']!r}; os.environ["MINT_API_KEY"] = {ALICE_MINT!r}
import mint
from mint import types
sc = mint.ServiceClient()
s = sc.create_sampling_client(model_path="tinker://alice:u2/sampler_weights/1")
r = s.sample(types.ModelInput.from_ints([9, 8, 7]), 1, types.SamplingParams(max_tokens=6, temperature=0.0)).result()
print(json.dumps({{"tokens": r.sequences[0].tokens, "logprobs": r.sequences[0].logprobs}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TINKER_TELEMETRY="0"))
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    seq = types.SampledSequence(stop_reason="length", _tokens_list=got["tokens"], _logprobs_list=got["logprobs"])
    assert_matches(oracles("alice:u2"), [9, 8, 7], seq, temperature=0.0, greedy=True)


def test_32_concurrent_clients_over_16_adapters_nothing_lost(env, oracles):
    server = env["server"]
    services = {"alice": client(env, ALICE), "bob": client(env, BOB)}
    before = server.service.engine.stats()
    jobs = []
    for i in range(32):
        adapter = f"{'alice' if (i % 16) % 2 == 0 else 'bob'}:u{i % 16}"
        owner = adapter.split(":")[0]
        sampler = services[owner].create_sampling_client(model_path=f"tinker://{adapter}/sampler_weights/head")
        prompt = [3 + i, 4 + (i * 7) % 80, 5 + (i * 13) % 80]
        jobs.append((adapter, prompt, sampler))
    futures = [s.sample(types.ModelInput.from_ints(p), 1, types.SamplingParams(max_tokens=16, temperature=0.0, stop=[]))
               for _, p, s in jobs]
    results = [f.result(timeout=300) for f in futures]
    for (adapter, prompt, _), r in zip(jobs, results):
        assert len(r.sequences[0].tokens) == 16
        assert_matches(oracles(adapter), prompt, r.sequences[0], temperature=0.0, greedy=True)
    after = server.service.engine.stats()
    assert after["tokens"] - before.get("tokens", 0) >= 32 * 16
    assert after["max_step_adapters"] > 1 and after["max_step_rows"] > 2  # adapters shared decode steps


def test_serving_revision_follows_promote_and_rollback(env, oracles):
    server = env["server"]
    reg, fp = server.service.registry, server.service.host.fingerprint
    reg.import_peft(env["dirs"]["alice:u4"], "alice:assistant", provenance={"base_model": fp}, message="first")
    reg.import_peft(env["dirs"]["alice:u6"], "alice:assistant", provenance={"base_model": fp}, message="second")

    def adapters_cli(*args):
        out = subprocess.run([sys.executable, "-m", "minlora", "adapters", "--root",
                              os.path.join(env["root"], "home"), *args], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr
        return out.stdout

    sc = client(env)
    with pytest.raises(tinker.NotFoundError, match="no serving revision"):
        sc.create_sampling_client(model_path="tinker://alice:assistant/sampler_weights/serving")
    reg.promote("alice:assistant", 1)
    sampler = sc.create_sampling_client(model_path="tinker://alice:assistant/sampler_weights/serving")
    prompt = [12, 13, 14, 15]

    def greedy():
        return sampler.sample(types.ModelInput.from_ints(prompt), 1,
                              types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])).result().sequences[0]

    assert_matches(oracles("alice:u4"), prompt, greedy(), temperature=0.0, greedy=True)
    adapters_cli("promote", "alice:assistant", "--rev", "2")
    assert_matches(oracles("alice:u6"), prompt, greedy(), temperature=0.0, greedy=True)
    reg.rollback("alice:assistant")
    assert_matches(oracles("alice:u4"), prompt, greedy(), temperature=0.0, greedy=True)
    assert "second" in adapters_cli("log", "alice:assistant")


def test_stop_strings_use_the_tokenizer(env):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["model"])
    sampler = client(env).create_sampling_client(model_path="tinker://alice:u8/sampler_weights/head")
    prompt = [20, 21, 22]
    free = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                          types.SamplingParams(max_tokens=20, temperature=0.0, stop=[])).result().sequences[0]
    text = tok.decode(free.tokens)
    stop = text[6:8]
    cut = next(k for k in range(1, 21) if stop in tok.decode(free.tokens[:k]))
    got = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=20, temperature=0.0, stop=[stop])).result().sequences[0]
    assert got.stop_reason == "stop" and got.tokens == free.tokens[:cut]


def test_bad_sampling_requests_get_clear_errors(env):
    sc = client(env)
    with pytest.raises(tinker.NotFoundError, match="not found"):
        sc.create_sampling_client(model_path="tinker://alice:nope/sampler_weights/1")
    with pytest.raises(tinker.BadRequestError, match="not served"):
        sc.create_sampling_client(base_model="some/other-model")
    sampler = sc.create_sampling_client(model_path="tinker://alice:u0/sampler_weights/1")
    for params, prompt, why in (
        (types.SamplingParams(max_tokens=4), [500], "token ids"),
        (types.SamplingParams(max_tokens=10_000), [1, 2], "max_tokens"),
        (types.SamplingParams(max_tokens=4, top_p=0.0), [1, 2], "top_p"),
        (types.SamplingParams(max_tokens=4, temperature=-1.0), [1, 2], "temperature"),
    ):
        with pytest.raises(tinker.BadRequestError, match=why):
            sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result()


def test_archive_download_loads_with_peft_and_equals_the_adapter(env):
    from peft import PeftModel

    rc = client(env).create_rest_client()
    listed = rc.list_checkpoints("alice:u10").result().checkpoints
    assert [c.tinker_path for c in listed] == ["tinker://alice:u10/sampler_weights/1"]
    link = rc.get_checkpoint_archive_url_from_tinker_path("tinker://alice:u10/sampler_weights/1").result()
    with urllib.request.urlopen(link.url, timeout=30) as resp:  # no API key: the link authorizes itself
        blob = resp.read()
    out = os.path.join(env["root"], "downloaded")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"} <= set(tar.getnames())
        tar.extractall(out, filter="data")
    want = peft_model(env["dirs"]["alice:u10"])
    from helpers.serve import tiny_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = PeftModel.from_pretrained(tiny_llama(), out).eval()
    x = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.no_grad():
        a, b = got(x).logits, want(x).logits
    assert float((a - b).abs().max()) <= 1e-5
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(link.url[:-3] + "abc", timeout=30)
    assert info.value.code == 404
