"""Registering one pair of real lung CT scans, end to end, with outputs in the fixed image's physical space.

Data flow (:class:`LungRegistration`)::

    fixed, moving CT (HU, any geometry)
      -> lung masks (:func:`~rrn_lung_registration.masking.lung_mask.lung_mask`)
      -> pre-alignment A, rigid then affine (:func:`~rrn_lung_registration.alignment.prealign.prealign`)
      -> displacement u over the fixed lung box (+ margin):
         without weights, the multi-level B-spline on MIND-SSC features at the images' own resolution
         (:func:`~rrn_lung_registration.alignment.deformable.register_deformable`); u on its finest grid;
         with weights, the RRN on the box sampled at ``grid_size`` (256^3 by default; fixed, and moving
         through A, clipped to the HU window and scaled to [0, 1]), then optional instance optimisation
         (:mod:`~rrn_lung_registration.alignment.instance`)
      -> transform phi(x) = A(x + U(x)) (:class:`~rrn_lung_registration.io.transform.RegistrationTransform`)

and :func:`write_outputs` writes, on the fixed image's own grid and geometry:

=============================  =====================================================================
``warped_moving.nii.gz``       the moving image resampled through phi (float32 HU)
``displacement_field.nii``     ITK displacement field ``phi(p) - p``, LPS mm, 3 components per voxel
                               (ITK / elastix / 3D Slicer apply it as a ``DisplacementFieldTransform``;
                               not compressed, like elastix's: float vectors shrink by about 15 % for
                               seconds of gzip)
``jacobian_determinant.nii.gz`` ``det D phi`` (<= 0 is folding)
``fixed_lung_mask.nii.gz``     the lung mask the registration used (uint8)
``prealign.tfm``               the pre-alignment A as an ITK ``AffineTransform`` (LPS)
``overview.png``               a coronal slice: fixed, moving, warped, differences, |phi - id|, Jacobian
``registration.json``          settings, timings, Jacobian and folding statistics, TRE, warnings
``warped_landmarks.csv``       phi(fixed landmarks), LPS mm (with landmarks)
``tre_per_landmark.csv``       TRE per landmark: before, after pre-alignment, after (sub-voxel, snapped)
``tre_summary.json``           mean, std, p95, max of each
=============================  =====================================================================

Everything is written to a hidden staging folder inside the output folder and moved into place only
when all files are complete, so a failed or interrupted run leaves no partial set behind; the set replaces
any earlier one as a whole (no file of an earlier run survives beside the new ones), and the staging folders
of killed runs are removed by the next run into the folder.

Before any computation, :func:`register_files` checks what can be checked (:mod:`~rrn_lung_registration.io.preflight`):
the output folder (writable, not a file, no earlier outputs unless ``overwrite``), the settings, the weights
file, each image (complete file, finite voxels, chest-CT spacing and extent, Hounsfield units) and the
landmarks (inside their images). After the registration, a mean Jacobian determinant in the lungs that
breathing cannot produce is logged as a warning and listed under ``"warnings"`` in ``registration.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor

from rrn_lung_registration.alignment.deformable import DeformableSettings, register_deformable
from rrn_lung_registration.alignment.instance import finetune_network, optimise_field
from rrn_lung_registration.alignment.prealign import PrealignSettings, prealign, window_hu
from rrn_lung_registration.alignment.threads import release_freed_memory
from rrn_lung_registration.io.ct_io import (
    WRITE_SUFFIXES,
    read_ct,
    read_displacement_field,
    write_displacement_field,
    write_image,
)
from rrn_lung_registration.io.landmarks import LPS_TO_RAS, summarize_errors, write_landmarks_csv
from rrn_lung_registration.io.preflight import (
    check_ct_geometry,
    check_finite,
    check_landmarks_inside,
    check_output_file,
    check_output_folder,
    jacobian_warning,
    remove_stale_staging,
    staging_prefix,
)
from rrn_lung_registration.io.spatial import Grid, sample_voxels, sample_world
from rrn_lung_registration.io.transform import RegistrationTransform
from rrn_lung_registration.losses import RegistrationLoss
from rrn_lung_registration.masking.lung_mask import (
    axial_axis_from_affine,
    check_ct_intensities,
    lung_bounding_box,
    lung_mask,
)
from rrn_lung_registration.outputs.overview import save_overview

__all__ = [
    "OUTPUT_FILES",
    "summary_line",
    "LungRegistration",
    "RegistrationResult",
    "RegistrationSettings",
    "apply_displacement_field",
    "landmark_report",
    "register_files",
    "write_outputs",
]

_LPS = np.asarray(LPS_TO_RAS, dtype=np.float64)

logger = logging.getLogger(__name__)

OUTPUT_FILES = (
    "warped_moving.nii.gz",
    "displacement_field.nii",
    "jacobian_determinant.nii.gz",
    "fixed_lung_mask.nii.gz",
    "prealign.tfm",
    "overview.png",
    "warped_landmarks.csv",
    "tre_per_landmark.csv",
    "tre_summary.json",
    "registration.json",
)
"""Every file a registration may write (the module notes); an output folder holds one such set at a time."""

_FORMER_OUTPUT_FILES = ("displacement_field.nii.gz",)
"""Names earlier versions wrote: removed with an earlier set too."""


@dataclass
class RegistrationSettings:
    """Every choice of :class:`LungRegistration`, paper values by default.

    Attributes:
        grid_size: the network's grid (with weights), one size or ``(I, J, K)``; each a multiple of 16.
        margin_mm: margin around the fixed lung box that the registration covers.
        hu_window: HU clipped and scaled to ``[0, 1]`` for the network and its losses.
        prealign: ``"affine"`` (rigid, then affine), ``"rigid"`` or ``"none"``.
        prealign_iterations: Adam steps per pre-alignment level and stage.
        prealign_spacings_mm: sample spacing of each pre-alignment level (the deformable registration's
            coarse levels take over from there).
        deformable: keyword arguments of
            :class:`~rrn_lung_registration.alignment.deformable.DeformableSettings`, the registration
            without weights (multi-level B-spline on MIND-SSC features, grids of physical spacing).
        weights: trained RRN weights (a state dict, or a bundle checkpoint holding ``"network"``); ``None``
            registers by the deformable optimisation alone.
        network: keyword arguments of :class:`~rrn_lung_registration.networks.RRN` (must match the weights).
        instance_steps: without weights, at most this many steps per level of the deformable optimisation
            (``None``: until converged; 0: none, the pre-alignment alone); with weights, the
            instance-optimisation steps per level after the network (``None``: 0, the network's field as is).
        instance_mode: with weights, ``"field"`` optimises the network's field; ``"network"`` fine-tunes the
            network's weights on the pair.
        instance_factors: with weights, image block-averaging factors of the field-optimisation levels.
        loss: the registration loss preset of the network fine-tuning (``"paper"`` or ``"released_code"``).
        field_loss: with weights, keyword arguments of the field optimisation's
            :class:`~rrn_lung_registration.losses.RegistrationLoss`.
        fill_hu: value of points mapped outside the moving image (air).
        device: ``"cpu"``, ``"cuda"``...; ``None`` picks CUDA when available.
    """

    grid_size: int | Sequence[int] = 256
    margin_mm: float = 10.0
    hu_window: tuple[float, float] = (-1000.0, -100.0)
    prealign: Literal["affine", "rigid", "none"] = "affine"
    prealign_iterations: int | Sequence[int] = 80
    prealign_spacings_mm: Sequence[float] = (8.0,)
    deformable: dict = field(default_factory=dict)
    weights: str | None = None
    network: dict = field(default_factory=dict)
    instance_steps: int | None = None
    instance_mode: Literal["field", "network"] = "field"
    instance_factors: Sequence[int] = (4, 2)
    loss: str = "paper"
    field_loss: dict = field(default_factory=lambda: {"window": 5, "penalty": "l2", "weight": 1.0})
    fill_hu: float = -1000.0
    device: str | None = None

    def grid_shape(self) -> tuple[int, int, int]:
        size = self.grid_size
        try:
            shape = (int(size),) * 3 if isinstance(size, int | float) else tuple(int(s) for s in size)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"grid_size must be one size or three sizes of at least 8, got {size!r}.")
        return shape

    def check(self) -> None:
        """Raise ``ValueError`` for a setting the registration would otherwise trip over only after minutes."""
        shape = self.grid_shape()
        if self.weights is not None and any(s % 16 for s in shape):
            raise ValueError(f"grid_size must be a multiple of 16 for the RRN's weights, got {self.grid_size!r}.")
        if self.prealign not in ("affine", "rigid", "none"):
            raise ValueError(f"prealign must be 'affine', 'rigid' or 'none', got {self.prealign!r}.")
        if self.instance_mode not in ("field", "network"):
            raise ValueError(f"instance_mode must be 'field' or 'network', got {self.instance_mode!r}.")
        steps = self.instance_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0):
            raise ValueError(f"instance_steps must be a whole number of steps (0 or more), got {steps!r}.")
        for name in ("margin_mm", "fill_hu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be 0 or more, got {self.margin_mm!r}.")
        try:
            self.deformable_settings().check()
        except TypeError as error:
            raise ValueError(f"deformable: {_one_line(error)}") from None

    def deformable_settings(self) -> DeformableSettings:
        """The deformable optimisation's settings, ``instance_steps`` capping its steps per level."""
        chosen = DeformableSettings(**self.deformable)
        if self.instance_steps is not None:
            chosen.max_steps = [min(int(n), int(self.instance_steps)) for n in chosen.max_steps]
        return chosen


@dataclass
class RegistrationResult:
    """What :meth:`LungRegistration.register` found.

    Attributes:
        transform: fixed RAS mm -> moving RAS mm.
        fixed_mask, moving_mask: lung masks ``(I, J, K)`` bool on each image's grid.
        overview_images: ``fixed``, ``moving`` (no pre-alignment), ``warped`` in HU on the overview's plane
            (:func:`overview_plane`), ``(I, 1, K)``.
        timings: seconds per stage.
        levels: without weights, one
            :class:`~rrn_lung_registration.alignment.deformable.LevelReport` per level of the optimisation.
    """

    transform: RegistrationTransform
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    overview_images: dict[str, torch.Tensor]
    timings: dict[str, float]
    levels: list = field(default_factory=list)


def _source(image: torch.Tensor, default: str) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else default


def _check_image(image: torch.Tensor, default: str) -> str:
    """Refuse what is not a chest CT in HU (naming the file): shape, NaN / inf, geometry, intensities."""
    source = _source(image, default)
    if not isinstance(image, MetaTensor):
        raise ValueError(f"{source}: expected a MetaTensor with its affine (read it with ct_io.read_ct).")
    if image.ndim != 3:
        raise ValueError(f"{source}: expected a 3-D volume (I, J, K), got shape {tuple(image.shape)}.")
    check_finite(image, source)
    check_ct_geometry(image, source)
    check_ct_intensities(image, source)
    return source


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)


class LungRegistration:
    """Register a moving CT to a fixed CT: ``LungRegistration(settings).register(fixed, moving)``.

    ``fixed`` and ``moving`` are ``MetaTensor (I, J, K)`` in HU, as :func:`~rrn_lung_registration.io.ct_io.read_ct`
    gives them. By the DIR-Lab convention fixed is the inhale scan and moving the exhale scan.
    """

    def __init__(self, settings: RegistrationSettings | None = None) -> None:
        self.settings = settings or RegistrationSettings()
        self.settings.check()
        if self.settings.instance_mode == "network" and self.settings.weights is None:
            raise ValueError("instance_mode 'network' fine-tunes trained weights: give weights=... too.")
        device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device {device!r} is not a torch device ({_one_line(error)}).") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine; use device='cpu'.")
        self.network = self._load_network() if self.settings.weights else None

    def _load_network(self) -> torch.nn.Module:
        """The RRN with the settings' weights (``torch.load(..., weights_only=True)``).

        Raises:
            FileNotFoundError: no such weights file.
            ValueError: one line naming the file and the problem: not a PyTorch file, damaged, holding
                objects other than tensors, or weights of another network.
        """
        from rrn_lung_registration.networks import RRN
        from shared_ops.checkpoints import load_network_weights

        path = Path(self.settings.weights)
        if not path.is_file():
            what = "a folder, not a weights file" if path.is_dir() else "no such weights file"
            raise FileNotFoundError(f"{path}: {what}.")
        network = RRN(**self.settings.network)
        try:
            network = load_network_weights(network, path)
        except Exception as error:  # unpickling, zip and state-dict errors alike: the file is the problem
            detail = _one_line(error).removeprefix(f"{path}: ")
            raise ValueError(
                f"{path}: cannot load these weights ({type(error).__name__}: {detail}); expected an RRN state "
                "dict or a bundle checkpoint holding one under 'network', saved with torch.save."
            ) from None
        return network.to(self.device).eval()

    def register(self, fixed: MetaTensor, moving: MetaTensor, progress: bool = False) -> RegistrationResult:
        """Register ``moving`` to ``fixed``; ``progress`` shows a progress bar per stage (tqdm)."""
        settings, timings = self.settings, {}
        fixed_source, moving_source = _check_image(fixed, "fixed"), _check_image(moving, "moving")
        fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
        with _timed(timings, "lung_masks"):
            fixed_mask = self._mask(fixed, fixed_grid, fixed_source)
            moving_mask = self._mask(moving, moving_grid, moving_source)
        with _timed(timings, "prealign"), _bar(progress, "pre-alignment", "step") as bar:
            prealign_settings = PrealignSettings(
                mode=settings.prealign,
                spacings_mm=tuple(settings.prealign_spacings_mm),
                iterations=settings.prealign_iterations,
                hu_window=settings.hu_window,
            )
            matrix = prealign(
                fixed.as_tensor(), fixed_grid.affine, moving.as_tensor(), moving_grid.affine,
                torch.from_numpy(fixed_mask), torch.from_numpy(moving_mask), prealign_settings, progress=bar,
            )  # fmt: skip
        box = lung_bounding_box(fixed_mask, fixed_grid.spacing.tolist(), settings.margin_mm)
        starts, stops = [s.start for s in box], [s.stop for s in box]
        lung_box = fixed_grid.box(starts, stops, [b - a for a, b in zip(starts, stops, strict=True)])
        levels = []
        if self.network is None:
            with _timed(timings, "deformable"), _bar(progress, "deformable", "step") as bar:
                grid, ddf, levels = register_deformable(
                    fixed.as_tensor(), fixed_grid.affine, moving.as_tensor(), moving_grid.affine, matrix,
                    torch.from_numpy(fixed_mask), lung_box, settings.deformable_settings(), progress=bar,
                )  # fmt: skip
        else:
            with _timed(timings, "resample"):
                grid = fixed_grid.box(starts, stops, settings.grid_shape())
                identity = RegistrationTransform(matrix, grid, torch.zeros(3, *grid.shape))
                points = grid.points()
                fixed_hu = sample_world(fixed.as_tensor(), fixed_grid.affine, points, fill=settings.fill_hu)
                aligned_hu = sample_world(
                    moving.as_tensor(), moving_grid.affine, identity.map_points(points).float(), fill=settings.fill_hu
                )
            with _timed(timings, "network_and_instance"):
                ddf = self._network_displacement(fixed_hu, aligned_hu, timings)
        transform = RegistrationTransform(matrix, grid, ddf)
        with _timed(timings, "resample_for_overview"):
            points = overview_plane(grid).points()
            moved = transform.map_points(points).float()
            images = {
                "fixed": sample_world(fixed.as_tensor(), fixed_grid.affine, points, fill=settings.fill_hu),
                "moving": sample_world(moving.as_tensor(), moving_grid.affine, points, fill=settings.fill_hu),
                "warped": sample_world(moving.as_tensor(), moving_grid.affine, moved, fill=settings.fill_hu),
            }
        return RegistrationResult(transform, fixed_mask, moving_mask, images, timings, levels)

    def _mask(self, image: MetaTensor, grid: Grid, source: str) -> np.ndarray:
        return lung_mask(
            image.as_tensor().numpy(),
            grid.spacing.tolist(),
            axial_axis=axial_axis_from_affine(grid.affine.numpy()),
            source=source,
        )

    def _scaled(self, hu: torch.Tensor) -> torch.Tensor:
        return window_hu(hu, *self.settings.hu_window)[None, None].to(self.device)

    def _network_displacement(self, fixed_hu: torch.Tensor, moving_hu: torch.Tensor, timings: dict) -> torch.Tensor:
        """``u`` ``(3, *grid)`` in grid voxels from the network (then instance optimisation, if asked)."""
        settings = self.settings
        fixed, moving = self._scaled(fixed_hu), self._scaled(moving_hu)
        steps = 0 if settings.instance_steps is None else settings.instance_steps
        with _timed(timings, "network"), torch.no_grad():
            ddf = self.network(moving, fixed).float()
        if steps and settings.instance_mode == "network":
            import copy

            with _timed(timings, "instance_optimisation"):
                network = copy.deepcopy(self.network)
                ddf = finetune_network(network, fixed, moving, RegistrationLoss.from_preset(settings.loss), steps)
        elif steps:
            with _timed(timings, "instance_optimisation"):
                loss = RegistrationLoss(**settings.field_loss)
                ddf = optimise_field(fixed, moving, ddf, loss, steps, settings.instance_factors)
        return ddf[0].cpu()


@contextlib.contextmanager
def _bar(show: bool, description: str, unit: str) -> Iterator[Callable[[int], object] | None]:
    """A tqdm progress bar's ``update`` for one stage (``None`` when not shown)."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(desc=description, unit=unit, leave=False, dynamic_ncols=True, disable=None) as bar:
        yield bar.update


# ----------------------------------------------------------------------------------------- outputs


def landmark_report(
    transform: RegistrationTransform,
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    fixed_grid: Grid,
    moving_grid: Grid,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """TRE per landmark (mm) and the warped fixed landmarks (LPS mm ``(N, 3)``).

    Returns ``({"before", "prealign", "after", "after_snapped"}: (N,) arrays, warped (N, 3))``. Snapped
    follows DIR-Lab practice: the fixed landmark is moved to its nearest fixed voxel before mapping and
    the mapped point to its nearest moving voxel before measuring.
    """
    fixed_points = np.asarray(fixed_points, dtype=np.float64).reshape(-1, 3)
    moving_points = np.asarray(moving_points, dtype=np.float64).reshape(-1, 3)
    if fixed_points.shape != moving_points.shape:
        raise ValueError(f"fixed and moving landmarks differ in number: {len(fixed_points)} vs {len(moving_points)}.")
    warped = transform.map_points_lps(fixed_points)
    errors = {
        "before": np.linalg.norm(fixed_points - moving_points, axis=1),
        "prealign": np.linalg.norm(transform.map_points_lps(fixed_points, deformable=False) - moving_points, axis=1),
        "after": np.linalg.norm(warped - moving_points, axis=1),
    }
    snapped_start = _snap(fixed_points, fixed_grid)
    snapped_end = _snap(transform.map_points_lps(snapped_start), moving_grid)
    errors["after_snapped"] = np.linalg.norm(snapped_end - moving_points, axis=1)
    return errors, warped


def _snap(points_lps: np.ndarray, grid: Grid) -> np.ndarray:
    """LPS points moved to the nearest voxel centre of ``grid``."""
    ras = torch.from_numpy(points_lps @ _LPS)
    return (grid.voxel_to_world(grid.world_to_voxel(ras).round()).numpy()) @ _LPS


def _write_itk_affine(path: Path, matrix: torch.Tensor) -> None:
    """The RAS world affine ``matrix`` as an ITK ``AffineTransform`` file (LPS, fixed -> moving points).

    Written as ITK's text transform format ("Insight Transform File V1.0": the 3 x 3 matrix row by row, the
    translation, and the centre 0 as fixed parameters), which ITK, elastix and 3D Slicer read; writing it
    through ITK itself costs seconds of module loading.
    """
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ matrix.numpy() @ flip
    parameters = [*lps[:3, :3].reshape(-1), *lps[:3, 3]]
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in parameters)}\n"
        "FixedParameters: 0 0 0\n"
    )
    path.write_text(text)


def _resampled_outputs(
    moving: MetaTensor, transform: RegistrationTransform, grid: Grid, fill: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On ``grid``, in one pass over its slabs: the moving image through ``phi`` ``(I, J, K)``, the ITK
    displacement ``phi(p) - p`` in LPS mm ``(I, J, K, 3)`` and ``det D phi`` ``(I, J, K)`` (float32).

    Each is a view of a buffer in the order NIfTI stores it (first axis fastest, vector components
    slowest), so the writers stream it without a copy.
    """
    size = tuple(reversed(grid.shape))
    warped = torch.empty(size, dtype=torch.float32).permute(2, 1, 0)
    displacement = torch.empty(3, *size, dtype=torch.float32).permute(3, 2, 1, 0)
    jacobian = torch.empty(size, dtype=torch.float32).permute(2, 1, 0)
    determinant = transform.jacobian_on_grid()
    lps = torch.as_tensor(_LPS)
    for k0, k1 in grid.slabs(max_points=1 << 20):  # small slabs: the float64 points are the peak here
        points = grid.points(torch.float64, (k0, k1))
        mapped = transform.map_points(points)
        warped[:, :, k0:k1] = sample_world(moving.as_tensor(), moving.affine, mapped.float(), fill=fill)
        displacement[:, :, k0:k1] = ((mapped - points) @ lps).float()
        jacobian[:, :, k0:k1] = sample_voxels(determinant, transform.grid.world_to_voxel(points).float())
    return warped, displacement, jacobian


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def overview_plane(grid: Grid) -> Grid:
    """The plane ``overview.png`` shows: the middle one along the second axis of ``grid``, ``(I, 1, K)``."""
    shift = torch.eye(4, dtype=torch.float64)
    shift[1, 3] = grid.shape[1] // 2
    return Grid((grid.shape[0], 1, grid.shape[2]), grid.affine @ shift)


def _overview_fields(transform: RegistrationTransform) -> tuple[np.ndarray, np.ndarray]:
    """On the overview's plane: ``phi - id`` in transform-grid voxels ``(3, I, 1, K)`` and ``det D phi``."""
    grid, middle = transform.grid, transform.grid.shape[1] // 2
    points = overview_plane(grid).points(torch.float64)
    voxels = grid.world_to_voxel(transform.map_points(points)) - grid.world_to_voxel(points)
    jacobian = transform.jacobian_on_grid()[:, middle : middle + 1, :]
    return torch.movedim(voxels, -1, 0).float().numpy(), jacobian.numpy()


def write_outputs(
    result: RegistrationResult,
    fixed: MetaTensor,
    moving: MetaTensor,
    output: str | os.PathLike,
    fixed_landmarks: np.ndarray | None = None,
    moving_landmarks: np.ndarray | None = None,
    settings: RegistrationSettings | None = None,
    input_warnings: Sequence[str] = (),
    started: float | None = None,
) -> dict[str, Path]:
    """Write the outputs listed in the module notes into ``output``; returns ``{name: path}``.

    Landmarks are ``(N, 3)`` LPS mm (as :func:`~rrn_lung_registration.io.landmarks.read_landmarks` gives).
    The new set replaces any earlier registration's outputs in ``output`` as a whole, and staging folders
    of killed runs are removed. ``registration.json`` lists under ``"warnings"`` the ``input_warnings`` and
    a mean Jacobian determinant in the lungs outside
    :data:`~rrn_lung_registration.io.preflight.JACOBIAN_MEAN_RANGE` (also logged as a warning).
    ``started`` (a ``time.perf_counter()`` value) adds the seconds since then as ``timings_s.total``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    transform = result.transform
    summary: dict = {
        "settings": asdict(settings) if settings else None,
        "timings_s": dict(result.timings),
        "deformable_levels": [asdict(level) for level in result.levels],
        "warnings": list(input_warnings),
    }
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=output))
    try:
        files: dict[str, str] = {}

        def target(name: str) -> Path:
            files[name] = name
            return staging / name

        start = time.perf_counter()
        fill = settings.fill_hu if settings else -1000.0
        warped, displacement, jacobian = _resampled_outputs(moving, transform, fixed_grid, fill)
        # The volumes are written on two threads (zlib compresses with the GIL released) while this one goes on;
        # leaving the block waits for them, also on an error (before the staging folder is removed).
        affine = fixed_grid.affine
        with ThreadPoolExecutor(2, thread_name_prefix="write-outputs") as writers:
            writes = [
                writers.submit(write_image, target("warped_moving.nii.gz"), warped, affine),
                writers.submit(write_image, target("jacobian_determinant.nii.gz"), jacobian, affine),
                writers.submit(write_displacement_field, target("displacement_field.nii"), displacement, affine),
                writers.submit(
                    write_image, target("fixed_lung_mask.nii.gz"), result.fixed_mask.astype(np.uint8), affine
                ),
            ]
            del warped, displacement, jacobian  # the writers hold them until written
            _write_itk_affine(target("prealign.tfm"), transform.prealign)
            summary["jacobian"] = _jacobian_summary(transform, result.fixed_mask, fixed_grid)
            implausible = jacobian_warning(summary["jacobian"]["mean_in_lungs"])
            if implausible:
                logger.warning("%s: %s", output, implausible)
                summary["warnings"].append(implausible)
            images = result.overview_images
            displacement_voxels, plane_jacobian = _overview_fields(transform)
            save_overview(
                target("overview.png"),
                images["fixed"].numpy(), images["moving"].numpy(), images["warped"].numpy(),
                displacement_voxels, spacing=transform.grid.spacing.tolist(), axis=1, index=0,
                jacobian=plane_jacobian,
            )  # fmt: skip
            if fixed_landmarks is not None and moving_landmarks is not None:
                errors, warped_points = landmark_report(
                    transform, fixed_landmarks, moving_landmarks, fixed_grid, moving_grid
                )
                write_landmarks_csv(target("warped_landmarks.csv"), warped_points)
                names = list(errors)
                rows = [[i, *(f"{errors[n][i]:.4f}" for n in names)] for i in range(len(warped_points))]
                _write_csv(target("tre_per_landmark.csv"), ["landmark", *(f"tre_{n}_mm" for n in names)], rows)
                summary["tre_mm"] = {name: summarize_errors(values) for name, values in errors.items()}
                (target("tre_summary.json")).write_text(json.dumps(summary["tre_mm"], indent=2) + "\n")
        for write in writes:
            write.result()
        summary["timings_s"]["outputs"] = round(time.perf_counter() - start, 3)
        if started is not None:
            summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        report = target("registration.json")
        summary["files"] = sorted(files)
        report.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        _replace_outputs(staging, output, list(files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: output / name for name in files}


def _replace_outputs(staging: Path, output: Path, names: Sequence[str]) -> None:
    """Move the complete new set ``names`` (``registration.json`` last) from ``staging`` into ``output``.

    Any earlier set goes first: its report (a folder without ``registration.json`` is recognisably
    incomplete), then its files that the new set does not rewrite, so that no file of it survives.
    """
    (output / "registration.json").unlink(missing_ok=True)
    for name in (*OUTPUT_FILES, *_FORMER_OUTPUT_FILES):
        if name not in names:
            (output / name).unlink(missing_ok=True)
    for name in names:
        os.replace(staging / name, output / name)


def _jacobian_summary(transform: RegistrationTransform, fixed_mask: np.ndarray, fixed_grid: Grid) -> dict:
    """Statistics of ``det D phi`` on the network grid, over the whole grid and inside the fixed lungs."""
    jacobian = transform.jacobian_on_grid()
    grid = transform.grid
    in_lung = torch.empty(grid.shape, dtype=torch.bool)
    mask = torch.from_numpy(fixed_mask).float()
    for k0, k1 in grid.slabs(max_points=1 << 20):
        voxels = fixed_grid.world_to_voxel(grid.points(torch.float64, (k0, k1))).float()
        in_lung[:, :, k0:k1] = sample_voxels(mask, voxels, fill=0.0, mode="nearest") > 0.5
    lung = jacobian[in_lung]
    return {
        "min": float(jacobian.min()),
        "max": float(jacobian.max()),
        "min_in_lungs": float(lung.min()) if lung.numel() else None,
        "max_in_lungs": float(lung.max()) if lung.numel() else None,
        "std_in_lungs": float(lung.std()) if lung.numel() > 1 else None,
        "mean_in_lungs": float(lung.mean()) if lung.numel() else None,
        "folding_percent": float((jacobian <= 0).float().mean() * 100),
        "folding_percent_in_lungs": float((lung <= 0).float().mean() * 100) if lung.numel() else None,
    }


def summary_line(summary: dict) -> str:
    """One line from a ``registration.json`` summary: seconds, TRE (with landmarks), Jacobian in the lungs."""
    parts = []
    total = summary.get("timings_s", {}).get("total")
    if total is not None:
        parts.append(f"registered in {total:.1f} s")
    tre = summary.get("tre_mm")
    if tre:
        after, before, prealigned = tre["after"], tre["before"], tre["prealign"]
        parts.append(
            f"TRE {after['mean']:.2f} mm mean, {after['median']:.2f} median, {after['max']:.2f} max "
            f"({after['count']} landmarks; {before['mean']:.1f} before, {prealigned['mean']:.2f} after pre-alignment)"
        )
    jacobian = summary.get("jacobian") or {}
    if jacobian.get("min_in_lungs") is not None:
        folding = jacobian["folding_percent_in_lungs"]
        state = "no folding" if folding == 0 else f"FOLDING in {folding:.3f} % of the lungs"
        parts.append(
            f"Jacobian in the lungs {jacobian['min_in_lungs']:.2f} to {jacobian['max_in_lungs']:.2f} ({state})"
        )
    parts.extend(f"warning: {w}" for w in summary.get("warnings", []))
    return "; ".join(parts)


def register_files(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    output: str | os.PathLike,
    fixed_landmarks: str | os.PathLike | None = None,
    moving_landmarks: str | os.PathLike | None = None,
    settings: RegistrationSettings | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Read a pair of CT files (and landmark files), register, write the outputs; returns the summary.

    Inputs are anything :func:`~rrn_lung_registration.io.ct_io.read_ct` reads and landmarks anything
    :func:`~rrn_lung_registration.io.landmarks.read_landmarks` reads (voxel formats refer to the images given).
    Everything is read and checked before the registration starts, in this order: the settings, the output
    folder, the weights, the images, the landmarks (see the module notes). Landmarks partly outside their
    image are a warning (logged, and kept in ``registration.json``).

    Args:
        overwrite: replace the outputs of an earlier registration in ``output`` (the whole set); without it
            such a folder is refused.
        progress: show a progress bar per stage (tqdm).

    Raises:
        FileExistsError: ``output`` holds an earlier registration's outputs and ``overwrite`` is false.
        NotADirectoryError, PermissionError: ``output`` is a file, or cannot be written.
        FileNotFoundError, ValueError: a missing or unusable input, naming the file.
    """
    from rrn_lung_registration.io.landmarks import read_landmark_pair

    started = time.perf_counter()
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ValueError("give both fixed_landmarks and moving_landmarks, or neither.")
    settings = settings or RegistrationSettings()
    settings.check()
    output = check_output_folder(output, OUTPUT_FILES, overwrite)
    registration = LungRegistration(settings)
    fixed_image, moving_image = read_ct(fixed), read_ct(moving)
    _check_image(fixed_image, str(fixed))
    _check_image(moving_image, str(moving))
    points, notes = None, []
    if fixed_landmarks is not None:
        points = read_landmark_pair(fixed_landmarks, moving_landmarks, fixed_image, moving_image)
        for path, found, image, source in (
            (fixed_landmarks, points[0], fixed_image, fixed),
            (moving_landmarks, points[1], moving_image, moving),
        ):
            note = check_landmarks_inside(found, image, path, str(source))
            if note:
                logger.warning(note)
                notes.append(note)
    remove_stale_staging(output)
    result = registration.register(fixed_image, moving_image, progress=progress)
    release_freed_memory()
    write_outputs(
        result,
        fixed_image,
        moving_image,
        output,
        *(points or (None, None)),
        settings=settings,
        input_warnings=notes,
        started=started,
    )
    return json.loads((output / "registration.json").read_text())


def apply_displacement_field(
    image: str | os.PathLike,
    field: str | os.PathLike,
    output: str | os.PathLike,
    fill_hu: float = -1000.0,
    max_outside: float = 0.5,
) -> Path:
    """Resample ``image`` through an ITK displacement ``field`` onto the field's grid; write ``output``.

    The output voxel at point ``p`` reads ``image`` at ``p + d(p)`` (trilinear; ``fill_hu`` outside), as
    ITK's resampler does with a ``DisplacementFieldTransform``: with ``register``'s outputs, the moving
    image and ``displacement_field.nii`` give ``warped_moving.nii.gz`` again.

    Raises:
        ValueError: the field is not a displacement field, or more than ``max_outside`` of its points map
            outside the image (the field belongs to another image), naming both files; a truncated or
            corrupt file, NaN / infinite values, a geometry no chest CT has, an output with an unsupported
            suffix (all checked before the resampling).
        IsADirectoryError, NotADirectoryError, PermissionError: ``output`` cannot be written.
    """
    check_output_file(output, WRITE_SUFFIXES)
    moving = read_ct(image)
    check_finite(moving, str(image))
    check_ct_geometry(moving, str(image))
    vectors, affine = read_displacement_field(field)
    grid = Grid(vectors.shape[:3], affine)
    check_ct_geometry(grid, str(field))
    values = torch.empty(grid.shape, dtype=torch.float32)
    outside = 0
    lps = torch.as_tensor(_LPS)
    moving_grid = Grid.of(moving)
    for k0, k1 in grid.slabs():
        points = grid.points(torch.float64, (k0, k1)) + vectors[:, :, k0:k1].to(torch.float64) @ lps
        voxels = moving_grid.world_to_voxel(points)
        size = torch.tensor(moving_grid.shape, dtype=torch.float64)
        outside += int((~((voxels >= -0.5) & (voxels <= size - 0.5)).all(dim=-1)).sum())
        values[:, :, k0:k1] = sample_voxels(moving.as_tensor(), voxels.float(), fill=fill_hu)
    fraction = outside / values.numel()
    if fraction > max_outside:
        raise ValueError(
            f"{field} does not match {image}: {fraction:.0%} of the field's points map outside the image "
            "(a field maps its own grid into the moving image it was computed for)."
        )
    write_image(output, values, affine)
    return Path(output)
