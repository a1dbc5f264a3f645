"""torch.optim.AdamW's update over float32 pages, vectorised across adapters.

One call updates every page of several adapters at once: each adapter's pages (weights,
gradient accumulator, exp_avg, exp_avg_sq: the same page numbers in four pools) are runs of
consecutive pages, and all runs of all adapters go through torch's multi-tensor (_foreach)
kernels together, in place, with per-run step sizes and clip coefficients (each adapter's own
step count and gradient norm).  The arithmetic is
torch.optim.AdamW's (decoupled weight decay, bias correction by the adapter's step count):

    p  *= 1 - lr * weight_decay
    m   = lerp(m, g, 1 - beta1)
    v   = v * beta2 + (1 - beta2) * g * g
    p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and gradient clipping is torch.nn.utils.clip_grad_norm_ applied per adapter (the 2-norm of all
of that adapter's gradients; coefficient min(1, max_norm / (norm + 1e-6))).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["AdamParams", "PageGroups", "page_runs", "paged_adamw_step"]

# row length -> (pages [N] int64, slot [N] int64): every page of the adapters being stepped.
PageGroups = dict[int, tuple[torch.Tensor, torch.Tensor]]


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AdamParams:
    """The hyperparameters of one optim_step (torch.optim.AdamW's meanings)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: Optional[float] = None

    def checked(self) -> "AdamParams":
        """These parameters, checked; ValueError naming the one that is wrong."""
        lr = _real("lr", self.lr)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        try:
            b1, b2 = self.betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}") from None
        b1, b2 = _real("betas[0]", b1), _real("betas[1]", b2)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas!r}")
        eps = _real("eps", self.eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        wd = _real("weight_decay", self.weight_decay)
        if wd < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        clip = self.grad_clip_norm
        if clip is not None:
            clip = _real("grad_clip_norm", clip)
            if clip <= 0:
                raise ValueError(f"grad_clip_norm must be None or > 0, got {self.grad_clip_norm!r}")
        return AdamParams(lr, (b1, b2), eps, wd, clip)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


def page_runs(groups: PageGroups) -> dict[int, list[tuple[int, int, int]]]:
    """Per row length, the slots' pages as runs of consecutive pages: [(slot, first page, count)].
    An adapter's pages come from a few allocator chunks, so there are few runs, and the update
    works on views of the pools in place: no gather, no scatter."""
    out = {}
    for d, (pages, slots) in groups.items():
        p, s = pages.cpu().numpy(), slots.cpu().numpy()
        order = np.lexsort((p, s))
        p, s = p[order], s[order]
        starts = np.flatnonzero(np.concatenate([[True], (p[1:] != p[:-1] + 1) | (s[1:] != s[:-1])]))
        ends = np.append(starts[1:], len(p))
        out[d] = [(int(s[a]), int(p[a]), int(b - a)) for a, b in zip(starts, ends)]
    return out


def paged_adamw_step(
    weights: dict[int, torch.Tensor],
    state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    groups: PageGroups,
    steps: list[int],
    skip: list[bool],
    params: AdamParams,
) -> list[float]:
    """One AdamW step of every slot not in `skip` whose gradient is finite; every slot's
    gradient pages are zeroed after.  Returns each slot's gradient norm (before clipping).

    weights: row length -> [P, d] pool (any float dtype); state: row length -> its (grad,
    exp_avg, exp_avg_sq) [P, d] float32 companions; groups: the pages of the slots;
    steps: each slot's step count after this step (t >= 1); skip: slots not to update.
    All slots' runs of pages go through torch's multi-tensor (_foreach) kernels at once, each
    run with its slot's bias corrections and clip coefficient.
    """
    S = len(steps)
    run_slot: list[int] = []
    w_runs: list[torch.Tensor] = []
    g_runs: list[torch.Tensor] = []
    m_runs: list[torch.Tensor] = []
    v_runs: list[torch.Tensor] = []
    for d, runs in page_runs(groups).items():
        g_view, m_view, v_view = state[d]
        for slot, first, n in runs:
            run_slot.append(slot)
            w_runs.append(weights[d].narrow(0, first, n))
            g_runs.append(g_view.narrow(0, first, n))
            m_runs.append(m_view.narrow(0, first, n))
            v_runs.append(v_view.narrow(0, first, n))
    sumsq = [0.0] * S
    if g_runs:
        for slot, norm in zip(run_slot, torch.stack(torch._foreach_norm(g_runs)).double().tolist()):
            sumsq[slot] += norm * norm
    norms = [math.sqrt(x) for x in sumsq]
    update = [not skip[s] and math.isfinite(norms[s]) for s in range(S)]
    keep = [i for i, s in enumerate(run_slot) if update[s]]
    if keep:
        _adamw_runs([w_runs[i] for i in keep], [g_runs[i] for i in keep], [m_runs[i] for i in keep],
                    [v_runs[i] for i in keep], [run_slot[i] for i in keep], steps, norms, params)
    if g_runs:
        torch._foreach_zero_(g_runs)
    return norms


def _adamw_runs(w: list[torch.Tensor], g: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                slot: list[int], steps: list[int], norms: list[float], params: AdamParams) -> None:
    """torch.optim.AdamW's multi-tensor update of the runs (their gradients may be scaled in place)."""
    lr, (b1, b2), eps, wd = params.lr, params.betas, params.eps, params.weight_decay
    if params.grad_clip_norm is not None:
        coef = [min(1.0, params.grad_clip_norm / (norms[s] + 1e-6)) for s in slot]
        torch._foreach_mul_(g, coef)
    # Per run, in double as torch.optim.AdamW computes them.
    step_size = [-(lr / (1 - b1 ** steps[s])) for s in slot]
    bc2_sqrt = [math.sqrt(1 - b2 ** steps[s]) for s in slot]
    p = w if all(t.dtype == torch.float32 for t in w) else [t.float() for t in w]
    if wd:
        torch._foreach_mul_(p, 1 - lr * wd)
    torch._foreach_lerp_(m, g, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, g, g, 1 - b2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(p, m, denom, step_size)
    if p is not w:
        torch._foreach_copy_(w, p)  # rounded into the pool's dtype
