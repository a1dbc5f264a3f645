"""Bad inputs give a Python exception naming the argument; the process survives and works on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minlora
from helpers import pythonpath
from helpers.cases import make_case


def _case():
    return make_case(12, 16, 8, [3, 2, 0], torch.float32, slot_weights=[3, 2, 1])


def _replace(args, **changes):
    names = ["x", "a_pool", "b_pool", "a_pages", "b_pages", "ranks", "scales", "token_slot"]
    d = dict(zip(names, args))
    d.update(changes)
    return [d[n] for n in names]


def _bad_inputs():
    c = _case()
    a = c.args()
    x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot = a
    out_of_range_a = a_pages.clone()
    out_of_range_a[0, 0] = a_pool.shape[0]
    negative_b = b_pages.clone()
    negative_b[1, 1] = -1
    rank_too_big = ranks.clone()
    rank_too_big[0] = a_pages.shape[1] + 1
    negative_rank = ranks.clone()
    negative_rank[2] = -1
    slot_too_big = token_slot.clone()
    slot_too_big[5] = ranks.shape[0]
    slot_too_small = token_slot.clone()
    slot_too_small[0] = -2
    return {
        "x int": (_replace(a, x=x.to(torch.int32)), "x must be float16"),
        "x 3-D": (_replace(a, x=x.view(2, 6, 16)), "x must be 2-D"),
        "x float64 vs pool float32": (_replace(a, x=x.double()), "a_pool must have the dtype of x"),
        "a_pool dtype": (_replace(a, a_pool=a_pool.half()), "a_pool must have the dtype of x"),
        "b_pool dtype": (_replace(a, b_pool=b_pool.bfloat16()), "b_pool must have the dtype of x"),
        "a_pool 1-D": (_replace(a, a_pool=a_pool.flatten()), "a_pool must be 2-D"),
        "a_pool non-contiguous": (_replace(a, a_pool=a_pool.t().contiguous().t()), "a_pool must be contiguous"),
        "b_pool non-contiguous": (_replace(a, b_pool=b_pool[:, ::2]), "b_pool must be contiguous"),
        "a_pool wrong in": (_replace(a, a_pool=a_pool[:, :15].contiguous()), "a_pool rows have length 15"),
        "a_pages int64": (_replace(a, a_pages=a_pages.long()), "a_pages must be int32"),
        "b_pages float": (_replace(a, b_pages=b_pages.float()), "b_pages must be int32"),
        "a_pages 1-D": (_replace(a, a_pages=a_pages.flatten()), "a_pages must be 2-D"),
        "b_pages shape": (_replace(a, b_pages=b_pages[:, :2].contiguous()), "b_pages must have the shape of a_pages"),
        "ranks length": (_replace(a, ranks=ranks[:2]), "ranks must have 3 entries"),
        "ranks int64": (_replace(a, ranks=ranks.long()), "ranks must be int32"),
        "rank > R": (_replace(a, ranks=rank_too_big), "ranks[0]"),
        "rank < 0": (_replace(a, ranks=negative_rank), "ranks[2]"),
        "scales float64": (_replace(a, scales=scales.double()), "scales must be float32"),
        "scales length": (_replace(a, scales=scales[:1]), "scales must have shape [3]"),
        "token_slot length": (_replace(a, token_slot=token_slot[:-1]), "token_slot must have 12 entries"),
        "token_slot int64": (_replace(a, token_slot=token_slot.long()), "token_slot must be int32"),
        "token_slot = S": (_replace(a, token_slot=slot_too_big), "token_slot[5]"),
        "token_slot = -2": (_replace(a, token_slot=slot_too_small), "token_slot[0]"),
        "a page past the end": (_replace(a, a_pages=out_of_range_a), "a_pages[0, 0]"),
        "negative b page": (_replace(a, b_pages=negative_b), "b_pages[1, 1]"),
        "x on meta": (_replace(a, x=x.to("meta")), "meta"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_argument(name):
    args, message = BAD[name]
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message.replace("[", r"\[")):
        minlora.lora(*args)
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message.replace("[", r"\[")):
        minlora.ops.lora_add_(torch.zeros(12, 8), *args)


def test_bad_y_of_accumulating_variant():
    c = _case()
    with pytest.raises(ValueError, match=r"y must have shape \[T, out\]"):
        minlora.ops.lora_add_(torch.zeros(12, 9), *c.args())
    with pytest.raises(RuntimeError, match="y must have the dtype of x"):
        minlora.ops.lora_add_(torch.zeros(12, 8, dtype=torch.float64), *c.args())
    with pytest.raises(ValueError, match="y must be contiguous"):
        minlora.ops.lora_add_(torch.zeros(8, 12).t(), *c.args())


def test_bad_plan():
    c = _case()
    plan = minlora.build_plan(c.token_slot, 3)
    wrong_order = plan.order.flip(0).contiguous()
    with pytest.raises(ValueError, match="the plan does not match token_slot"):
        minlora.lora(*c.args(), plan=minlora.BatchPlan(wrong_order, plan.seg_offsets))
    bad_seg = plan.seg_offsets.clone()
    bad_seg[1] = 100
    with pytest.raises(ValueError, match="seg_offsets"):
        minlora.lora(*c.args(), plan=minlora.BatchPlan(plan.order, bad_seg))
    with pytest.raises(ValueError, match="seg_offsets must have 4 entries"):
        minlora.lora(*c.args(), plan=minlora.build_plan(c.token_slot, 4))
    with pytest.raises(ValueError, match="order must have 12 entries"):
        minlora.lora(*c.args(), plan=minlora.BatchPlan(plan.order[:5], plan.seg_offsets))


def test_bad_backward_inputs():
    c = _case()
    with pytest.raises(ValueError, match=r"grad_y must have shape \[T, out\]"):
        minlora.ops.lora_backward(torch.randn(12, 7), *c.args())
    with pytest.raises(RuntimeError, match="grad_y must have the dtype of x"):
        minlora.ops.lora_backward(torch.randn(12, 8).double(), *c.args())
    plan = minlora.build_plan(c.token_slot, 3)
    with pytest.raises(ValueError, match="order and seg_offsets must be given together"):
        torch.ops.minlora.lora_backward(torch.randn(12, 8), *c.args(), plan.order, None, [True] * 3)


def test_bad_build_plan():
    with pytest.raises(ValueError, match="num_slots must be >= 0"):
        minlora.build_plan(torch.zeros(3, dtype=torch.int32), -1)
    with pytest.raises(ValueError, match="token_slot\\[1\\] = 3"):
        minlora.build_plan(torch.tensor([0, 3], dtype=torch.int32), 3)
    with pytest.raises(RuntimeError, match="token_slot must be int32"):
        minlora.build_plan(torch.zeros(3), 2)


def test_process_survives_every_bad_input_and_still_computes():
    """All bad inputs in a fresh interpreter, then a good call: it exits normally with the right answer."""
    script = """
import torch, minlora
from test_op_errors import BAD, _case
from minlora.reference import lora_forward_ref
for args, _ in BAD.values():
    try:
        minlora.lora(*args)
    except (RuntimeError, ValueError, NotImplementedError):
        pass
    else:
        raise SystemExit("no error raised")
c = _case()
err = (minlora.lora(*c.args()).double() - lora_forward_ref(*c.args())).abs().max().item()
print("OK", err)
"""
    env = {**os.environ, "PYTHONPATH": pythonpath(Path(__file__).parent)}  # helpers and this module
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK")
    assert float(done.stdout.split()[1]) < 1e-5
