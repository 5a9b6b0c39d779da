"""Automatic lung masks of CT volumes in Hounsfield units, lung bounding boxes and MONAI transforms for them.

No trained model is involved: the mask comes from a threshold, a rule that tells air outside the body from
air inside it, connected components, hole filling and a small morphological closing (``scipy.ndimage``).

Conventions:

* Volumes are arrays ``(I, J, K)`` as :func:`rrn_lung_registration.io.ct_io.read_ct` gives them (ITK index
  order, no channel), in Hounsfield units; ``spacing`` is ``(3,)`` mm per voxel along the same axes. The
  *axial* axis (``axial_axis``, default 2 = ``K``, the slice axis of a DICOM series) is the one the
  slice-wise steps work across; the two others span the axial plane. The transforms find it from the
  affine (the array axis that runs most nearly along the patient's superior axis).
* Masks are boolean arrays of the volume's shape (``uint8`` ``MetaTensor`` in the transforms, with the
  image's affine and metadata).
* Boxes are ``tuple[slice, slice, slice]`` of voxel indices into the volume.
* Errors raise ``ValueError`` naming the image (``source``, or ``meta["filename_or_obj"]`` in the
  transforms).

Algorithm of :func:`lung_mask` (each step a small function below):

1. **Check** that the values look like CT in HU (:func:`check_ct_intensities`).
2. **Working grid.** Voxel blocks are averaged to about ``working_mm`` (integer factors per axis: a
   0.98 x 0.98 x 2 mm series is worked on at 1.95 x 1.95 x 2 mm); the result is brought back to the full
   grid at the end (see 8).
3. **Threshold.** Air is ``HU < threshold_hu``, ``-320`` HU by default: aerated lung is -950 to -700 HU
   (denser, -600 or so, in dependent regions and at exhale), fat -120 to -50 and other soft tissue above
   -100, so -320 sits in the wide gap, keeps partial-volume voxels at the lung wall that are more than
   about half air, and is a value common in simple threshold-based lung segmentation.
4. **Air outside the body.** In each axial slice, a voxel *escapes* along one of its four in-plane
   directions when the straight ray from it to the edge of the slice meets no tissue. Outside air
   escapes in at least two directions (around a convex body, and also in the gap between the body and
   the table); lung escapes in none in a whole-thorax scan, and in one only (out through the cut; chest
   wall and mediastinum stop the others) where the edge of a cropped field of view cuts through it.
   Removing every air component that touches the slice edge would therefore delete the lungs of crops;
   instead, air is removed where three tests agree:

   * its 2-D component in its axial slice has more than half of its voxels escaping twice or more;
   * that 2-D component is as dark as air: mean under -900 HU (air outside the body reads -1000 HU
     within a few tens of HU on a calibrated scanner, aerated lung averages -700 to -900 HU),
     which keeps a lung that a crop cuts on two adjacent sides (escaping twice like a corner of outside
     air, but brighter);
   * its 3-D component (face connectivity) also has more than half of its voxels escaping twice, which
     keeps such a lung even when it is very dark (emphysema) as long as most of it is not cut.

   Deciding per slice as well as in 3-D keeps the lungs when, in a scan reaching the head, the airways
   join the air outside through the mouth or nose: the slices where they join are mostly outside air
   and are cut there, while the 3-D test alone would throw the lungs away with the outside air.
5. **Components.** Of the remaining air, the largest 3-D component (face connectivity) is kept, and the
   second largest too when it holds at least ``second_fraction`` (0.2) of the first's voxels: left and
   right lungs are one component when the airways or the anterior junction join them, two otherwise;
   bowel and stomach gas are far smaller. The trachea and main bronchi stay in the mask.
6. **Closing** with an ellipsoid of radius ``closing_mm`` (2 mm) in millimetres, so anisotropic spacing
   is honoured; the volume edge is padded by replication so lungs cut by the edge are not eroded.
7. **Holes** (vessels, airway walls, nodules) are filled in each axial slice and then in 3-D, when no
   larger than a disc / ball of diameter ``max_hole_mm`` (30 mm): the size limit keeps the mediastinum
   out in slices where the two lungs meet in front of and behind it.
8. **Full grid.** When the working grid was coarser, the mask is repeated back onto the full grid and its
   boundary refined there: voxels well inside the coarse mask are kept, and in a band of one coarse voxel
   either side of its edge the full-resolution air voxels are taken.
9. **Size check.** A mask under ``min_volume_litres`` (0.05 L = 50 mL, a 4.6 cm cube; one adult lung is
   over 1 L, and even a crop that would be worth registering holds far more) raises ``ValueError``.

On the POPI end-inhale thorax (512 x 512 x 141, 0.98 x 0.98 x 2 mm) the mask takes about 2 s on one core.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Crop, InvertibleTransform, MapTransform
from monai.utils import ensure_tuple
from scipy import ndimage

__all__ = [
    "DEFAULT_THRESHOLD_HU",
    "CropToLungd",
    "LungMaskd",
    "axial_axis_from_affine",
    "check_ct_intensities",
    "lung_bounding_box",
    "lung_mask",
    "lung_volume_litres",
]

DEFAULT_THRESHOLD_HU = -320.0
"""Air / tissue threshold in HU (see the module notes, step 3)."""

_AIR_PERCENTILE_MAX_HU = -500.0  # the 1st percentile of a CT volume with any air or lung in it is below this
_MIN_RANGE_HU = 200.0  # a CT volume spans at least air (-1000) to soft tissue (0); [0, 1] images do not
_OUTSIDE_FRACTION = 0.5  # an air component is outside air when more than this fraction escapes twice
_LUNG_MEAN_MIN_HU = -900.0  # outside air averages about -1000 HU, aerated lung -700 to -900 HU
_SAMPLE_SIZE = 1_000_000  # voxels sampled for the intensity percentiles


# ---------------------------------------------------------------------------------------------- checks


def _as_numpy(volume) -> np.ndarray:
    if isinstance(volume, torch.Tensor):
        return volume.detach().cpu().numpy()
    return np.asarray(volume)


def _spacing3(spacing, source: str) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{source}: spacing must be three positive millimetre values, got {spacing}.")
    return values


def _check_volume_shape(volume: np.ndarray, source: str) -> None:
    if volume.ndim != 3:
        raise ValueError(f"{source}: expected a 3-D volume (I, J, K), got shape {tuple(volume.shape)}.")
    if min(volume.shape) < 3:
        raise ValueError(f"{source}: volume of shape {tuple(volume.shape)} is too small for a lung mask.")


def _intensity_sample(volume: np.ndarray) -> np.ndarray:
    """Up to about ``_SAMPLE_SIZE`` voxels of ``volume`` (a regular stride), as float64."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // _SAMPLE_SIZE)
    return flat[::step].astype(np.float64)


def check_ct_intensities(image, source: str = "image") -> None:
    """Raise ``ValueError`` naming ``source`` when ``image`` does not look like CT in Hounsfield units.

    A CT volume of the chest holds air or lung (about -1000 and -850 HU) and soft tissue (about 0 to
    +60 HU), so its 1st percentile is below -500 HU and its values span more than 200 HU. Images scaled
    to ``[0, 1]`` or ``[0, 255]``, DIR-Lab raw values (``HU + 1024``), MR, or volumes without any air fail.
    Low values such as the -2048 / -3024 HU padding outside the reconstruction circle are accepted.

    Args:
        image: array or tensor of any shape (usually ``(I, J, K)``).
        source: the file (or name) the message names.

    Raises:
        ValueError: non-finite values, or values that are not HU of an air-containing CT.
    """
    values = _as_numpy(image)
    if values.size == 0:
        raise ValueError(f"{source}: the image is empty (shape {tuple(values.shape)}).")
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise ValueError(f"{source}: the image holds NaN or infinite values; expected CT in Hounsfield units.")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{source}: expected a numeric CT image, got dtype {values.dtype}.")
    sample = _intensity_sample(values)
    low, high = np.percentile(sample, [1.0, 99.0])
    lowest, highest = float(values.min()), float(values.max())
    if low > _AIR_PERCENTILE_MAX_HU or highest - lowest < _MIN_RANGE_HU:
        raise ValueError(
            f"{source}: expected CT in Hounsfield units with air near -1000 HU and soft tissue near 0 HU (1st "
            f"percentile below {_AIR_PERCENTILE_MAX_HU:g} HU, range over {_MIN_RANGE_HU:g} HU); got values "
            f"from {lowest:g} to {highest:g} (1st-99th percentile {low:g} to {high:g}). Is the image "
            "normalised, or stored with an offset (DIR-Lab raw files hold HU + 1024)?"
        )


# ---------------------------------------------------------------------------------------- working grid


def _working_factors(spacing: np.ndarray, working_mm: float) -> tuple[int, int, int]:
    """Integer block sizes per axis bringing ``spacing`` up to at most about ``working_mm``."""
    return tuple(max(1, int(math.floor(working_mm / s + 1e-6))) for s in spacing)


def _block_mean(volume: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """``volume`` ``(I, J, K)`` averaged over blocks of ``factors`` voxels (edges padded by replication):
    ``(ceil(I / fi), ceil(J / fj), ceil(K / fk))`` float32."""
    if all(f == 1 for f in factors):
        return volume.astype(np.float32, copy=False)
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors, strict=True)]
    if any(after for _, after in pad):
        volume = np.pad(volume, pad, mode="edge")
    a, b, c = (n // f for n, f in zip(volume.shape, factors, strict=True))
    blocks = volume.reshape(a, factors[0], b, factors[1], c, factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _repeat_to(mask: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Coarse ``mask`` repeated by ``factors`` along each axis and cut to ``shape``."""
    for axis, f in enumerate(factors):
        if f > 1:
            mask = np.repeat(mask, f, axis=axis)
    return mask[: shape[0], : shape[1], : shape[2]]


# -------------------------------------------------------------------------------------- mask steps


def _plane_structure(axial_axis: int) -> np.ndarray:
    """``(3, 3, 3)`` 4-connectivity in the axial plane, none across slices (labels each slice alone)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    index = [slice(None)] * 3
    index[axial_axis] = 1
    structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    return structure


def _escape_counts(air: np.ndarray, axial_axis: int) -> np.ndarray:
    """Per voxel ``(I, J, K)`` uint8: how many of the four in-plane rays reach the slice edge through air."""
    tissue = ~air
    counts = np.zeros(air.shape, dtype=np.uint8)
    for axis in (a for a in range(3) if a != axial_axis):
        counts += ~np.logical_or.accumulate(tissue, axis=axis)
        flipped = np.flip(tissue, axis=axis)
        counts += np.flip(~np.logical_or.accumulate(flipped, axis=axis), axis=axis)
    return counts


def _component_stats(labels: np.ndarray, count: int, escaping: np.ndarray, hu: np.ndarray):
    """Per label ``0..count``: fraction of its voxels ``escaping`` and mean ``hu``, ``(count + 1,)`` each."""
    flat = labels.ravel()
    sizes = np.maximum(np.bincount(flat, minlength=count + 1), 1)
    escaped = np.bincount(flat, weights=escaping.ravel(), minlength=count + 1) / sizes
    mean_hu = np.bincount(flat, weights=hu.ravel(), minlength=count + 1) / sizes
    return escaped, mean_hu


def _remove_outside_air(air: np.ndarray, hu: np.ndarray, axial_axis: int) -> np.ndarray:
    """``air`` without outside air (module notes, 4): the voxels whose 2-D component in their axial slice
    mostly escapes in two or more in-plane directions and is as dark as air (mean under
    ``_LUNG_MEAN_MIN_HU``), and whose 3-D component mostly escapes too. ``hu`` is the volume ``(I, J, K)``."""
    escaping = _escape_counts(air, axial_axis) >= 2
    if not (air & escaping).any():
        return air
    labels, count = ndimage.label(air, structure=_plane_structure(axial_axis))
    escaped, mean_hu = _component_stats(labels, count, escaping, hu)
    outside_2d = (escaped > _OUTSIDE_FRACTION) & (mean_hu < _LUNG_MEAN_MIN_HU)
    outside_2d[0] = False
    outside = outside_2d[labels]
    labels, count = ndimage.label(air, structure=ndimage.generate_binary_structure(3, 1))
    escaped, _ = _component_stats(labels, count, escaping, hu)
    outside &= (escaped > _OUTSIDE_FRACTION)[labels]
    return air & ~outside


def _largest_components(mask: np.ndarray, second_fraction: float) -> np.ndarray:
    """The largest 3-D component of ``mask``, plus the second when it has ``second_fraction`` of its size."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]]
    if count > 1 and sizes[order[1]] >= second_fraction * sizes[order[0]]:
        keep.append(order[1])
    return np.isin(labels, keep)


def _ellipsoid(radius_mm: float, spacing: np.ndarray) -> np.ndarray | None:
    """Boolean ellipsoid of ``radius_mm`` on a grid of ``spacing`` (``None`` when under one voxel)."""
    radii = np.floor(radius_mm / spacing + 1e-6).astype(int)
    if radii.max() < 1:
        return None
    grids = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(radii, spacing, strict=True)], indexing="ij")
    return sum(g * g for g in grids) <= radius_mm * radius_mm + 1e-6


def _bounding_slices(mask: np.ndarray, pad: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...]:
    """Tight box of the non-zero voxels of ``mask`` grown by ``pad`` voxels per axis, clipped."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        start, stop = int(present[0]) - int(pad[axis]), int(present[-1]) + 1 + int(pad[axis])
        box.append(slice(max(0, start), min(mask.shape[axis], stop)))
    return tuple(box)


def _close(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing with an ellipsoid of ``radius_mm``, the volume's edges padded by replication
    (a lung cut by the edge goes on beyond it rather than being eroded there)."""
    structure = _ellipsoid(radius_mm, spacing)
    if structure is None or not mask.any():
        return mask
    radii = [n // 2 for n in structure.shape]
    # inside the volume a margin of two radii keeps the box's edge out of reach of the erosion
    box = _bounding_slices(mask, pad=[2 * r for r in radii])
    part = mask[box]
    pad = [(r if s.start == 0 else 0, r if s.stop == n else 0) for r, s, n in zip(radii, box, mask.shape, strict=True)]
    padded = np.pad(part, pad, mode="edge")
    closed = ndimage.binary_erosion(ndimage.binary_dilation(padded, structure), structure, border_value=1)
    cut = tuple(slice(before, before + n) for (before, _), n in zip(pad, part.shape, strict=True))
    out = mask.copy()
    out[box] |= closed[cut]
    return out


def _fill_small_holes(mask: np.ndarray, structure: np.ndarray, max_voxels: float) -> np.ndarray:
    """Fill the holes of ``mask`` (background components, under ``structure``'s connectivity, that do not
    reach the edge of the mask's box) of at most ``max_voxels`` voxels."""
    if not mask.any():
        return mask
    box = _bounding_slices(mask)
    part = mask[box]
    labels, count = ndimage.label(~part, structure=structure)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    fill = sizes <= max_voxels
    fill[0] = False
    # components reaching the box's faces (those the structure connects along) are not holes
    for axis in range(3):
        if not structure.take(indices=(0, 2), axis=axis).any():
            continue
        fill[np.take(labels, [0, -1], axis=axis)] = False
    out = mask.copy()
    out[box] |= fill[labels]
    return out


def _fill_holes(mask: np.ndarray, spacing: np.ndarray, axial_axis: int, max_hole_mm: float) -> np.ndarray:
    """Fill holes up to ``max_hole_mm`` across, first in each axial slice, then in 3-D."""
    radius = max_hole_mm / 2.0
    in_plane = [a for a in range(3) if a != axial_axis]
    pixel_mm2 = float(np.prod(spacing[in_plane]))
    mask = _fill_small_holes(mask, _plane_structure(axial_axis), math.pi * radius**2 / pixel_mm2)
    voxel_mm3 = float(np.prod(spacing))
    return _fill_small_holes(mask, ndimage.generate_binary_structure(3, 1), 4.0 / 3.0 * math.pi * radius**3 / voxel_mm3)


def _refine(coarse: np.ndarray, air: np.ndarray, factors: Sequence[int], second_fraction: float) -> np.ndarray:
    """Full-grid mask from the ``coarse`` one: its interior, plus full-resolution ``air`` near its edge
    (keeping the one or two largest components, as :func:`_largest_components`)."""
    cross = ndimage.generate_binary_structure(3, 1)
    inner = ndimage.binary_erosion(coarse, cross, border_value=1)
    outer = ndimage.binary_dilation(coarse, cross)
    shape = air.shape
    fine = _repeat_to(inner, factors, shape) | (_repeat_to(outer, factors, shape) & air)
    if not fine.any():
        return fine
    box = _bounding_slices(fine)  # drop the specks of air the band picks up apart from the lungs
    fine[box] = _largest_components(fine[box], second_fraction)
    return fine


def lung_volume_litres(mask, spacing: Sequence[float]) -> float:
    """Volume of the non-zero voxels of ``mask`` ``(I, J, K)`` in litres, ``spacing`` ``(3,)`` mm."""
    values = _as_numpy(mask)
    return float(np.count_nonzero(values)) * float(np.prod(_spacing3(spacing, "mask"))) * 1e-6


def lung_mask(
    volume,
    spacing: Sequence[float],
    threshold_hu: float = DEFAULT_THRESHOLD_HU,
    *,
    axial_axis: int = 2,
    working_mm: float = 2.0,
    closing_mm: float = 2.0,
    max_hole_mm: float = 30.0,
    second_fraction: float = 0.2,
    min_volume_litres: float = 0.05,
    source: str = "image",
) -> np.ndarray:
    """Boolean lung mask ``(I, J, K)`` of a CT ``volume`` ``(I, J, K)`` in HU (see the module notes).

    Args:
        volume: the CT, array or tensor, Hounsfield units.
        spacing: ``(3,)`` mm per voxel along ``I, J, K``.
        threshold_hu: voxels below are air (lung, airways, outside air).
        axial_axis: the array axis across axial slices (2 for :func:`~rrn_lung_registration.io.ct_io.read_ct`
            volumes of axial series).
        working_mm: the mask is computed on voxels about this size (block averages), then refined on the
            full grid; ``0`` works on the full grid.
        closing_mm: radius of the closing, mm (``0``: none).
        max_hole_mm: largest hole (vessel, nodule) filled, mm across.
        second_fraction: a second component is kept when it has at least this fraction of the largest's voxels.
        min_volume_litres: smaller masks raise ``ValueError``.
        source: the image's name for error messages.

    Returns:
        ``(I, J, K)`` bool, ``True`` in the lungs (airways included).

    Raises:
        ValueError: not CT in HU (:func:`check_ct_intensities`), bad shape or spacing, or no lung found /
            a mask under ``min_volume_litres`` (messages name ``source``).
    """
    values = _as_numpy(volume)
    _check_volume_shape(values, source)
    spacing = _spacing3(spacing, source)
    if axial_axis not in (0, 1, 2):
        raise ValueError(f"{source}: axial_axis must be 0, 1 or 2, got {axial_axis}.")
    check_ct_intensities(values, source)
    factors = _working_factors(spacing, working_mm)
    coarse_spacing = spacing * np.asarray(factors)
    hu = _block_mean(values, factors)
    mask = _largest_components(_remove_outside_air(hu < threshold_hu, hu, axial_axis), second_fraction)
    if not mask.any():
        raise ValueError(
            f"{source}: no lung found: no air below {threshold_hu:g} HU inside the body (all of it touches the "
            "edge of its axial slice like air outside the body)."
        )
    mask = _close(mask, closing_mm, coarse_spacing)
    mask = _fill_holes(mask, coarse_spacing, axial_axis, max_hole_mm)
    if any(f > 1 for f in factors):
        mask = _refine(mask, values < threshold_hu, factors, second_fraction)
    litres = lung_volume_litres(mask, spacing)
    if litres < min_volume_litres:
        raise ValueError(
            f"{source}: the lung mask holds {litres * 1000:.1f} mL, less than the {min_volume_litres * 1000:g} mL "
            f"expected of lungs (threshold {threshold_hu:g} HU); is there lung in the field of view?"
        )
    return mask


def lung_bounding_box(mask, spacing: Sequence[float], margin_mm: float = 10.0) -> tuple[slice, slice, slice]:
    """Box of the non-zero voxels of ``mask`` ``(I, J, K)`` grown by ``margin_mm`` on every side, clipped.

    The margin is ``ceil(margin_mm / spacing)`` voxels along each axis.

    Raises:
        ValueError: ``mask`` is not 3-D or is empty, or ``margin_mm`` is negative.
    """
    values = _as_numpy(mask)
    if values.ndim != 3:
        raise ValueError(f"lung_bounding_box: expected a mask (I, J, K), got shape {tuple(values.shape)}.")
    if margin_mm < 0:
        raise ValueError(f"lung_bounding_box: margin_mm must be >= 0, got {margin_mm}.")
    if not values.any():
        raise ValueError("lung_bounding_box: the mask is empty, there is no box to take.")
    pad = [int(math.ceil(margin_mm / s - 1e-9)) for s in _spacing3(spacing, "mask")]
    return _bounding_slices(values != 0, pad)


# ------------------------------------------------------------------------------------ MONAI transforms


def axial_axis_from_affine(affine) -> int:
    """The array axis (0, 1, 2) of a voxel -> RAS ``affine`` ``(4, 4)`` running most along superior."""
    linear = np.asarray(_as_numpy(affine), dtype=np.float64)[:3, :3]
    directions = linear / np.maximum(np.linalg.norm(linear, axis=0), 1e-12)
    return int(np.argmax(np.abs(directions[2])))


def _source_of(image, key: Hashable) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name not in (None, "") else f"data[{key!r}]"


def _spatial(image, source: str) -> tuple[np.ndarray, bool]:
    """The ``(I, J, K)`` array of ``image`` ``(I, J, K)`` or ``(1, I, J, K)``, and whether it had a channel."""
    values = _as_numpy(image)
    if values.ndim == 4 and values.shape[0] == 1:
        return values[0], True
    if values.ndim == 3:
        return values, False
    raise ValueError(f"{source}: expected a CT volume (I, J, K) or (1, I, J, K), got shape {tuple(values.shape)}.")


def _affine_of(image, source: str) -> np.ndarray:
    if not isinstance(image, MetaTensor):
        raise ValueError(f"{source}: expected a MetaTensor with an affine (load it with LoadImaged / read_ct).")
    return image.affine.detach().cpu().numpy().astype(np.float64)


class LungMaskd(MapTransform):
    """Add the lung mask of each CT image under ``key + mask_suffix`` (see :func:`lung_mask`).

    Each image is a ``MetaTensor`` ``(I, J, K)`` or channel-first ``(1, I, J, K)`` (as ``LoadImaged`` with
    ``ensure_channel_first=True`` gives it) in HU; spacing and the axial axis come from its affine. The
    mask is a ``uint8`` ``MetaTensor`` of the image's shape (channel included), affine, metadata and
    applied operations, so that it follows the image through later transforms and their inverses.

    Args:
        keys: the image keys.
        mask_suffix: the mask of ``data[key]`` goes to ``data[key + mask_suffix]``.
        threshold_hu, working_mm, closing_mm, max_hole_mm, second_fraction, min_volume_litres: as in
            :func:`lung_mask`.
        allow_missing_keys: skip absent keys.

    Raises:
        ValueError: from :func:`lung_mask`, naming ``meta["filename_or_obj"]`` (or the key).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_suffix: str = "_lung_mask",
        threshold_hu: float = DEFAULT_THRESHOLD_HU,
        working_mm: float = 2.0,
        closing_mm: float = 2.0,
        max_hole_mm: float = 30.0,
        second_fraction: float = 0.2,
        min_volume_litres: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not mask_suffix:
            raise ValueError("LungMaskd: mask_suffix must be non-empty (the mask would replace the image).")
        self.mask_suffix = mask_suffix
        self.options = {
            "threshold_hu": threshold_hu,
            "working_mm": working_mm,
            "closing_mm": closing_mm,
            "max_hole_mm": max_hole_mm,
            "second_fraction": second_fraction,
            "min_volume_litres": min_volume_litres,
        }

    def mask_of(self, image, key: Hashable = "image") -> MetaTensor:
        """The mask ``MetaTensor`` of one image (same shape, affine and metadata)."""
        source = _source_of(image, key)
        affine = _affine_of(image, source)
        volume, has_channel = _spatial(image, source)
        spacing = affine_to_spacing(affine, r=3)
        mask = lung_mask(volume, spacing, axial_axis=axial_axis_from_affine(affine), source=source, **self.options)
        values = torch.from_numpy(mask.astype(np.uint8))
        if has_channel:
            values = values[None]
        meta = copy.deepcopy(dict(image.meta))  # holds the affine
        return MetaTensor(values, meta=meta, applied_operations=copy.deepcopy(image.applied_operations))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}{self.mask_suffix}"] = self.mask_of(d[key], key)
        return d


class CropToLungd(MapTransform, InvertibleTransform):
    """Crop channel-first images ``(C, I, J, K)`` and their lung mask to the mask's box plus ``margin_mm``.

    The box is :func:`lung_bounding_box` of ``data[mask_key]`` (margin converted to voxels with the mask's
    spacing), and the crop is MONAI's :class:`~monai.transforms.Crop`: the cropped ``MetaTensor``'s affine
    maps its voxel 0 to the box corner, and ``inverse`` (or ``Invertd`` on a ``Compose`` holding this
    transform) pads each image back to its former shape and affine.

    Args:
        keys: the images to crop; ``mask_key`` is cropped too even when not listed.
        mask_key: the lung mask (``LungMaskd`` output), ``(1, I, J, K)``, on the images' grid.
        margin_mm: margin around the lungs, mm.
        allow_missing_keys: skip absent image keys (the mask must be there).

    Raises:
        KeyError: ``mask_key`` is absent.
        ValueError: images without a channel, or whose grid differs from the mask's, or an empty mask
            (messages name the files).
    """

    def __init__(
        self, keys: KeysCollection, mask_key: str, margin_mm: float = 10.0, allow_missing_keys: bool = False
    ) -> None:
        keys = ensure_tuple(keys)
        if mask_key not in keys:
            keys = (*keys, mask_key)
        super().__init__(keys, allow_missing_keys)
        if margin_mm < 0:
            raise ValueError(f"CropToLungd: margin_mm must be >= 0, got {margin_mm}.")
        self.mask_key = mask_key
        self.margin_mm = float(margin_mm)
        self.cropper = Crop()

    def box_of(self, mask) -> tuple[slice, slice, slice]:
        """The crop box of a mask ``MetaTensor`` ``(1, I, J, K)``."""
        source = _source_of(mask, self.mask_key)
        affine = _affine_of(mask, source)
        values = _as_numpy(mask)
        if values.ndim != 4:
            raise ValueError(f"{source}: CropToLungd needs a channel-first mask (1, I, J, K), got {values.shape}.")
        if not values.any():
            raise ValueError(f"{source}: the lung mask {self.mask_key!r} is empty; there is nothing to crop to.")
        return lung_bounding_box(values.any(axis=0), affine_to_spacing(affine, r=3), self.margin_mm)

    def _check_grid(self, image, key: Hashable, mask) -> None:
        source = _source_of(image, key)
        if image.ndim != 4:
            raise ValueError(
                f"{source}: CropToLungd needs channel-first images (C, I, J, K), got shape {tuple(image.shape)} "
                "(add EnsureChannelFirstd, or LoadImaged(ensure_channel_first=True))."
            )
        if tuple(image.shape[1:]) != tuple(mask.shape[1:]):
            raise ValueError(
                f"{source}: image {key!r} of spatial shape {tuple(image.shape[1:])} is not on the grid of the lung "
                f"mask {self.mask_key!r} {tuple(mask.shape[1:])}."
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.mask_key not in d:
            raise KeyError(f"CropToLungd: the lung mask key {self.mask_key!r} is not in the data ({list(d)}).")
        mask = d[self.mask_key]
        box = self.box_of(mask)
        for key in self.key_iterator(d):
            self._check_grid(d[key], key, mask)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], box)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d
