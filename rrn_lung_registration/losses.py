"""Unsupervised registration loss: local normalised cross-correlation + weight * smoothness of the field.

Presets:

========================  =========================  ==================================  ======
preset                    similarity                 smoothness                          weight
========================  =========================  ==================================  ======
``"paper"`` (default)     LNCC, 5^3 box window       total variation, L1 of forward diffs  0.01
``"released_code"``       LNCC, 5^3 box window       diffusion, L2 of forward diffs        1.25
========================  =========================  ==================================  ======

The LNCC term has the value of MONAI's :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` with a
box window (squared local correlation, negated, in [-1, 0]); the window size is a parameter. Both
smoothness terms average over the three axes the mean (over batch, channels and voxels) of the absolute or
squared forward difference of the field, as the released code does for its diffusion term.

Every term has a hand-written backward that keeps only its inputs and recomputes the rest: with
autograd through the elementwise operations the loss and the warp before it kept about 57 volumes of the
image size for the backward (for one 256^3 training step, 3.2 GiB more than now, measured: more than the
network's own activations).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers import separable_filtering
from torch import nn

__all__ = ["LOSS_PRESETS", "LocalNCCLoss", "RegistrationLoss", "diffusion_l2", "total_variation_l1"]

Penalty = Literal["l1", "l2"]

LOSS_PRESETS: dict[str, dict] = {
    "paper": {"window": 5, "penalty": "l1", "weight": 0.01},
    "released_code": {"window": 5, "penalty": "l2", "weight": 1.25},
}


def _check_field(ddf: torch.Tensor) -> None:
    if ddf.ndim != 5:
        raise ValueError(f"expected a displacement field (B, 3, D, H, W), got shape {tuple(ddf.shape)}.")


def total_variation_l1(ddf: torch.Tensor) -> torch.Tensor:
    """Mean over the three axes of the mean absolute forward difference of ``ddf`` (B, 3, D, H, W)."""
    _check_field(ddf)
    return _DifferencePenalty.apply(ddf, 1)


def diffusion_l2(ddf: torch.Tensor) -> torch.Tensor:
    """Mean over the three axes of the mean squared forward difference of ``ddf`` (B, 3, D, H, W)."""
    _check_field(ddf)
    return _DifferencePenalty.apply(ddf, 2)


class _DifferencePenalty(torch.autograd.Function):
    """mean over axes a of mean |ddf[i + 1] - ddf[i]|^power along a (power 1 or 2); the backward keeps only
    ``ddf`` and recomputes one axis's differences at a time (autograd would keep all three, 9 volumes)."""

    @staticmethod
    def forward(ctx, ddf: torch.Tensor, power: int) -> torch.Tensor:
        ctx.save_for_backward(ddf)
        ctx.power = power
        means = [(d.abs() if power == 1 else d.square()).mean() for d in (ddf.diff(dim=axis) for axis in (2, 3, 4))]
        return torch.stack(means).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ddf,) = ctx.saved_tensors
        out = torch.zeros_like(ddf)
        for axis in (2, 3, 4):
            d = ddf.diff(dim=axis)
            scale = grad / (3 * d.numel())
            d = d.sign_().mul_(scale) if ctx.power == 1 else d.mul_(2 * scale)
            length = d.shape[axis]
            out.narrow(axis, 1, length).add_(d)
            out.narrow(axis, 0, length).sub_(d)
        return out, None


class LocalNCCLoss(nn.Module):
    """Squared local normalised cross-correlation in a cubic box window, negated: ``forward(pred, target)``.

    The value is that of MONAI's :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` with a
    rectangular kernel (same window sums, same ``smooth_nr``/``smooth_dr`` handling, same reductions). The
    backward is written out: it keeps only ``pred`` and ``target`` and recomputes the five window sums,
    where autograd through MONAI's filters keeps about 20 volumes (1.2 GiB for one 256^3 pair).

    Args:
        window: side of the cubic window in voxels (odd).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over batch, channels and voxels.
        smooth_nr, smooth_dr: added to the squared covariance; lower bound of each variance (MONAI's).

    Inputs ``pred`` and ``target`` are (B, C, D, H, W) of one shape; both may require gradients.
    """

    def __init__(self, window: int = 5, reduction: str = "mean", smooth_nr: float = 0.0, smooth_dr: float = 1e-5):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number of voxels, got {window}.")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        self.window, self.reduction = window, reduction
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 5 or pred.shape != target.shape:
            raise ValueError(
                f"LocalNCCLoss expects pred and target (B, C, D, H, W) of one shape, "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}."
            )
        ncc = _LocalNCC.apply(pred, target, self.window, self.smooth_nr, self.smooth_dr)
        if self.reduction == "mean":
            return ncc.mean().neg()
        if self.reduction == "sum":
            return ncc.sum().neg()
        return ncc.neg()

    def extra_repr(self) -> str:
        return f"window={self.window}, reduction={self.reduction!r}"


def _window_sums(p: torch.Tensor, t: torch.Tensor, window: int) -> tuple[torch.Tensor, ...]:
    """Box sums (zero padded) of t, p, t^2, p^2 and t p over the window around every voxel."""
    kernels = [torch.ones(window, dtype=p.dtype, device=p.device)] * 3
    return tuple(separable_filtering(x, kernels) for x in (t, p, t * t, p * p, t * p))


class _LocalNCC(torch.autograd.Function):
    """Per-voxel squared local NCC, MONAI's formula; its backward recomputes the window sums.

    With box sums S_t, S_p, S_tt, S_pp, S_tp over n voxels: cross = S_tp - S_p S_t / n, var_x =
    max(S_xx - S_x^2 / n, smooth_dr), ncc = (cross^2 + smooth_nr) / (var_t var_p). The box sum is its own
    adjoint, so d(sum_y g(y) ncc(y)) / dp = box(g dncc/dS_p) + 2 p box(g dncc/dS_pp) + t box(g dncc/dS_tp).
    """

    @staticmethod
    def forward(ctx, pred, target, window: int, smooth_nr: float, smooth_dr: float) -> torch.Tensor:
        ctx.save_for_backward(pred, target)
        ctx.window, ctx.smooth_nr, ctx.smooth_dr = window, smooth_nr, smooth_dr
        return _LocalNCC.terms(pred, target, window, smooth_nr, smooth_dr)[0]

    @staticmethod
    def terms(p, t, window, smooth_nr, smooth_dr):
        """ncc and the pieces of its derivative: (ncc, cross, var_t, var_p, t_sum, p_sum, raw_t, raw_p), where
        ``raw_x`` is var_x before the floor.

        In float32 at least, also under autocast: variances are differences of window sums, which half
        precision would lose.
        """
        dtype = torch.promote_types(torch.promote_types(p.dtype, t.dtype), torch.float32)
        with torch.autocast(p.device.type, enabled=False):
            return _LocalNCC._terms(p.to(dtype), t.to(dtype), window, smooth_nr, smooth_dr)

    @staticmethod
    def _terms(p, t, window, smooth_nr, smooth_dr):
        t_sum, p_sum, t2_sum, p2_sum, tp_sum = _window_sums(p, t, window)
        n = float(window**3)
        t_avg, p_avg = t_sum / n, p_sum / n
        cross = tp_sum - p_avg * t_sum
        floor = torch.as_tensor(smooth_dr, dtype=p.dtype, device=p.device)
        t_raw, p_raw = t2_sum - t_avg * t_sum, p2_sum - p_avg * p_sum
        t_var, p_var = torch.max(t_raw, floor), torch.max(p_raw, floor)
        ncc = (cross * cross + smooth_nr) / (t_var * p_var)
        return ncc, cross, t_var, p_var, t_sum, p_sum, t_raw, p_raw

    @staticmethod
    def backward(ctx, grad):
        pred, target = ctx.saved_tensors
        ncc, cross, t_var, p_var, t_sum, p_sum, t_raw, p_raw = _LocalNCC.terms(
            pred, target, ctx.window, ctx.smooth_nr, ctx.smooth_dr
        )
        p, t, grad = pred.to(ncc.dtype), target.to(ncc.dtype), grad.to(ncc.dtype)
        n = float(ctx.window**3)
        kernels = [torch.ones(ctx.window, dtype=p.dtype, device=p.device)] * 3
        d_tp = 2 * grad * cross / (t_var * p_var)  # g dncc/dS_tp, the same for both images
        del cross

        def gradient(x, y, x_sum, y_sum, x_var, x_raw):
            """Gradient for image x (y the other image): the three box sums of the class docstring."""
            # where a variance sits on its floor it does not depend on the images (ties share, as in autograd)
            x_free = (x_raw > ctx.smooth_dr).to(x.dtype) + 0.5 * (x_raw == ctx.smooth_dr).to(x.dtype)
            d_xx = -grad * ncc / x_var * x_free  # g dncc/dS_xx: through var_x, where it is above its floor
            d_x = d_tp * (-y_sum / n) + d_xx * (-2 * x_sum / n)  # g dncc/dS_x: through cross and var_x
            out = separable_filtering(d_x, kernels)
            out += 2 * x * separable_filtering(d_xx, kernels)
            out += y * separable_filtering(d_tp, kernels)
            return out

        grad_p = gradient(p, t, p_sum, t_sum, p_var, p_raw).to(pred.dtype) if ctx.needs_input_grad[0] else None
        grad_t = gradient(t, p, t_sum, p_sum, t_var, t_raw).to(target.dtype) if ctx.needs_input_grad[1] else None
        return grad_p, grad_t, None, None, None


class RegistrationLoss(nn.Module):
    """``forward(fixed, warped, ddf)``: LNCC(fixed, warped) + weight * smoothness(ddf).

    Args:
        window: side of the cubic LNCC window, in voxels (odd).
        penalty: ``"l1"`` total variation (paper) or ``"l2"`` diffusion (released code).
        weight: weight of the smoothness term (paper 0.01, released code 1.25).
    """

    def __init__(self, window: int = 5, penalty: Penalty = "l1", weight: float = 0.01) -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' (total variation) or 'l2' (diffusion), got {penalty!r}.")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number of voxels, got {window}.")
        if weight < 0:
            raise ValueError(f"weight must be non-negative, got {weight}.")
        self.similarity = LocalNCCLoss(window)
        self.smoothness = total_variation_l1 if penalty == "l1" else diffusion_l2
        self.window, self.penalty, self.weight = window, penalty, weight

    @classmethod
    def from_preset(cls, name: str, **overrides) -> RegistrationLoss:
        if name not in LOSS_PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(LOSS_PRESETS)}.")
        return cls(**{**LOSS_PRESETS[name], **overrides})

    def terms(self, fixed: torch.Tensor, warped: torch.Tensor, ddf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two terms and their weighted sum, for logging."""
        similarity = self.similarity(warped, fixed)
        smoothness = self.smoothness(ddf)
        return {"similarity": similarity, "smoothness": smoothness, "loss": similarity + self.weight * smoothness}

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return self.terms(fixed, warped, ddf)["loss"]

    def extra_repr(self) -> str:
        return f"window={self.window}, penalty={self.penalty!r}, weight={self.weight}"
