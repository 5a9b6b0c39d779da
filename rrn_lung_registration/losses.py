"""Unsupervised registration loss: local normalised cross-correlation + weight * smoothness of the field.

Presets:

========================  =========================  ==================================  ======
preset                    similarity                 smoothness                          weight
========================  =========================  ==================================  ======
``"paper"`` (default)     LNCC, 5^3 box window       total variation, L1 of forward diffs  0.01
``"released_code"``       LNCC, 5^3 box window       diffusion, L2 of forward diffs        1.25
========================  =========================  ==================================  ======

The LNCC term is MONAI's :class:`~monai.losses.LocalNormalizedCrossCorrelationLoss` (squared local
correlation, negated, in [-1, 0]); the window size is a parameter. Both smoothness terms average over
the three axes the mean (over batch, channels and voxels) of the absolute or squared forward difference
of the field, as the released code does for its diffusion term.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from torch import nn

__all__ = ["LOSS_PRESETS", "RegistrationLoss", "diffusion_l2", "total_variation_l1"]

Penalty = Literal["l1", "l2"]

LOSS_PRESETS: dict[str, dict] = {
    "paper": {"window": 5, "penalty": "l1", "weight": 0.01},
    "released_code": {"window": 5, "penalty": "l2", "weight": 1.25},
}


def _forward_differences(ddf: torch.Tensor) -> list[torch.Tensor]:
    """Forward differences of a field (B, 3, D, H, W) along D, H and W."""
    if ddf.ndim != 5:
        raise ValueError(f"expected a displacement field (B, 3, D, H, W), got shape {tuple(ddf.shape)}.")
    return [ddf.diff(dim=axis) for axis in (2, 3, 4)]


def total_variation_l1(ddf: torch.Tensor) -> torch.Tensor:
    """Mean over the three axes of the mean absolute forward difference of ``ddf`` (B, 3, D, H, W)."""
    return torch.stack([d.abs().mean() for d in _forward_differences(ddf)]).mean()


def diffusion_l2(ddf: torch.Tensor) -> torch.Tensor:
    """Mean over the three axes of the mean squared forward difference of ``ddf`` (B, 3, D, H, W)."""
    return torch.stack([d.square().mean() for d in _forward_differences(ddf)]).mean()


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
        self.similarity = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=window, kernel_type="rectangular"
        )
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
