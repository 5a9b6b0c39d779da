"""Sampling volumes at world points, and the grids registration runs on.

This is the one place where physical space meets tensors. Conventions (those of :mod:`.ct_io` and
:mod:`.landmarks`):

* A volume is a tensor ``(I, J, K)`` (or ``(C, I, J, K)``) with a ``(4, 4)`` affine mapping a voxel index
  ``(i, j, k)`` to **RAS** millimetres, as MONAI's ``MetaTensor`` carries it. Inside this module and its
  callers, world points are RAS mm ``(..., 3)``; files speak LPS and are converted where they are read
  and written (:data:`.landmarks.LPS_TO_RAS`).
* A :class:`Grid` is a shape and such an affine, without values: the fixed image's grid, the network's
  grid over the lung box, a coarse grid for pre-alignment.
* Sampling is trilinear (``grid_sample`` with ``align_corners=True``: voxel ``0`` and ``n - 1`` are the
  end samples). As in ITK's resampler, a volume extends half a voxel beyond its end samples, where it
  repeats its border values; points farther out read ``fill`` (or the border value when ``fill`` is
  ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Grid", "apply_affine", "sample_voxels", "sample_world", "to_matrix"]

# world points per grid_sample call: bounds the temporaries of a whole-CT resampling to a few hundred MB
_CHUNK_POINTS = 1 << 22


def to_matrix(affine, dtype=torch.float64) -> torch.Tensor:
    """A ``(4, 4)`` affine (numpy, tensor or MetaTensor affine) as a CPU tensor of ``dtype``."""
    matrix = torch.as_tensor(np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64), dtype=dtype)
    if matrix.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) affine, got shape {tuple(matrix.shape)}.")
    return matrix


def apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``matrix (4, 4)`` applied to points ``(..., 3)``, in the points' dtype."""
    matrix = matrix.to(points)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a volume: ``shape (I, J, K)`` and ``affine`` voxel -> RAS mm ``(4, 4)`` float64."""

    shape: tuple[int, int, int]
    affine: torch.Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "affine", to_matrix(self.affine))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"a grid needs three positive sizes, got {self.shape}.")

    @classmethod
    def of(cls, image: torch.Tensor) -> Grid:
        """The grid of a ``MetaTensor (I, J, K)`` or ``(C, I, J, K)``."""
        if not hasattr(image, "affine"):
            raise TypeError("expected a MetaTensor (a tensor with an affine).")
        return cls(tuple(image.shape[-3:]), image.affine)

    @property
    def spacing(self) -> torch.Tensor:
        """``(3,)`` mm between neighbouring voxels along each axis."""
        return self.affine[:3, :3].norm(dim=0)

    @property
    def linear(self) -> torch.Tensor:
        """``(3, 3)``: column ``a`` is the RAS step of one voxel along axis ``a``."""
        return self.affine[:3, :3]

    def world_to_voxel(self, points: torch.Tensor) -> torch.Tensor:
        """RAS mm ``(..., 3)`` -> continuous voxel indices ``(..., 3)``."""
        return apply_affine(torch.linalg.inv(self.affine), points)

    def voxel_to_world(self, voxels: torch.Tensor) -> torch.Tensor:
        """Voxel indices ``(..., 3)`` -> RAS mm ``(..., 3)``."""
        return apply_affine(self.affine, voxels)

    def voxels(self, dtype=torch.float32, k_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Voxel indices ``(I, J, k1 - k0, 3)`` of the slabs ``k0 <= k < k1`` (all by default)."""
        k0, k1 = k_range or (0, self.shape[2])
        axes = [torch.arange(n, dtype=dtype) for n in (*self.shape[:2], k1 - k0)]
        axes[2] += k0
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)

    def points(self, dtype=torch.float32, k_range: tuple[int, int] | None = None) -> torch.Tensor:
        """RAS mm of the voxel centres ``(I, J, k1 - k0, 3)`` (all slabs by default)."""
        return self.voxel_to_world(self.voxels(torch.float64, k_range)).to(dtype)

    def slabs(self, max_points: int = _CHUNK_POINTS) -> list[tuple[int, int]]:
        """``(k0, k1)`` ranges along the last axis with at most about ``max_points`` voxels each."""
        per_slice = self.shape[0] * self.shape[1]
        step = max(1, max_points // per_slice)
        return [(k, min(k + step, self.shape[2])) for k in range(0, self.shape[2], step)]

    def box(self, start: Sequence[int], stop: Sequence[int], shape: Sequence[int]) -> Grid:
        """A grid of ``shape`` whose end voxels are this grid's voxels ``start`` and ``stop - 1``.

        The sub-box ``[start, stop)`` of this grid, sampled with ``shape`` voxels per axis (more or fewer
        than the box holds): the network grid over the lung box.
        """
        start = torch.tensor([float(s) for s in start], dtype=torch.float64)
        length = torch.tensor([float(b) for b in stop], dtype=torch.float64) - 1 - start
        shape = tuple(int(n) for n in shape)
        steps = torch.tensor([max(n - 1, 1) for n in shape], dtype=torch.float64)
        scale = torch.eye(4, dtype=torch.float64)
        scale[:3, :3] = torch.diag(length / steps)
        scale[:3, 3] = start
        return Grid(shape, self.affine @ scale)

    def with_spacing(self, spacing_mm: float) -> Grid:
        """The same box sampled at about ``spacing_mm`` (at least 2 voxels per axis)."""
        extent = (torch.tensor(self.shape, dtype=torch.float64) - 1) * self.spacing
        shape = [max(2, round(float(e) / spacing_mm) + 1) for e in extent]
        return self.box((0, 0, 0), self.shape, shape)


def sample_world(
    image: torch.Tensor,
    affine,
    points: torch.Tensor,
    fill: float | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Values of ``image`` at world points.

    Args:
        image: ``(I, J, K)`` or ``(C, I, J, K)``.
        affine: ``(4, 4)`` voxel -> RAS mm of ``image``.
        points: RAS mm ``(..., 3)``.
        fill: the value of points outside the volume; ``None`` repeats the border.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.

    Returns:
        ``points.shape[:-1]`` (or ``(C, *points.shape[:-1])``), float32 (float64 for float64 images).
        Differentiable with respect to ``image`` and ``points``.
    """
    return sample_voxels(image, apply_affine(torch.linalg.inv(to_matrix(affine)), points), fill, mode)


def sample_voxels(image: torch.Tensor, voxels: torch.Tensor, fill: float | None = None, mode: str = "bilinear"):
    """Values of ``image`` (``(I, J, K)`` or ``(C, I, J, K)``) at continuous voxel indices ``(..., 3)``."""
    squeeze = image.ndim == 3
    volume = image[None] if squeeze else image
    if volume.ndim != 4:
        raise ValueError(f"expected a volume (I, J, K) or (C, I, J, K), got shape {tuple(image.shape)}.")
    volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
    volume = volume if volume.is_floating_point() else volume.float()
    voxels = voxels.to(volume.dtype)
    size = torch.tensor(volume.shape[1:], dtype=volume.dtype)
    # grid_sample reads (x, y, z) = (K, J, I) normalised to [-1, 1] over voxel centres 0 .. n - 1
    normalised = (2 * voxels / (size - 1).clamp(min=1) - 1).flip(-1)
    flat = normalised.reshape(1, -1, 1, 1, 3)
    outputs = []
    for start in range(0, flat.shape[1], _CHUNK_POINTS):
        chunk = flat[:, start : start + _CHUNK_POINTS]
        outputs.append(
            F.grid_sample(volume[None], chunk, mode=mode, padding_mode="border", align_corners=True).reshape(
                volume.shape[0], -1
            )
        )
    values = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    values = values.reshape(volume.shape[0], *voxels.shape[:-1])
    if fill is not None:
        inside = ((voxels >= -0.5) & (voxels <= size - 0.5)).all(dim=-1)
        values = torch.where(inside, values, values.new_full((), fill))
    return values[0] if squeeze else values
