"""The decode engine on the patched tiny Llama, checked against PEFT's own model.

Every generated token must have been chosen from the distribution PEFT gives for that
adapter and context (greedy: PEFT's argmax; sampled: a token PEFT gives positive probability)
and its reported logprob must be PEFT's, although rows of different adapters, prompt lengths
and start times share every forward.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from minlora.serve.engine import DecodeEngine, SampleJob
from minlora.serve.model_host import load_hosted_model
from minlora.serve.sampler import RowSampling, StopRule

from helpers.serve import model_dir, peft_dir, peft_model, teacher_logprobs, wait_until

TOL = 2e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    host = load_hosted_model(model_dir(str(root)), pool_bytes=64 << 20)
    dirs = {"a": peft_dir(str(root), "a", rank=2, seed=1), "b": peft_dir(str(root), "b", rank=8, seed=2),
            "c": peft_dir(str(root), "c", rank=1, seed=3, targets=["q_proj", "v_proj"])}
    for name, d in dirs.items():
        host.pool.register(name, d)
    oracles = {None: peft_model(None), **{n: peft_model(d) for n, d in dirs.items()}}
    yield host, oracles
    host.pool.close()


class Answer:
    def __init__(self):
        self.event = threading.Event()
        self.result = None
        self.exc = None

    def __call__(self, result, exc):
        self.result, self.exc = result, exc
        self.event.set()

    def get(self):
        assert self.event.wait(60), "no answer"
        assert self.exc is None, self.exc
        return self.result


def job(host, prompt, adapter, *, n=1, temperature=0.0, seed=0, max_tokens=12, stop=frozenset(), **kw):
    lease = host.pool.prepare([adapter], wait=True) if adapter is not None else None
    answer = Answer()
    rows = [RowSampling(temperature, kw.pop("top_k", -1), kw.pop("top_p", 1.0), np.random.default_rng([seed, i]))
            for i in range(n)]
    return SampleJob(prompt=prompt, adapter=adapter, sampling=rows, stop=StopRule(max_tokens, stop_tokens=stop),
                     done=answer, lease=lease, **kw), answer


def check_against_oracle(oracle, prompt, seq, temperature, greedy):
    _, gen_lp, rows = teacher_logprobs(oracle, prompt, seq["tokens"])
    scaled = torch.log_softmax(rows / temperature, dim=-1) if temperature > 0 else rows
    for i, tok in enumerate(seq["tokens"]):
        if greedy:
            assert scaled[i, tok] >= scaled[i].max() - TOL, f"token {i} is not PEFT's argmax"
        assert abs(seq["logprobs"][i] - float(scaled[i, tok])) <= TOL, (i, seq["logprobs"][i], float(scaled[i, tok]))


def test_mixed_batch_matches_peft_with_joins_between_steps(setup):
    host, oracles = setup
    engine = DecodeEngine(host, max_rows=16)
    try:
        first = [job(host, [5, 6, 7, 8, 9, 10], "a", max_tokens=24), job(host, [11, 12], "b", max_tokens=24),
                 job(host, [13, 14, 15], None, max_tokens=24)]
        for j, _ in first:
            engine.submit(j)
        wait_until(lambda: engine.stats().get("steps", 0) >= 3, 30, "three decode steps")
        later = [job(host, [20, 21, 22, 23], "c", max_tokens=10), job(host, [30], "a", max_tokens=10),
                 job(host, [40, 41, 42, 43, 44, 45, 46, 47], "b", max_tokens=10, want_prompt_logprobs=True,
                     topk_prompt_logprobs=3)]
        for j, _ in later:
            engine.submit(j)
        for j, answer in first + later:
            result = answer.get()
            seq = result["sequences"][0]
            assert len(seq["tokens"]) == j.stop.max_tokens and seq["stop_reason"] == "length"
            check_against_oracle(oracles[j.adapter], j.prompt, seq, 0.0, greedy=True)
        # the later jobs joined a running batch: some steps held rows of several adapters
        assert engine.stats()["prefills"] >= 2
        last_job, last = later[2]
        prompt_lp, _, _ = teacher_logprobs(oracles["b"], last_job.prompt, [])
        got = last.result["prompt_logprobs"]
        assert got[0] is None and np.allclose(got[1:], prompt_lp.numpy(), atol=TOL)
        top = last.result["topk_prompt_logprobs"]
        assert top[0] is None and all(len(t) == 3 for t in top[1:])
    finally:
        engine.close()


def test_sampling_seeds_samples_and_limits(setup):
    host, oracles = setup
    engine = DecodeEngine(host, max_rows=8, max_batch_adapters=1)
    try:
        a, ra = job(host, [3, 4, 5], "b", n=3, temperature=0.8, seed=42, max_tokens=16, top_p=0.95)
        b, rb = job(host, [3, 4, 5], "b", n=3, temperature=0.8, seed=42, max_tokens=16, top_p=0.95)
        c, rc = job(host, [3, 4, 5], "a", n=1, temperature=1.0, seed=7, max_tokens=16)
        z, rz = job(host, [3, 4, 5, 6], None, max_tokens=0, want_prompt_logprobs=True)
        for j in (a, b, c, z):
            engine.submit(j)
        res_a, res_b = ra.get(), rb.get()
        assert [s["tokens"] for s in res_a["sequences"]] == [s["tokens"] for s in res_b["sequences"]]
        assert len({tuple(s["tokens"]) for s in res_a["sequences"]}) > 1  # samples differ from each other
        for seq in res_a["sequences"]:
            check_against_oracle(oracles["b"], a.prompt, seq, 0.8, greedy=False)
        check_against_oracle(oracles["a"], c.prompt, rc.get()["sequences"][0], 1.0, greedy=False)
        zero = rz.get()
        assert zero["sequences"] == [{"tokens": [], "logprobs": [], "stop_reason": "length"}]
        assert zero["prompt_logprobs"][0] is None and len(zero["prompt_logprobs"]) == 4
    finally:
        engine.close()


def test_stop_tokens_and_many_rows(setup):
    host, oracles = setup
    engine = DecodeEngine(host, max_rows=6)
    try:
        probe, answer = job(host, [9, 8, 7], "a", max_tokens=12)
        engine.submit(probe)
        tokens = answer.get()["sequences"][0]["tokens"]
        stop_at = tokens[4]
        first = tokens.index(stop_at)
        j, answer = job(host, [9, 8, 7], "a", max_tokens=12, stop=frozenset({stop_at}))
        engine.submit(j)
        seq = answer.get()["sequences"][0]
        assert seq["stop_reason"] == "stop" and seq["tokens"] == tokens[: first + 1]
        # more requests than rows: they wait their turn and all finish
        jobs = [job(host, [i + 3, i + 4], ["a", "b", "c", None][i % 4], max_tokens=6) for i in range(20)]
        for j, _ in jobs:
            engine.submit(j)
        for j, answer in jobs:
            check_against_oracle(oracles[j.adapter], j.prompt, answer.get()["sequences"][0], 0.0, greedy=True)
        with pytest.raises(ValueError, match="num_samples"):
            engine.submit(job(host, [1], None, n=7)[0])
    finally:
        engine.close()
    assert host.pool.stats()["steps_in_flight"] == 0  # every lease was handed back
