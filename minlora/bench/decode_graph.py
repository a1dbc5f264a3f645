"""The patched model's decode step as one CUDA graph, against the memory-traffic floor.

A decode step (one token per request, a KV cache of `context` tokens) must at least read the
base weights, the pages of the step's distinct adapters and the KV cache; at the device's
measured copy bandwidth that is the floor.  `DecodeStep` holds the fixed inputs of such a
step (a transformers StaticCache, the token, position and mask tensors), runs the prefill and
the eager decode on any device, and on CUDA captures the decode once and replays it after
each refill of the step buffers (`minlora.adapters(...)`, then `plan_tokens` after the prefill).
"""
from __future__ import annotations

import inspect

import statistics
from typing import Any, Sequence

import torch

import minlora
from minlora.patching import plan_tokens

__all__ = ["DecodeStep", "device_copy_bandwidth", "bench_decode_graph"]


def device_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes per second a device-to-device copy moves (bytes read + bytes written)."""
    if device.type != "cuda":
        raise RuntimeError("the copy bandwidth is measured on a CUDA device")
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = max(1 << 20, min(nbytes, free // 4))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / min(times)


class DecodeStep:
    """One decode step of `model` (patched) for `batch` requests after `context` prompt tokens."""

    def __init__(self, model: torch.nn.Module, batch: int, context: int, vocab: int, seed: int = 0) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.batch, self.context = int(batch), int(context)
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(3, vocab, (batch, context), generator=g).to(self.device)
        self.cache = StaticCache(config=model.config, max_cache_len=context + 1)
        # The graph's inputs: fixed tensors, refilled in place.
        self.token = torch.randint(3, vocab, (batch, 1), generator=g).to(self.device)
        self.position = torch.full((1,), context, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(batch, context + 1, dtype=torch.long, device=self.device)
        self.graph: Any = None
        self.logits: Any = None
        # transformers renamed the KV-cache keyword (past_key_values -> cache); use what it takes.
        forward_params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"

    def prefill(self) -> None:
        """Fills the KV cache with the prompt under the current step's adapters and makes the
        step's token plan the decode's (call inside `minlora.adapters(model, ...)`)."""
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, : self.context] = 1
        self.model(self.prompt, **{self._cache_kw: self.cache},
                   cache_position=torch.arange(self.context, device=self.device), attention_mask=self.mask)
        self.mask[:, self.context] = 1
        plan_tokens(self.model, 1)

    def rewind(self) -> None:
        """Puts the cache's write position back at `context`.  A StaticCache layer keeps that
        position in a device counter which every forward advances (the model reads no
        cache_position), so without this the warm-ups and each replay would write one column
        further, past the mask and then past the cache."""
        for layer in self.cache.layers:
            # Sliding-window and indexed layers keep more counters (a host copy, an index's).
            for name in ("cumulative_length", "cumulative_length_int", "indexer_cumulative_length"):
                written = getattr(layer, name, None)
                if isinstance(written, torch.Tensor):
                    written.fill_(self.context)  # in place: the captured graph holds its address
                elif isinstance(written, int):
                    setattr(layer, name, self.context)

    def decode(self) -> torch.Tensor:
        """The decode forward (the rewind first, so that a captured graph carries it): logits
        [B, 1, vocab]."""
        self.rewind()
        return self.model(self.token, **{self._cache_kw: self.cache}, cache_position=self.position,
                          attention_mask=self.mask).logits

    def capture(self) -> None:
        """Captures the decode in one CUDA graph (after warm-up forwards on a side stream)."""
        if self.device.type != "cuda":
            raise RuntimeError("a CUDA graph needs the model on a CUDA device")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.decode()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.decode()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits

    def traffic_bytes(self, step: Any, module_shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        """The bytes a decode step must read: base weights (the input embedding only for the
        batch's rows), the step's distinct adapters' pages, the KV cache."""
        model = self.model
        emb = model.get_input_embeddings().weight
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        base = params - emb.numel() * emb.element_size() + self.batch * emb.shape[1] * emb.element_size()
        names = list(module_shapes)
        host = step.host_tables(names)
        elem = emb.element_size()
        rows = torch.tensor([i + o for i, o in module_shapes.values()], dtype=torch.int64)
        pages = int((torch.from_numpy(host.ranks).long().sum(1) * rows).sum()) * elem
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = 2 * cfg.num_hidden_layers * self.batch * cfg.num_key_value_heads * head_dim * (self.context + 1) * elem
        return {"base_weights": int(base), "adapter_pages": pages, "kv_cache": int(kv), "total": int(base + pages + kv)}


def bench_decode_graph(model: torch.nn.Module, module_shapes: dict[str, tuple[int, int]],
                       assignments: Sequence[Sequence[Any]], context: int, vocab: int, repeats: int = 50,
                       seed: int = 0) -> dict[str, Any]:
    """Times the patched decode step as a CUDA graph (median over `repeats` replays per
    assignment, each assignment refilled into the step buffers before its replays) and eagerly,
    against the memory-traffic floor at the measured copy bandwidth."""
    dec = DecodeStep(model, len(assignments[0]), context, vocab, seed)
    graph_times: list[float] = []
    eager_times: list[float] = []
    traffic = None
    with torch.no_grad():
        for assign in assignments:
            with minlora.adapters(model, list(assign)) as step:
                dec.prefill()
                if traffic is None:
                    traffic = dec.traffic_bytes(step, module_shapes)
                    dec.capture()  # raises on CPU: everything before it runs anywhere
                eager_times.append(_median_time(dec.decode, max(3, repeats // 5)))
                graph_times.append(_median_time(dec.replay, repeats))
    bandwidth = device_copy_bandwidth(dec.device)
    floor_s = traffic["total"] / bandwidth
    graph_s = statistics.median(graph_times)
    eager_s = statistics.median(eager_times)
    return {
        "context": context, "batch": dec.batch, "assignments": len(assignments),
        "graph_s": graph_s, "eager_s": eager_s, "eager_over_graph": eager_s / graph_s,
        "copy_bandwidth_Bps": bandwidth, "traffic_bytes": traffic, "floor_s": floor_s,
        "graph_over_floor": graph_s / floor_s,
    }


def _median_time(fn: Any, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
