"""A small forward and backward through every CUDA kernel path, for compute-sanitizer.

Run by scripts/gpu_check.sh (stage perf) under `compute-sanitizer --tool memcheck|racecheck`:
`python scripts/gpu_sanitize_case.py [cuda|cpu] [--light]`; cpu runs the same cases on the CPU
kernels.  --light (for racecheck, which tracks every shared-memory access and is the slowest
tool) drops the float16 twins of the bfloat16 cases (the same kernel code) and the one-token
segments forced through the grouped GEMM (hundreds of tiles of one row each).
Paths: the split decode (few groups: the shrink's K and the expand's N split across blocks),
the fused gather (more groups than twice the multiprocessors), the grouped GEMM (long
segments, float16 / bfloat16), the one-block-per-token fallback, and the backward (pool
gradients and grad_x; the accumulating form into float32 pages), each under every
MINLORA_CUDA_KERNELS mode.  Every result is also compared with the float64 reference, so a
run that the sanitizer passes is a correct run too.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import minlora  # noqa: E402
from helpers.cases import TOLERANCE, make_case, rel_error  # noqa: E402
from minlora.reference import lora_backward_ref, lora_forward_ref  # noqa: E402

MODES = ("auto", "gather", "grouped", "fallback")


def cases(device: str) -> list[tuple[str, torch.dtype, object]]:
    """(name, dtype, case on `device`): shapes small enough for racecheck, large enough to split."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132
    many = 2 * sms + 40  # more groups than the split rule's target: the fused gather kernel
    g = torch.Generator().manual_seed(1234)
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        out.append(("decode_split", dtype, make_case(12, 256, 72, [16, 1, 8, 16, 4, 2, 16, 8, 3, 16, 1, 5], dtype,
                                                     generator=g)))
        out.append(("prefill_grouped", dtype, make_case(160, 64, 40, [16, 1, 32, 8, 2, 16], dtype,
                                                        slot_weights=[20, 1, 10, 5, 1, 8], generator=g)))
    out.append(("decode_fused", torch.bfloat16, make_case(many, 64, 40, [1 + (s % 16) for s in range(many)],
                                                          torch.bfloat16, no_adapter_fraction=0.0, generator=g)))
    out.append(("decode_split_fp32", torch.float32, make_case(8, 96, 33, [4, 16, 1, 8, 2, 16, 3, 5], torch.float32,
                                                              generator=g)))
    return [(name, dtype, case.to(device)) for name, dtype, case in out]


def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = rel_error(got, want)
    if not err <= TOLERANCE[dtype]:
        raise AssertionError(f"{name}: relative error {err:.2e} over {TOLERANCE[dtype]:.0e}")


def references(c, g: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The float64 forward and backward of case c with grad_y g (computed once per case)."""
    args = [t.cpu() for t in c.args()]
    return lora_forward_ref(*args), lora_backward_ref(g.cpu(), *args)


def run_case(mode: str, name: str, dtype: torch.dtype, c, g: torch.Tensor, want, want_grads) -> None:
    tag = f"{mode}/{name}/{str(dtype)[6:]}"
    args = c.args()
    plan = minlora.build_plan(c.token_slot.cpu(), c.ranks.shape[0])
    dev = c.x.device
    # Built on the host, as a serving step does, then moved: the op gets the longest segment.
    plan = minlora.BatchPlan(plan.order.to(dev), plan.seg_offsets.to(dev), plan.positions.to(dev), plan.max_segment)
    check(f"{tag} forward (plan)", minlora.lora(*args, plan=plan), want, dtype)
    check(f"{tag} forward", minlora.lora(*args), want, dtype)
    y0 = torch.randn(want.shape, dtype=dtype, device=dev)
    check(f"{tag} forward_add", minlora.ops.lora_add_(y0.clone(), *args, plan=plan), want + y0.double().cpu(), dtype)
    for planned in (plan, None):
        for got, ref, what in zip(minlora.ops.lora_backward(g, *args, plan=planned), want_grads, ("x", "a", "b")):
            check(f"{tag} grad_{what} ({'plan' if planned else 'no plan'})", got, ref, dtype)
    acc_a = torch.zeros(c.a_pool.shape, dtype=torch.float32, device=dev)
    acc_b = torch.zeros(c.b_pool.shape, dtype=torch.float32, device=dev)
    gx = minlora.ops.lora_backward_accumulate_(acc_a, acc_b, g, *args, plan=plan)
    check(f"{tag} accumulate grad_x", gx, want_grads[0], dtype)
    check(f"{tag} accumulate grad_a", acc_a, want_grads[1], dtype)
    check(f"{tag} accumulate grad_b", acc_b, want_grads[2], dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--light"]
    light = "--light" in sys.argv[1:]
    device = args[0] if args else "cuda"
    all_cases = []
    for name, dtype, c in cases(device):
        if light and dtype == torch.float16:
            continue
        g = torch.randn(c.x.shape[0], c.b_pool.shape[1], dtype=dtype, device=device)
        all_cases.append((name, dtype, c, g, *references(c, g)))
    for mode in MODES:
        os.environ["MINLORA_CUDA_KERNELS"] = mode
        run = [case for case in all_cases if not (light and mode == "grouped" and case[0] == "decode_fused")]
        for case in run:
            run_case(mode, *case)
        print(f"sanitize case: mode {mode}: {len(run)} cases pass", flush=True)
    print("sanitize case done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
