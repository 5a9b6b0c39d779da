"""Resampling of volumes by a dense displacement field, exact for the zero field.

Convention (used by every module of this package): a displacement field ``ddf`` is ``(B, 3, D, H, W)`` in
voxels of the grid it is defined on, and channel ``i`` is the displacement along spatial axis ``i`` of
``(D, H, W)``, as in MONAI's ``Warp``. Warping samples the image at ``x + ddf(x)``::

    warped[x] = image[x + ddf(x)]

so a ``ddf`` that registers ``moving`` to ``fixed`` satisfies ``warp(moving, ddf) ~= fixed``.

Trilinear sampling is written with gathers on voxel coordinates instead of ``grid_sample``: the identity
grid is exact in floating point, so a zero field returns the input bit for bit (``grid_sample``'s
normalised coordinates round-trip with errors of about 1e-6).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["Warp3d", "identity_grid", "warp"]

Mode = Literal["bilinear", "nearest"]
Padding = Literal["border", "zeros"]


def identity_grid(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of a grid, ``(3, D, H, W)``, channel ``i`` = index along axis ``i``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def warp(
    image: torch.Tensor, ddf: torch.Tensor, mode: Mode = "bilinear", padding_mode: Padding = "border"
) -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at ``x + ddf(x)``; ``ddf`` is (B, 3, D, H, W) in voxels.

    Args:
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"border"`` clamps sample points to the volume, ``"zeros"`` reads zero outside it.

    Returns:
        ``(B, C, D, H, W)`` on the grid of ``ddf`` (which must equal the grid of ``image``).
    """
    if image.ndim != 5 or ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(
            "warp expects image (B, C, D, H, W) and ddf (B, 3, D, H, W), "
            f"got {tuple(image.shape)} and {tuple(ddf.shape)}."
        )
    if image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and ddf {tuple(ddf.shape)} must share batch size and spatial shape."
        )
    if mode not in ("bilinear", "nearest") or padding_mode not in ("border", "zeros"):
        raise ValueError(f"unsupported mode {mode!r} or padding_mode {padding_mode!r}.")
    if min(image.shape[2:]) < 2:
        raise ValueError(f"warp needs at least 2 voxels along each spatial axis, got {tuple(image.shape[2:])}.")
    batch, channels = image.shape[:2]
    dtype = ddf.dtype if ddf.is_floating_point() else torch.float32
    flat_image = image.reshape(batch, channels, -1)
    strides = (image.shape[3] * image.shape[4], image.shape[4], 1)
    base = None  # flat index of the lower corner, (B, N)
    weights, inside = [], []  # per axis: (weight of lower, weight of upper), (lower inside, upper inside)
    for axis, size in enumerate(image.shape[2:]):
        coordinate = torch.arange(size, device=ddf.device, dtype=dtype).view(
            [size if a == axis else 1 for a in range(3)]
        )
        pos = (ddf[:, axis].to(dtype) + coordinate).reshape(batch, -1)  # sample position along this axis, (B, N)
        if mode == "nearest":
            index = torch.round(pos)
            if padding_mode == "border":
                index = index.clamp(0, size - 1)
            else:
                inside.append((index >= 0) & (index <= size - 1))
                index = index.clamp(0, size - 1)
            term = index.long() * strides[axis]
            base = term if base is None else base + term
            continue
        if padding_mode == "border":
            pos = pos.clamp(0, size - 1)
            low = torch.floor(pos).clamp(max=size - 2)  # upper corner stays inside; weight 1 on it at the end
            frac = pos - low
            inside.append(None)
        else:
            low = torch.floor(pos)
            frac = pos - low
            inside.append(((low >= 0) & (low <= size - 1), (low >= -1) & (low <= size - 2)))
            low = low.clamp(-1, size - 1)
        frac = frac.to(image.dtype)
        weights.append((1 - frac, frac))
        term = low.long() * strides[axis]
        base = term if base is None else base + term

    if mode == "nearest":
        values = _gather(flat_image, base)
        if inside:
            values = values * (inside[0] & inside[1] & inside[2]).unsqueeze(1).to(values.dtype)
        return values.view_as(image)

    out = None
    for corner in range(8):
        bits = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
        weight = weights[0][bits[0]] * weights[1][bits[1]] * weights[2][bits[2]]
        if padding_mode == "zeros":
            weight = weight * (inside[0][bits[0]] & inside[1][bits[1]] & inside[2][bits[2]]).to(weight.dtype)
        offset = sum(b * s for b, s in zip(bits, strides, strict=True))
        term = _gather(flat_image, base + offset) * weight.unsqueeze(1)
        out = term if out is None else out + term
    return out.view_as(image)


def _gather(flat_image: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Values of ``flat_image`` (B, C, N) at flat voxel indices (B, N), clamped into the volume."""
    flat_index = flat_index.clamp(0, flat_image.shape[2] - 1)
    return torch.gather(flat_image, 2, flat_index.unsqueeze(1).expand(-1, flat_image.shape[1], -1))


class Warp3d(nn.Module):
    """Module form of :func:`warp`; ``forward(image, ddf)``."""

    def __init__(self, mode: Mode = "bilinear", padding_mode: Padding = "border") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        return warp(image, ddf, self.mode, self.padding_mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}"
