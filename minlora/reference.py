"""Float64 pure-PyTorch reference of every minlora op: the oracle for all tests.

Notation (see DESIGN.md): T tokens, S slots, R page-table width.

    x          [T, in]        activations
    a_pool     [Pa, in]       row j of A_s is a_pool[a_pages[s, j]]
    b_pool     [Pb, out]      column j of B_s is b_pool[b_pages[s, j]]
    a_pages    [S, R] int32   page tables; entries at j >= ranks[s] are ignored
    b_pages    [S, R] int32
    ranks      [S] int32
    scales     [S] float32
    token_slot [T] int32      -1 = no adapter

Everything here is computed in float64 on the CPU, one slot at a time, with no
cleverness, so that it is obviously right.
"""
from __future__ import annotations

import torch

__all__ = [
    "lora_forward_ref",
    "lora_backward_ref",
    "lora_backward_accumulate_ref",
    "build_plan_ref",
    "slot_matrices",
]

Tensor = torch.Tensor


def slot_matrices(
    a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor, ranks: Tensor, s: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense float64 A_s [r, in] and B_s [out, r] of slot s, plus their page indices [r]."""
    r = int(ranks[s])
    a_idx = a_pages[s, :r].long().cpu()
    b_idx = b_pages[s, :r].long().cpu()
    a = a_pool.detach().cpu().double()[a_idx]
    b = b_pool.detach().cpu().double()[b_idx].t()
    return a, b, a_idx, b_idx


def _slot_segments(a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot):
    """For each slot with tokens: (rows [n], A_s [r, in], B_s [out, r], a_idx [r], b_idx [r], scale)."""
    slots = token_slot.detach().cpu().long()
    for s in range(ranks.shape[0]):
        rows = (slots == s).nonzero().flatten()
        if rows.numel():
            yield (rows, *slot_matrices(a_pool, b_pool, a_pages, b_pages, ranks, s), float(scales[s]))


def lora_forward_ref(
    x: Tensor, a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor, ranks: Tensor,
    scales: Tensor, token_slot: Tensor,
) -> Tensor:
    """The LoRA delta [T, out] in float64: y_t = scale_s * B_s (A_s x_t); rows with slot -1 are 0."""
    xd = x.detach().cpu().double()
    y = torch.zeros(x.shape[0], b_pool.shape[1], dtype=torch.float64)
    for rows, a, b, _, _, scale in _slot_segments(a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot):
        y[rows] = scale * (xd[rows] @ a.t()) @ b.t()
    return y


def lora_backward_ref(
    grad_y: Tensor, x: Tensor, a_pool: Tensor, b_pool: Tensor, a_pages: Tensor, b_pages: Tensor,
    ranks: Tensor, scales: Tensor, token_slot: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (grad_x [T, in], grad_a_pool [Pa, in], grad_b_pool [Pb, out]).

    dx_t = scale_s A_s^T (B_s^T g_t);  dB_s = scale_s sum_t g_t (A_s x_t)^T;
    dA_s = scale_s sum_t (B_s^T g_t) x_t^T.  Pages shared by several slots or
    rank indices accumulate.
    """
    g = grad_y.detach().cpu().double()
    xd = x.detach().cpu().double()
    grad_x = torch.zeros_like(xd)
    grad_a = torch.zeros(a_pool.shape, dtype=torch.float64)
    grad_b = torch.zeros(b_pool.shape, dtype=torch.float64)
    segments = _slot_segments(a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot)
    for rows, a, b, a_idx, b_idx, scale in segments:
        gs, xs = g[rows], xd[rows]
        u = gs @ b  # [n, r] = B_s^T g_t
        h = xs @ a.t()  # [n, r] = A_s x_t
        grad_x[rows] += scale * u @ a
        grad_a.index_add_(0, a_idx, scale * u.t() @ xs)
        grad_b.index_add_(0, b_idx, scale * h.t() @ gs)
    return grad_x, grad_a, grad_b


def lora_backward_accumulate_ref(
    grad_a_acc: Tensor, grad_b_acc: Tensor, grad_y: Tensor, x: Tensor, a_pool: Tensor, b_pool: Tensor,
    a_pages: Tensor, b_pages: Tensor, ranks: Tensor, scales: Tensor, token_slot: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (grad_x [T, in], grad_a_acc + dA rows [Pa, in], grad_b_acc + dB rows [Pb, out]).

    The accumulating backward: the given accumulators (any dtype, read as float64) plus, for
    every slot s and j < ranks[s],
        row a_pages[s, j]: scale_s * sum_{t of s} (B_s^T g_t)_j x_t
        row b_pages[s, j]: scale_s * sum_{t of s} (A_s x_t)_j g_t
    with every other row unchanged (not even read: NaN stays NaN, not 0 * NaN).
    """
    grad_x, grad_a, grad_b = lora_backward_ref(grad_y, x, a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot)
    acc_a = grad_a_acc.detach().cpu().double().clone()
    acc_b = grad_b_acc.detach().cpu().double().clone()
    used_a = torch.zeros(acc_a.shape[0], dtype=torch.bool)
    used_b = torch.zeros(acc_b.shape[0], dtype=torch.bool)
    for rows, _, _, a_idx, b_idx, _ in _slot_segments(a_pool, b_pool, a_pages, b_pages, ranks, scales, token_slot):
        used_a[a_idx] = True
        used_b[b_idx] = True
    acc_a[used_a] += grad_a[used_a]
    acc_b[used_b] += grad_b[used_b]
    return grad_x, acc_a, acc_b


def build_plan_ref(token_slot: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T] int32, seg_offsets [S + 1] int32): a stable counting sort of tokens by slot.

    Tokens of slot s are order[seg_offsets[s]:seg_offsets[s + 1]] in their
    original order; tokens with slot -1 follow seg_offsets[S].
    """
    slots = token_slot.detach().cpu().long()
    key = torch.where(slots < 0, torch.full_like(slots, num_slots), slots)
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    seg = torch.zeros(num_slots + 1, dtype=torch.int32)
    seg[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return order, seg
