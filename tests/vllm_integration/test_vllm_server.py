"""vLLM's OpenAI-compatible server with minlora as its LoRA backend: five adapters given at
start-up, one loaded at run time through /v1/load_lora_adapter, three slots; 32 concurrent
completions mixing every adapter and the base model, each equal to HF + PEFT's mixed batch
(fp32, greedy tokens and log-probabilities); text prompts through the model's tokenizer."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_assets import NEEDS_VLLM, Row, compare, mixed_rows, peft_greedy, tokenizer

pytest.importorskip("vllm", reason=NEEDS_VLLM)

RUNTIME = "r64"  # loaded through the API once the server runs
MAX_LORAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Server:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group, on loopback."""

    def __init__(self, assets, log_path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        static = [f"{n}={p}" for n, p in assets.adapters.items() if n != RUNTIME]
        cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", assets.base,
               "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port), "--enable-lora",
               "--max-loras", str(MAX_LORAS), "--max-lora-rank", "64", "--max-cpu-loras", str(len(assets.adapters)),
               "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(256 << 20), "--lora-modules", *static]
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **env}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=environ, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, limit_s: float = 600) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; log: {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"the server was not ready after {limit_s} s; log: {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server(llama_assets, tmp_path_factory):
    srv = Server(llama_assets, tmp_path_factory.mktemp("server") / "server.log", MINLORA_VLLM="1")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def complete(server: Server, row: Row) -> dict:
    status, text = post(server.url + "/v1/completions", {
        "model": row.adapter or "base", "prompt": row.prompt, "max_tokens": row.max_tokens, "temperature": 0.0,
        "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True})
    assert status == 200, text[:500]
    choice = json.loads(text)["choices"][0]["logprobs"]
    return {"tokens": [int(t.split(":", 1)[1]) for t in choice["tokens"]], "logprobs": choice["token_logprobs"]}


@pytest.mark.timeout(1200)
def test_concurrent_mixed_requests_with_a_runtime_adapter(server, llama_assets):
    status, text = post(server.url + "/v1/load_lora_adapter",
                        {"lora_name": RUNTIME, "lora_path": llama_assets.adapters[RUNTIME]})
    assert status == 200, text
    with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as resp:
        served = {m["id"] for m in json.loads(resp.read())["data"]}
    assert served == {"base", *llama_assets.adapters}

    rows = mixed_rows(list(llama_assets.adapters), seed=3, lengths=(5, 8, 13, 6), new_tokens=(6, 8, 10, 7))
    assert len(rows) == 32 and sum(r.adapter is None for r in rows) == 8
    want = peft_greedy(llama_assets, rows)
    with ThreadPoolExecutor(len(rows)) as pool:  # all at once: the server batches them continuously
        got = list(pool.map(lambda row: complete(server, row), rows))
    assert compare(rows, want, got) == []


@pytest.mark.timeout(600)
def test_text_and_chat_prompts(server, llama_assets):
    """The served model's own tokenizer: a text completion equals the same prompt as token ids."""
    words = "w5 w17 w230 w42 w8"
    ids = tokenizer()(words, add_special_tokens=False)["input_ids"]
    rows = [Row("r4", ids, 6), Row(None, ids, 6)]
    want = peft_greedy(llama_assets, rows)
    decode = tokenizer().decode
    for row, w in zip(rows, want):
        status, text = post(server.url + "/v1/completions", {"model": row.adapter or "base", "prompt": words,
                                                             "max_tokens": 6, "temperature": 0.0, "ignore_eos": True})
        assert status == 200, text[:500]
        assert json.loads(text)["choices"][0]["text"].split() == decode(w["tokens"]).split()
    status, text = post(server.url + "/v1/chat/completions", {
        "model": "r8", "messages": [{"role": "user", "content": words}], "max_tokens": 4, "temperature": 0.0})
    assert status == 200, text[:500]
    choice = json.loads(text)["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("length", "stop")
