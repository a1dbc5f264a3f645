"""What the `minlora serve` tests share: a tiny Llama directory (optionally with a tokenizer),
PEFT adapters made by PEFT, API keys, a server on a free loopback port (in this process or
in a subprocess), and PEFT as the oracle of what a sample's logprobs must be.

No downloads: the model is built from a config with random weights and saved with
save_pretrained; clients send token ids.  This file holds no tests.
"""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from typing import Iterator, Optional

import torch

from helpers import REPO
from helpers.patching import ALL_LLAMA, make_peft_adapter

os.environ.setdefault("TINKER_TELEMETRY", "0")

VOCAB = 96
CONTEXT = 256
ALICE = "tml-alice-0123456789abcdef"
ALICE_MINT = "sk-alice-0123456789abcdef"
BOB = "tml-bob-0123456789abcdef00"
CAROL_MINT = "sk-carol-0123456789abcdef"
KEYS = {ALICE: "alice", ALICE_MINT: "alice", BOB: "bob", CAROL_MINT: "carol"}


def tiny_llama(seed: int = 11) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=CONTEXT, vocab_size=VOCAB,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def save_tokenizer(path: str) -> None:
    """A character-level tokenizer over the model's 96 ids (0-2 special), saved beside the model."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.ascii_letters + string.digits + string.punctuation + " "][: VOCAB - 3]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(path)


def model_dir(root: str, *, tokenizer: bool = False) -> str:
    path = os.path.join(root, "tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_llama().save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return path


def peft_dir(root: str, name: str, *, rank: int = 4, seed: int = 0, targets: Optional[list] = None) -> str:
    path = os.path.join(root, "peft", name)
    make_peft_adapter(tiny_llama(), dict(r=rank, lora_alpha=2 * rank, target_modules=targets or ALL_LLAMA),
                      path, seed=seed)
    return path


def peft_model(peft_path: Optional[str]) -> torch.nn.Module:
    """The base model with one PEFT adapter (or none), as PEFT runs it: the oracle."""
    from peft import PeftModel

    base = tiny_llama()
    if peft_path is None:
        return base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), peft_path).eval()


def teacher_logprobs(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Under `model` (float64 log-softmax): the logprobs [N-1] of prompt[1:], the logprobs [G] of
    the generated tokens, and the log-softmax rows [G, V] each generated token was chosen from."""
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].double(), dim=-1)
    targets = seq[0, 1:]
    picked = lp[:-1].gather(1, targets[:, None]).squeeze(1)
    n = len(prompt)
    return picked[: n - 1], picked[n - 1:], lp[n - 1: n - 1 + len(generated)]


def train_batch(seed: int, rows: int = 2, length: int = 12) -> list[list[int]]:
    """`rows` random token sequences of length+1 (input = seq[:-1], targets = seq[1:])."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB - 6, (length + 1,), generator=g).tolist() for _ in range(rows)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def in_process_server(model_path: str, root: str, **config) -> Iterator[object]:
    """A Service + HTTP server on a background thread; yields the Server (its .url, .service)."""
    from minlora.serve import ServeConfig, Server, Service

    config.setdefault("api_keys", KEYS)
    config.setdefault("long_poll_s", 2.0)
    service = Service(ServeConfig(model_dir=model_path, root=root, **config))
    server = Server(service, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


class ServerProcess:
    """`minlora serve` in a subprocess (for restarts and crashes)."""

    def __init__(self, model_path: str, root: str, keys_file: str, port: Optional[int] = None, *extra: str) -> None:
        self.args = [sys.executable, "-m", "minlora", "serve", "--model", model_path, "--root", root,
                     "--api-keys", keys_file, "--port", str(port or free_port()), "--log-level", "warning", *extra]
        self.port = int(self.args[self.args.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = os.path.join(root, f"server-{self.port}.log")

    def start(self, timeout: float = 90.0) -> "ServerProcess":
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        self.proc = subprocess.Popen(self.args, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {open(self.log).read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/v1/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"the server did not come up: {open(self.log).read()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def write_keys(path: str, keys: dict = KEYS) -> str:
    with open(path, "w") as f:
        for key, owner in keys.items():
            f.write(f"{key} {owner}\n")
    return path


def wait_until(predicate, timeout: float, what: str, period: float = 0.05) -> None:
    """Polls `predicate` until true; fails naming `what` after `timeout` s (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(period)
