"""The service's parts on their own: tokens, keys, paths, seq ordering, the fair lock, the
sampler, training-data checks and the coalescing scheduler (no model, no HTTP)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from minlora.serve.errors import ApiError
from minlora.serve.fairlock import FairLock
from minlora.serve.keys import KeyRing, key_id
from minlora.serve.ordering import SeqOrder
from minlora.serve.paths import parse_path
from minlora.serve.sampler import RowSampling, StopRule, choose_tokens, prompt_logprobs
from minlora.serve.scheduler import TrainingScheduler, Work
from minlora.serve.tokens import Signer, TokenError
from minlora.serve.train_batch import parse_train_data, stack
from minlora.serve.wire import ForwardBackwardInput, SampleRequest, parse


# ---------------------------------------------------------------------- tokens


def test_jwt_round_trip_and_refusals():
    s = Signer(b"k" * 32)
    token = s.jwt("abc", ttl_s=60, now=1000)
    assert token.startswith("eyJ")  # what the SDKs' prefix check accepts
    claims = s.verify_jwt(token, now=1010)
    assert claims["sub"] == "abc" and claims["iat"] == 1000 and claims["exp"] == 1060
    with pytest.raises(TokenError, match="expired"):
        s.verify_jwt(token, now=1060)
    header, payload, sig = token.split(".")
    with pytest.raises(TokenError, match="signature"):
        s.verify_jwt(f"{header}.{payload}x.{sig}", now=1010)
    with pytest.raises(TokenError, match="signature"):
        Signer(b"o" * 32).verify_jwt(token, now=1010)
    with pytest.raises(TokenError):
        s.verify_jwt("eyJnot-a-jwt", now=1010)
    # A download link is not a JWT and the other way round (keys derived per purpose).
    link = s.url_token({"a": "x", "r": 1}, ttl_s=60, now=1000)
    assert s.open_url_token(link, now=1001) == {"a": "x", "r": 1}
    with pytest.raises(TokenError):
        s.open_url_token(link, now=2000)
    with pytest.raises(TokenError):
        s.open_url_token(token.split(".", 1)[1], now=1001)
    with pytest.raises(ValueError):
        Signer(b"short")


# ---------------------------------------------------------------------- keys


def test_keys_file_owners_and_refusals(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\ntml-aaaaaaaaaaaaaaaa alice\n\nsk-bbbbbbbbbbbbbbbbbb alice  # mint\ntml-cccccccccccccccc\n")
    ring = KeyRing(str(path))
    assert ring.lookup("tml-aaaaaaaaaaaaaaaa").owner == "alice"
    assert ring.lookup("sk-bbbbbbbbbbbbbbbbbb").owner == "alice"
    anon = ring.lookup("tml-cccccccccccccccc")
    assert anon.owner.startswith("key-") and anon.key_id == key_id("tml-cccccccccccccccc")
    assert ring.lookup("tml-unknown-key-xxxx") is None
    assert ring.by_key_id(anon.key_id) == anon
    for bad, why in (("xyz-aaaaaaaaaaaaaaaaaaaa a", "start with"), ("tml-short a", "at least"),
                     ("tml-aaaaaaaaaaaaaaaa bad/owner", "owner"), ("tml-aaaaaaaaaaaaaaaa a b", "KEY")):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=why):
            KeyRing(str(path))
    path.write_text("# nobody\n")
    with pytest.raises(ValueError, match="no API keys"):
        KeyRing(str(path))


def test_keys_file_reload_revokes(tmp_path, monkeypatch):
    import minlora.serve.keys as keys

    monkeypatch.setattr(keys, "_RECHECK_S", 0.0)
    path = tmp_path / "keys"
    path.write_text("tml-aaaaaaaaaaaaaaaa alice\n")
    ring = KeyRing(str(path))
    assert ring.lookup("tml-aaaaaaaaaaaaaaaa") is not None
    path.write_text("tml-dddddddddddddddddd dora\n")
    import os

    os.utime(path, (time.time() + 5, time.time() + 5))
    assert ring.lookup("tml-aaaaaaaaaaaaaaaa") is None
    assert ring.lookup("tml-dddddddddddddddddd").owner == "dora"
    path.write_text("garbage line with too many words\n")  # a broken edit keeps the last good keys
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert ring.lookup("tml-dddddddddddddddddd").owner == "dora"


# ---------------------------------------------------------------------- paths


def test_tinker_paths():
    p = parse_path("tinker://s:train:0/sampler_weights/step-10")
    assert (p.source, p.folder, p.name, p.checkpoint_type, p.checkpoint_id) == (
        "s:train:0", "sampler_weights", "step-10", "sampler", "sampler_weights/step-10")
    assert str(p) == "tinker://s:train:0/sampler_weights/step-10"
    for bad in ("http://x/weights/a", "tinker://x/other/a", "tinker://x/weights", "tinker://x/weights/a/b",
                "tinker:///weights/a", 5, None):
        with pytest.raises(ApiError) as info:
            parse_path(bad)
        assert info.value.status == 400


# ---------------------------------------------------------------------- ordering


def test_seq_order_runs_in_order_one_at_a_time_and_skips_gaps():
    ran: list = []
    order: SeqOrder

    def dispatch(item):
        ran.append(item)
        threading.Thread(target=lambda: (time.sleep(0.01), order.finished(item))).start()

    order = SeqOrder(dispatch, gap_timeout_s=0.3)
    for seq in (3, 2, 5, 1):  # 4 never arrives: after the gap timeout 5 runs anyway
        order.submit(seq, seq)
    deadline = time.monotonic() + 5
    while len(ran) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran == [1, 2, 3, 5]
    order.submit(4, 4)  # a late arrival (already passed) runs next, not never
    order.submit(None, "unordered")
    while len(ran) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran[4:] == [4, "unordered"]
    assert order.has_seq(9) is False
    order.submit(9, 9)
    assert order.close() in ([9], [])


def test_fair_lock_is_first_come_first_served():
    lock = FairLock()
    got: list[int] = []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), got.append(i), lock.release()))
        t.start()
        threads.append(t)
        time.sleep(0.02)  # queue them in this order
    lock.release()
    for t in threads:
        t.join(5)
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError):
        lock.release()


# ---------------------------------------------------------------------- sampler


def _rows(n, **kw):
    return [RowSampling(kw.get("temperature", 1.0), kw.get("top_k", -1), kw.get("top_p", 1.0),
                        np.random.default_rng([kw.get("seed", 0), i])) for i in range(n)]


def test_sampler_greedy_topk_topp_and_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    greedy, lp = choose_tokens(logits, _rows(6, temperature=0.0))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, greedy[:, None]).squeeze(1))
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        tok, _ = choose_tokens(logits, _rows(6, **kw))
        assert torch.equal(tok, logits.argmax(-1))
    tok, lp = choose_tokens(logits, _rows(6, temperature=0.5, top_k=3, seed=4))
    top3 = logits.topk(3, -1).indices
    assert all(int(t) in top3[i].tolist() for i, t in enumerate(tok))
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1).gather(1, tok[:, None]).squeeze(1))
    a, _ = choose_tokens(logits, _rows(6, seed=9))
    b, _ = choose_tokens(logits, _rows(6, seed=9))
    assert torch.equal(a, b)


def test_sampler_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    rows = [RowSampling(1.0, -1, 1.0, np.random.default_rng([3, i])) for i in range(4000)]
    tok, _ = choose_tokens(logits, rows)
    freq = torch.bincount(tok, minlength=4).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), -1), atol=0.03)
    rows = [RowSampling(1.0, -1, 0.7, np.random.default_rng([5, i])) for i in range(4000)]
    tok, _ = choose_tokens(logits, rows)  # top_p 0.7 keeps tokens 0 and 1 (0.64 + 0.24 > 0.7)
    assert set(tok.tolist()) == {0, 1}


def test_prompt_logprobs_and_stop_rule():
    logits = torch.randn(4, 10)
    values, top = prompt_logprobs(logits, [1, 2, 3, 4], topk=2)
    lp = torch.log_softmax(logits, -1)
    assert values[0] is None and values[1:] == pytest.approx([lp[0, 2].item(), lp[1, 3].item(), lp[2, 4].item()])
    assert top[0] is None and [t for t, _ in top[1]] == lp[0].topk(2).indices.tolist()
    assert prompt_logprobs(logits[:1], [7], topk=3) == ([None], [None])
    rule = StopRule(max_tokens=4, stop_tokens=frozenset({9}))
    assert rule.stop_reason([1]) is None and rule.stop_reason([1, 9]) == "stop"
    assert rule.stop_reason([1, 2, 3, 4]) == "length"


# ---------------------------------------------------------------------- training data


def _fbi(**kw) -> ForwardBackwardInput:
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
                                "weights": {"data": [0, 1, 1], "dtype": "float32", "shape": [3]}}}
    datum.update(kw.pop("datum", {}))
    return parse({"data": [datum], "loss_fn": "cross_entropy", **kw}, ForwardBackwardInput, "fbi")


def test_train_data_is_checked_and_stacked():
    limits = dict(vocab_size=10, max_context=16, max_tokens=100)
    d = parse_train_data(_fbi(), "fbi", **limits)
    assert d.num_tokens == 3 and d.datums[0].weights.tolist() == [0, 1, 1]
    bad = [
        (_fbi(loss_fn="dpo"), "not supported"),
        (_fbi(datum={"loss_fn_inputs": {"weights": {"data": [1, 1, 1], "dtype": "float32"}}}), "needs"),
        (_fbi(datum={"loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64"}}}), "expected 3"),
        (_fbi(datum={"loss_fn_inputs": {"target_tokens": {"data": [2, 3, 99], "dtype": "int64"}}}), r"\[0, 10\)"),
        (_fbi(datum={"model_input": {"chunks": [{"type": "image", "data": "x"}]}}), "not supported"),
        (_fbi(datum={"loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
                                        "weights": {"data": [1, float("nan"), 1], "dtype": "float32"}}}), "NaN"),
        (_fbi(loss_fn_config={"beta": 1.0}), "loss_fn_config"),
    ]
    for fbi, why in bad:
        with pytest.raises(ApiError, match=why):
            parse_train_data(fbi, "fbi", **limits)
    # CSR tensors (the SDK's encoding of sparse 2-D weights) decode densely.
    sparse = parse({"data": [5.0, 6.0], "dtype": "float32", "shape": [2, 3], "sparse_crow_indices": [0, 1, 2],
                    "sparse_col_indices": [2, 0]}, type(_fbi().data[0].loss_fn_inputs["weights"]), "t")
    assert sparse.to_tensor("t").tolist() == [[0, 0, 5], [6, 0, 0]]
    other = parse_train_data(parse({"data": [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": [4]}]},
                                              "loss_fn_inputs": {"target_tokens": {"data": [5], "dtype": "int64"}}}],
                                    "loss_fn": "cross_entropy"}, ForwardBackwardInput, "x"), "x", **limits)
    batch = stack([("a", d), ("b", other)], torch.device("cpu"))
    assert batch.adapters == ["a", "b"] and batch.rows == [(0, 1), (1, 1)] and batch.lengths == [3, 1]
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.weights.tolist() == [[0, 1, 1], [1, 0, 0]] and batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sample_request_wire_checks():
    ok = parse({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
                "sampling_params": {"stop": [3, 4], "temperature": 0.5}, "unknown_new_field": 1}, SampleRequest, "s")
    assert ok.sampling_params.stop == [3, 4]
    with pytest.raises(ApiError, match="prompt"):
        parse({"sampling_params": {}}, SampleRequest, "asample")
    with pytest.raises(ApiError, match="tokens"):
        parse({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [True]}]}, "sampling_params": {}},
              SampleRequest, "asample")


# ---------------------------------------------------------------------- scheduler


def test_scheduler_coalesces_concurrent_clients_and_keeps_each_in_order():
    calls: list[tuple[str, list]] = []

    def execute(kind, works):
        calls.append((kind, [w.payload for w in works]))
        time.sleep(0.02)  # a step takes time: the others' next requests arrive meanwhile
        return [f"{kind}:{w.payload}" for w in works]

    sched = TrainingScheduler(FairLock(), execute, linger_s=0.005)
    results: dict[str, list] = {}
    clients = [f"c{i}" for i in range(8)]

    def client(name):
        got = results.setdefault(name, [])
        for step in range(3):
            for kind in ("forward_backward", "optim_step"):
                done = threading.Event()
                sched.ready(Work(kind, name, key=("k",), payload=f"{name}.{step}", tokens=1,
                                 on_done=lambda r, e: (got.append(r), done.set())))
                done.wait(10)

    threads = [threading.Thread(target=client, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sched.close()
    for c in clients:
        assert results[c] == [f"{k}:{c}.{s}" for s in range(3) for k in ("forward_backward", "optim_step")]
    fb_calls = [p for k, p in calls if k == "forward_backward"]
    assert sum(len(p) for p in fb_calls) == 24
    assert len(fb_calls) < 24 and max(len(p) for p in fb_calls) >= 4  # requests were shared
    assert all(len({x.split(".")[0] for x in p}) == len(p) for p in fb_calls)  # one request per client per call
