"""The paged AdamW against torch.optim.AdamW + clip_grad_norm_ on each adapter's own tensors:
scattered pages (runs of every length, slots interleaved), per-adapter step counts, weight
decay, clipping, skipped slots, half-precision weights."""
from __future__ import annotations

import pytest
import torch

from minlora.train.adamw import AdamParams, page_runs, paged_adamw_step


def scattered_groups(S: int, d: int, P: int, seed: int):
    """Each slot gets a random set of pages of a [P, d] pool (runs of random lengths, slots mixed)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(P, generator=g)
    counts = torch.randint(1, 9, (S,), generator=g).tolist()
    pages, slots, o = [], [], 0
    for s, n in enumerate(counts):
        chosen = perm[o : o + n].sort().values if s % 2 else perm[o : o + n]
        pages.append(chosen)
        slots += [s] * n
        o += n
    return torch.cat(pages), torch.tensor(slots)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip", [None, 0.3])
def test_paged_adamw_equals_torch_adamw_per_adapter(wdtype, clip):
    S, P = 5, 40
    lengths = (8, 12)
    g = torch.Generator().manual_seed(0)
    weights = {d: torch.randn(P, d, generator=g).to(wdtype) for d in lengths}
    state = {d: (torch.zeros(P, d), torch.zeros(P, d), torch.zeros(P, d)) for d in lengths}
    groups = {d: scattered_groups(S, d, P, seed=d) for d in lengths}
    assert any(len(r) > S for r in page_runs(groups).values())  # really scattered
    params = AdamParams(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, grad_clip_norm=clip).checked()
    # The oracle: per slot, its pages as one tensor per row length, trained by torch.
    mine = {s: [weights[d][groups[d][0][groups[d][1] == s]].float().clone().requires_grad_(True) for d in lengths]
            for s in range(S)}
    opts = {s: torch.optim.AdamW(mine[s], lr=params.lr, betas=params.betas, eps=params.eps,
                                 weight_decay=params.weight_decay) for s in range(S)}
    steps = [0] * S
    for it in range(6):
        skip = [s == (it % S) and it % 2 == 1 for s in range(S)]  # some slots sit some steps out
        for d in lengths:
            pages, slots = groups[d]
            grads = torch.randn(pages.shape[0], d, generator=g)
            state[d][0][pages] = grads
            for s in range(S):
                mine[s][lengths.index(d)].grad = grads[slots == s].clone()
        for s in range(S):
            if not skip[s]:
                steps[s] += 1
        norms = paged_adamw_step(weights, state, groups, [max(t, 1) for t in steps], skip, params)
        for s in range(S):
            want_norm = torch.cat([p.grad.flatten() for p in mine[s]]).norm()
            assert norms[s] == pytest.approx(float(want_norm), rel=1e-5)
            if skip[s]:
                continue
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(mine[s], clip)
            opts[s].step()
            if wdtype != torch.float32:  # the pool holds the weights rounded: so must the oracle
                with torch.no_grad():
                    for p in mine[s]:
                        p.copy_(p.to(wdtype).float())
        for d in lengths:
            assert not state[d][0].any()  # gradients cleared, skipped slots too
    for s in range(S):
        for d, want in zip(lengths, mine[s]):
            got = weights[d][groups[d][0][groups[d][1] == s]].float()
            tol = 1e-6 if wdtype == torch.float32 else 1e-2
            assert torch.allclose(got, want.detach(), rtol=tol, atol=tol), (s, d)
            m = state[d][1][groups[d][0][groups[d][1] == s]]
            assert torch.allclose(m, opts[s].state[want]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_non_finite_gradient_slot_is_not_updated():
    P, d = 10, 4
    w = {d: torch.randn(P, d)}
    st = {d: (torch.randn(P, d), torch.zeros(P, d), torch.zeros(P, d))}
    st[d][0][3, 1] = float("nan")
    groups = {d: (torch.tensor([3, 4, 7, 8]), torch.tensor([0, 0, 1, 1]))}
    before = w[d].clone()
    norms = paged_adamw_step(w, st, groups, [1, 1], [False, False], AdamParams(lr=0.1).checked())
    assert norms[0] != norms[0] and norms[1] > 0
    assert torch.equal(w[d][[3, 4]], before[[3, 4]]) and not torch.equal(w[d][[7, 8]], before[[7, 8]])
    assert not st[d][1][[3, 4]].any() and not st[d][0][[3, 4, 7, 8]].any()  # cleared, the NaN too
    assert st[d][0][[0, 5]].all()  # other pages untouched
