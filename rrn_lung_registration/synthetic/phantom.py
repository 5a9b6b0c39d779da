"""Synthetic breathing-lung CT phantom (inhale / exhale pair) with a known displacement and landmark pairs.

One call of :func:`make_breathing_pair` gives a *fixed* (inspiration, inhale) and a *moving* (expiration,
exhale) CT-like volume in Hounsfield units, the exact dense displacement that registers them, lung masks of
both phases and landmark pairs at vessel bifurcations, for unsupervised training and TRE measurement.

Conventions (used by every function of this module):

* Volumes are numpy arrays ``(D, H, W)`` indexed ``[z, y, x]``: axis 0 runs inferior -> superior (feet to
  head), axis 1 anterior -> posterior, axis 2 patient right -> patient left. With the identity direction
  this is the ITK/DICOM LPS frame and the ``(z, y, x)`` order ``itk.GetArrayFromImage`` returns.
* Geometry tuples (``spacing``, ``origin``, rows and columns of ``direction``) and point coordinates are in
  the same array axis order. A voxel index ``i`` (float, 0-based) lies at the physical point
  ``origin + direction @ (i * spacing)`` in mm.
* The displacement ``ddf`` is ``(3, D, H, W)`` in voxels of the fixed grid, channel ``c`` = displacement along
  array axis ``c``; it is MONAI's ``Warp`` convention: ``Warp()(moving, ddf)(x) = moving(x + ddf(x))``, and
  ``moving(x + ddf(x)) = fixed(x)`` holds for the anatomy, so ``ddf`` is what a registration network
  should predict.
* Landmarks are ``(N, 3)`` float64 voxel coordinates in array axis order; ``moving_landmarks =
  fixed_landmarks + ddf(fixed_landmarks)`` (trilinear), so the TRE before registration is
  ``|moving - fixed|`` and a perfect registration gives zero.

Construction (exact by design): the anatomy at inhale is an analytic function of continuous physical
position (ellipses, a dome, tubes; smooth texture from a fixed physical lattice) and the breathing motion
``u`` is an analytic smooth field in mm. ``fixed`` evaluates the anatomy on the grid; ``moving`` evaluates
the same anatomy at ``x = phi^-1(y)``, the inverse of ``phi(x) = x + u(x)``, found by the fixed-point
iteration ``x <- y - u(x)`` finished by Newton steps. Hence ``moving(x + u(x)) = fixed(x)`` exactly up to
sampling, and ``ddf = u / spacing``. The only intended intensity difference is the lung density: with
``mass_preserving=True`` the parenchyma keeps its mass, ``HU_exhale + 1000 = (HU_inhale + 1000) / J`` with
``J = det(I + grad u) < 1`` the local exhale / inhale volume ratio, so the lungs are denser (higher HU) at
exhale. Vessels, soft tissue and bone keep their HU. Acquisition noise (``noise_std``) is drawn
independently for the two phases.

The phantom lives in a physical field of view (default 300 mm cube) whatever the grid size: one seed gives
the same body and motion pattern at every resolution and amplitude, and the spacing is
``field_of_view_mm / shape``.

Files (:func:`save_pair`): nibabel arrays are ``(i, j, k)``; the ``(D, H, W)`` arrays are written transposed
to ``(W, H, D)`` (``i = x``, ``j = y``, ``k = z``) with a RAS affine built from spacing, origin and direction
(axis codes ``('L', 'P', 'S')`` for the identity direction), so viewers show the anatomy the right way up;
:func:`load_nifti_volume` undoes the transpose. Landmark CSV files are those of
:mod:`rrn_lung_registration.io.landmarks`: world LPS mm, header
``x,y,z`` (the reverse of the array axis order). ``ddf.npy`` keeps the array convention above.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from rrn_lung_registration.fields import jacobian_determinant
from rrn_lung_registration.io import landmarks as landmarks_io
from shared_ops.atomic import atomic_write

__all__ = [
    "PhantomPair",
    "jacobian_determinant",
    "load_nifti_volume",
    "make_breathing_pair",
    "make_dataset",
    "nifti_affine",
    "physical_to_voxel",
    "sample_field",
    "save_pair",
    "target_registration_error",
    "voxel_to_physical",
    "write_landmarks_csv",
]

Vec3 = tuple[float, float, float]
Mat3 = tuple[Vec3, Vec3, Vec3]
IDENTITY: Mat3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

# Hounsfield units of the tissues.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_BLOOD = 45.0
HU_VESSEL = 40.0
HU_CANCELLOUS = 400.0
HU_CORTICAL = 700.0
HU_DISC = 90.0
HU_RIB = 600.0

# Motion model: peak cranio-caudal diaphragm excursion as a fraction of the lung height (amplitude 1).
SI_FRACTION = 0.12
MAX_AMPLITUDE = 2.5  # the motion stays fold-free (det > 0) up to about 3
TEXTURE_SPACING_MM = 4.0
INVERSE_TOLERANCE_MM = 1e-3
INVERSE_PLAIN_ITERATIONS = 12
INVERSE_MAX_ITERATIONS = 40


# ----------------------------------------------------------------------------------------------------------
# Result container
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PhantomPair:
    """A fixed (inhale) / moving (exhale) phantom pair with its ground truth (conventions: module docstring).

    Attributes:
        fixed: inhale CT ``(D, H, W)`` float32 HU.
        moving: exhale CT ``(D, H, W)`` float32 HU.
        ddf: ``(3, D, H, W)`` float32 voxels; ``moving(x + ddf(x)) = fixed(x)``.
        fixed_lung_mask: ``(D, H, W)`` bool, lungs at inhale.
        moving_lung_mask: ``(D, H, W)`` bool, lungs at exhale.
        fixed_landmarks: ``(N, 3)`` float64 voxel coordinates in the fixed image.
        moving_landmarks: ``(N, 3)`` float64 voxel coordinates in the moving image.
        spacing: mm per voxel along each array axis.
        origin: physical position (mm) of voxel ``(0, 0, 0)``.
        direction: 3x3 direction cosines (columns = array axes), identity by default.
    """

    fixed: np.ndarray
    moving: np.ndarray
    ddf: np.ndarray
    fixed_lung_mask: np.ndarray
    moving_lung_mask: np.ndarray
    fixed_landmarks: np.ndarray
    moving_landmarks: np.ndarray
    spacing: Vec3
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: Mat3 = field(default=IDENTITY)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size ``(D, H, W)``."""
        return tuple(self.fixed.shape)  # type: ignore[return-value]

    def target_registration_error(self, ddf: np.ndarray | None = None) -> np.ndarray:
        """TRE ``(N,)`` in mm, before registration or, given a predicted ``ddf (3, D, H, W)``, after it."""
        return target_registration_error(self.fixed_landmarks, self.moving_landmarks, self.spacing, ddf)

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write the pair into ``folder`` (see :func:`save_pair`)."""
        return save_pair(self, folder)


# ----------------------------------------------------------------------------------------------------------
# Random anatomy and motion parameters (all lengths in mm, coordinates centred on the grid centre)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Anatomy:
    """Random shape parameters of one phantom, in mm (``(y, x)`` pairs, z along the body axis)."""

    body_semi: np.ndarray  # (2,) body ellipse semi-axes (y, x)
    body_y: float  # body ellipse centre along y
    fat_mm: float
    lung_centres: np.ndarray  # (2, 2) per lung (y, x); lung 0 = patient right (x < 0)
    lung_semi: np.ndarray  # (2, 2) per lung cross-section semi-axes (y, x)
    dome_top: np.ndarray  # (2,) z of the diaphragm dome top under each lung
    dome_depth: np.ndarray  # (2,) how much lower the dome is at the lung rim
    apex: np.ndarray  # (2,) z of each lung apex
    taper_start: float  # z where the lungs start narrowing towards the apex
    wall_mm: float  # chest-wall thickness inside the body outline (lungs stay inside it)
    heart_centre: np.ndarray  # (3,) z, y, x
    heart_semi: np.ndarray  # (3,)
    spine_yx: np.ndarray  # (2,)
    spine_radius: float
    disc_period: float
    disc_phase: float
    rib_period: float
    rib_phase: float
    rib_slope: float
    rib_radius: float
    trachea_yx: np.ndarray  # (2,)
    trachea_radius: float
    carina_z: float
    texture: np.ndarray  # (Lz, Ly, Lx) smooth unit-variance noise on a TEXTURE_SPACING_MM lattice
    texture_origin: np.ndarray  # (3,) position of lattice node (0, 0, 0)


@dataclass(frozen=True, eq=False)
class _Vessels:
    """Vessel tree segments (tapered tubes) and bifurcation points, in mm."""

    starts: np.ndarray  # (S, 3)
    ends: np.ndarray  # (S, 3)
    radius_start: np.ndarray  # (S,)
    radius_end: np.ndarray  # (S,)
    bifurcations: np.ndarray  # (B, 3)


@dataclass(frozen=True, eq=False)
class _Motion:
    """Breathing motion parameters (inhale -> exhale displacement in mm)."""

    amplitude: float
    si_mm: np.ndarray  # (2,) cranio-caudal excursion at the base, patient right / left
    z_apex: float
    z_base: float
    ap_rate: float  # anterior-posterior contraction (fraction of the distance to the spine)
    lr_rate: float  # lateral contraction (fraction of the distance to the mid-line)
    envelope_semi: np.ndarray  # (2,) (y, x) semi-axes of the moving thorax (body outline)
    envelope_y: float
    spine_yx: np.ndarray  # (2,)
    spine_radius: float  # no motion inside this distance from the spine axis
    spine_fade: float  # full motion this much farther out
    wave_vectors: np.ndarray  # (K, 3) rad / mm
    wave_phases: np.ndarray  # (K,)
    wave_amplitudes: np.ndarray  # (K, 3) mm


def _f32(values) -> np.ndarray:
    """Parameters as float32, so that arithmetic with float32 point arrays stays float32."""
    return np.asarray(values, dtype=np.float32)


def _sample_texture(rng: np.random.Generator, half_fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smooth unit-variance Gaussian noise on a physical lattice covering the FOV plus a 20 % margin.

    Beyond the lattice the texture continues as its border value (still one function of position).

    Returns:
        ``(lattice (Lz, Ly, Lx) float32, origin (3,))``.
    """
    extent = 1.2 * half_fov
    size = np.ceil(2 * extent / TEXTURE_SPACING_MM).astype(int) + 1
    noise = ndimage.gaussian_filter(rng.standard_normal(tuple(size)), sigma=1.5, mode="wrap")
    noise = (noise - noise.mean()) / max(float(noise.std()), 1e-6)
    return noise.astype(np.float32), -extent


def _sample_anatomy(rng: np.random.Generator, half_fov: np.ndarray) -> _Anatomy:
    """Draw the random anatomy of one phantom; sizes scale with the field of view (300 mm reference)."""
    hz, hy, hx = half_fov
    body_semi = np.array([0.72 * hy, 0.94 * hx]) * rng.uniform(0.96, 1.04, 2)
    lung_semi = np.array([[0.56 * hy, 0.43 * hx]] * 2) * rng.uniform(0.95, 1.05, (2, 2))
    lung_centres = np.array([[0.03 * hy, -0.47 * hx], [0.03 * hy, 0.47 * hx]]) + rng.uniform(-0.01, 0.01, (2, 2)) * hy
    dome_top = np.array([-0.24, -0.28]) * hz + rng.uniform(-0.03, 0.03, 2) * hz  # right dome higher (liver)
    texture, texture_origin = _sample_texture(rng, half_fov)
    return _Anatomy(
        body_semi=_f32(body_semi),
        body_y=0.0,
        fat_mm=10.0 * hy / 150.0,
        lung_centres=_f32(lung_centres),
        lung_semi=_f32(lung_semi),
        dome_top=_f32(dome_top),
        dome_depth=_f32(np.array([0.42, 0.42]) * hz * rng.uniform(0.9, 1.1, 2)),
        apex=_f32(np.array([0.78, 0.78]) * hz + rng.uniform(-0.02, 0.02, 2) * hz),
        taper_start=0.3 * hz,
        wall_mm=22.0 * hy / 150.0,
        heart_centre=_f32(np.array([-0.17 * hz, -0.2 * hy, 0.15 * hx]) + rng.uniform(-0.02, 0.02, 3) * half_fov),
        heart_semi=_f32(np.array([0.28 * hz, 0.31 * hy, 0.34 * hx]) * rng.uniform(0.93, 1.07, 3)),
        spine_yx=_f32([0.47 * hy, 0.0]),
        spine_radius=0.115 * hy,
        disc_period=0.2 * hz,
        disc_phase=float(rng.uniform(0, 0.2 * hz)),
        rib_period=0.175 * hz,
        rib_phase=float(rng.uniform(0, 0.175 * hz)),
        rib_slope=float(rng.uniform(0.3, 0.45)),
        rib_radius=0.033 * hy,
        trachea_yx=_f32([-0.05 * hy, 0.0]),
        trachea_radius=0.06 * hx,
        carina_z=0.25 * hz,
        texture=texture,
        texture_origin=_f32(texture_origin),
    )


def _sample_motion(rng: np.random.Generator, anatomy: _Anatomy, amplitude: float) -> _Motion:
    """Draw the breathing motion; the base of the lungs moves ``SI_FRACTION`` of the lung height at amplitude 1."""
    z_base = float(np.min(anatomy.dome_top - anatomy.dome_depth))
    z_apex = float(np.max(anatomy.apex))
    n_waves = 6
    directions = rng.standard_normal((n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(140.0, 260.0, n_waves)
    return _Motion(
        amplitude=float(amplitude),
        si_mm=_f32(SI_FRACTION * (z_apex - z_base) * rng.uniform(0.85, 1.15, 2)),
        z_apex=z_apex + 0.05 * (z_apex - z_base),
        z_base=z_base,
        ap_rate=float(rng.uniform(0.035, 0.06)),
        lr_rate=float(rng.uniform(0.02, 0.04)),
        envelope_semi=anatomy.body_semi.copy(),
        envelope_y=anatomy.body_y,
        spine_yx=anatomy.spine_yx.copy(),
        spine_radius=anatomy.spine_radius,
        spine_fade=2.0 * anatomy.spine_radius,
        wave_vectors=_f32(directions * (2 * np.pi / wavelengths)[:, None]),
        wave_phases=_f32(rng.uniform(0, 2 * np.pi, n_waves)),
        wave_amplitudes=_f32(rng.uniform(-1.2, 1.2, (n_waves, 3))),
    )


# ----------------------------------------------------------------------------------------------------------
# Analytic shapes: approximate signed distances in mm (negative inside), points p (3, ...) = (z, y, x)
# ----------------------------------------------------------------------------------------------------------


def _ellipse_sdf(offsets: Sequence[np.ndarray], semi: Sequence[float]) -> np.ndarray:
    """First-order signed distance ``(rho - 1) / |grad rho|`` to an axis-aligned ellipse/ellipsoid (mm)."""
    rho_sq = sum((o / s) ** 2 for o, s in zip(offsets, semi, strict=True))
    grad_sq = sum((o / s**2) ** 2 for o, s in zip(offsets, semi, strict=True))
    rho = np.sqrt(rho_sq)
    grad = np.sqrt(grad_sq) / np.maximum(rho, 1e-6)
    return ((rho - 1.0) / np.maximum(grad, 1e-6 / min(semi))).astype(np.float32)


def _ramp(sdf: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume weight: 1 inside, 0 outside, linear over ``edge`` mm across the surface."""
    return np.clip(0.5 - sdf / edge, 0.0, 1.0)


def _cos_step(t: np.ndarray) -> np.ndarray:
    """Smooth step: 0 for ``t <= 0``, 1 for ``t >= 1``, ``(1 - cos(pi t)) / 2`` in between."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))


def _body_sdf(anat: _Anatomy, p: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
    """Elliptic cylinder of the body outline shrunk by ``inset_mm`` (all slices)."""
    return _ellipse_sdf((p[1] - anat.body_y, p[2]), anat.body_semi - inset_mm)


def _heart_sdf(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Ellipsoid of the heart, left-anterior between the lungs."""
    return _ellipse_sdf([p[i] - anat.heart_centre[i] for i in range(3)], anat.heart_semi)


def _spine_sdf(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Cylinder of the vertebral column, posterior on the mid-line."""
    dist = np.sqrt((p[1] - anat.spine_yx[0]) ** 2 + (p[2] - anat.spine_yx[1]) ** 2)
    return dist - anat.spine_radius


def _trachea_sdf(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Air column of the trachea above the carina."""
    dist = np.sqrt((p[1] - anat.trachea_yx[0]) ** 2 + (p[2] - anat.trachea_yx[1]) ** 2)
    return np.maximum(dist - anat.trachea_radius, anat.carina_z - p[0])


def _one_lung_sdf(anat: _Anatomy, p: np.ndarray, side: int) -> np.ndarray:
    """One lung lobe: elliptic cross-section tapering to an apex, floor = diaphragm dome."""
    cy, cx = anat.lung_centres[side]
    sy, sx = anat.lung_semi[side]
    rho = np.sqrt(((p[1] - cy) / sy) ** 2 + ((p[2] - cx) / sx) ** 2)
    cap = (p[0] - anat.taper_start) / (anat.apex[side] - anat.taper_start)
    taper = np.sqrt(np.clip(1.0 - np.clip(cap, 0.0, None) ** 2, 0.0, 1.0))
    cross = (rho - taper) * min(sy, sx)
    floor = anat.dome_top[side] - anat.dome_depth[side] * rho**2 - p[0]
    return np.maximum(cross, floor)


def _lung_sdf(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Both lungs, kept inside the chest wall and away from heart, spine, trachea and mid-line."""
    lobes = np.minimum(_one_lung_sdf(anat, p, 0), _one_lung_sdf(anat, p, 1))
    gap = 3.0
    mediastinum = 0.09 * anat.body_semi[1] - np.abs(p[2])
    sdf = np.maximum(lobes, _body_sdf(anat, p, anat.fat_mm + anat.wall_mm))
    sdf = np.maximum(sdf, mediastinum)
    sdf = np.maximum(sdf, gap - _heart_sdf(anat, p))
    sdf = np.maximum(sdf, gap + 2.0 - _spine_sdf(anat, p))
    sdf = np.maximum(sdf, gap + 2.0 - _trachea_sdf(anat, p))
    return sdf.astype(np.float32)


def _rib_sdf(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Ribs: tubes along an ellipse in the chest wall, one every ``rib_period`` mm, sloping down anteriorly."""
    radial = _body_sdf(anat, p, anat.fat_mm + 0.35 * anat.wall_mm)
    z_local = p[0] - anat.rib_phase - anat.rib_slope * p[1]
    along = np.mod(z_local, anat.rib_period) - 0.5 * anat.rib_period
    sdf = np.sqrt(radial**2 + along**2) - anat.rib_radius
    anterior_end = -0.45 * anat.body_semi[0] - p[1]  # no ribs in front (cartilage)
    span = np.maximum(p[0] - np.max(anat.apex), np.min(anat.dome_top - anat.dome_depth) - 10.0 - p[0])
    return np.maximum(sdf, np.maximum(anterior_end, span))


def _texture(anat: _Anatomy, p: np.ndarray) -> np.ndarray:
    """Smooth unit-variance tissue texture at points ``p (3, ...)`` (moves with the tissue)."""
    index = (p - anat.texture_origin.reshape((3,) + (1,) * (p.ndim - 1))) / TEXTURE_SPACING_MM
    return ndimage.map_coordinates(anat.texture, index, order=1, mode="nearest").astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Vessel trees
# ----------------------------------------------------------------------------------------------------------


def _random_perpendicular(rng: np.random.Generator, directions: np.ndarray) -> np.ndarray:
    """Unit vectors ``(B, 3)`` perpendicular to the unit ``directions (B, 3)``."""
    v = rng.standard_normal(directions.shape)
    v -= np.sum(v * directions, axis=1, keepdims=True) * directions
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def _normalise(v: np.ndarray) -> np.ndarray:
    """Rows of ``v (B, 3)`` scaled to unit length."""
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def _vessel_roots(rng: np.random.Generator, anat: _Anatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Root segments at each lung hilum: ``(starts (R, 3), unit directions (R, 3), hilum (R, 3))``."""
    starts, dirs = [], []
    for side, sign in ((0, -1.0), (1, 1.0)):
        cy, cx = anat.lung_centres[side]
        hilum = np.array([0.03 * (anat.apex[side] - anat.dome_top[side]), cy - 0.1 * anat.lung_semi[side, 0], 0.0])
        hilum[2] = cx - sign * 0.45 * anat.lung_semi[side, 1]
        base = np.array(
            [
                [0.9, 0.1, 0.4],
                [0.5, -0.5, 0.7],
                [0.4, 0.7, 0.6],
                [0.0, -0.7, 0.7],
                [0.0, 0.7, 0.7],
                [-0.8, -0.3, 0.5],
                [-0.8, 0.5, 0.4],
            ]
        )
        base[:, 2] *= sign
        starts.append(np.repeat(hilum[None], len(base), axis=0))
        dirs.append(_normalise(base + rng.normal(0.0, 0.12, base.shape)))
    starts_arr = np.concatenate(starts)
    return starts_arr, np.concatenate(dirs), starts_arr.copy()


def _end_inside_lungs(
    anat: _Anatomy, pos: np.ndarray, dirs: np.ndarray, length: np.ndarray, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Segment ends ``(B, 3)`` at the longest of 100 %, 60 %, 35 % of ``length`` that stays half a radius inside
    the lungs, and which segments found one ``(B,)``."""
    end = pos.copy()
    found = np.zeros(len(pos), dtype=bool)
    for factor in (1.0, 0.6, 0.35):
        trial = pos + dirs * (factor * length)[:, None]
        ok = ~found & (_lung_sdf(anat, trial.T) < -0.5 * radius)
        end[ok] = trial[ok]
        found |= ok
    return end, found


def _split(
    rng: np.random.Generator, ends: np.ndarray, dirs: np.ndarray, hilum: np.ndarray, length: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two child directions per parent, interleaved ``(2B, 3)``, and child lengths ``(2B,)``.

    The children turn by 20-40 degrees to opposite sides in a random plane, lean away from the hilum so the
    trees fill the lungs, and are 75-90 % as long as their parent.
    """
    parent_dirs = np.repeat(dirs, 2, axis=0)
    angle = np.deg2rad(rng.uniform(20.0, 40.0, len(parent_dirs))) * np.tile([1.0, -1.0], len(dirs))
    normal = np.repeat(_random_perpendicular(rng, dirs), 2, axis=0)
    turned = np.cos(angle)[:, None] * parent_dirs + np.sin(angle)[:, None] * normal
    outward = _normalise(np.repeat(ends - hilum, 2, axis=0))
    child_length = np.repeat(length, 2) * rng.uniform(0.75, 0.9, len(parent_dirs))
    return _normalise(turned + 0.3 * outward), child_length


def _grow_vessels(rng: np.random.Generator, anat: _Anatomy, root_radius: float, min_radius: float = 0.8) -> _Vessels:
    """Grow binary vessel trees from the hila, one generation at a time (vectorised over branches).

    A segment is at most ``0.7 x`` its start's depth inside the lungs long and must end inside them
    (shortened if needed, else dropped); its radius shrinks by 70-80 % per generation down to ``min_radius``
    mm. A segment with two surviving children marks a bifurcation.
    """
    pos, dirs, hilum = _vessel_roots(rng, anat)
    length = np.full(len(pos), 0.16 * float(np.mean(anat.apex - anat.dome_top)))
    radius = np.full(len(pos), root_radius)
    parent_of = np.full(len(pos), -1)
    parent_ends = np.zeros((0, 3))
    starts, ends, r_start, r_end, bifurcations = [], [], [], [], []
    while len(pos):
        reach = np.minimum(length, np.maximum(0.7 * -_lung_sdf(anat, pos.T), 2.0 * radius))
        end, keep = _end_inside_lungs(anat, pos, dirs, reach, radius)
        counts = np.bincount(parent_of[keep & (parent_of >= 0)], minlength=len(parent_ends))
        bifurcations.append(parent_ends[counts == 2])
        pos, end, dirs, hilum, radius, length = (a[keep] for a in (pos, end, dirs, hilum, radius, length))
        child_radius = radius * rng.uniform(0.70, 0.80, len(radius))
        starts.append(pos)
        ends.append(end)
        r_start.append(radius)
        r_end.append(0.5 * (radius + child_radius))
        grows = np.flatnonzero(child_radius >= min_radius)
        dirs, length = _split(rng, end[grows], dirs[grows], hilum[grows], length[grows])
        parent_of, parent_ends = np.repeat(grows, 2), end
        pos, hilum, radius = end[parent_of], hilum[parent_of], child_radius[parent_of]
    return _Vessels(
        starts=np.concatenate(starts),
        ends=np.concatenate(ends),
        radius_start=np.concatenate(r_start),
        radius_end=np.concatenate(r_end),
        bifurcations=np.concatenate(bifurcations),
    )


def _segment_occupancy(points: np.ndarray, seg: tuple[np.ndarray, np.ndarray, float, float], edge: float) -> np.ndarray:
    """Partial-volume occupancy of one tapered tube at ``points (3, ...)``.

    Tubes thinner than half a voxel are drawn half a voxel wide with a proportionally lower weight (their
    cross-section area is kept), so thin vessels fade instead of aliasing.
    """
    a, b, r0, r1 = seg
    shape = (3,) + (1,) * (points.ndim - 1)
    ab = (b - a).reshape(shape).astype(np.float32)
    rel = points - a.reshape(shape).astype(np.float32)
    t = np.clip(np.sum(rel * ab, axis=0) / max(float(np.sum(ab**2)), 1e-12), 0.0, 1.0)
    dist = np.sqrt(np.sum((rel - t * ab) ** 2, axis=0))
    r = r0 + t * (r1 - r0)
    r_eff = np.maximum(r, 0.5 * edge)
    return (r / r_eff) ** 2 * np.clip((r_eff - dist) / edge + 0.5, 0.0, 1.0)


def _rasterise_vessels(
    vessels: _Vessels, points: np.ndarray, grid: _Grid, edge: float, ddf: np.ndarray | None = None
) -> np.ndarray:
    """Vessel occupancy in [0, 1] at the grid-shaped ``points (3, D, H, W)`` (mm, inhale frame).

    ``points`` are the grid itself (fixed image, ``ddf=None``) or the inverse-mapped grid ``phi^-1(y)``
    (moving image, with the forward ``ddf (3, D, H, W)`` in voxels). Each segment is evaluated only on the
    block of voxels that can reach it (see :func:`_segment_block`).
    """
    out = np.zeros(points.shape[1:], dtype=np.float32)
    for a, b, r0, r1 in zip(vessels.starts, vessels.ends, vessels.radius_start, vessels.radius_end, strict=True):
        reach = max(r0, r1, 0.5 * edge) + edge  # the occupancy is zero farther than this from the axis
        block = _segment_block(grid, a, b, reach, ddf)
        if block is not None:
            occ = _segment_occupancy(points[(slice(None),) + block], (a, b, float(r0), float(r1)), edge)
            np.maximum(out[block], occ, out=out[block])
    return out


def _segment_block(
    grid: _Grid, a: np.ndarray, b: np.ndarray, reach: float, ddf: np.ndarray | None
) -> tuple[slice, slice, slice] | None:
    """Voxel block whose points can lie within ``reach`` mm of the segment ``a-b`` (inhale frame), or None.

    Fixed image: the segment's bounding box. Moving image: a voxel ``y`` holds the inhale point ``x`` with
    ``y = x + u(x)``, so the box is widened by the range of ``ddf`` over it, plus two voxels for the variation
    between grid points; a box reaching outside the grid is widened by the global displacement bound.
    """
    shape = np.array(grid.shape)
    lo = np.floor(grid.to_index(np.minimum(a, b) - reach)).astype(int)
    hi = np.ceil(grid.to_index(np.maximum(a, b) + reach)).astype(int) + 1
    if ddf is not None:
        if np.all(lo >= 0) and np.all(hi <= shape):
            box = ddf[(slice(None),) + tuple(slice(int(i), int(j)) for i, j in zip(lo, hi, strict=True))]
            lo = lo + np.floor(box.reshape(3, -1).min(axis=1)).astype(int) - 2
            hi = hi + np.ceil(box.reshape(3, -1).max(axis=1)).astype(int) + 2
        else:
            lo = np.floor(grid.to_index(np.minimum(a, b) - reach - grid.max_shift_mm)).astype(int)
            hi = np.ceil(grid.to_index(np.maximum(a, b) + reach + grid.max_shift_mm)).astype(int) + 1
    lo, hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(i), int(j)) for i, j in zip(lo, hi, strict=True))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Grid geometry and motion
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Grid:
    """Voxel grid centred on the phantom: index ``i`` <-> position ``(i - (n - 1) / 2) * spacing`` mm."""

    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,)
    max_shift_mm: float = 0.0

    def centre(self) -> np.ndarray:
        """Index of the grid centre ``(3,)``."""
        return (np.array(self.shape) - 1) / 2.0

    def to_index(self, mm: np.ndarray) -> np.ndarray:
        """Centred mm ``(..., 3)`` -> voxel index ``(..., 3)``."""
        return mm / self.spacing + self.centre()

    def to_mm(self, index: np.ndarray) -> np.ndarray:
        """Voxel index ``(..., 3)`` -> centred mm ``(..., 3)``."""
        return (index - self.centre()) * self.spacing

    def points(self) -> np.ndarray:
        """Positions of all voxel centres, ``(3, D, H, W)`` float32 mm."""
        axes = [
            ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)
            for n, s in zip(self.shape, self.spacing, strict=True)
        ]
        return np.stack(np.meshgrid(*axes, indexing="ij"))


def _displacement_mm(motion: _Motion, p: np.ndarray) -> np.ndarray:
    """Inhale -> exhale displacement ``u(p) (3, ...)`` in mm at inhale positions ``p (3, ...)``.

    The diaphragm region rises (``+z``) most, fading to zero at the apex; the thorax contracts a little
    towards the spine and the mid-line; a few long-wavelength random waves add variety. Everything fades out
    towards the body outline (zero outside it) and the spine (zero inside it).
    """
    z, y, x = p
    base = _cos_step((motion.z_apex - z) / (motion.z_apex - motion.z_base))
    rho = np.sqrt(((y - motion.envelope_y) / motion.envelope_semi[0]) ** 2 + (x / motion.envelope_semi[1]) ** 2)
    envelope = _cos_step((1.05 - rho) / 0.45)
    spine_distance = np.sqrt((y - motion.spine_yx[0]) ** 2 + (x - motion.spine_yx[1]) ** 2)
    weight = motion.amplitude * envelope * _cos_step((spine_distance - motion.spine_radius) / motion.spine_fade)
    side = 0.5 * (1.0 + np.tanh(x / 40.0))
    si = motion.si_mm[0] + (motion.si_mm[1] - motion.si_mm[0]) * side
    lower = 0.5 + 0.5 * base
    u = np.empty_like(p)
    u[0] = weight * si * base
    u[1] = weight * motion.ap_rate * (motion.spine_yx[0] - y) * lower
    u[2] = -weight * motion.lr_rate * (x - motion.spine_yx[1]) * lower
    for k, phase, amp in zip(motion.wave_vectors, motion.wave_phases, motion.wave_amplitudes, strict=True):
        wave = weight * np.sin(k[0] * z + k[1] * y + k[2] * x + phase)
        for axis in range(3):
            u[axis] += amp[axis] * wave
    return u.astype(np.float32)


def _invert_motion(motion: _Motion, y: np.ndarray) -> np.ndarray:
    """Inhale positions ``x (3, ...)`` with ``x + u(x) = y`` for exhale positions ``y (3, ...)`` (mm).

    Fixed-point iteration ``x <- y - u(x)`` first (fast where ``u`` is gentle), then Newton steps
    ``x <- x - (I + grad u)^-1 (x + u(x) - y)`` for the points still moving, where strong shear slows the
    plain iteration. Each point stops once its update is below ``INVERSE_TOLERANCE_MM``.
    """
    flat = y.reshape(3, -1)
    x = flat - _displacement_mm(motion, flat)
    active = np.arange(flat.shape[1])
    for iteration in range(INVERSE_MAX_ITERATIONS):
        xa, ya = x[:, active], flat[:, active]
        new = (
            ya - _displacement_mm(motion, xa) if iteration < INVERSE_PLAIN_ITERATIONS else _newton_step(motion, xa, ya)
        )
        change = np.max(np.abs(new - xa), axis=0)
        x[:, active] = new
        active = active[~(change < INVERSE_TOLERANCE_MM)]
        if active.size == 0:
            return x.reshape(y.shape)
    raise ValueError("the breathing motion could not be inverted at this amplitude; use a smaller amplitude")


def _newton_step(motion: _Motion, x: np.ndarray, y: np.ndarray, h: float = 0.05) -> np.ndarray:
    """One Newton step for ``x + u(x) = y`` at points ``x, y (3, M)``, ``grad u`` by central differences."""
    jac = np.empty((x.shape[1], 3, 3), dtype=np.float64)
    for j in range(3):
        offset = np.zeros((3, 1), dtype=x.dtype)
        offset[j] = h
        diff = _displacement_mm(motion, x + offset) - _displacement_mm(motion, x - offset)
        jac[:, :, j] = (diff / (2 * h)).T
    jac += np.eye(3)
    residual = (x + _displacement_mm(motion, x) - y).T.astype(np.float64)
    return (x.T - np.linalg.solve(jac, residual[..., None])[..., 0]).T.astype(x.dtype)


def _determinant3(m: list[list[np.ndarray]]) -> np.ndarray:
    """Determinant of a field of 3x3 matrices given as nested lists of arrays."""
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def _inverse_jacobian(x: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``det(d phi^-1 / dy)`` of the inverse-mapped grid ``x (3, D, H, W)`` (mm), i.e. ``1 / J(x)``."""
    grads = [np.gradient(x[i], *spacing, axis=(0, 1, 2)) for i in range(3)]
    return _determinant3([[grads[i][j] for j in range(3)] for i in range(3)])


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _render(
    anat: _Anatomy,
    vessels_occ: np.ndarray,
    p: np.ndarray,
    edge: float,
    lung_hu: float,
    density_factor: np.ndarray | float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CT values and lung mask at the inhale-frame positions ``p (3, D, H, W)``.

    Args:
        vessels_occ: vessel occupancy ``(D, H, W)`` at ``p``.
        edge: partial-volume width in mm (about one voxel).
        lung_hu: inhale parenchyma HU.
        density_factor: ``(HU + 1000)`` multiplier of the parenchyma (``1 / J`` for the exhale image).

    Returns:
        ``(hu (D, H, W) float32, lung_mask (D, H, W) bool)``.
    """
    tex = _texture(anat, p)
    body = _ramp(_body_sdf(anat, p), edge)
    inner = _ramp(_body_sdf(anat, p, anat.fat_mm), edge)
    tissue = HU_FAT + inner * (HU_SOFT + 10.0 * tex - HU_FAT)
    hu = HU_AIR + body * (tissue - HU_AIR)
    hu += _ramp(_heart_sdf(anat, p), edge) * (HU_BLOOD + 6.0 * tex - hu)
    lung_sdf = _lung_sdf(anat, p)
    dependent = 25.0 * (p[1] - anat.lung_centres[0, 0]) / anat.lung_semi[0, 0]  # posterior lung a bit denser
    parenchyma = HU_AIR + (lung_hu + 20.0 * tex + dependent - HU_AIR) * density_factor
    lung_value = parenchyma + vessels_occ * (HU_VESSEL - parenchyma)
    hu += _ramp(lung_sdf, edge) * (lung_value - hu)
    hu += _ramp(_trachea_sdf(anat, p), edge) * (HU_AIR - hu)
    hu = _add_bone(anat, p, edge, hu)
    return hu.astype(np.float32), lung_sdf < 0


def _add_bone(anat: _Anatomy, p: np.ndarray, edge: float, hu: np.ndarray) -> np.ndarray:
    """Spine (cortical rim, cancellous core, discs) and ribs composited over ``hu (D, H, W)``."""
    spine_sdf = _spine_sdf(anat, p)
    rim = _ramp(-(spine_sdf + 3.0), edge)  # outer 3 mm shell
    disc = np.abs(np.mod(p[0] - anat.disc_phase, anat.disc_period) - 0.5 * anat.disc_period) < 4.0
    core = np.where(disc, HU_DISC, HU_CANCELLOUS)
    hu = hu + _ramp(spine_sdf, edge) * (core + rim * (HU_CORTICAL - core) - hu)
    return hu + _ramp(_rib_sdf(anat, p), edge) * (HU_RIB - hu)


# ----------------------------------------------------------------------------------------------------------
# Landmarks, sampling and TRE
# ----------------------------------------------------------------------------------------------------------


def sample_field(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of a multi-channel ``volume (C, D, H, W)`` (e.g. a ddf) at voxel ``points (N, 3)``.

    Points outside the grid take border values. Returns ``(N, C)`` float64.
    """
    volume = np.asarray(volume)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if volume.ndim != 4:
        raise ValueError(f"volume: expected shape (C, D, H, W), got {volume.shape}")
    channels = [ndimage.map_coordinates(np.asarray(c, np.float64), points.T, order=1, mode="nearest") for c in volume]
    return np.stack(channels, axis=1).reshape(len(points), len(volume))


def target_registration_error(
    fixed_landmarks: np.ndarray,
    moving_landmarks: np.ndarray,
    spacing: Sequence[float],
    ddf: np.ndarray | None = None,
) -> np.ndarray:
    """Target registration error per landmark pair, in mm.

    Args:
        fixed_landmarks: ``(N, 3)`` voxel coordinates in the fixed image.
        moving_landmarks: ``(N, 3)`` voxel coordinates in the moving image.
        spacing: mm per voxel along the array axes.
        ddf: optional predicted displacement ``(3, D, H, W)`` (voxels, Warp convention); the fixed landmarks
            are then carried to ``fixed + ddf(fixed)`` (trilinear) before comparing. ``None``: TRE before
            registration.

    Returns:
        ``(N,)`` float64 distances in mm.
    """
    fixed = np.asarray(fixed_landmarks, dtype=np.float64).reshape(-1, 3)
    moving = np.asarray(moving_landmarks, dtype=np.float64).reshape(-1, 3)
    if fixed.shape != moving.shape:
        raise ValueError(f"landmark arrays differ in shape: {fixed.shape} vs {moving.shape}")
    predicted = fixed if ddf is None else fixed + sample_field(ddf, fixed)
    return np.linalg.norm((predicted - moving) * np.asarray(spacing, dtype=np.float64), axis=1)


def _select_landmarks(
    rng: np.random.Generator, anat: _Anatomy, vessels: _Vessels, grid: _Grid, lung_mask: np.ndarray, n: int
) -> np.ndarray:
    """``n`` fixed-image landmarks ``(n, 3)`` (voxels): vessel bifurcations well inside the lungs first, then
    random points inside the lungs if there are too few bifurcations."""
    margin = float(np.max(grid.spacing))
    candidates = grid.to_index(vessels.bifurcations)
    candidates = candidates[_valid_landmarks(anat, grid, lung_mask, candidates, margin)]
    chosen = candidates[rng.permutation(len(candidates))[:n]]
    if len(chosen) < n:
        chosen = np.concatenate([chosen, _random_lung_points(rng, anat, grid, lung_mask, n - len(chosen), margin)])
    return chosen.astype(np.float64)


def _valid_landmarks(anat: _Anatomy, grid: _Grid, mask: np.ndarray, idx: np.ndarray, margin: float) -> np.ndarray:
    """Which voxel points ``idx (N, 3)`` are inside the grid interior, the lung mask and ``margin`` mm deep."""
    inside = np.all((idx >= 1) & (idx <= np.array(grid.shape) - 2), axis=1)
    nearest = np.clip(np.rint(idx).astype(int), 0, np.array(grid.shape) - 1)
    in_mask = mask[tuple(nearest.T)]
    deep = _lung_sdf(anat, grid.to_mm(idx).T) < -margin if len(idx) else np.zeros(0, dtype=bool)
    return inside & in_mask & deep


def _random_lung_points(
    rng: np.random.Generator, anat: _Anatomy, grid: _Grid, mask: np.ndarray, n: int, margin: float
) -> np.ndarray:
    """``n`` random voxel points ``(n, 3)`` inside the lungs (voxel centre + sub-voxel jitter)."""
    voxels = np.argwhere(mask)
    if len(voxels) == 0:
        raise ValueError("the grid holds no lung voxels to place landmarks in")
    found = np.zeros((0, 3))
    for _ in range(100):
        pick = voxels[rng.integers(0, len(voxels), 4 * n)] + rng.uniform(-0.45, 0.45, (4 * n, 3))
        found = np.concatenate([found, pick[_valid_landmarks(anat, grid, mask, pick, 0.5 * margin)]])
        if len(found) >= n:
            return found[:n]
    raise ValueError(f"could not place {n} landmarks inside the lungs")


# ----------------------------------------------------------------------------------------------------------
# Main entry
# ----------------------------------------------------------------------------------------------------------


def _validate_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as three ints >= 16, or a ValueError."""
    values = tuple(shape) if isinstance(shape, Sequence | np.ndarray) else ()
    if len(values) != 3 or not all(_is_int(v) and v >= 16 for v in values):
        raise ValueError(f"shape: expected 3 integers >= 16, got {shape!r}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _is_int(value) -> bool:
    """Whether ``value`` is a Python or numpy integer (not a bool)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_int(name: str, value, minimum: int) -> None:
    """ValueError unless ``value`` is an integer >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value, minimum: float) -> None:
    """ValueError unless ``value`` is a finite real number >= ``minimum``."""
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected a finite number >= {minimum}, got {value!r}")
    if not math.isfinite(float(value)) or value < minimum:
        raise ValueError(f"{name}: expected a finite number >= {minimum}, got {value!r}")


def _validate_arguments(
    seed: int, amplitude: float, n_landmarks: int, fov: Sequence[float], noise_std: float, lung_hu: float
) -> None:
    """Raise ValueError for a bad argument of :func:`make_breathing_pair`."""
    _check_int("seed", seed, 0)
    _check_number("amplitude", amplitude, 0.0)
    if amplitude > MAX_AMPLITUDE:
        raise ValueError(f"amplitude: expected a value in [0, {MAX_AMPLITUDE}] (larger ones fold), got {amplitude!r}")
    _check_int("n_landmarks", n_landmarks, 0)
    _check_number("noise_std", noise_std, 0.0)
    _check_number("lung_hu", lung_hu, -999.0)
    if lung_hu >= 0:
        raise ValueError(f"lung_hu: expected a value in [-999, 0), got {lung_hu!r}")
    values = tuple(fov) if isinstance(fov, Sequence | np.ndarray) else ()
    if len(values) != 3:
        raise ValueError(f"field_of_view_mm: expected 3 positive lengths, got {fov!r}")
    for value in values:
        _check_number("field_of_view_mm", value, 1e-3)


def make_breathing_pair(
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    amplitude: float = 1.0,
    n_landmarks: int = 300,
    *,
    field_of_view_mm: Sequence[float] = (300.0, 300.0, 300.0),
    noise_std: float = 10.0,
    mass_preserving: bool = True,
    lung_hu: float = -850.0,
) -> PhantomPair:
    """Generate an inhale (fixed) / exhale (moving) lung CT phantom pair with exact ground truth.

    Args:
        shape: grid ``(D, H, W)``, each >= 16.
        seed: seed of every random choice (anatomy, vessels, motion, landmarks, noise).
        amplitude: breathing amplitude in ``[0, MAX_AMPLITUDE]``; 1 moves the lung base about 12 % of the
            lung height (~27 mm, mean landmark TRE ~10 mm), 0 gives no motion.
        n_landmarks: number of landmark pairs (vessel bifurcations, then random lung points).
        field_of_view_mm: physical extent along the array axes; ``spacing = field_of_view_mm / shape``.
        noise_std: standard deviation (HU) of independent Gaussian acquisition noise per phase.
        mass_preserving: lung parenchyma denser at exhale by the local volume change (else same HU).
        lung_hu: mean inhale lung parenchyma HU.

    Returns:
        A :class:`PhantomPair` (conventions in the module docstring).
    """
    dims = _validate_shape(shape)
    _validate_arguments(seed, amplitude, n_landmarks, field_of_view_mm, noise_std, lung_hu)
    rng = np.random.default_rng(seed)
    half_fov = np.asarray(field_of_view_mm, dtype=np.float64) / 2.0
    spacing = np.asarray(field_of_view_mm, dtype=np.float64) / np.array(dims)
    edge = float(np.mean(spacing))
    anat = _sample_anatomy(rng, half_fov)
    vessels = _grow_vessels(rng, anat, root_radius=5.5 * half_fov[1] / 150.0)
    motion = _sample_motion(rng, anat, amplitude)

    grid = _Grid(dims, spacing)
    x = grid.points()
    u = _displacement_mm(motion, x)
    ddf = (u / spacing.reshape(3, 1, 1, 1)).astype(np.float32)
    if float(jacobian_determinant(ddf).min()) <= 0.0:
        raise ValueError(f"amplitude {amplitude} folds the breathing motion; use a smaller amplitude")  # safeguard
    fixed, fixed_mask = _render(anat, _rasterise_vessels(vessels, x, grid, edge), x, edge, lung_hu)
    moving, moving_mask = _render_exhale(anat, vessels, motion, grid, ddf, edge, lung_hu, mass_preserving)

    fixed_landmarks = _select_landmarks(rng, anat, vessels, grid, fixed_mask, int(n_landmarks))
    moving_landmarks = fixed_landmarks + sample_field(ddf, fixed_landmarks)
    fixed, moving = _add_noise(rng, fixed, noise_std), _add_noise(rng, moving, noise_std)
    return PhantomPair(
        fixed=fixed,
        moving=moving,
        ddf=ddf,
        fixed_lung_mask=fixed_mask,
        moving_lung_mask=moving_mask,
        fixed_landmarks=fixed_landmarks,
        moving_landmarks=moving_landmarks,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
    )


def _render_exhale(
    anat: _Anatomy,
    vessels: _Vessels,
    motion: _Motion,
    grid: _Grid,
    ddf: np.ndarray,
    edge: float,
    lung_hu: float,
    mass_preserving: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhale CT and lung mask ``(D, H, W)``: the inhale anatomy at the inverse-mapped grid ``phi^-1(y)``.

    ``ddf (3, D, H, W)`` is the forward displacement in voxels (used to bound each vessel's voxel block).
    With ``mass_preserving`` the parenchyma ``HU + 1000`` is scaled by ``det(d phi^-1 / dy) = 1 / J``.
    """
    y = grid.points()
    x_inv = _invert_motion(motion, y)
    shift_mm = float(np.max(np.abs(x_inv - y)))
    density = _inverse_jacobian(x_inv, grid.spacing) if mass_preserving else 1.0
    moving_grid = _Grid(grid.shape, grid.spacing, max_shift_mm=1.5 * shift_mm + edge)
    occupancy = _rasterise_vessels(vessels, x_inv, moving_grid, edge, ddf)
    return _render(anat, occupancy, x_inv, edge, lung_hu, density)


def _add_noise(rng: np.random.Generator, image: np.ndarray, std: float) -> np.ndarray:
    """``image`` plus Gaussian noise of ``std`` HU (float32)."""
    if std == 0:
        return image.astype(np.float32)
    return (image + rng.normal(0.0, std, image.shape)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def nifti_affine(
    spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[Sequence[float]] = IDENTITY
) -> np.ndarray:
    """RAS affine ``(4, 4)`` of a ``(D, H, W)`` volume written transposed as NIfTI ``(W, H, D)``.

    Array geometry (array axis order, LPS frame) -> NIfTI voxel ``(i, j, k) = (x, y, z)`` index -> RAS mm.
    """
    reverse = np.eye(3)[::-1]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    linear = lps_to_ras @ reverse @ np.asarray(direction, float) @ np.diag(np.asarray(spacing, float)) @ reverse
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = lps_to_ras @ reverse @ np.asarray(origin, float)
    return affine


def _save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """Write a ``(D, H, W)`` volume as NIfTI ``(W, H, D)`` with ``affine`` (sform and qform, mm units)."""
    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(volume, (2, 1, 0))), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(image, str(tmp)))


def load_nifti_volume(path: str | os.PathLike) -> tuple[np.ndarray, Vec3]:
    """Read a volume written by :func:`save_pair`: ``(array (D, H, W), spacing in array axis order)``."""
    image = nib.load(str(path))
    array = np.transpose(np.asanyarray(image.dataobj), (2, 1, 0))
    zooms = image.header.get_zooms()[:3]
    return np.ascontiguousarray(array), tuple(float(z) for z in zooms[::-1])  # type: ignore[return-value]


def voxel_to_physical(
    points: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[Sequence[float]] = IDENTITY,
) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` -> physical mm ``(N, 3)`` (array axis order)."""
    scaled = np.asarray(points, float).reshape(-1, 3) * np.asarray(spacing, float)
    return scaled @ np.asarray(direction, float).T + np.asarray(origin, float)


def physical_to_voxel(
    points: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[Sequence[float]] = IDENTITY,
) -> np.ndarray:
    """Physical mm ``(N, 3)`` (array axis order) -> voxel coordinates ``(N, 3)``."""
    local = (np.asarray(points, float).reshape(-1, 3) - np.asarray(origin, float)) @ np.asarray(direction, float)
    return local / np.asarray(spacing, float)


def write_landmarks_csv(
    path: str | os.PathLike,
    landmarks: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[Sequence[float]] = IDENTITY,
) -> None:
    """Write voxel landmarks ``(N, 3)`` (array axis order) as a world LPS mm CSV of
    :mod:`rrn_lung_registration.io.landmarks` (header ``x,y,z``, atomic)."""
    points = voxel_to_physical(landmarks, spacing, origin, direction)
    landmarks_io.write_landmarks_csv(path, points[:, ::-1])


def save_pair(pair: PhantomPair, folder: str | os.PathLike) -> dict[str, Path]:
    """Write a pair into ``folder`` (created if needed), every file atomically.

    Files: ``fixed.nii.gz``, ``moving.nii.gz`` (float32 HU), ``fixed_lung_mask.nii.gz``,
    ``moving_lung_mask.nii.gz`` (uint8), ``fixed_landmarks.csv``, ``moving_landmarks.csv`` (mm) and
    ``ddf.npy`` (``(3, D, H, W)`` voxels, array convention; for arrays read by nibabel/MONAI in ``(W, H, D)``
    order use ``ddf[::-1].transpose(0, 3, 2, 1)``).

    Returns:
        ``{name: path}`` with the keys ``fixed, moving, fixed_lung_mask, moving_lung_mask, fixed_landmarks,
        moving_landmarks, ddf``.
    """
    folder = Path(folder)
    affine = nifti_affine(pair.spacing, pair.origin, pair.direction)
    paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_lung_mask", "moving_lung_mask")}
    paths |= {name: folder / f"{name}.csv" for name in ("fixed_landmarks", "moving_landmarks")}
    paths["ddf"] = folder / "ddf.npy"
    _save_nifti(paths["fixed"], pair.fixed.astype(np.float32), affine)
    _save_nifti(paths["moving"], pair.moving.astype(np.float32), affine)
    _save_nifti(paths["fixed_lung_mask"], pair.fixed_lung_mask.astype(np.uint8), affine)
    _save_nifti(paths["moving_lung_mask"], pair.moving_lung_mask.astype(np.uint8), affine)
    for name in ("fixed_landmarks", "moving_landmarks"):
        write_landmarks_csv(paths[name], getattr(pair, name), pair.spacing, pair.origin, pair.direction)
    atomic_write(paths["ddf"], lambda tmp: np.save(tmp, pair.ddf.astype(np.float32)))
    return paths


def make_dataset(
    folder: str | os.PathLike,
    n_pairs: int,
    shape: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    n_validation: int = 0,
    **pair_kwargs,
) -> Path:
    """Write ``n_pairs`` phantom pairs under ``folder/pair_XXX/`` and a datalist ``folder/datalist.json``.

    Pair ``i`` uses a seed derived from ``seed`` and ``i`` (``numpy.random.SeedSequence(seed).spawn``);
    ``pair_kwargs`` go to :func:`make_breathing_pair`.

    Returns:
        Path of ``datalist.json``: ``{"training": [...], "validation": [...]}`` (the last ``n_validation``
        pairs validate), each pair a dict of paths relative to ``folder`` with the keys ``fixed, moving,
        fixed_landmarks, moving_landmarks, fixed_lung_mask, moving_lung_mask, ddf``.
    """
    _check_int("n_pairs", n_pairs, 1)
    _check_int("seed", seed, 0)
    _check_int("n_validation", n_validation, 0)
    if n_validation >= n_pairs:
        raise ValueError(f"n_validation ({n_validation}) must leave at least one training pair of {n_pairs}.")
    _validate_shape(shape)
    folder = Path(folder)
    entries = []
    for i, child in enumerate(np.random.SeedSequence(int(seed)).spawn(int(n_pairs))):
        pair = make_breathing_pair(shape, seed=int(child.generate_state(1)[0]), **pair_kwargs)
        paths = save_pair(pair, folder / f"pair_{i:03d}")
        entries.append({name: path.relative_to(folder).as_posix() for name, path in paths.items()})
    split = len(entries) - int(n_validation)
    datalist = folder / "datalist.json"
    content = {"training": entries[:split], "validation": entries[split:]}
    atomic_write(datalist, lambda tmp: tmp.write_text(json.dumps(content, indent=2) + "\n"))
    return datalist
