"""torch.optim.AdamW's update over float32 pages, vectorised across adapters.

One call updates every page of several adapters at once: the pages of each row length are
gathered (weights, gradient accumulator, exp_avg, exp_avg_sq), updated with per-page step counts
and clip coefficients (each adapter's own), and scattered back.  The arithmetic is
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

import torch

__all__ = ["AdamParams", "PageGroups", "paged_adamw_step"]

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


def grad_norms(grad_views: dict[int, torch.Tensor], groups: PageGroups, num_slots: int) -> torch.Tensor:
    """[num_slots] float32: the 2-norm of each slot's gradient pages."""
    device = next(iter(grad_views.values())).device if grad_views else torch.device("cpu")
    sumsq = torch.zeros(num_slots, dtype=torch.float32, device=device)
    for d, (pages, slots) in groups.items():
        g = grad_views[d].index_select(0, pages)
        sumsq.index_add_(0, slots, g.square().sum(1))
    return sumsq.sqrt()


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
    """
    S = len(steps)
    grads = {d: state[d][0] for d in groups}
    norms = grad_norms(grads, groups, S)
    norm_list = norms.tolist()
    update = torch.tensor(
        [not skip[s] and math.isfinite(norm_list[s]) for s in range(S)], dtype=torch.bool, device=norms.device
    )
    lr, (b1, b2), eps, wd = params.lr, params.betas, params.eps, params.weight_decay
    # Per slot, as torch.optim.AdamW computes them (in double, then applied to float32 data).
    step_size = torch.tensor([lr / (1 - b1**t) for t in steps], dtype=torch.float32, device=norms.device)
    bc2_sqrt = torch.tensor([math.sqrt(1 - b2**t) for t in steps], dtype=torch.float32, device=norms.device)
    if params.grad_clip_norm is not None:
        coef = (params.grad_clip_norm / (norms + 1e-6)).clamp(max=1.0)
    else:
        coef = None
    for d, (pages, slots) in groups.items():
        g_view, m_view, v_view = state[d]
        keep = update.index_select(0, slots)
        idx = pages[keep]
        if idx.numel():
            sl = slots[keep]
            w_view = weights[d]
            p = w_view.index_select(0, idx).float()
            g = g_view.index_select(0, idx)
            m = m_view.index_select(0, idx)
            v = v_view.index_select(0, idx)
            if coef is not None:
                g = g * coef.index_select(0, sl)[:, None]
            if wd:
                p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.index_select(0, sl)[:, None]).add_(eps)
            p.add_((m / denom) * -step_size.index_select(0, sl)[:, None])
            w_view.index_copy_(0, idx, p.to(w_view.dtype))
            m_view.index_copy_(0, idx, m)
            v_view.index_copy_(0, idx, v)
        g_view.index_fill_(0, pages, 0.0)
    return norm_list
