"""The newest tinker SDK (0.38, its own environment: it cannot share one with the 0.22 pin)
against the server: its protobuf results for sampling and forward_backward, and its protobuf
forward_backward requests.  The test command makes that environment (scripts/tinker_latest_env.sh)
and names its Python in MINLORA_TINKER_LATEST_PYTHON; without it these tests skip, except under
CI (the CI variable set), where they fail: CI must exercise them."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from helpers.serve import ALICE, in_process_server, model_dir, peft_dir, peft_model, teacher_logprobs

PYTHON = os.environ.get("MINLORA_TINKER_LATEST_PYTHON", "")


@pytest.fixture(autouse=True)
def newest_tinker() -> None:
    if not os.path.exists(PYTHON):
        why = f"no newest-tinker environment (MINLORA_TINKER_LATEST_PYTHON={PYTHON!r}; scripts/tinker_latest_env.sh makes it)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI is set, so these tests must run", pytrace=False)
        pytest.skip(why)

SAMPLE = """
import json, sys
import tinker
from tinker import types
assert tinker.__version__.startswith("0.3"), tinker.__version__
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
s = sc.create_sampling_client(model_path="tinker://alice:a/sampler_weights/1")
r = s.sample(types.ModelInput.from_ints([5, 6, 7, 8]), 2, types.SamplingParams(max_tokens=6, temperature=0.0),
             include_prompt_logprobs=True, topk_prompt_logprobs=2).result()
print(json.dumps({"tokens": [q.tokens for q in r.sequences], "logprobs": [q.logprobs for q in r.sequences],
                  "stop": [q.stop_reason for q in r.sequences], "prompt": r.prompt_logprobs,
                  "topk": r.topk_prompt_logprobs}))
"""

TRAIN = """
import json, sys
import tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
tc = sc.create_lora_training_client(base_model="tiny-llama", rank=4, seed=2)
seq = [3, 9, 14, 27, 33, 41, 52, 60, 71]
d = [types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": seq[1:]})]
losses = []
for _ in range(5):
    fb = tc.forward_backward(d, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
    losses.append(fb.result().metrics["loss:sum"])
fwd = tc.forward(d, "cross_entropy").result()
state = tc.save_state("ckpt").result().path
again = sc.create_training_client_from_state(state).forward(d, "cross_entropy").result()
external = tc.save_weights_external("export").result().path
import os, urllib.request
urls = sc.create_rest_client().get_external_weights_urls(external).result().urls
os.makedirs(sys.argv[3], exist_ok=True)
for name, url in urls.items():
    with urllib.request.urlopen(url, timeout=30) as resp, open(os.path.join(sys.argv[3], name), "wb") as f:
        f.write(resp.read())
print(json.dumps({"losses": losses, "logprobs": fwd.loss_fn_outputs[0]["logprobs"].tolist(),
                  "resumed": again.loss_fn_outputs[0]["logprobs"].tolist(), "files": sorted(urls)}))
"""


def run(script: str, url: str, *args: str) -> dict:
    out = subprocess.run([PYTHON, "-c", script, url, ALICE, *args], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, TINKER_TELEMETRY="0", PYTHONPATH=""))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_newest_tinker_samples_through_protobuf_results(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home")) as server:
        path = peft_dir(root, "a", rank=4, seed=4)
        server.service.registry.import_peft(path, "alice:a")
        got = run(SAMPLE, server.url)
    oracle = peft_model(path)
    prompt = [5, 6, 7, 8]
    for tokens, logprobs in zip(got["tokens"], got["logprobs"]):
        _, want, rows = teacher_logprobs(oracle, prompt, tokens)
        assert np.allclose(logprobs, want.numpy(), atol=2e-4)
        assert all(rows[i, t] >= rows[i].max() - 2e-4 for i, t in enumerate(tokens))  # greedy
    assert got["stop"] == ["length", "length"]
    want_prompt, _, _ = teacher_logprobs(oracle, prompt, [])
    assert got["prompt"][0] is None and np.allclose(got["prompt"][1:], want_prompt.numpy(), atol=2e-4)
    assert got["topk"][0] is None and all(len(row) == 2 for row in got["topk"][1:])


def test_newest_tinker_trains_through_protobuf_requests(tmp_path):
    root = str(tmp_path)
    export = os.path.join(root, "export")
    with in_process_server(model_dir(root), os.path.join(root, "home")) as server:
        got = run(TRAIN, server.url, export)
    assert got["losses"][-1] < got["losses"][0]
    assert len(got["logprobs"]) == 8 and all(lp < 0 for lp in got["logprobs"])
    assert np.allclose(got["resumed"], got["logprobs"], atol=1e-5)  # a client made from the checkpoint
    assert got["files"] == ["adapter_config.json", "adapter_model.safetensors", "checkpoint_complete"]
    seq = [3, 9, 14, 27, 33, 41, 52, 60, 71]
    prompt_lp, _, _ = teacher_logprobs(peft_model(export), seq, [])  # the downloaded files, loaded by PEFT
    assert np.allclose(prompt_lp.numpy(), got["logprobs"], atol=2e-4)
