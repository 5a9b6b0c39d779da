"""Rigid / affine pre-alignment of a moving CT to a fixed CT, before the deformable registration.

Real exhale / inhale pairs can sit tens of millimetres apart and turned by a few degrees (table
position, breath-hold), beyond what the network's coarsest level can search. This step finds a world
affine ``A`` (RAS mm, fixed -> moving: the moving point that matches fixed point ``x`` is ``A x``) by
gradient descent on coarse copies of the two scans:

1. start from the translation that superimposes the centroids of the two lung masks;
2. rigid (rotation about the fixed lungs' centroid + translation), then optionally a full affine,
   coarse to fine over ``spacings_mm``;
3. loss: local normalised cross-correlation of the HU-windowed images over the fixed lung box (with a
   margin), plus the mean squared difference of the two lung masks, which keeps the lungs superimposed
   when breathing changes their density.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rrn_lung_registration.alignment.threads import few_threads
from rrn_lung_registration.io.spatial import Grid, apply_affine, sample_world, to_matrix
from rrn_lung_registration.losses import LocalNCCLoss

__all__ = ["PrealignSettings", "downsample", "prealign", "window_hu"]

Mode = Literal["rigid", "affine", "none"]


@dataclass
class PrealignSettings:
    """Settings of :func:`prealign`.

    Attributes:
        mode: ``"rigid"``, ``"affine"`` (rigid first, then affine) or ``"none"`` (identity).
        spacings_mm: sample spacing of each resolution level, coarse to fine.
        iterations: Adam steps of each stage at each level (one number per level, or one for all).
        margin_mm: margin around the fixed lung box where the loss is measured.
        hu_window: HU range mapped to ``[0, 1]`` before comparing intensities.
        mask_weight: weight of the lung-mask term.
        window: LNCC window, in samples.
    """

    mode: Mode = "affine"
    spacings_mm: Sequence[float] = (8.0,)
    iterations: int | Sequence[int] = (80,)
    margin_mm: float = 20.0
    hu_window: tuple[float, float] = (-1000.0, -100.0)
    mask_weight: float = 1.0
    window: int = 5


def window_hu(volume: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """HU clipped to ``[low, high]`` and scaled to ``[0, 1]`` (float32)."""
    return (volume.float().clamp(low, high) - low) / (high - low)


def downsample(volume: torch.Tensor, affine, spacing_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block means of ``volume (I, J, K)`` to about ``spacing_mm``, with the matching affine.

    Each axis is averaged over ``round(spacing_mm / spacing)`` voxels (at least 1); the new voxel ``n``
    is the centre of its block, at old index ``n f + (f - 1) / 2``.
    """
    affine = to_matrix(affine)
    spacing = affine[:3, :3].norm(dim=0)
    factors = [max(1, min(int(round(spacing_mm / float(s))), n)) for s, n in zip(spacing, volume.shape, strict=True)]
    if max(factors) == 1:  # already as coarse: no copy
        return volume.float(), affine
    pooled = F.avg_pool3d(volume.float()[None, None], kernel_size=factors, stride=factors)[0, 0]
    scale = torch.eye(4, dtype=torch.float64)
    scale[:3, :3] = torch.diag(torch.tensor(factors, dtype=torch.float64))
    scale[:3, 3] = (torch.tensor(factors, dtype=torch.float64) - 1) / 2
    return pooled, affine @ scale


def _centroid(mask: torch.Tensor, affine) -> torch.Tensor:
    """RAS mm of the centre of mass of a boolean volume."""
    index = torch.nonzero(mask).to(torch.float64)
    return apply_affine(to_matrix(affine), index.mean(dim=0))


def _mask_box(mask: torch.Tensor, affine, margin_mm: float) -> tuple[list[int], list[int]]:
    """Voxel index range ``[start, stop)`` of the mask's bounding box grown by ``margin_mm``, clipped."""
    index = torch.nonzero(mask)
    spacing = to_matrix(affine)[:3, :3].norm(dim=0)
    grow = [int(torch.ceil(margin_mm / s)) for s in spacing]
    start = [max(0, int(index[:, a].min()) - grow[a]) for a in range(3)]
    stop = [min(mask.shape[a], int(index[:, a].max()) + 1 + grow[a]) for a in range(3)]
    return start, stop


def _skew(r: torch.Tensor) -> torch.Tensor:
    zero = r.new_zeros(())
    return torch.stack(
        [torch.stack([zero, -r[2], r[1]]), torch.stack([r[2], zero, -r[0]]), torch.stack([-r[1], r[0], zero])]
    )


class _AffineParameters(torch.nn.Module):
    """``A x = c_m + M (x - c_f) + t`` with ``M = exp(skew(r)) (I + S)``; ``S = 0`` while rigid."""

    def __init__(self, fixed_centre: torch.Tensor, moving_centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed_centre", fixed_centre)
        self.register_buffer("moving_centre", moving_centre)
        self.rotation = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.translation = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.linear = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))

    def matrix(self) -> torch.Tensor:
        m = torch.linalg.matrix_exp(_skew(self.rotation)) @ (torch.eye(3, dtype=torch.float64) + self.linear)
        out = torch.eye(4, dtype=torch.float64)
        out = out.index_put((torch.arange(3)[:, None], torch.arange(3)[None]), m)
        shift = self.moving_centre + self.translation - m @ self.fixed_centre
        return out.index_put((torch.arange(3), torch.full((3,), 3)), shift)


def prealign(
    fixed: torch.Tensor,
    fixed_affine,
    moving: torch.Tensor,
    moving_affine,
    fixed_mask: torch.Tensor,
    moving_mask: torch.Tensor,
    settings: PrealignSettings | None = None,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """World affine ``A`` (``(4, 4)`` float64, fixed RAS mm -> moving RAS mm) superimposing the two scans.

    Args:
        fixed, moving: CT volumes ``(I, J, K)`` in HU.
        fixed_affine, moving_affine: their voxel -> RAS affines.
        fixed_mask, moving_mask: boolean lung masks on the same grids (non-empty).
        settings: see :class:`PrealignSettings`.
        progress: called with the number of steps just taken (a progress bar's ``update``).
    """
    settings = settings or PrealignSettings()
    if settings.mode not in ("rigid", "affine", "none"):
        raise ValueError(f"pre-alignment mode must be 'rigid', 'affine' or 'none', got {settings.mode!r}.")
    fixed_mask, moving_mask = torch.as_tensor(fixed_mask).bool(), torch.as_tensor(moving_mask).bool()
    if settings.mode == "none":
        return torch.eye(4, dtype=torch.float64)
    params = _AffineParameters(_centroid(fixed_mask, fixed_affine), _centroid(moving_mask, moving_affine))
    start, stop = _mask_box(fixed_mask, fixed_affine, settings.margin_mm)
    box = Grid(fixed.shape, fixed_affine).box(start, stop, [b - a for a, b in zip(start, stop, strict=True)])
    similarity = LocalNCCLoss(settings.window)
    stages = ["rigid"] + (["affine"] if settings.mode == "affine" else [])
    with torch.enable_grad(), few_threads():
        for spacing, steps in _levels(settings, fixed_affine, moving_affine):
            level = _Level(fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, box, spacing, settings)
            for stage in stages:
                _optimise(params, level, similarity, stage, spacing, steps, settings.mask_weight, progress)
    return params.matrix().detach()


def _levels(settings: PrealignSettings, *affines) -> list[tuple[float, int]]:
    """``(spacing, iterations)`` per level; levels finer than the coarser image's voxels are merged into one."""
    iterations = settings.iterations
    if isinstance(iterations, int):
        iterations = [iterations] * len(settings.spacings_mm)
    if len(iterations) != len(settings.spacings_mm):
        raise ValueError(f"give one number of iterations per level {tuple(settings.spacings_mm)}, got {iterations}.")
    finest = max(float(to_matrix(affine)[:3, :3].norm(dim=0).max()) for affine in affines)
    levels: list[tuple[float, int]] = []
    for spacing, steps in zip(settings.spacings_mm, iterations, strict=True):
        spacing = max(float(spacing), finest)
        if levels and levels[-1][0] == spacing:
            continue
        levels.append((spacing, int(steps)))
    return levels


class _Level:
    """The fixed box sampled at one spacing, and the moving image and mask pooled to match.

    Images and masks travel as two channels: windowed intensities, then the lung mask.
    """

    def __init__(self, fixed, fixed_affine, moving, moving_affine, fixed_mask, moving_mask, box, spacing, settings):
        self.points = box.with_spacing(spacing).points(torch.float32)
        fixed_pair, fixed_affine = self._pooled(fixed, fixed_mask, fixed_affine, spacing, settings.hu_window)
        self.moving, self.moving_affine = self._pooled(moving, moving_mask, moving_affine, spacing, settings.hu_window)
        self.fixed = sample_world(fixed_pair, fixed_affine, self.points, fill=0.0)

    @staticmethod
    def _pooled(image, mask, affine, spacing, hu_window) -> tuple[torch.Tensor, torch.Tensor]:
        values, pooled_affine = downsample(window_hu(torch.as_tensor(image), *hu_window), affine, spacing)
        pooled_mask, _ = downsample(mask.float(), affine, spacing)
        return torch.stack([values, pooled_mask]), pooled_affine

    def loss(self, matrix: torch.Tensor, similarity, mask_weight: float) -> torch.Tensor:
        moved = sample_world(self.moving, self.moving_affine, apply_affine(matrix, self.points), fill=0.0)
        lncc = similarity(moved[None, :1], self.fixed[None, :1])
        return lncc + mask_weight * (moved[1] - self.fixed[1]).square().mean()


def _optimise(
    params: _AffineParameters,
    level: _Level,
    similarity,
    stage: str,
    spacing: float,
    steps: int,
    mask_weight: float,
    progress: Callable[[int], object] | None = None,
) -> None:
    groups = [
        {"params": [params.rotation], "lr": 0.01},
        {"params": [params.translation], "lr": spacing / 4},
    ]
    if stage == "affine":
        groups.append({"params": [params.linear], "lr": 0.005})
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad()
        level.loss(params.matrix(), similarity, mask_weight).backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(1)
