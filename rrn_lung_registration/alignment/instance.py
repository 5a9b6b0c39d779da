"""Instance optimisation: registering one pair by optimising the unsupervised loss on that pair alone.

Two ways, both on the network grid with the images scaled to ``[0, 1]`` (``(1, 1, D, H, W)``) and fields
``(1, 3, D, H, W)`` in voxels of that grid (MONAI ``Warp`` convention):

* :func:`optimise_field` refines a displacement field directly, from zero (no trained network needed) or
  from a network's prediction. The field is coarse to fine: at each level the images are block-averaged
  by ``factor``, the field lives on a grid ``control`` times coarser still and is smoothed and upsampled
  before warping (a B-spline-like parametrisation), and the loss is the registration loss of
  :class:`~rrn_lung_registration.losses.RegistrationLoss`.
* :func:`finetune_network` takes Adam steps on a trained network's weights with the same loss, then
  returns the network's field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rrn_lung_registration.losses import RegistrationLoss
from rrn_lung_registration.warp import warp

__all__ = ["finetune_network", "optimise_field"]


def _check(fixed: torch.Tensor, moving: torch.Tensor, initial: torch.Tensor | None) -> None:
    if fixed.ndim != 5 or fixed.shape[:2] != (1, 1) or moving.shape != fixed.shape:
        raise ValueError(
            f"expected fixed and moving images (1, 1, D, H, W) of one shape, got {tuple(fixed.shape)} and "
            f"{tuple(moving.shape)}."
        )
    if initial is not None and tuple(initial.shape) != (1, 3, *fixed.shape[2:]):
        raise ValueError(f"initial field {tuple(initial.shape)} does not match the images {tuple(fixed.shape)}.")


def _resize_field(field: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A field ``(1, 3, ...)`` in voxels resampled to ``size``, its vectors rescaled to the new voxels."""
    old = torch.tensor(field.shape[2:], dtype=field.dtype)
    new = torch.tensor(list(size), dtype=field.dtype)
    scale = ((new - 1) / (old - 1).clamp(min=1)).view(1, 3, 1, 1, 1)
    return scale * F.interpolate(field, size=tuple(size), mode="trilinear", align_corners=True)


def _smooth(field: torch.Tensor) -> torch.Tensor:
    """Two 3^3 box filters (a quadratic B-spline kernel), border replicated."""
    for _ in range(2):
        field = F.avg_pool3d(F.pad(field, (1,) * 6, mode="replicate"), 3, stride=1)
    return field


def optimise_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial: torch.Tensor | None = None,
    loss: RegistrationLoss | None = None,
    steps: int = 100,
    factors: Sequence[int] = (4, 2, 1),
    control: int = 2,
    learning_rate: float = 0.5,
) -> torch.Tensor:
    """Displacement ``(1, 3, D, H, W)`` in voxels registering ``moving`` to ``fixed`` (both ``(1, 1, D, H, W)``).

    Args:
        initial: starting field (a network's prediction), zero by default.
        loss: the objective; default ``RegistrationLoss(window=5, penalty="l2", weight=1.0)``: 5^3 LNCC plus
            the diffusion penalty.
        steps: Adam steps at each level.
        factors: image block-averaging factor of each level, coarse to fine; each divides the image size or
            the size is rounded down.
        control: the field's grid is this many times coarser than the level's images.
        learning_rate: Adam step, in voxels of the level's control grid.
    """
    _check(fixed, moving, initial)
    loss = loss or RegistrationLoss(window=5, penalty="l2", weight=1.0)
    size = fixed.shape[2:]
    field = torch.zeros(1, 3, *size, dtype=torch.float32, device=fixed.device) if initial is None else initial.float()
    with torch.enable_grad():
        for factor in factors:
            f_level = F.avg_pool3d(fixed.float(), factor) if factor > 1 else fixed.float()
            m_level = F.avg_pool3d(moving.float(), factor) if factor > 1 else moving.float()
            level_size = f_level.shape[2:]
            coarse = [max(2, (n + control - 1) // control) for n in level_size]
            params = nn.Parameter(_resize_field(_resize_field(field, level_size), coarse))
            optimizer = torch.optim.Adam([params], lr=learning_rate / control)
            for _ in range(steps):
                optimizer.zero_grad()
                dense = _resize_field(_smooth(params), level_size)
                value = loss(f_level, warp(m_level, dense), dense)
                value.backward()
                optimizer.step()
            with torch.no_grad():
                field = _resize_field(_resize_field(_smooth(params), level_size), size)
    return field.detach()


def finetune_network(
    network: nn.Module,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    loss: RegistrationLoss | None = None,
    steps: int = 20,
    learning_rate: float = 1e-5,
) -> torch.Tensor:
    """Fine-tune ``network`` (``network(moving, fixed) -> ddf``) on one pair; returns its final field.

    The network's weights are changed in place (pass a copy to keep the original).
    """
    _check(fixed, moving, None)
    loss = loss or RegistrationLoss()
    optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=learning_rate)
    network.train()
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            ddf = network(moving, fixed)
            loss(fixed, warp(moving, ddf), ddf).backward()
            optimizer.step()
    network.eval()
    with torch.no_grad():
        return network(moving, fixed).float()
