"""Restarts and vanished clients: a crashed server comes back with its sessions, samplers and
registry intact and answers the futures it lost with a clear failure; a client that stops
heartbeating is expired and the adapter memory it held is freed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")
from tinker import types  # noqa: E402

from minlora.registry import Registry  # noqa: E402
from minlora.serve.state import CheckpointRecord, RunRecord, StateStore  # noqa: E402
from helpers import REPO  # noqa: E402
from helpers.serve import (ALICE, ServerProcess, in_process_server, model_dir, peft_dir,  # noqa: E402
                            wait_until, write_keys)


def raw(url, key=ALICE):
    return httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key}, timeout=60)


def test_restart_keeps_sessions_and_samplers_and_fails_lost_futures(tmp_path):
    root = str(tmp_path)
    home = os.path.join(root, "home")
    model = model_dir(root)
    with Registry(root=home) as reg:
        reg.import_peft(peft_dir(root, "a", rank=4, seed=9), "alice:a")
    # a checkpoint row as a training client leaves it (the trainer itself is tested elsewhere)
    store = StateStore("sqlite:///" + os.path.join(home, "serve.db"))
    run_id = "00000000-0000-4000-8000-000000000002:train:0"
    store.add_run(RunRecord(run_id, "alice", run_id.split(":")[0], "alice:a", "tiny-llama", {"rank": 4}, {},
                            time.time(), time.time(), state="ended"))
    store.put_checkpoint(CheckpointRecord(run_id, "sampler", "final", "alice", "alice:a", 1, 1, time.time()),
                         overwrite=False)
    store.close()
    checkpoint = f"tinker://{run_id}/sampler_weights/final"
    server = ServerProcess(model, home, write_keys(os.path.join(root, "keys"))).start()
    try:
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        sampler = sc.create_sampling_client(model_path="tinker://alice:a/sampler_weights/1")
        prompt = types.ModelInput.from_ints([7, 8, 9])
        greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
        before = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
        # A long request in flight when the server dies.
        c = raw(server.url)
        session = c.get("/sessions").json()["sessions"][0]
        sid = c.post("/create_sampling_session", json={"session_id": session, "sampling_session_seq_id": 50,
                                                       "base_model": "tiny-llama"}).json()["sampling_session_id"]
        rid = c.post("/asample", json={"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                       "sampling_params": {"max_tokens": 250, "stop": []},
                                       "sampling_session_id": sid}).json()["request_id"]
        server.kill()
        server = ServerProcess(model, home, os.path.join(root, "keys"), server.port).start()
        c = raw(server.url)
        lost = c.post("/retrieve_future", json={"request_id": rid})
        assert lost.status_code == 200
        assert lost.json()["category"] == "server" and "restarted" in lost.json()["error"]
        assert c.post("/retrieve_future", json={"request_id": "req-000000000000-nope"}).status_code == 404
        # The client made before the crash goes on: its session and sampling session were kept.
        assert sampler.sample(prompt, 1, greedy).result().sequences[0].tokens == before
        # The checkpoint is still listed and still samples the same weights.
        rest = sc.create_rest_client()
        assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [checkpoint]
        again = sc.create_sampling_client(model_path=checkpoint).sample(prompt, 1, greedy).result()
        assert again.sequences[0].tokens == before
        assert session in c.get("/sessions").json()["sessions"]
        assert c.get(f"/samplers/{sid}").json()["base_model"] == "tiny-llama"
        # The registry revision behind it is intact, and the CLI reads it.
        out = subprocess.run([sys.executable, "-m", "minlora", "adapters", "--root", home, "log", "alice:a", "--json"],
                             capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.returncode == 0, out.stderr
        assert [r["number"] for r in json.loads(out.stdout)] == [1]
    finally:
        server.kill()


CLIENT = """
import os, sys, time
import tinker
from tinker import types
sc = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
s = sc.create_sampling_client(model_path="tinker://alice:a/sampler_weights/1")
s.sample(types.ModelInput.from_ints([3, 4]), 1, types.SamplingParams(max_tokens=2)).result()
print("SAMPLED", flush=True)
time.sleep(600)
"""


def test_a_client_that_vanishes_is_expired_and_its_adapters_freed(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home"), session_timeout_s=3.0) as server:
        svc = server.service
        rev = svc.registry.import_peft(peft_dir(root, "a", rank=4, seed=9), "alice:a")
        pool_id = f"revision/{rev.content_hash}"
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.url, ALICE], stdout=subprocess.PIPE,
                                text=True, env=dict(os.environ, TINKER_TELEMETRY="0"))
        try:
            assert proc.stdout.readline().strip() == "SAMPLED"
            assert svc.host.pool.residency(pool_id) == "gpu"
            assert svc.host.pool.stats()["fast_used_bytes"] > 0
            session = raw(server.url).get("/sessions").json()["sessions"][0]
        finally:
            proc.kill()
            proc.wait(30)
        wait_until(lambda: pool_id not in svc.host.pool, 30, "the vanished client's adapter to leave the pool")
        assert svc.host.pool.stats()["fast_used_bytes"] == 0
        rec = svc.store.session(session)
        assert rec.ended_at is not None and "no heartbeat" in rec.end_reason
        resp = raw(server.url).post("/session_heartbeat", json={"session_id": session})
        assert resp.status_code == 404 and "has ended" in resp.json()["detail"]


def test_heartbeats_keep_a_session_alive(tmp_path):
    root = str(tmp_path)
    with in_process_server(model_dir(root), os.path.join(root, "home"), session_timeout_s=1.5) as server:
        c = raw(server.url)
        session = c.post("/create_session", json={"tags": []}).json()["session_id"]
        for _ in range(6):  # 3 s of heartbeats, twice the timeout
            time.sleep(0.5)
            assert c.post("/session_heartbeat", json={"session_id": session}).status_code == 200
        assert server.service.sessions.is_live(session)
        wait_until(lambda: not server.service.sessions.is_live(session), 30, "the silent session to end")
