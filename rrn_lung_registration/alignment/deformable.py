"""Deformable registration of a pre-aligned lung CT pair by optimisation, without a trained network.

Conventions (this module):

* The **box** is a :class:`~rrn_lung_registration.io.spatial.Grid` over the fixed lung box. Points are ``q``
  in mm along the box's three axes from its first voxel (the frame of
  :class:`~rrn_lung_registration.alignment.bspline.BSplineField`); displacements ``u(q)`` are mm along the same
  axes. The moving point matched to the fixed point ``x`` is ``A(x + U(x))`` (``A``: the pre-alignment,
  ``U``: ``u`` turned into world axes).
* A **level** samples the box at one spacing (``Grid.with_spacing``): voxel ``n`` of the level is ``q =
  n * spacing`` (per axis).

The field is a sum of cubic B-splines, one per level, coarse to fine (``control_mm``): smooth by
construction. Each level:

1. block-averages both images to about the level's spacing (``levels_mm``) and samples them on the level's
   grid (the moving one through ``A``, on the grid grown by ``reach_mm`` so that the field can look beyond
   the box), then describes both by MIND-SSC features (:func:`mind_ssc`: 12 channels of local
   self-similarity, insensitive to the density change of breathing lungs and to noise);
2. keeps as sample points the level voxels inside the fixed lung mask grown by ``mask_margin_mm`` (the lungs
   slide along the chest wall: the wall's motion is not the lungs', and the similarity looks at the lungs);
3. minimises with Adam, on ``samples`` random sample points per step (a stochastic gradient, as elastix
   does), each moved to a random place within its voxel (fixed and moving features are then both
   interpolated, so the optimum does not depend on where the level's grid falls): the mean squared
   MIND difference + ``smoothness`` * the roughness of the level's coefficients +
   ``folding`` * the mean of ``relu(min_jacobian - det(I + grad u))^2`` (keeps ``det J > 0``, from the exact
   B-spline gradient);
4. halves the learning rate whenever the loss (a running mean) stops improving, and stops at the
   ``decays + 1``-th such plateau (converged) or after ``max_steps``: the last steps are small, so the
   sampling noise of the gradient does not stay in the field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rrn_lung_registration.alignment.bspline import BSplineField
from rrn_lung_registration.alignment.prealign import downsample
from rrn_lung_registration.alignment.threads import few_threads, release_freed_memory
from rrn_lung_registration.io.spatial import Grid, apply_affine, sample_world, to_matrix

__all__ = ["NATIVE_MARGIN", "DeformableSettings", "LevelReport", "finest_spacing", "mind_ssc", "register_deformable"]


@dataclass
class DeformableSettings:
    """Settings of :func:`register_deformable` (one value per level where a sequence).

    Attributes:
        levels_mm: image sample spacing of each level, coarse to fine; ``None`` (the last entry) means the
            finest spacing the images and ``max_voxels`` allow (:func:`finest_spacing`), and no level is
            finer than that.
        control_mm: B-spline control point spacing of each level.
        max_steps: Adam steps at most.
        learning_rate: Adam step (mm) of each level.
        samples: sample points of the similarity per step.
        jacobian_samples: sample points of the folding penalty per step.
        smoothness: weight of the coefficients' roughness.
        folding: weight of the penalty on Jacobian determinants below ``min_jacobian``.
        min_jacobian: the determinant below which that penalty starts.
        mask_margin_mm: the similarity is measured in the fixed lung mask grown by this much.
        reach_mm: the moving image is sampled this far beyond the fixed box.
        hu_window: HU clipped to this range before the features.
        max_voxels: largest level grid (voxels) the finest automatic spacing may make.
        tolerance, patience, decays: a plateau is less than ``tolerance`` relative improvement of the loss
            (a running mean) over ``patience`` steps; each plateau halves the learning rate, and the
            ``decays + 1``-th ends the level (few decays on the coarse levels: the next level goes on).
    """

    levels_mm: Sequence[float | None] = (6.0, 3.0, None)
    control_mm: Sequence[float] = (24.0, 12.0, 8.0)
    max_steps: Sequence[int] = (300, 300, 300)
    learning_rate: Sequence[float] = (1.0, 0.5, 0.25)
    samples: Sequence[int] = (2048, 2048, 4096)
    jacobian_samples: int = 2048
    smoothness: float = 0.05
    folding: float = 10.0
    min_jacobian: float = 0.2
    mask_margin_mm: float = 5.0
    reach_mm: float = 6.0
    hu_window: tuple[float, float] = (-1000.0, 0.0)
    max_voxels: int = 16_000_000
    tolerance: float = 5e-4
    patience: int = 20
    decays: Sequence[int] = (1, 1, 3)

    def check(self) -> None:
        n = len(self.levels_mm)
        for name in ("control_mm", "max_steps", "learning_rate", "samples", "decays"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} needs one value per level {tuple(self.levels_mm)}, got {getattr(self, name)!r}."
                )
        if any(s is None for s in self.levels_mm[:-1]):
            raise ValueError(f"only the last level's spacing may be automatic (None), got {tuple(self.levels_mm)}.")


@dataclass
class LevelReport:
    """What one level did: its spacing and grid shape, its control spacing, the steps taken, the loss (running
    mean) at the start and at the end, and the seconds spent preparing the level and optimising."""

    spacing_mm: float
    shape: tuple[int, int, int]
    control_mm: float
    steps: int
    first_loss: float
    last_loss: float
    setup_s: float
    optimise_s: float


#: The finest level stays this much coarser than the images' smallest voxel side: measured on the
#: benchmark's one-lung pair (1.37 mm voxels), TRE mean / median 0.252 / 0.236 mm at 1.37 mm against 0.226 /
#: 0.212 at 1.41 mm and 0.227 / 0.209 at 1.46 mm.
NATIVE_MARGIN = 1.065


def finest_spacing(box: Grid, image_spacings: Sequence[torch.Tensor], max_voxels: int) -> float:
    """The finest level spacing: ``NATIVE_MARGIN`` times the finer image's smallest voxel side (at least 1 mm),
    made coarser where the box would hold more than ``max_voxels`` voxels at it."""
    extent = (torch.tensor(box.shape, dtype=torch.float64) - 1) * box.spacing
    native = max(1.0, NATIVE_MARGIN * min(float(s.min()) for s in image_spacings))
    by_size = float((extent.prod() / max_voxels) ** (1.0 / 3.0))
    return max(native, by_size)


# ----------------------------------------------------------------------------------------------- features

# MIND-SSC: the six neighbours of a voxel at distance ``dilation`` along the axes, and the twelve pairs of
# them at distance sqrt(2) * dilation (neighbours on different axes): the self-similarity context.
_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_PAIRS = tuple(
    (a, b)
    for a in range(6)
    for b in range(a + 1, 6)
    if sum(x * y for x, y in zip(_NEIGHBOURS[a], _NEIGHBOURS[b], strict=True)) == 0
)


def _box_sum(volume: torch.Tensor, radius: int) -> torch.Tensor:
    """Sum over a ``(2 radius + 1)^3`` box of ``volume (1, C, I, J, K)``, where the box fits: ``(1, C, I - 2
    radius, ...)``. Separable: three passes of ``2 radius`` additions."""
    for axis in range(2, 5):
        length = volume.shape[axis] - 2 * radius
        total = volume.narrow(axis, 0, length).clone()
        for offset in range(1, 2 * radius + 1):
            total += volume.narrow(axis, offset, length)
        volume = total
    return volume


def _grow(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``mask (I, J, K)`` bool grown by a ``(2 radius + 1)^3`` box (separable maximum)."""
    volume = mask.float()[None, None]
    width = 2 * radius + 1
    for kernel, padding in (
        ((width, 1, 1), (radius, 0, 0)),
        ((1, width, 1), (0, radius, 0)),
        ((1, 1, width), (0, 0, radius)),
    ):
        volume = F.max_pool3d(volume, kernel, stride=1, padding=padding)
    return volume[0, 0] > 0


def _pair_sources(dilation: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """For each MIND-SSC pair ``(a, b)``: ``(d, s)`` with ``(I(x + a) - I(x + b))^2 = C_d(x + s)``, ``C_d(y) =
    (I(y + d) - I(y))^2``. Pairs whose offsets differ by ``-d`` share ``C_d``: six images serve twelve."""
    sources: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for a, b in _PAIRS:
        offset_a = tuple(dilation * v for v in _NEIGHBOURS[a])
        offset_b = tuple(dilation * v for v in _NEIGHBOURS[b])
        d = tuple(x - y for x, y in zip(offset_a, offset_b, strict=True))
        flipped = tuple(-v for v in d)
        if any(known == flipped for known, _ in sources):
            sources.append((flipped, offset_a))  # = C_{b - a}(x + a)
        else:
            sources.append((d, offset_b))
    return sources


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC features ``(1, 12, I, J, K)`` of ``image (1, 1, I, J, K)``.

    For each of the twelve neighbour pairs ``(a, b)``: the patch distance ``D = box((I(x + a) - I(x +
    b))^2)`` over a ``(2 radius + 1)^3`` box; features ``exp(-D / V)`` with ``V`` the mean of the twelve
    distances (clamped to [0.001, 1000] times its mean over the image), divided by their maximum over the
    channels (Heinrich et al., MICCAI 2013). The image is extended by repeating its edge voxels.

    Twelve pairs but six distinct squared differences (a pair and its mirror image are the same difference,
    shifted): each is computed and box-summed once (separably) on the grid grown by the reach of the
    shifts, and the channels are its shifted windows. Box sums stand for box means: ``D / V`` does not
    change with the scale of ``D``.
    """
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"mind_ssc expects an image (1, 1, I, J, K), got {tuple(image.shape)}.")
    size = image.shape[2:]
    margin = dilation + radius  # C_d is needed at x + s (|s| <= dilation), boxed over +-radius
    pad = margin + dilation  # and reads the image at y + d (|d| <= dilation per axis)
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    span = tuple(n + 2 * margin for n in size)

    sources = _pair_sources(dilation)
    windows = {  # the image at y + offset for y from -margin over span: a view for each offset used
        offset: padded[(..., *(slice(dilation + o, dilation + o + n) for o, n in zip(offset, span, strict=True)))]
        for offset in {(0, 0, 0), *(d for d, _ in sources)}
    }
    boxed = {d: _box_sum(torch.sub(windows[d], windows[(0, 0, 0)]).square_(), radius) for d, _ in sources}
    del padded, windows
    features = image.new_empty(1, len(_PAIRS), *size)
    for channel, (d, s) in enumerate(sources):  # boxed[d] starts at y = -dilation
        i, j, k = (dilation + v for v in s)
        features[:, channel] = boxed[d][:, 0, i : i + size[0], j : j + size[1], k : k + size[2]]
    del boxed
    variance = features.mean(dim=1, keepdim=True)
    level = float(variance.mean())
    variance.clamp_(min=max(level * 1e-3, 1e-12), max=max(level * 1e3, 1e-12))
    features.div_(variance).neg_().exp_()
    del variance
    return features.div_(features.amax(dim=1, keepdim=True))


# ------------------------------------------------------------------------------------------------- levels


def _features(values: torch.Tensor, hu_window: tuple[float, float]) -> torch.Tensor:
    low, high = hu_window
    return mind_ssc(((values.clamp(low, high) - low) / (high - low))[None, None])


class _Level:
    """One level: the sample points, and the fixed and moving features as :class:`_ChannelLast` rows (float16).

    Attributes:
        grid: the level's grid over the box; ``spacing`` ``(3,)`` mm per axis.
        voxels: ``(M, 3)`` level voxels of the sample points; ``points``: the same as ``q`` (mm, box frame).
        fixed: the fixed features on the grid ``(I, J, K)``.
        moving: the moving features on the grid grown by ``reach`` voxels, ``(I + 2r, J + 2r, K + 2r)``.
    """

    def __init__(self, grid, fixed, fixed_affine, moving, moving_affine, prealign, fixed_mask, settings) -> None:
        self.grid = grid
        self.spacing = grid.spacing.float()
        spacing = float(grid.spacing.mean())
        low = settings.hu_window[0]
        self.reach = max(1, math.ceil(settings.reach_mm / spacing))
        points = grid.points(torch.float32)  # float32 mm: far finer than a voxel, half the memory of float64
        pooled, pooled_affine = downsample(fixed_mask.float(), fixed_affine, spacing)
        mask = sample_world(pooled, pooled_affine, points, fill=0.0) > 0.25
        grow = round(settings.mask_margin_mm / spacing)
        if grow > 0:
            mask = _grow(mask, grow)
        voxels = torch.nonzero(mask)
        if len(voxels) == 0:
            raise ValueError("the fixed lung mask is empty on the registration grid.")
        self.voxels = voxels
        self.points = voxels.float() * self.spacing
        pooled, pooled_affine = downsample(fixed, fixed_affine, spacing)
        values = sample_world(pooled, pooled_affine, points, fill=low)
        del points
        # float16 rows (features in [0, 1]; 3 significant digits are plenty for a squared difference)
        self.fixed = _ChannelLast.mind(values, settings.hu_window)
        pooled, pooled_affine = downsample(moving, moving_affine, spacing)
        wide = Grid(tuple(n + 2 * self.reach for n in grid.shape), grid.affine @ _shift(-self.reach))
        values = sample_world(
            pooled, pooled_affine, apply_affine(prealign.float(), wide.points(torch.float32)), fill=low
        )
        self.moving = _ChannelLast.mind(values, settings.hu_window)

    def at_points(self, fields: Sequence[BSplineField], slab: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum of ``fields`` ``(M, 3)`` and its gradient ``(M, 3, 3)`` at the sample points."""
        u, grad = torch.zeros(len(self.points), 3), torch.zeros(len(self.points), 3, 3)
        rows, size = self.voxels[:, 0], self.grid.shape
        for start in range(0, size[0], slab):  # a slab of planes at a time: the grid's values are never all held
            chosen = (rows >= start) & (rows < start + slab)
            if not chosen.any():
                continue
            shape, origin = (min(slab, size[0] - start), *size[1:]), (start * float(self.spacing[0]), 0.0, 0.0)
            index = (rows[chosen] - start, self.voxels[chosen, 1], self.voxels[chosen, 2])
            for field in fields:
                u[chosen] += field.on_grid(shape, self.spacing, origin_mm=origin)[index]
                for axis in range(3):
                    grad[chosen, :, axis] += field.on_grid(shape, self.spacing, axis, origin)[index]
        return u, grad

    def moving_at(self, q: torch.Tensor) -> torch.Tensor:
        """Moving features ``(N, 12)`` at box points ``q (N, 3)`` mm (trilinear, border values outside)."""
        return self.moving.at(q / self.spacing + self.reach)


class _ChannelLast:
    """A feature volume ``(1, C, I, J, K)`` stored as rows ``(I * J * K, C)`` in float16, sampled trilinearly.

    Each corner of a sample is one contiguous row, and the gradient flows to the points only: forward and
    backward over 8 k points take a quarter of ``grid_sample``'s time on a 12-channel volume (whose backward
    also walks the volume), at half the memory.
    """

    def __init__(self, volume: torch.Tensor) -> None:
        self._layout(volume.shape[2:])
        self.rows = volume[0].permute(1, 2, 3, 0).reshape(-1, volume.shape[1]).half()

    def _layout(self, shape: Sequence[int]) -> None:
        self.last = torch.tensor(tuple(shape), dtype=torch.float32) - 1
        self.strides = (shape[1] * shape[2], shape[2], 1)

    @classmethod
    def mind(cls, values: torch.Tensor, hu_window: tuple[float, float], slab: int = 32) -> _ChannelLast:
        """The MIND-SSC features of ``values (I, J, K)`` (HU), computed in slabs along the first axis, each
        with the 3-voxel margin the descriptors read: the float32 feature volume of the whole grid is never
        held."""
        margin = 3  # dilation 2 + box radius 1
        size = values.shape
        table = cls.__new__(cls)
        table._layout(size)
        table.rows = torch.empty(size[0] * size[1] * size[2], len(_PAIRS), dtype=torch.float16)
        plane = size[1] * size[2]
        for start in range(0, size[0], slab):
            stop = min(start + slab, size[0])
            low = max(0, start - margin)
            features = _features(values[low : min(size[0], stop + margin)], hu_window)[0, :, start - low :][
                :, : stop - start
            ]
            table.rows[start * plane : stop * plane] = features.permute(1, 2, 3, 0).reshape(-1, len(_PAIRS))
        return table

    def at(self, voxels: torch.Tensor) -> torch.Tensor:
        """Features ``(N, C)`` float32 at ``voxels (N, 3)`` (clamped to the volume: border values outside)."""
        voxels = torch.minimum(voxels.clamp(min=0.0), self.last)
        base = voxels.detach().floor().minimum(self.last - 1).clamp(min=0.0)
        weight = voxels - base  # (N, 3), carries the gradient
        index = (base.long() * torch.tensor(self.strides)).sum(1)
        out = 0.0
        for dx in (0, 1):
            wx = weight[:, 0] if dx else 1.0 - weight[:, 0]
            for dy in (0, 1):
                wxy = wx * (weight[:, 1] if dy else 1.0 - weight[:, 1])
                for dz in (0, 1):
                    w = wxy * (weight[:, 2] if dz else 1.0 - weight[:, 2])
                    corner = self.rows[index + (dx * self.strides[0] + dy * self.strides[1] + dz)]
                    out = out + w[:, None] * corner.float()
        return out


def _shift(voxels: float) -> torch.Tensor:
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, 3] = float(voxels)
    return matrix


def _determinant(grad: torch.Tensor) -> torch.Tensor:
    """``det(I + grad)`` for ``grad (N, 3, 3)`` (cofactor expansion: cheaper than a batched LU here)."""
    g = grad + torch.eye(3, dtype=grad.dtype)
    return (
        g[:, 0, 0] * (g[:, 1, 1] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 1])
        - g[:, 0, 1] * (g[:, 1, 0] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 0])
        + g[:, 0, 2] * (g[:, 1, 0] * g[:, 2, 1] - g[:, 1, 1] * g[:, 2, 0])
    )


# ---------------------------------------------------------------------------------------------- optimiser


class _Plateau:
    """A running mean of the loss; on a plateau (less than ``tolerance`` relative improvement over ``patience``
    steps) the learning rate is halved, and after ``decays`` halvings the level has converged."""

    def __init__(self, optimizer: torch.optim.Optimizer, tolerance: float, patience: int, decays: int) -> None:
        self.optimizer, self.tolerance, self.patience, self.decays = optimizer, tolerance, patience, decays
        self.means: list[float] = []
        self.mean: float | None = None
        self.halvings = 0

    def converged(self, value: float) -> bool:
        self.mean = value if self.mean is None else 0.9 * self.mean + 0.1 * value
        self.means.append(self.mean)
        if len(self.means) <= self.patience + 10:  # the running mean needs a few steps to settle
            return False
        before = self.means[-self.patience - 1]
        if before - self.mean >= self.tolerance * abs(before):
            return False
        if self.halvings == self.decays:
            return True
        self.halvings += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= 0.5
        self.means = self.means[-1:]
        return False


def register_deformable(
    fixed: torch.Tensor,
    fixed_affine,
    moving: torch.Tensor,
    moving_affine,
    prealign: torch.Tensor,
    fixed_mask: torch.Tensor,
    box: Grid,
    settings: DeformableSettings | None = None,
    progress: Callable[[int], object] | None = None,
    seed: int = 0,
) -> tuple[Grid, torch.Tensor, list[LevelReport]]:
    """The displacement registering ``moving`` to ``fixed`` over the fixed lung ``box``.

    Args:
        fixed, moving: CT ``(I, J, K)`` in HU; ``fixed_affine``, ``moving_affine`` their voxel -> RAS mm.
        prealign: ``(4, 4)`` world affine fixed -> moving (the pre-alignment ``A``).
        fixed_mask: ``(I, J, K)`` bool lungs of ``fixed``.
        box: a grid over the fixed lung box (its sampling is irrelevant: each level resamples the box).
        progress: called with the number of steps just taken (a progress bar's ``update``).
        seed: draws the sample points; same inputs and seed, same field.

    Returns:
        ``(grid, u, reports)``: the finest level's grid, ``u (3, I, J, K)`` float32 in its voxels (the moving
        point of the grid's voxel ``x`` is ``A(x + U(x))``), and one :class:`LevelReport` per level.
    """
    settings = settings or DeformableSettings()
    settings.check()
    fixed_affine, moving_affine, prealign = to_matrix(fixed_affine), to_matrix(moving_affine), to_matrix(prealign)
    extent = ((torch.tensor(box.shape, dtype=torch.float64) - 1) * box.spacing).tolist()
    image_spacings = [fixed_affine[:3, :3].norm(dim=0), moving_affine[:3, :3].norm(dim=0)]
    finest = finest_spacing(box, image_spacings, settings.max_voxels)
    spacings = [finest if s is None else max(float(s), finest) for s in settings.levels_mm]
    release_freed_memory()  # what reading, masking and pre-aligning freed, before the feature volumes
    generator = torch.Generator().manual_seed(seed)
    fields: list[BSplineField] = []
    reports: list[LevelReport] = []
    grid = box
    for spacing, control, max_steps, rate, samples, decays in zip(
        spacings,
        settings.control_mm,
        settings.max_steps,
        settings.learning_rate,
        settings.samples,
        settings.decays,
        strict=True,
    ):
        start = time.perf_counter()
        grid = box.with_spacing(float(spacing))
        if int(max_steps) == 0:  # nothing to optimise on this level
            continue
        level = _Level(grid, fixed, fixed_affine, moving, moving_affine, prealign, fixed_mask, settings)
        base_u, base_grad = level.at_points(fields)  # the coarser levels' field: fixed from now on
        level.voxels = None  # needed for that only
        field = BSplineField(extent, float(control))
        optimizer = torch.optim.Adam(field.parameters(), lr=float(rate))
        plateau = _Plateau(optimizer, settings.tolerance, settings.patience, int(decays))
        first = None
        steps = 0
        count = len(level.points)
        setup = time.perf_counter() - start
        with torch.enable_grad(), few_threads():
            while steps < int(max_steps):
                steps += 1
                pick = torch.randint(count, (min(int(samples), count),), generator=generator)
                q = level.points[pick]
                # anywhere in the sample's voxel: fixed and moving features both interpolated
                shift = (torch.rand(q.shape, generator=generator) - 0.5) * level.spacing
                q = q + shift
                # the coarser levels' field there, to first order (their splines are 12 mm and wider)
                base = base_u[pick] + (base_grad[pick] @ shift[:, :, None])[:, :, 0]
                target = level.fixed.at(q / level.spacing)
                similarity = (level.moving_at(q + field(q) + base) - target).square().mean()
                loss = similarity + settings.smoothness * field.roughness()
                if settings.folding > 0:  # the Jacobian at fewer points: the field is smooth
                    pick = torch.randint(count, (min(settings.jacobian_samples, count),), generator=generator)
                    _, grad = field(level.points[pick], gradient=True)
                    determinant = _determinant(grad + base_grad[pick])
                    loss = loss + settings.folding * F.relu(settings.min_jacobian - determinant).square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                first = value if first is None else first
                if progress is not None:
                    progress(1)
                if plateau.converged(value):
                    break
        field.requires_grad_(False)
        fields.append(field)
        del level  # its feature volumes, before the next level makes its own
        release_freed_memory()
        seconds = time.perf_counter() - start - setup
        report = LevelReport(
            float(spacing), tuple(grid.shape), float(control), steps, first, plateau.mean, setup, seconds
        )
        reports.append(report)
    spacing = grid.spacing.float()
    u = sum((f.on_grid(grid.shape, spacing) for f in fields), torch.zeros(*grid.shape, 3))  # (I, J, K, 3) mm
    return grid, torch.movedim(u / spacing, -1, 0).contiguous(), reports
