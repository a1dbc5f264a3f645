"""Training through the real SDKs: two users at once (tinker and mint, different ranks), their
requests coalesced into shared Trainer calls; the loss falls; the weights equal an in-process
Trainer's on the same data; checkpoints are registry revisions with provenance, sample as the
trained weights, download as PEFT directories, survive a restart; a vanished client's adapter
leaves the pool."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import urllib.request
import warnings

import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from minlora.serve.wire import LoraConfig  # noqa: E402
from helpers import TESTS  # noqa: E402
from helpers.cases import rel_error  # noqa: E402
from helpers.serve import (ALICE, BOB, CAROL_MINT, ServerProcess, in_process_server, model_dir,  # noqa: E402
                            teacher_logprobs, tiny_llama, train_batch, wait_until, write_keys)

ADAM = dict(learning_rate=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0)
STEPS = 6


def datums(seqs: list[list[int]]) -> list:
    return [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                        loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}) for s in seqs]


def train(tc, seqs: list[list[int]]) -> list[float]:
    losses = []
    for _ in range(STEPS):
        fb = tc.forward_backward(datums(seqs), "cross_entropy")
        opt = tc.optim_step(types.AdamParams(**ADAM))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


MINT_CLIENT = """
import json, os, sys
os.environ["MINT_BASE_URL"], os.environ["MINT_API_KEY"] = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
import mint
from mint import types
from helpers.serve import train_batch
adam, steps = json.loads(sys.argv[4]), int(sys.argv[5])
sc = mint.ServiceClient()
tc = sc.create_lora_training_client(base_model="tiny-llama", rank=8, seed=5, user_metadata={"user": "carol"})
data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                    loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)}) for s in train_batch(2)]
losses = []
for _ in range(steps):
    fb = tc.forward_backward(data, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(**adam))
    losses.append(fb.result().metrics["loss:sum"])
    opt.result()
path = tc.save_weights_for_sampler("final").result().path
print(json.dumps({"losses": losses, "model_id": tc.model_id, "path": path}))
"""


def reference_weights(model_path: str, service, lora: LoraConfig, seqs: list[list[int]]) -> dict:
    """The same training, in process, with a fresh Trainer: the adapter's weights after STEPS steps."""
    from transformers import AutoModelForCausalLM

    from minlora.patching import linear_shape
    from minlora.pool import AdapterPool
    from minlora.train import Trainer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    shapes = {n: linear_shape(m) for n, m in model.named_modules() if n in service.host.module_groups}
    trainer = Trainer(model, AdapterPool(shapes, capacity_bytes=64 << 20, optimizer_state=True))
    trainer.create("ref", lora.rank, service.config.lora_alpha, target_modules=service.backend.target_modules(lora),
                   seed=int(lora.seed or 0))
    ids = torch.tensor([s[:-1] for s in seqs])
    targets = torch.tensor([s[1:] for s in seqs])
    for _ in range(STEPS):
        trainer.forward_backward(["ref"] * len(seqs), ids, targets, torch.ones(targets.shape))
        trainer.optim_step(ADAM["learning_rate"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
    return trainer.export("ref").modules


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        for part in ("a", "b"):
            err = rel_error(getattr(got[name], part), getattr(want[name], part))
            assert err <= 1e-4, (name, part, err)


def test_two_users_train_at_once_with_tinker_and_mint(tmp_path):
    root = str(tmp_path)
    model = model_dir(root)
    with in_process_server(model, os.path.join(root, "home")) as server:
        svc = server.service
        carol = subprocess.Popen([sys.executable, "-c", MINT_CLIENT, server.url, CAROL_MINT,
                                  str(TESTS), json.dumps(ADAM), str(STEPS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=dict(os.environ, TINKER_TELEMETRY="0"))
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model="tiny-llama", rank=4, seed=3,
                                            user_metadata={"user": "alice", "adapter": "assistant"})
        losses = train(tc, train_batch(1))
        out, err = carol.communicate(timeout=600)
        assert carol.returncode == 0, err[-3000:]
        carol_run = json.loads(out.strip().splitlines()[-1])

        assert losses[-1] < losses[0] and carol_run["losses"][-1] < carol_run["losses"][0]
        calls = svc.training.scheduler.stats()
        assert calls["requests"]["forward_backward"] == 2 * STEPS
        # the two clients' steps were shared at least once (they ran at the same time)
        assert calls["calls"]["forward_backward"] <= 2 * STEPS

        path = tc.save_weights_for_sampler("final").result().path
        assert path == f"tinker://{tc.model_id}/sampler_weights/final"
        rev = svc.registry.show("alice:assistant", "head")
        prov = rev.provenance
        assert prov["base_model"] == svc.host.fingerprint
        extra = prov["extra"]
        assert extra["tinker_run"] == tc.model_id and extra["step"] == STEPS
        assert [loss for _, loss in extra["loss_history"]] == pytest.approx(losses)
        assert extra["user_metadata"]["user"] == "alice"

        alice_lora = LoraConfig(rank=4, seed=3)
        assert_same_weights(svc.registry.load("alice:assistant", rev.number).modules,
                            reference_weights(model, svc, alice_lora, train_batch(1)))
        carol_adapter = f"carol:{carol_run['model_id']}"
        assert_same_weights(svc.registry.load(carol_adapter, "head").modules,
                            reference_weights(model, svc, LoraConfig(rank=8, seed=5), train_batch(2)))

        # sampling the checkpoint samples the trained weights (PEFT on the downloaded archive agrees)
        rc = sc.create_rest_client()
        link = rc.get_checkpoint_archive_url_from_tinker_path(path).result()
        with urllib.request.urlopen(link.url, timeout=30) as resp:
            blob = resp.read()
        out_dir = os.path.join(root, "alice-final")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(out_dir, filter="data")
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft = PeftModel.from_pretrained(tiny_llama(), out_dir).eval()
        sampler = sc.create_sampling_client(model_path=path)
        prompt = train_batch(1)[0][:5]
        seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                             types.SamplingParams(max_tokens=8, temperature=1.0, seed=1, stop=[])).result().sequences[0]
        _, want, _ = teacher_logprobs(peft, prompt, list(seq.tokens))
        assert torch.allclose(torch.tensor(seq.logprobs, dtype=torch.float64), want, atol=2e-4)
        ephemeral = tc.save_weights_and_get_sampling_client()
        again = ephemeral.sample(types.ModelInput.from_ints(prompt), 1,
                                 types.SamplingParams(max_tokens=8, temperature=1.0, seed=1, stop=[])).result()
        assert again.sequences[0].tokens == seq.tokens

        # listings, and isolation between the users
        runs = rc.list_training_runs().result().training_runs
        assert [r.training_run_id for r in runs] == [tc.model_id]
        assert runs[0].last_sampler_checkpoint.tinker_path == path and runs[0].lora_rank == 4
        assert [c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints] == [path]
        other = tinker.ServiceClient(base_url=server.url, api_key=BOB)
        with pytest.raises(tinker.NotFoundError):
            other.create_rest_client().get_training_run(tc.model_id).result()
        with pytest.raises(tinker.NotFoundError):
            other.create_sampling_client(model_path=path)
        with pytest.raises(tinker.NotFoundError):
            other.create_rest_client().get_training_run(carol_run["model_id"]).result()


def test_losses_rl_and_errors_through_the_api(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home")) as server:
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model="tiny-llama", rank=2, train_unembed=False)
        seq = train_batch(7, rows=1)[0]
        n = len(seq) - 1
        rl = [types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                          loss_fn_inputs={"target_tokens": seq[1:], "logprobs": [-4.0] * n,
                                          "advantages": [0.5, -0.5] * (n // 2) + [0.0] * (n % 2)})]
        for loss_fn, config in (("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9,
                                                                        "clip_high_threshold": 1.1})):
            r = tc.forward_backward(rl, loss_fn, config).result()
            assert len(r.loss_fn_outputs[0]["logprobs"].data) == n
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        fwd = tc.forward(datums([seq]), "cross_entropy").result()
        assert fwd.metrics["loss:sum"] > 0
        bad = [types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"weights": [1.0] * n})]
        with pytest.raises(tinker.BadRequestError, match="target_tokens"):
            tc.forward_backward(bad, "cross_entropy").result()
        with pytest.raises(tinker.BadRequestError, match="rank"):
            sc.create_lora_training_client(base_model="tiny-llama", rank=100_000)
        info = tc.get_info()
        assert info.lora_rank == 2 and info.model_data.model_name == "tiny-llama"


def test_restart_keeps_checkpoints_and_the_old_client_is_told(tmp_path):
    root = str(tmp_path)
    home = os.path.join(root, "home")
    model = model_dir(root)
    keys = write_keys(os.path.join(root, "keys"))
    server = ServerProcess(model, home, keys).start()
    try:
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model="tiny-llama", rank=4, seed=1)
        train(tc, train_batch(3))
        state = tc.save_state("ckpt").result().path
        sampler_path = tc.save_weights_for_sampler("final").result().path
        prompt = types.ModelInput.from_ints(train_batch(3)[0][:4])
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
        before = sc.create_sampling_client(model_path=sampler_path).sample(prompt, 1, greedy).result()
        server.kill()
        server = ServerProcess(model, home, keys, server.port).start()
        rc = sc.create_rest_client()
        listed = {c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
        assert listed == {state, sampler_path}
        after = sc.create_sampling_client(model_path=sampler_path).sample(prompt, 1, greedy).result()
        assert after.sequences[0].tokens == before.sequences[0].tokens
        with pytest.raises(tinker.BadRequestError, match="no longer live"):
            tc.forward_backward(datums(train_batch(3)), "cross_entropy").result()
        resumed = sc.create_training_client_from_state_with_optimizer(state)
        resumed.forward_backward(datums(train_batch(3)), "cross_entropy").result()
        resumed.optim_step(types.AdamParams(**ADAM)).result()
    finally:
        server.kill()


VANISHING_TRAINER = """
import sys, time
import tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
tc = sc.create_lora_training_client(base_model="tiny-llama", rank=4)
d = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3, 4]})]
tc.forward_backward(d, "cross_entropy").result()
print(tc.model_id, flush=True)
time.sleep(600)
"""


def test_a_vanished_training_client_frees_its_adapter(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home"), session_timeout_s=3.0) as server:
        svc = server.service
        proc = subprocess.Popen([sys.executable, "-c", VANISHING_TRAINER, server.url, ALICE], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, TINKER_TELEMETRY="0"))
        try:
            model_id = proc.stdout.readline().strip()
            adapter = f"alice:{model_id}"
            assert adapter in svc.backend.trainer.adapters()
        finally:
            proc.kill()
            proc.wait(30)
        wait_until(lambda: adapter not in svc.backend.trainer.adapters(), 30, "the adapter to be released")
        wait_until(lambda: adapter not in svc.host.pool, 30, "the adapter to leave the pool")
        assert svc.store.run(model_id).state == "ended"


def test_concurrent_clients_share_forward_backward_calls(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home")) as server:
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        clients = [sc.create_lora_training_client(base_model="tiny-llama", rank=1 + i, seed=i) for i in range(6)]
        results: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, train(clients[i], train_batch(10 + i))))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert all(results[i][-1] < results[i][0] for i in range(6))
        stats = server.service.training.scheduler.stats()
        assert stats["requests"]["forward_backward"] == 6 * STEPS
        assert stats["calls"]["forward_backward"] < 6 * STEPS  # coalesced
