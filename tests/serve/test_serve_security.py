"""Keys, isolation between owners, and hostile requests: every answer is the API's error shape
(`{"detail": ...}`, 4xx), never someone else's data, never a 500."""
from __future__ import annotations

import json
import os

import pytest

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")
from tinker import types  # noqa: E402

from helpers.serve import ALICE, BOB, in_process_server, model_dir, peft_dir  # noqa: E402

POST_ENDPOINTS = [
    "client/config", "auth/token", "create_session", "session_heartbeat", "retrieve_future", "create_model",
    "get_info", "unload_model", "forward", "forward_backward", "optim_step", "save_weights",
    "save_weights_for_sampler", "load_weights", "weights_info", "create_sampling_session", "asample", "telemetry",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve-security"))
    with in_process_server(model_dir(root), os.path.join(root, "home"), max_request_bytes=1 << 20) as server:
        server.service.registry.import_peft(peft_dir(root, "a", rank=2, seed=5), "alice:a")
        yield server


def http(env, key=ALICE) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=env.url + "/api/v1", headers=headers, timeout=30)


def assert_error(resp, status, match=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    assert "Traceback" not in resp.text
    if match:
        assert match in body["detail"], body["detail"]


def test_keys_are_required_and_checked(env):
    with pytest.raises(tinker.AuthenticationError, match="invalid API key"):
        tinker.ServiceClient(base_url=env.url, api_key="tml-wrong-key-0000000000")
    with pytest.raises(tinker.TinkerError, match="tml-"):  # the SDK's own shape check, before any request
        tinker.ServiceClient(base_url=env.url, api_key="not-a-key")
    assert_error(http(env, key=None).post("/create_session", json={}), 401, "missing API key")
    assert_error(http(env, key="tml-unknown-00000000000").get("/training_runs"), 401, "invalid API key")
    jwt = http(env).post("/auth/token", json={}).json()["jwt"]
    assert http(env, key=jwt).get("/training_runs").status_code == 200  # the JWT works in place of the key
    head, payload, sig = jwt.split(".")
    resp = http(env, key=f"{head}.{payload}.{sig[:-2]}AA").get("/training_runs")
    assert_error(resp, 401, "invalid token")
    assert "invalid_token" in resp.headers.get("www-authenticate", "")
    assert http(env, key=None).get("/healthz").json() == {"status": "ok"}


def test_another_key_sees_nothing_of_alices(env):
    alice, bob = http(env, ALICE), http(env, BOB)
    sid = alice.post("/create_session", json={"tags": [], "sdk_version": "x"}).json()["session_id"]
    sampler = alice.post("/create_sampling_session", json={
        "session_id": sid, "sampling_session_seq_id": 0, "model_path": "tinker://alice:a/sampler_weights/1"}
    ).json()["sampling_session_id"]
    sample = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
              "sampling_params": {"max_tokens": 3, "temperature": 0.0}, "sampling_session_id": sampler}
    rid = alice.post("/asample", json=sample).json()["request_id"]
    done = alice.post("/retrieve_future", json={"request_id": rid}).json()
    assert len(done["sequences"][0]["tokens"]) == 3

    assert_error(bob.post("/retrieve_future", json={"request_id": rid}), 404)
    assert_error(bob.get(f"/samplers/{sampler}"), 404)
    assert_error(bob.post("/asample", json=sample), 404)
    assert_error(bob.post("/session_heartbeat", json={"session_id": sid}), 404)
    assert_error(bob.get(f"/sessions/{sid}"), 404)
    assert sid not in bob.get("/sessions").json()["sessions"]
    assert sid in alice.get("/sessions").json()["sessions"]
    bob_sid = bob.post("/create_session", json={"tags": []}).json()["session_id"]
    for path in ("tinker://alice:a/sampler_weights/1", "tinker://alice:a/sampler_weights/serving"):
        assert_error(bob.post("/create_sampling_session", json={
            "session_id": bob_sid, "sampling_session_seq_id": 0, "model_path": path}), 404)
    assert_error(bob.post("/create_sampling_session", json={  # someone else's session id
        "session_id": sid, "sampling_session_seq_id": 5, "base_model": "tiny-llama"}), 404)
    assert_error(bob.get("/training_runs/alice:a/checkpoints"), 404)
    assert_error(bob.get("/training_runs/alice:a/checkpoints/sampler_weights/1/archive"), 404)
    assert_error(bob.post("/weights_info", json={"tinker_path": "tinker://alice:a/sampler_weights/1"}), 404)
    assert_error(bob.get(f"/training_runs/{sid}:train:0"), 404)
    # the SDK surfaces the same refusals as NotFoundError
    sc = tinker.ServiceClient(base_url=env.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        sc.create_sampling_client(model_path="tinker://alice:a/sampler_weights/1")
    with pytest.raises(tinker.NotFoundError):
        sc.create_rest_client().get_training_run(f"{sid}:train:0").result()


def test_another_key_cannot_see_a_training_run_or_its_checkpoints(env):
    import time

    from minlora.serve.state import CheckpointRecord, RunRecord

    svc = env.service  # a run as a training client leaves it: its row and a sampler checkpoint's
    run_id = "00000000-0000-4000-8000-000000000001:train:0"
    svc.store.add_run(RunRecord(run_id, "alice", run_id.split(":")[0], "alice:a", "tiny-llama", {"rank": 2},
                                {"note": "x"}, time.time(), time.time(), state="ended"))
    svc.store.put_checkpoint(CheckpointRecord(run_id, "sampler", "final", "alice", "alice:a", 1, 100, time.time()),
                             overwrite=False)
    path = f"tinker://{run_id}/sampler_weights/final"
    rest = tinker.ServiceClient(base_url=env.url, api_key=ALICE).create_rest_client()
    runs = rest.list_training_runs().result().training_runs
    assert [r.training_run_id for r in runs] == [run_id] and runs[0].last_sampler_checkpoint.tinker_path == path
    assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [path]
    assert rest.get_checkpoint_archive_url_from_tinker_path(path).result().url
    bob = tinker.ServiceClient(base_url=env.url, api_key=BOB)
    bob_rest = bob.create_rest_client()
    assert bob_rest.list_training_runs().result().training_runs == []
    assert bob_rest.list_user_checkpoints().result().checkpoints == []
    for call in (lambda: bob_rest.get_training_run(run_id), lambda: bob_rest.list_checkpoints(run_id),
                 lambda: bob_rest.get_checkpoint_archive_url_from_tinker_path(path),
                 lambda: bob_rest.get_weights_info_by_tinker_path(path),
                 lambda: bob_rest.delete_checkpoint_from_tinker_path(path),
                 lambda: bob_rest.publish_checkpoint_from_tinker_path(path)):
        with pytest.raises(tinker.NotFoundError):
            call().result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=path)
    # published, bob may sample it (and still not change it)
    rest.publish_checkpoint_from_tinker_path(path).result()
    bob.create_sampling_client(model_path=path)
    with pytest.raises(tinker.NotFoundError):
        bob_rest.delete_checkpoint_from_tinker_path(path).result()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        bob.create_sampling_client(model_path=path)


def test_malformed_requests_get_400_never_500(env):
    c = http(env)
    garbage = [b"", b"null", b"[]", b"{}", b'{"x":', b"\xff\xfe", b'"text"', b"123",
               json.dumps({"model_id": 5, "session_id": [], "seq_id": "x", "prompt": 3}).encode(),
               json.dumps({"request_id": {"a": 1}, "sampling_params": {"max_tokens": "many"}}).encode()]
    for endpoint in POST_ENDPOINTS:
        for raw in garbage:
            resp = c.post("/" + endpoint, content=raw, headers={"content-type": "application/json"})
            assert resp.status_code < 500, (endpoint, raw, resp.status_code, resp.text)
            if resp.status_code >= 400:
                assert isinstance(resp.json().get("detail"), str), (endpoint, raw, resp.text)
    assert_error(c.post("/create_session", content=b'{"tags": 5}'), 400, "tags")
    assert_error(c.post("/retrieve_future", content=b"{bad json"), 400, "not valid JSON")
    assert_error(c.get("/no/such/endpoint"), 404, "no such endpoint")
    assert_error(c.get("/create_session"), 405)
    assert_error(c.get("/training_runs", params={"limit": -1}), 400, "limit")
    assert_error(c.get("/training_runs", params={"limit": "x"}), 400)
    assert_error(c.post("/retrieve_future", json={"request_id": "req-nope"}), 404, "unknown request_id")
    assert_error(c.post("/create_model", json={"session_id": "x", "model_seq_id": 0, "base_model": "tiny-llama",
                                                "lora_config": {"rank": 4}}), 404)


def test_request_size_limits(env):
    c = http(env)
    assert_error(c.post("/telemetry", content=b"x" * ((1 << 20) + 1)), 413, "limit")

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(40):
            yield b"y" * 65536

    assert_error(c.post("/asample", content=chunks()), 413, "limit")
    assert c.get("/healthz").status_code == 200  # the server goes on


def test_stop_strings_without_a_tokenizer_are_refused(env):
    sampler = tinker.ServiceClient(base_url=env.url, api_key=ALICE).create_sampling_client(base_model="tiny-llama")
    with pytest.raises(tinker.BadRequestError, match="tokenizer"):
        sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2, stop=["\n"])).result()
