"""`minlora bench vllm`, the layer part: vLLM's add_lora_linear at real projection shapes,
minlora's punica wrapper against vLLM's own CPU wrapper (PunicaWrapperCPU), side by side.

Both wrappers get the same step (a LoRAMapping: requests cycling over the adapters and the
base model, one LoRA int id per token) and the same adapter weights: in vLLM's layout for
the stock wrapper, in minlora's paged layout (B as rows of B^T, true ranks) for minlora's.
Needs vLLM (the vLLM environment).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

__all__ = ["LLAMA3_8B_LAYERS", "LayerCase", "bench_layer"]

# vLLM's packed projections of Llama-3-8B: (in, output slices).
LLAMA3_8B_LAYERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv_proj": (4096, (4096, 1024, 1024)),
    "o_proj": (4096, (4096,)),
    "gate_up_proj": (4096, (14336, 14336)),
    "down_proj": (14336, (4096,)),
}


@dataclass(frozen=True)
class LayerCase:
    layer: str
    in_features: int
    out_slices: tuple[int, ...]
    ranks: tuple[int, ...]  # true rank of each adapter (one slot each)
    max_rank: int  # vLLM's max_lora_rank
    requests: int  # requests in the step, cycling over the adapters and no adapter
    tokens_per_request: int  # 1 = decode, more = prefill
    dtype: str


class _Weights:
    """The adapters of one layer in both layouts; A and B drawn at each adapter's true rank."""

    def __init__(self, case: LayerCase, seed: int) -> None:
        from minlora.integrations.vllm.layers import LayerPages, PagedStack

        dtype = getattr(torch, case.dtype)
        gen = torch.Generator().manual_seed(seed)
        L, R = len(case.ranks), case.max_rank
        a = [torch.zeros(L, 1, R, case.in_features, dtype=dtype) for _ in case.out_slices]
        self.pages = LayerPages(a, case.out_slices)
        b = self.pages.b_stacked()
        for s, r in enumerate(case.ranks):
            for i, out in enumerate(case.out_slices):
                a[i][s, 0, :r] = (torch.randn(r, case.in_features, generator=gen) / case.in_features ** 0.5).to(dtype)
                b[i][s, 0, :, :r] = torch.randn(out, r, generator=gen).to(dtype)
            self.pages.set_ranks(s, [r] * len(case.out_slices))
        self.paged = (PagedStack(a, self.pages), PagedStack(b, self.pages))
        self.stock = (tuple(a), tuple(t.contiguous() for t in b))  # vLLM's own [L, 1, out, R] B


def _mapping(case: LayerCase):
    from vllm.lora.layers import LoRAMapping

    n = len(case.ranks)
    request_ids = [i % (n + 1) for i in range(case.requests)]  # 0 = no adapter; ids 1..n hold slots 0..n-1
    token_ids = tuple(i for i in request_ids for _ in range(case.tokens_per_request))
    return LoRAMapping(token_ids, tuple(request_ids), is_prefill=True), list(range(1, n + 1)), token_ids


def _best_seconds(fn, y0: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        y = y0.clone()
        t0 = time.perf_counter()
        fn(y)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_layer(case: LayerCase, *, repeats: int = 5, stock_repeats: int = 2, seed: int = 0) -> dict[str, Any]:
    """Times add_lora_linear of both wrappers on one case; their results agree on the adapter rows."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from minlora.integrations.vllm.wrapper import MinloraPunicaWrapper

    weights = _Weights(case, seed)
    mapping, layout, token_ids = _mapping(case)
    T = len(token_ids)
    capacity = max(T, 1)
    config = LoRAConfig(max_lora_rank=case.max_rank, max_loras=len(case.ranks))
    stock = PunicaWrapperCPU(capacity, case.requests, "cpu")
    ours = MinloraPunicaWrapper(capacity, case.requests, "cpu", lora_config=config)
    for w in (stock, ours):
        w.update_metadata(mapping, layout, len(layout) + 1, 128256)

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, case.in_features, generator=gen).to(dtype)
    y0 = torch.randn(T, sum(case.out_slices), generator=gen).to(dtype)

    def run(wrapper, stacks):
        return lambda y: wrapper.add_lora_linear(y, x, stacks[0], stacks[1], 1.0, case.out_slices)

    results = {}
    for name, fn, reps in (("minlora", run(ours, weights.paged), repeats), ("stock", run(stock, weights.stock),
                                                                            stock_repeats)):
        y = y0.clone()
        fn(y)  # warm-up, and the result compared below
        results[name] = y
        results[f"{name}_s"] = _best_seconds(fn, y0, reps)
    has = torch.tensor([i > 0 for i in token_ids])
    ref = (results["stock"] - y0)[has].double()
    err = float(((results["minlora"] - y0)[has].double() - ref).norm() / ref.norm().clamp_min(1e-30))
    esize = torch.empty(0, dtype=dtype).element_size()
    used = [r for i, r in enumerate(case.ranks) if (i + 1) in set(token_ids)]
    row_bytes = case.in_features * len(case.out_slices) + sum(case.out_slices)
    return {
        **asdict(case),
        "tokens": T,
        "minlora_ms": results["minlora_s"] * 1e3,
        "stock_ms": results["stock_s"] * 1e3,
        "x_stock": results["stock_s"] / results["minlora_s"],
        "relerr_vs_stock": err,
        # minlora reads each used adapter's true-rank pages; vLLM's stored slots are padded to R.
        "true_weight_mb": sum(used) * row_bytes * esize / 1e6,
        "padded_weight_mb": len(used) * case.max_rank * row_bytes * esize / 1e6,
        "base_rows_unchanged": bool(torch.equal(results["minlora"][~has], y0[~has])),
    }


def layer_cases(layers: Sequence[str], ranks: Sequence[int], max_rank: int, decode_requests: int,
                prefill_requests: int, prefill_tokens: int, dtype: str) -> list[LayerCase]:
    cases = []
    for name in layers:
        if name not in LLAMA3_8B_LAYERS:
            raise ValueError(f"unknown layer {name!r}; choose from {', '.join(LLAMA3_8B_LAYERS)}")
        n_in, outs = LLAMA3_8B_LAYERS[name]
        cases.append(LayerCase(name, n_in, outs, tuple(ranks), max_rank, decode_requests, 1, dtype))
        if prefill_requests > 0:
            cases.append(LayerCase(name, n_in, outs, tuple(ranks), max_rank, prefill_requests, prefill_tokens, dtype))
    return cases
