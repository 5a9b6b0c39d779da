"""Realistic synthetic breathing pairs made from one real CT, with exact landmark correspondences.

:func:`synthetic_breathing_pair` takes one real CT (read as an end-inhale phase) and makes a synthetic
end-exhale image of it by a known, smooth, invertible motion, plus landmark pairs that correspond exactly
by construction: a test bed and benchmark for the registration pipeline on real anatomy and real image
texture. :func:`downsample_ct` shrinks a CT for fast tests, :func:`write_pair` saves a pair.

Conventions (for the whole module)
----------------------------------
* Volumes are ``MetaTensor (I, J, K)`` as :func:`rrn_lung_registration.io.ct_io.read_ct` returns them: ITK
  index order, no channel, affine voxel ``(i, j, k)`` -> **RAS** mm. The moving image has the fixed
  image's shape and affine: only its content moves.
* Points are ``(N, 3)`` world **LPS** mm, ``(x, y, z)`` = (patient right -> left, anterior -> posterior,
  inferior -> superior), as in :mod:`rrn_lung_registration.io.landmarks`. Every motion below is a map of LPS
  mm to LPS mm.
* Torch resampling uses ``grid_sample(input (1, C, I, J, K), grid (1, n, 1, 1, 3), align_corners=True)``:
  the grid's last axis holds the **reversed** voxel coordinates ``(k, j, i)``, each normalised as
  ``2 * index / (size - 1) - 1``, so that ``-1`` / ``+1`` are the centres of the first / last voxels.

Motion model (exact by design, no inversion needed)
---------------------------------------------------
A point ``y`` of the **moving** (exhale) image is the same anatomy as the point ``x = psi(y)`` of the
**fixed** (inhale) image, with::

    psi(y) = B(T(y)),    T(y) = R (y - c) + c + t,    B(p) = p + u(p)

* ``T`` (:class:`RigidMotion`): a patient repositioning: rotation ``R = Rz Ry Rx`` (``rotation_deg``
  about the LPS x, y, z axes) about the centre ``c`` of the lung bounding box, then translation ``t``
  (``offset_mm``, about 30 mm by default). The moving image's anatomy therefore sits near ``y = x - t``.
* ``B`` (:class:`BreathingMotion`): exhale -> inhale breathing, built from the fixed image's lung bounding
  box (``z_base`` / ``z_apex`` its inferior / superior ends, ``H`` its height, half sizes ``h_x, h_y``,
  centre ``c``; ``dx = x - c_x``, ``dy = y - c_y``). With the smooth step ``S(q) = t^2 (3 - 2 t)``,
  ``t = clip(q, 0, 1)`` (0 -> 1, C1), the soft sign ``sigma(q) = q / sqrt(1 + q^2)`` and ``A = amplitude_mm``:

  - superior-inferior: ``u_z = -A s m(x, y)`` with ``s = S(zeta)^3``, ``zeta = (z_top - z) / (z_top -
    z_bottom)``, ``z_top = z_apex + 0.1 H`` (no motion above), ``z_bottom = z_base + A`` (the exhale lung
    base; full motion below, where the abdomen follows the diaphragm). Inhale points are more inferior than
    exhale points: about ``A`` at the base of the lungs, an eighth of it half-way up, nothing at the apex;
  - ``m = (1 + b_lr sigma(dx / h_x) + b_ap sigma(dy / h_y)) * e * d``: left and right lungs move a little
    differently and the posterior lung more than the anterior (``b_lr in [-0.15, 0.15]``,
    ``b_ap in [0.15, 0.3]``); the domes ``d = (1 + b_d sum_k S(1 - |(x, y) - dome_k|^2_r)) / (1 + b_d)``
    (``b_d in [0.6, 1]``, one dome under the middle of each lung, radii ``(0.5 h_x, h_y)``) make the
    middle of each hemi-diaphragm move most; the envelope ``e = e_min + (1 - e_min) S((1 + w - rho) / w)``
    with the super-ellipse ``rho = ((dx / h_x)^4 + (dy / h_y)^4)^(1/4)`` is 1 over the lung box's footprint
    and falls to ``e_min = 0.25`` at ``rho >= 1 + w`` (``w = 0.4``): chest wall and spine move less;
  - anterior-posterior and lateral expansion, larger towards the base (``g = (1 + s) / 2``):
    ``u_y = a_ap g (y - y_post)`` (``y_post`` = posterior side of the lung box: the chest wall moves
    anteriorly at inhale, the spine stays) and ``u_x = a_lr g dx``, ``a_ap in [0.035, 0.05]``,
    ``a_lr in [0.02, 0.035]``;
  - four waves (wavelengths 80-160 mm, amplitudes up to 1.5 mm per component) for local variety:
    ``u += sum_k a_k sin(kappa_k . (p - c) + phi_k)``.

  The ranges are for ``A = 15`` mm: rates and wave amplitudes scale with ``A`` (``A = 0`` gives ``B =
  identity``); the drawn values come from ``seed``. At ``A = 15`` the landmarks of a real thorax (POPI)
  move 6 mm on average (up to 15), and the best affine map leaves about a third of that (1.5-2.5 mm mean):
  a deformable registration has work left after pre-alignment. The superior-inferior term has
  ``d u_z / d z >= 0`` and the other gradients are small or shear-like, so ``J_B = det(I + grad u) > 0``;
  :func:`synthetic_breathing_pair` checks it on a grid over the image (``ValueError`` otherwise), and
  :meth:`BreathingMotion.jacobian_determinant` evaluates it analytically.

The model reads "superior" from the image's affine: a header with the wrong superior-inferior sign
mirrors the motion (largest at the apex instead of the diaphragm), though ``psi`` and the landmarks stay
exact.

Images::

    moving(y) = fixed(psi(y))        (trilinear; outside the fixed volume: ``outside_hu``)

so ``moving_landmarks = y`` and ``fixed_landmarks = psi(y)`` correspond exactly, up to the trilinear
sampling of the fixed image.

Density change (``density_change=True``, mass preservation in the lung parenchyma): a small volume
``dV`` around ``y`` at exhale is the volume ``J_B(T(y)) dV`` at inhale (``det R = 1``), and it holds the
same mass, so ``rho_exhale(y) = rho_inhale(psi(y)) J_B``. With density ``~ HU + 1000``::

    HU_exhale(y) + 1000 = (HU_inhale(psi(y)) + 1000) * J_B(T(y))

The inhale lung is expanded (``J_B > 1`` on the whole), so the exhale lung is denser (higher HU), as in
real 4D-CT. The change is weighted by the lung mask at ``psi(y)`` (trilinear, clipped to ``[0, 1]``) and by
a parenchyma weight ``clip((-200 - HU) / 300, 0, 1)`` (``PARENCHYMA_HU``): vessels, soft tissue and bone
keep their HU. Optional Gaussian noise (``noise_hu``) is added to the moving image only; the fixed image
is the input CT.

Landmarks are voxel centres ``y`` of the moving grid with ``psi(y)`` inside the fixed lung mask eroded by
``margin_mm``, preferably local intensity maxima of the (noise-free) moving image that stand out from their
surroundings (vessels), kept at least ``min_distance_mm`` apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from scipy import ndimage
from scipy.spatial import cKDTree

from rrn_lung_registration.io.ct_io import write_image
from rrn_lung_registration.io.landmarks import LPS_TO_RAS, voxel_to_world, write_landmarks_csv
from shared_ops.atomic import atomic_write

__all__ = [
    "BreathingMotion",
    "RigidMotion",
    "SlidingWeight",
    "SyntheticPair",
    "downsample_ct",
    "resample_ct",
    "scanner_pair",
    "synthetic_breathing_pair",
    "sliding_region",
    "threshold_lung_mask",
    "write_pair",
]

AIR_HU = -1000.0
REFERENCE_AMPLITUDE_MM = 15.0  # the drawn expansion rates and wave amplitudes are for this amplitude
PARENCHYMA_HU = (-500.0, -200.0)  # full density change below the first value, none above the second
VESSEL_HU = -500.0  # landmark candidates: local maxima at least this bright ...
VESSEL_CONTRAST_HU = 100.0  # ... and this much above their neighbourhood mean
MIN_JACOBIAN = 0.1
OUTSIDE_AIR_HU = -950.0  # median HU below which an air region touching the sides is outside the body
CHUNK_VOXELS = 1 << 18  # voxels per slab on the CPU (64 times more on a GPU)

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------------------------


def _points(points: Array, dtype=torch.float64) -> tuple[torch.Tensor, bool]:
    """``points (..., 3)`` as a tensor (numpy input -> float64), and whether the input was numpy."""
    is_numpy = not isinstance(points, torch.Tensor)
    tensor = torch.as_tensor(np.asarray(points, dtype=np.float64) if is_numpy else points)
    if tensor.shape[-1:] != (3,):
        raise ValueError(f"expected points (..., 3) in LPS mm, got shape {tuple(tensor.shape)}.")
    return (tensor.to(dtype) if is_numpy else tensor), is_numpy


def _back(tensor: torch.Tensor, is_numpy: bool) -> Array:
    return tensor.numpy() if is_numpy else tensor


def _smooth_step(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S(q) = t^2 (3 - 2 t)`` with ``t = clip(q, 0, 1)`` (0 -> 1, C1) and its derivative ``6 t (1 - t)``."""
    t = q.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t), 6.0 * t * (1.0 - t)


def _soft_sign(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q / sqrt(1 + q^2)`` (smooth, in ``(-1, 1)``) and its derivative ``(1 + q^2)^(-3/2)``."""
    r = torch.rsqrt(q * q + 1.0)
    return q * r, r * r * r


@dataclass(frozen=True, eq=False)
class RigidMotion:
    """``T(y) = R (y - centre) + centre + offset`` on LPS mm points; ``R = Rz Ry Rx`` of ``rotation_deg``."""

    rotation_deg: tuple[float, float, float]
    offset_mm: tuple[float, float, float]
    centre: tuple[float, float, float]

    @property
    def matrix(self) -> np.ndarray:
        """The rotation ``R (3, 3)`` (float64)."""
        ax, ay, az = np.deg2rad(np.asarray(self.rotation_deg, dtype=np.float64))
        rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
        ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
        rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def __call__(self, points: Array) -> Array:
        """``T(points)``: ``(..., 3)`` LPS mm -> ``(..., 3)`` LPS mm (numpy in, numpy out)."""
        p, is_numpy = _points(points)
        matrix, centre, offset = (
            torch.as_tensor(value, dtype=p.dtype, device=p.device)
            for value in (self.matrix, self.centre, self.offset_mm)
        )
        return _back((p - centre) @ matrix.T + centre + offset, is_numpy)


@dataclass(frozen=True, eq=False)
class SlidingWeight:
    """``w(p) = 1 - strength (1 - r(p))``: the share of the superior-inferior breathing motion at ``p``.

    ``r`` is the lung region (see :func:`sliding_region`), smoothed, sampled trilinearly (1 inside the lungs
    and below them, 0 in the chest wall and mediastinum). The lungs keep their full motion and the tissue
    around them keeps ``1 - strength`` of it: the lungs slide along the chest wall. Only ``u_z`` is scaled, and
    the region's boundary is vertical except above the lungs (where ``u_z`` is near 0), so ``grad w`` is
    nearly orthogonal to the motion it scales: a shear, which keeps ``J_B > 0``.

    Attributes:
        strength: 0 (no sliding) to 1 (the chest wall does not move superior-inferior).
        values: ``(4, I, J, K)`` float32: ``r`` and its gradient ``d r / d p`` (LPS x, y, z, per mm).
        lps_to_grid: ``(4, 4)`` LPS mm -> ``grid_sample`` coordinates ``(i, j, k)`` normalised to [-1, 1].
    """

    strength: float
    values: torch.Tensor
    lps_to_grid: np.ndarray

    def weight(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``w`` and ``d w / d x, d w / d y, d w / d z`` at points given as three tensors of one shape."""
        shape, dtype = x.shape, x.dtype
        rows = [(*row[:3].tolist(), float(row[3])) for row in self.lps_to_grid[:3]]
        grid = torch.stack([a * x + b * y + c * z + d for a, b, c, d in rows][::-1], dim=-1)
        values = self.values.to(x.device)
        grid = grid.reshape(1, -1, 1, 1, 3).to(values.dtype)
        sampled = F.grid_sample(values[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled[0, :, :, 0, 0].to(dtype).reshape(4, *shape)
        return (1.0 - self.strength + self.strength * sampled[0], *(self.strength * sampled[1:]))


@dataclass(frozen=True, eq=False)
class BreathingMotion:
    """The exhale -> inhale breathing map ``B(p) = p + u(p)`` on LPS mm points (see the module notes).

    Attributes:
        amplitude_mm: ``A``, superior-inferior motion at the lung base.
        centre, half_size: ``(3,)`` centre and half sizes of the fixed lung bounding box (LPS mm).
        z_top, z_bottom: the superior-inferior profile runs from 0 (``z >= z_top``) to ``A`` (``z <= z_bottom``).
        y_posterior: LPS y of the posterior side of the lung box (AP expansion is relative to it).
        lr_balance, ap_gradient: ``b_lr``, ``b_ap`` of ``m(x, y)``.
        dome_gain: ``b_d``; dome_centres ``(2, 2)`` LPS ``(x, y)`` of the two domes; dome_radii ``(2,)`` mm
            (along x, along y).
        envelope_floor, envelope_width: ``e_min`` and ``w`` of the envelope ``e(x, y)``.
        lr_rate, ap_rate: ``a_lr``, ``a_ap`` (lateral and anterior-posterior expansion per mm).
        wave_vectors ``(K, 3)`` rad / mm, wave_phases ``(K,)``, wave_amplitudes ``(K, 3)`` mm.
        sliding: scales the superior-inferior term (not the waves) by ``w(p)``; ``None``: ``w = 1``.
    """

    amplitude_mm: float
    centre: np.ndarray
    half_size: np.ndarray
    z_top: float
    z_bottom: float
    y_posterior: float
    lr_balance: float
    ap_gradient: float
    dome_gain: float
    dome_centres: np.ndarray
    dome_radii: np.ndarray
    envelope_floor: float
    envelope_width: float
    lr_rate: float
    ap_rate: float
    wave_vectors: np.ndarray
    wave_phases: np.ndarray
    wave_amplitudes: np.ndarray
    sliding: SlidingWeight | None = None

    def _profile(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s = S(zeta)^3`` and ``d s / d z`` of the superior-inferior profile."""
        inverse_span = 1.0 / (self.z_top - self.z_bottom)
        step, slope = _smooth_step((self.z_top - z) * inverse_span)
        square = step * step
        return square * step, square * slope * (-3.0 * inverse_span)

    def _modulation(self, dx: torch.Tensor, dy: torch.Tensor, gradient: bool = False) -> tuple[torch.Tensor, ...]:
        """``m(x, y)`` at offsets ``dx, dy`` from the centre, and with ``gradient`` its ``d m / d x, d m / d y``.

        ``m = base * envelope * dome`` (see the module notes); the derivatives by the product rule.
        """
        hx, hy = float(self.half_size[0]), float(self.half_size[1])
        ex, ey = dx * (1.0 / hx), dy * (1.0 / hy)
        ex2, ey2 = ex * ex, ey * ey
        rho = torch.sqrt(torch.sqrt(ex2 * ex2 + ey2 * ey2))
        width, floor = self.envelope_width, self.envelope_floor
        step, step_slope = _smooth_step((1.0 + width - rho) * (1.0 / width))
        envelope = step * (1.0 - floor) + floor
        sign_x, slope_x = _soft_sign(ex)
        sign_y, slope_y = _soft_sign(ey)
        base = sign_x * self.lr_balance + sign_y * self.ap_gradient + 1.0
        gain = self.dome_gain / (1.0 + self.dome_gain)
        dome = torch.full_like(dx, 1.0 / (1.0 + self.dome_gain))
        dome_dx, dome_dy = torch.zeros_like(dx), torch.zeros_like(dx)
        (rx, ry), (cx, cy) = self.dome_radii.tolist(), self.centre[:2].tolist()
        for x0, y0 in self.dome_centres.tolist():
            qx, qy = (dx - (x0 - cx)) * (1.0 / rx), (dy - (y0 - cy)) * (1.0 / ry)
            bump, bump_slope = _smooth_step(1.0 - qx * qx - qy * qy)
            dome += bump * gain
            if gradient:
                dome_dx -= bump_slope * qx * (2.0 * gain / rx)
                dome_dy -= bump_slope * qy * (2.0 * gain / ry)
        modulation = base * envelope * dome
        if not gradient:
            return (modulation,)
        # d envelope / d rho, then d rho / d ex = ex^3 / rho^3 (the envelope is flat where rho is near 0)
        envelope_slope = step_slope * (-(1.0 - floor) / width) / (rho * rho * rho).clamp(min=1e-12)
        dm_dx = (slope_x * self.lr_balance * envelope + base * envelope_slope * ex * ex2) * (dome / hx)
        dm_dy = (slope_y * self.ap_gradient * envelope + base * envelope_slope * ey * ey2) * (dome / hy)
        return modulation, dm_dx + base * envelope * dome_dx, dm_dy + base * envelope * dome_dy

    def _waves(self):
        return zip(self.wave_vectors.tolist(), self.wave_phases.tolist(), self.wave_amplitudes.tolist(), strict=True)

    def components(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(u_x, u_y, u_z)`` at points given as three tensors of one shape (LPS mm; their dtype)."""
        cx, cy, cz = (float(v) for v in self.centre)
        dx, dy, dz = x - cx, y - cy, z - cz
        s, _ = self._profile(z)
        g = s * 0.5 + 0.5
        (modulation,) = self._modulation(dx, dy)
        ux = dx * g * self.lr_rate
        uy = (y - self.y_posterior) * g * self.ap_rate
        uz = s * modulation * -self.amplitude_mm
        if self.sliding is not None:
            uz = uz * self.sliding.weight(x, y, z)[0]
        for vector, phase, amplitude in self._waves():
            wave = torch.sin(dx * vector[0] + dy * vector[1] + dz * vector[2] + phase)
            ux += wave * amplitude[0]
            uy += wave * amplitude[1]
            uz += wave * amplitude[2]
        return ux, uy, uz

    def jacobian_components(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``J_B = det(I + grad u)`` (analytic) at points given as three tensors of one shape (LPS mm)."""
        cx, cy, cz = (float(v) for v in self.centre)
        dx, dy, dz = x - cx, y - cy, z - cz
        s, ds = self._profile(z)
        g, dg = s * 0.5 + 0.5, ds * 0.5
        modulation, dm_dx, dm_dy = self._modulation(dx, dy, gradient=True)
        zero = torch.zeros_like(dx)
        a = -self.amplitude_mm
        si_row = [s * dm_dx * a, s * dm_dy * a, ds * modulation * a]  # d u_z / d p_j before sliding
        if self.sliding is not None:  # u_z = w u_si: d u_z = w d u_si + u_si d w
            w, *dw = self.sliding.weight(x, y, z)
            u_si = s * modulation * a
            si_row = [w * d + u_si * g_w for d, g_w in zip(si_row, dw, strict=True)]
        grad = [  # grad[i][j] = d B_i / d p_j
            [g * self.lr_rate + 1.0, zero.clone(), dx * dg * self.lr_rate],
            [zero.clone(), g * self.ap_rate + 1.0, (y - self.y_posterior) * dg * self.ap_rate],
            [si_row[0], si_row[1], si_row[2] + 1.0],
        ]
        for vector, phase, amplitude in self._waves():
            wave = torch.cos(dx * vector[0] + dy * vector[1] + dz * vector[2] + phase)
            for i in range(3):
                for j in range(3):
                    grad[i][j] += wave * (amplitude[i] * vector[j])
        return (
            grad[0][0] * (grad[1][1] * grad[2][2] - grad[1][2] * grad[2][1])
            - grad[0][1] * (grad[1][0] * grad[2][2] - grad[1][2] * grad[2][0])
            + grad[0][2] * (grad[1][0] * grad[2][1] - grad[1][1] * grad[2][0])
        )

    def displacement(self, points: Array) -> Array:
        """``u(points)``: ``(..., 3)`` LPS mm -> ``(..., 3)`` mm (same type and dtype; numpy -> float64)."""
        p, is_numpy = _points(points)
        return _back(torch.stack(self.components(*p.unbind(-1)), dim=-1), is_numpy)

    def __call__(self, points: Array) -> Array:
        """``B(points) = points + u(points)``: ``(..., 3)`` LPS mm -> ``(..., 3)`` LPS mm."""
        p, is_numpy = _points(points)
        return _back(p + self.displacement(p), is_numpy)

    def jacobian_determinant(self, points: Array) -> Array:
        """``J_B = det(I + grad u)`` at ``points (..., 3)`` LPS mm -> ``(...)`` (analytic derivatives)."""
        p, is_numpy = _points(points)
        return _back(self.jacobian_components(*p.unbind(-1)), is_numpy)


def sliding_region(mask: np.ndarray, lps: np.ndarray) -> np.ndarray:
    """The region that moves with the lungs: the lung mask with its holes filled, extended inferiorly.

    ``mask (I, J, K)`` bool on the grid of ``lps`` (voxel -> LPS mm). Everything below a lung voxel along
    the image axis closest to superior-inferior belongs to the region (the abdomen follows the diaphragm),
    so the region's boundary is the chest wall and mediastinum beside the lungs and the lungs' upper surface.
    """
    region = ndimage.binary_fill_holes(mask)
    axis = int(np.argmax(np.abs(lps[2, :3]) / _spacing(lps)))
    superior_last = lps[2, axis] > 0  # the index grows towards superior
    if superior_last:
        region = np.flip(region, axis)
    region = np.logical_or.accumulate(region, axis=axis)  # from superior downwards
    return np.flip(region, axis) if superior_last else region


def _sliding_weight(mask: np.ndarray, lps: np.ndarray, strength: float, smoothing_mm: float = 2.0) -> SlidingWeight:
    """:class:`SlidingWeight` of the lung ``mask`` (fixed grid, ``lps`` voxel -> LPS mm), smoothed by a Gaussian
    of ``smoothing_mm`` and kept on a grid of about 2 mm (a subsample of the image grid)."""
    spacing = _spacing(lps)
    region = ndimage.gaussian_filter(sliding_region(mask, lps).astype(np.float32), smoothing_mm / spacing)
    step = np.maximum(1, np.round(2.0 / spacing)).astype(int)
    region = np.ascontiguousarray(region[:: step[0], :: step[1], :: step[2]])
    coarse = lps.copy()
    coarse[:3, :3] = lps[:3, :3] * step
    gradient_voxels = np.stack(np.gradient(region), axis=-1)  # d r / d v_i (coarse voxels)
    to_voxel = np.linalg.inv(coarse)
    gradient_lps = gradient_voxels @ to_voxel[:3, :3]  # d r / d p_j = sum_i d r / d v_i d v_i / d p_j
    values = np.concatenate((region[None], np.moveaxis(gradient_lps, -1, 0))).astype(np.float32)
    scale = 2.0 / np.maximum(np.asarray(region.shape) - 1.0, 1.0)
    lps_to_grid = np.eye(4)
    lps_to_grid[:3] = scale[:, None] * to_voxel[:3]
    lps_to_grid[:3, 3] -= 1.0
    return SlidingWeight(float(strength), torch.from_numpy(values), lps_to_grid)


def _draw_breathing(rng: np.random.Generator, box: tuple[np.ndarray, np.ndarray], amplitude: float) -> BreathingMotion:
    """Draw the breathing map for the fixed lung bounding box ``box = (low, high)`` (LPS mm)."""
    low, high = box
    centre, half = (low + high) / 2.0, np.maximum((high - low) / 2.0, 1.0)
    height = 2.0 * half[2]
    z_top = high[2] + 0.1 * height
    z_bottom = min(low[2] + amplitude, z_top - 0.5 * height)
    scale = amplitude / REFERENCE_AMPLITUDE_MM
    n_waves = 4
    directions = rng.standard_normal((n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(80.0, 160.0, n_waves)
    domes = centre[:2] + np.array([[-0.5, 0.1], [0.5, 0.1]]) * half[:2] + rng.uniform(-0.1, 0.1, (2, 2)) * half[:2]
    return BreathingMotion(
        amplitude_mm=float(amplitude),
        centre=centre,
        half_size=half,
        z_top=float(z_top),
        z_bottom=float(z_bottom),
        y_posterior=float(high[1]),
        lr_balance=float(rng.uniform(-0.15, 0.15)),
        ap_gradient=float(rng.uniform(0.15, 0.3)),
        dome_gain=float(rng.uniform(0.6, 1.0)),
        dome_centres=domes,
        dome_radii=np.array([0.5, 1.0]) * half[:2],
        envelope_floor=0.25,
        envelope_width=0.4,
        lr_rate=float(rng.uniform(0.02, 0.035) * scale),
        ap_rate=float(rng.uniform(0.035, 0.05) * scale),
        wave_vectors=directions * (2.0 * np.pi / wavelengths)[:, None],
        wave_phases=rng.uniform(0.0, 2.0 * np.pi, n_waves),
        wave_amplitudes=rng.uniform(-1.5, 1.5, (n_waves, 3)) * scale,
    )


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------


def _affine(image: MetaTensor) -> np.ndarray:
    return np.asarray(torch.as_tensor(image.affine, dtype=torch.float64).cpu(), dtype=np.float64)


def _lps_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel -> LPS mm ``(4, 4)`` from a voxel -> RAS affine."""
    return np.diag([*np.diag(LPS_TO_RAS), 1.0]) @ affine


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def _check_volume(image, name: str = "image") -> MetaTensor:
    if not isinstance(image, MetaTensor):
        raise ValueError(f"{name}: expected a MetaTensor (I, J, K) with its affine, got {type(image).__name__}.")
    if image.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D volume (I, J, K) without channel, got shape {tuple(image.shape)}.")
    if min(image.shape) < 2:
        raise ValueError(f"{name}: every axis needs at least 2 voxels, got shape {tuple(image.shape)}.")
    return image


def _meta_for(image: MetaTensor, affine: np.ndarray, shape: Sequence[int]) -> dict:
    """A copy of ``image``'s metadata with the geometry of a new grid (``affine`` voxel -> RAS)."""
    lps = _lps_affine(affine)
    spacing = _spacing(lps)
    meta = {key: value for key, value in dict(image.meta).items() if key != "affine"}
    meta.update(
        spacing=spacing,
        origin=lps[:3, 3].copy(),
        direction=lps[:3, :3] / spacing,
        original_affine=affine.copy(),
        spatial_shape=np.asarray(shape),
    )
    return meta


def _box_corners_world(low: np.ndarray, high: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World LPS ``(8, 3)`` of the corners of the voxel index box ``[low, high]``."""
    corners = np.array([[(low, high)[(c >> a) & 1][a] for a in range(3)] for c in range(8)], dtype=np.float64)
    return voxel_to_world(corners, affine)


def _lung_box(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS mm bounding box ``(low (3,), high (3,))`` of a mask ``(I, J, K)`` (through its voxel index box)."""
    box = _bounding_box(mask)
    low = np.array([b.start - 0.5 for b in box])
    high = np.array([b.stop - 0.5 for b in box])
    world = _box_corners_world(low, high, affine)
    return world.min(axis=0), world.max(axis=0)


# ----------------------------------------------------------------------------------------------------------
# Box morphology and filters on (I, J, K) numpy arrays (separable, on the bounding box of what matters)
# ----------------------------------------------------------------------------------------------------------


def _radii(mm: float, spacing: np.ndarray) -> list[int]:
    """Half sizes in voxels of a box about ``mm`` in each direction."""
    return [int(round(mm / s)) for s in spacing]


def _bounding_box(mask: np.ndarray, pad: Sequence[int] = (0, 0, 0)) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask (I, J, K)`` (non-empty) grown by ``pad`` voxels, within the volume."""
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(present[0] - pad[axis], 0), min(present[-1] + 1 + pad[axis], mask.shape[axis])))
    return tuple(box)


def _box_filter(mask: np.ndarray, radii: Sequence[int], kind: str, mode: str) -> np.ndarray:
    """Box dilation (``kind="max"``) or erosion (``"min"``) of a bool array; ``mode`` as scipy.ndimage."""
    out = mask.astype(np.uint8)
    filter1d = ndimage.maximum_filter1d if kind == "max" else ndimage.minimum_filter1d
    for axis, radius in enumerate(radii):
        if radius > 0:
            out = filter1d(out, 2 * radius + 1, axis=axis, mode=mode, cval=0)
    return out.astype(bool)


def _erode(mask: np.ndarray, radii: Sequence[int]) -> np.ndarray:
    """Box erosion of a bool ``(I, J, K)``; voxels outside the volume count as outside the mask."""
    out = np.zeros_like(mask)
    if mask.any():
        box = _bounding_box(mask)
        out[box] = _box_filter(mask[box], radii, "min", "constant")
    return out


def _close(mask: np.ndarray, radii: Sequence[int]) -> np.ndarray:
    """Box closing (dilation then erosion) of a bool ``(I, J, K)``, united with the mask itself."""
    out = mask.copy()
    if mask.any():
        box = _bounding_box(mask, [r + 1 for r in radii])
        dilated = _box_filter(mask[box], radii, "max", "nearest")
        out[box] |= _box_filter(dilated, radii, "min", "nearest")
    return out


# ----------------------------------------------------------------------------------------------------------
# Lung mask fallback
# ----------------------------------------------------------------------------------------------------------


def threshold_lung_mask(image: MetaTensor, threshold_hu: float = -400.0, closing_mm: float = 5.0) -> np.ndarray:
    """A simple lung mask ``(I, J, K)`` bool by thresholding (the fallback of :func:`synthetic_breathing_pair`).

    Connected air regions (``< threshold_hu``) that touch the volume's sides (the faces of the two array
    axes other than the one closest to superior-inferior) and are nearly pure air (median below
    ``OUTSIDE_AIR_HU``) are outside the body; lung parenchyma, a mix of air and tissue, has a median near
    -850 HU, so lungs cut by a crop stay. Of the rest the largest region, and the second largest when it
    holds at least a fifth as many voxels, are the lungs. A box closing of ``closing_mm`` fills vessels.
    Good enough for a lung bounding box and landmark placement (not for emphysematous lungs, whose median
    can fall below ``OUTSIDE_AIR_HU``); pass a proper segmentation for anything else.

    Raises:
        ValueError: no lung-like air region.
    """
    image = _check_volume(image)
    affine = _affine(image)
    hu = image.as_tensor().detach().cpu().float().numpy()
    labels, count = ndimage.label(hu < threshold_hu)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    si_axis = int(np.argmax(np.abs(affine[2, :3]) / _spacing(affine)))
    sides = set()
    for axis in (a for a in range(3) if a != si_axis):
        for index in (0, hu.shape[axis] - 1):
            sides.update(np.unique(np.take(labels, index, axis=axis)).tolist())
    step = max(1, hu.size // 2_000_000)  # medians from a regular subsample
    sample_labels, sample_hu = labels.ravel()[::step], hu.ravel()[::step]
    for label in np.argsort(sizes)[::-1][:8]:
        if label in sides and sizes[label] > 0:
            values = sample_hu[sample_labels == label]
            if values.size == 0 or np.median(values) < OUTSIDE_AIR_HU:
                sizes[label] = 0
    if sizes.max() == 0:
        raise ValueError(f"no lung-like region below {threshold_hu} HU found; pass lung_mask=.")
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] + ([order[1]] if count > 1 and sizes[order[1]] >= 0.2 * sizes[order[0]] else [])
    return _close(np.isin(labels, keep), _radii(closing_mm, _spacing(affine)))


# ----------------------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------------------


def downsample_ct(
    image: MetaTensor, factor: int | Sequence[int] | None = None, *, spacing_mm: float | Sequence[float] | None = None
) -> MetaTensor:
    """Average blocks of ``factor`` voxels (per axis ``I, J, K``): a smaller CT for fast tests, float32.

    Give either ``factor`` (int or 3 ints) or a target ``spacing_mm`` (mm or 3 mm; the factor per axis is
    ``max(1, round(spacing_mm / spacing))``). Output voxel ``a`` is the mean of input voxels
    ``a f .. a f + f - 1`` (after dropping ``n mod f`` voxels, split evenly between both ends), and its
    affine puts it at their centre: ``affine_out = affine @ [[diag(f), start + (f - 1) / 2], [0, 1]]``.
    The world extent and centre are kept exactly when every axis divides (``n mod f`` even: centre kept).
    The metadata geometry (``spacing``, ``origin``, ``direction``, ``original_affine``) is the new grid's.

    Raises:
        ValueError: not a 3-D ``MetaTensor``, neither or both of ``factor`` / ``spacing_mm``, a factor < 1,
            or a factor larger than the axis.
    """
    image = _check_volume(image)
    affine = _affine(image)
    if (factor is None) == (spacing_mm is None):
        raise ValueError("downsample_ct: give exactly one of factor= or spacing_mm=.")
    if factor is not None:
        factors = np.broadcast_to(np.asarray(factor), (3,))
        if not np.all(np.equal(np.mod(factors, 1), 0)) or np.any(factors < 1):
            raise ValueError(f"downsample_ct: factors must be integers >= 1, got {factor!r}.")
    else:
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if not np.all(np.isfinite(target)) or np.any(target <= 0):
            raise ValueError(f"downsample_ct: spacing_mm must be positive, got {spacing_mm!r}.")
        factors = np.maximum(1, np.round(target / _spacing(affine)))
    factors = factors.astype(int)
    shape = np.asarray(image.shape)
    if np.any(factors > shape):
        raise ValueError(f"downsample_ct: factors {factors.tolist()} exceed the volume shape {shape.tolist()}.")
    out_shape = shape // factors
    start = (shape - out_shape * factors) // 2
    crop = (
        image.as_tensor()
        .detach()
        .float()[tuple(slice(s, s + n * f) for s, n, f in zip(start, out_shape, factors, strict=True))]
    )
    data = F.avg_pool3d(crop[None, None], tuple(factors.tolist()), stride=tuple(factors.tolist()))[0, 0]
    step = np.eye(4)
    step[:3, :3] = np.diag(factors.astype(np.float64))
    step[:3, 3] = start + (factors - 1) / 2.0
    new_affine = affine @ step
    return MetaTensor(
        data.contiguous(),
        affine=torch.as_tensor(new_affine, dtype=torch.float64),
        meta=_meta_for(image, new_affine, data.shape),
    )


def _lung_side_box(mask: np.ndarray, lps: np.ndarray, side: str | None, margin_mm: float) -> np.ndarray:
    """``(2, 3)`` LPS mm low / high corners of the lungs (``side``: ``"right"``, ``"left"`` or ``None`` for
    both), grown by ``margin_mm``. Patient right is LPS ``-x``; the sides split at the lungs' mid-x."""
    index = np.argwhere(mask)
    world = index @ lps[:3, :3].T + lps[:3, 3]
    if side is not None:
        middle = (world[:, 0].min() + world[:, 0].max()) / 2.0
        world = world[world[:, 0] < middle] if side == "right" else world[world[:, 0] >= middle]
    return np.stack((world.min(axis=0) - margin_mm, world.max(axis=0) + margin_mm))


def resample_ct(
    image: MetaTensor, spacing_mm: Sequence[float], box_lps: np.ndarray | None = None, fill_hu: float = AIR_HU
) -> MetaTensor:
    """``image`` resampled to voxels of ``spacing_mm`` (per array axis) over ``box_lps`` ((2, 3) LPS mm corners;
    default the whole image), keeping its axis directions: what a scanner with that geometry would give.

    Axes made coarser are first blurred by a Gaussian whose width makes up the difference in resolution
    (FWHM ``sqrt(new^2 - old^2)``), as a thicker slice integrates over more tissue; trilinear sampling,
    ``fill_hu`` outside the image.
    """
    image = _check_volume(image)
    affine = _affine(image)
    lps = _lps_affine(affine)
    old = _spacing(lps)
    new = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    shape = np.asarray(image.shape)
    if box_lps is None:
        start, stop = np.zeros(3), shape - 1.0
    else:
        corners = np.array(
            [[box_lps[a][0], box_lps[b][1], box_lps[c][2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        )
        voxels = (corners - lps[:3, 3]) @ np.linalg.inv(lps[:3, :3]).T
        start, stop = np.clip(voxels.min(axis=0), 0, shape - 1), np.clip(voxels.max(axis=0), 0, shape - 1)
    out_shape = np.maximum(2, np.floor((stop - start) * old / new).astype(int) + 1)
    step = np.eye(4)
    step[:3, :3] = np.diag(new / old)
    step[:3, 3] = start
    out_affine = affine @ step
    blur = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / (2.3548 * old)
    data = image.as_tensor().detach().float()
    if np.any(blur > 0.1):
        data = torch.from_numpy(ndimage.gaussian_filter(data.cpu().numpy(), blur, mode="nearest"))
    axes = [torch.arange(n, dtype=torch.float64) * (new[a] / old[a]) + start[a] for a, n in enumerate(out_shape)]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    normalised = voxels * torch.as_tensor(2.0 / (shape - 1.0)) - 1.0
    grid = normalised.flip(-1).float()[None]
    values = F.grid_sample((data - fill_hu)[None, None], grid, mode="bilinear", align_corners=True)[0, 0] + fill_hu
    return MetaTensor(
        values.contiguous(),
        affine=torch.as_tensor(out_affine, dtype=torch.float64),
        meta=_meta_for(image, out_affine, values.shape),
    )


def _resample_mask(mask: np.ndarray, source: MetaTensor, target: MetaTensor) -> np.ndarray:
    """A boolean mask on the grid of ``source`` resampled (nearest) onto the grid of ``target``."""
    to_source = np.linalg.inv(_affine(source)) @ _affine(target)
    voxels = np.stack(np.meshgrid(*(np.arange(n) for n in target.shape), indexing="ij"), axis=-1)
    index = np.rint(voxels @ to_source[:3, :3].T + to_source[:3, 3]).astype(int)
    inside = np.all((index >= 0) & (index < np.asarray(mask.shape)), axis=-1)
    out = np.zeros(target.shape, dtype=bool)
    clipped = np.clip(index, 0, np.asarray(mask.shape) - 1)
    out[inside] = mask[tuple(clipped[inside].T)]
    return out


def _inside(points_lps: np.ndarray, image: MetaTensor, margin_voxels: float = 0.5) -> np.ndarray:
    lps = _lps_affine(_affine(image))
    voxels = (points_lps - lps[:3, 3]) @ np.linalg.inv(lps[:3, :3]).T
    return np.all((voxels >= margin_voxels) & (voxels <= np.asarray(image.shape) - 1 - margin_voxels), axis=1)


def scanner_pair(
    pair: SyntheticPair, spacing_mm: Sequence[float], side: str | None = None, margin_mm: float = 15.0
) -> SyntheticPair:
    """The pair as two scans of their own: each image cropped to its own lungs (``side``: ``"right"``,
    ``"left"`` or ``None`` for both) plus ``margin_mm``, and resampled to ``spacing_mm`` (e.g. 2.5 mm slices).

    Fixed and moving then have different grids (origins and shapes), like a real baseline / follow-up pair.
    The landmark pairs are kept where both points lie inside their images; their world coordinates (and so
    the correspondences) are unchanged. The lung masks are resampled (nearest).
    """
    if side not in (None, "right", "left"):
        raise ValueError(f"side must be 'right', 'left' or None, got {side!r}.")
    images, masks = {}, {}
    for name in ("fixed", "moving"):
        image, mask = getattr(pair, name), getattr(pair, f"{name}_lung_mask")
        box = _lung_side_box(mask, _lps_affine(_affine(image)), side, margin_mm)
        images[name] = resample_ct(image, spacing_mm, box)
        masks[name] = _resample_mask(mask, image, images[name])
    keep = _inside(pair.fixed_landmarks, images["fixed"]) & _inside(pair.moving_landmarks, images["moving"])
    parameters = dict(
        pair.parameters,
        scanner={
            "spacing_mm": list(map(float, np.broadcast_to(spacing_mm, (3,)))),
            "side": side,
            "margin_mm": float(margin_mm),
        },
    )
    return SyntheticPair(
        fixed=images["fixed"],
        moving=images["moving"],
        fixed_landmarks=pair.fixed_landmarks[keep],
        moving_landmarks=pair.moving_landmarks[keep],
        rigid=pair.rigid,
        breathing=pair.breathing,
        fixed_lung_mask=masks["fixed"],
        moving_lung_mask=masks["moving"],
        parameters=parameters,
    )


@dataclass
class _Rendered:
    moving: torch.Tensor  # (I, J, K) float32, noise-free
    lung: torch.Tensor  # (I, J, K) bool: psi(y) in the fixed lung mask
    candidates: torch.Tensor  # (I, J, K) bool: psi(y) well inside the eroded fixed lung mask


def _rows(matrix: np.ndarray, offset: np.ndarray) -> list[tuple[float, float, float, float]]:
    """``(a, b, c, d)`` per output row of ``v -> matrix @ v + offset``, as python floats."""
    return [(*matrix[row].tolist(), float(offset[row])) for row in range(3)]


def _render(
    fixed: torch.Tensor,
    mask_code: torch.Tensor,
    lps: np.ndarray,
    rigid: RigidMotion,
    breathing: BreathingMotion,
    density_change: bool,
    outside_hu: float | None,
) -> _Rendered:
    """``moving(y) = fixed(psi(y))`` (with the density change) on the fixed grid, slab by slab, float32.

    ``mask_code (I, J, K)``: lung mask + eroded lung mask (0, 1 or 2), sampled alongside the image: its
    trilinear value ``v`` at ``psi(y)`` gives the lung weight ``clip(v, 0, 1)`` and the landmark candidates
    ``v >= 1.999`` (all eight neighbours in the eroded mask).
    """
    shape = tuple(fixed.shape)
    fill = AIR_HU if outside_hu is None else float(outside_hu)
    stack = torch.stack((fixed - fill, mask_code.float()))[None]
    # moving voxel index -> T(world): one affine map; fixed LPS -> normalised grid coordinate: another
    rotation = rigid.matrix
    centre, offset = np.asarray(rigid.centre), np.asarray(rigid.offset_mm)
    to_rigid = _rows(rotation @ lps[:3, :3], rotation @ (lps[:3, 3] - centre) + centre + offset)
    inverse = np.linalg.inv(lps)
    scale = 2.0 / (np.asarray(shape) - 1.0)
    to_grid = _rows(scale[:, None] * inverse[:3, :3], scale * inverse[:3, 3] - 1.0)
    device = fixed.device
    j = torch.arange(shape[1], dtype=torch.float32, device=device)[:, None]
    k = torch.arange(shape[2], dtype=torch.float32, device=device)[None, :]
    planes = [b * j + c * k + d for _, b, c, d in to_rigid]  # (J, K) each
    padding = "border" if outside_hu is None else "zeros"
    low, high = PARENCHYMA_HU
    moving = torch.empty(shape, dtype=torch.float32, device=device)
    lung = torch.empty(shape, dtype=torch.bool, device=device)
    candidates = torch.empty(shape, dtype=torch.bool, device=device)
    chunk = CHUNK_VOXELS if device.type == "cpu" else 64 * CHUNK_VOXELS
    step = max(1, chunk // (shape[1] * shape[2]))
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        i = torch.arange(start, stop, dtype=torch.float32, device=device)[:, None, None]
        rigid_xyz = [plane + row[0] * i for plane, row in zip(planes, to_rigid, strict=True)]  # (n, J, K)
        mapped = [p + u for p, u in zip(rigid_xyz, breathing.components(*rigid_xyz), strict=True)]
        grid = [a * mapped[0] + b * mapped[1] + c * mapped[2] + d for a, b, c, d in to_grid]
        grid = torch.stack(grid[::-1], dim=-1)[None]  # (1, n, J, K, 3) as (k, j, i)
        values = F.grid_sample(stack, grid, mode="bilinear", padding_mode=padding, align_corners=True)[0]
        hu, code = values[0] + fill, values[1]
        if density_change:
            weight = code.clamp(0.0, 1.0) * ((high - hu) * (1.0 / (high - low))).clamp(0.0, 1.0)
            active = weight > 0
            if active.any():
                jacobian = breathing.jacobian_components(*(c[active] for c in rigid_xyz))
                hu[active] += weight[active] * (hu[active] - AIR_HU).clamp(min=0.0) * (jacobian - 1.0)
        moving[start:stop] = hu
        lung[start:stop] = code >= 0.5
        candidates[start:stop] = code >= 1.999
    return _Rendered(moving, lung, candidates)


# ----------------------------------------------------------------------------------------------------------
# Landmarks
# ----------------------------------------------------------------------------------------------------------


def _greedy_spaced(points: np.ndarray, order: np.ndarray, chosen: list[int], distance: float, n: int) -> None:
    """Append to ``chosen`` indices of ``points (M, 3)`` in ``order``, each ``>= distance`` from the others."""
    if distance > 0:
        tree = cKDTree(points)
        blocked = np.zeros(len(points), dtype=bool)
        if chosen:
            for near in tree.query_ball_point(points[chosen], distance):
                blocked[near] = True
    else:
        blocked = np.zeros(len(points), dtype=bool)
        blocked[chosen] = True
    for index in order:
        if len(chosen) >= n:
            return
        if blocked[index]:
            continue
        chosen.append(int(index))
        if distance > 0:
            blocked[tree.query_ball_point(points[index], distance)] = True
        blocked[index] = True


def _select_landmarks(
    moving: np.ndarray,
    candidates: np.ndarray,
    affine: np.ndarray,
    n: int,
    min_distance_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Voxel indices ``(n, 3)`` of the moving grid among ``candidates (I, J, K)`` bool.

    Vessel-like points first: local maxima (3 x 3 x 3 voxels) of ``moving (I, J, K)`` at least
    ``VESSEL_HU`` bright and ``VESSEL_CONTRAST_HU`` above their surrounding mean (a box of about 3 mm), in a
    random order, kept ``min_distance_mm`` apart; then, when too few, any candidate voxels, the spacing halved
    until enough are found.

    Raises:
        ValueError: fewer than ``n`` candidate voxels.
    """
    available = int(candidates.sum())
    if available < n:
        raise ValueError(
            f"n_landmarks={n} but only {available} moving voxels map well inside the fixed lung mask "
            "(away from its border by margin_mm); ask for fewer landmarks, a smaller margin_mm or a larger image."
        )
    box = _bounding_box(candidates, (1, 1, 1))
    volume, inside = moving[box], candidates[box]
    sizes = [2 * max(r, 1) + 1 for r in _radii(3.0, _spacing(affine))]
    contrast = volume - ndimage.uniform_filter(volume, sizes, mode="nearest")
    peaks = volume >= ndimage.maximum_filter(volume, 3, mode="nearest")
    distinct = inside & peaks & (volume >= VESSEL_HU) & (contrast >= VESSEL_CONTRAST_HU)
    corner = np.array([b.start for b in box])
    vessels = np.argwhere(distinct) + corner
    others = np.argwhere(inside & ~distinct) + corner
    keep = max(50 * n, 20000)
    if len(others) > keep:
        others = others[np.sort(rng.choice(len(others), keep, replace=False))]
    voxels = np.concatenate((vessels, others))
    world = voxel_to_world(voxels, affine)
    vessel_order = rng.permutation(len(vessels))
    every_order = np.concatenate((vessel_order, len(vessels) + rng.permutation(len(others))))
    chosen: list[int] = []
    _greedy_spaced(world, vessel_order, chosen, min_distance_mm, n)
    distance = min_distance_mm
    while len(chosen) < n:
        _greedy_spaced(world, every_order, chosen, distance, n)
        distance = distance / 2.0 if distance > 0.5 else 0.0
    return voxels[np.asarray(chosen)]


# ----------------------------------------------------------------------------------------------------------
# The pair
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SyntheticPair:
    """A synthetic breathing pair made from one CT (see the module notes for ``psi``).

    Attributes:
        fixed: the input CT (inhale) as float32, ``(I, J, K)``, its geometry unchanged.
        moving: the synthetic exhale, same shape and affine as ``fixed``: ``moving(y) = fixed(psi(y))``.
        fixed_landmarks: ``(N, 3)`` world LPS mm, ``psi(moving_landmarks)``.
        moving_landmarks: ``(N, 3)`` world LPS mm, the same anatomical points in ``moving`` (voxel centres).
        rigid, breathing: the two parts of ``psi = breathing o rigid``.
        fixed_lung_mask: ``(I, J, K)`` bool, the lung mask used (given or :func:`threshold_lung_mask`).
        moving_lung_mask: ``(I, J, K)`` bool, ``fixed_lung_mask(psi(y)) >= 0.5`` (trilinear).
        parameters: the arguments of :func:`synthetic_breathing_pair` (JSON-ready).
    """

    fixed: MetaTensor
    moving: MetaTensor
    fixed_landmarks: np.ndarray
    moving_landmarks: np.ndarray
    rigid: RigidMotion
    breathing: BreathingMotion
    fixed_lung_mask: np.ndarray
    moving_lung_mask: np.ndarray
    parameters: dict = field(default_factory=dict)

    def psi(self, points: Array) -> Array:
        """Moving (exhale) LPS mm points ``(..., 3)`` -> the corresponding fixed (inhale) points."""
        return self.breathing(self.rigid(points))

    def initial_errors(self) -> np.ndarray:
        """``|fixed_landmarks - moving_landmarks|`` ``(N,)`` mm: the TRE before registration."""
        return np.linalg.norm(self.fixed_landmarks - self.moving_landmarks, axis=1)


def _check_vector(name: str, value) -> tuple[float, float, float]:
    vector = np.asarray(value, dtype=np.float64)
    if vector.shape != (3,) or not np.all(np.isfinite(vector)):
        raise ValueError(f"{name}: expected three finite numbers (LPS x, y, z), got {value!r}.")
    return tuple(float(v) for v in vector)


def _check_number(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {value!r}.")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}: expected a finite number >= {minimum}, got {value!r}.")
    return float(value)


def _check_mask(lung_mask, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(lung_mask.detach().cpu() if isinstance(lung_mask, torch.Tensor) else lung_mask)
    if mask.shape != shape:
        raise ValueError(f"lung_mask: expected the image's shape {shape}, got {mask.shape}.")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("lung_mask is empty.")
    return mask


def _check_jacobian(breathing: BreathingMotion, rigid: RigidMotion, shape: Sequence[int], lps: np.ndarray) -> None:
    """Raise unless ``J_B > MIN_JACOBIAN`` on a grid (about 8 mm, at most 24 points per axis) over the image."""
    spacing = _spacing(lps)
    axes = [
        np.linspace(0, n - 1, int(min(24, max(2, math.ceil((n - 1) * s / 8.0)))))
        for n, s in zip(shape, spacing, strict=True)
    ]
    voxels = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    points = voxels @ lps[:3, :3].T + lps[:3, 3]
    jacobian = breathing.jacobian_determinant(rigid(points))
    if jacobian.min() <= MIN_JACOBIAN:
        raise ValueError(
            f"the breathing map folds (min Jacobian {jacobian.min():.3f}) at amplitude {breathing.amplitude_mm} mm "
            f"for a lung {2 * breathing.half_size[2]:.0f} mm high; use a smaller amplitude_mm."
        )


def synthetic_breathing_pair(
    image: MetaTensor,
    lung_mask: np.ndarray | torch.Tensor | None = None,
    *,
    amplitude_mm: float = 15.0,
    offset_mm: Sequence[float] = (20.0, -15.0, 15.0),
    rotation_deg: Sequence[float] = (3.0, -2.0, 2.0),
    n_landmarks: int = 100,
    density_change: bool = True,
    sliding: float = 0.0,
    noise_hu: float = 10.0,
    margin_mm: float = 5.0,
    min_distance_mm: float = 10.0,
    outside_hu: float | None = AIR_HU,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> SyntheticPair:
    """Make a synthetic exhale image of ``image`` (inhale CT, HU) with exact landmark pairs.

    Args:
        image: ``MetaTensor (I, J, K)`` in HU, affine voxel -> RAS (as ``ct_io.read_ct`` gives it).
        lung_mask: ``(I, J, K)`` bool lungs of ``image``; default :func:`threshold_lung_mask`.
        amplitude_mm: superior-inferior breathing motion at the lung base (``A``, >= 0).
        offset_mm: rigid translation ``t`` (LPS mm) of ``psi``; about 30 mm long by default.
        rotation_deg: rigid rotation about the LPS x, y, z axes through the lung centre.
        n_landmarks: number of landmark pairs.
        density_change: mass-preserving lung density change (the exhale lung is denser).
        sliding: share of the superior-inferior breathing motion that the tissue around the lungs loses
            (0: none, the default; 0.7: the chest wall moves 30 % as much as the lungs beside it), so that
            the lungs slide along the chest wall (:class:`SlidingWeight`).
        noise_hu: standard deviation of Gaussian noise added to the moving image (0: none).
        margin_mm: landmarks map at least about this far inside the fixed lung mask.
        min_distance_mm: preferred minimum spacing of the landmarks (relaxed when the lungs are too small).
        outside_hu: value of moving voxels mapped outside the fixed volume; ``None``: nearest edge value.
        seed: draws the breathing details, the landmark choice and the noise; same seed, same pair.
        device: where to resample (e.g. ``"cuda"``); default the image's device. The pair's images are
            on the image's device, masks and landmarks in numpy.

    Returns:
        :class:`SyntheticPair` (float32 images, float64 landmarks).

    Raises:
        ValueError: not a 3-D ``MetaTensor``; a lung mask of another shape or empty; bad numbers; a folding
            breathing map; fewer lung voxels than ``n_landmarks``.
    """
    image = _check_volume(image)
    amplitude = _check_number("amplitude_mm", amplitude_mm)
    offset, rotation = _check_vector("offset_mm", offset_mm), _check_vector("rotation_deg", rotation_deg)
    if isinstance(n_landmarks, bool) or not isinstance(n_landmarks, (int, np.integer)) or n_landmarks < 1:
        raise ValueError(f"n_landmarks: expected an integer >= 1, got {n_landmarks!r}.")
    noise = _check_number("noise_hu", noise_hu)
    sliding = _check_number("sliding", sliding)
    if sliding > 1.0:
        raise ValueError(f"sliding: expected a share between 0 and 1, got {sliding!r}.")
    margin = _check_number("margin_mm", margin_mm)
    min_distance = _check_number("min_distance_mm", min_distance_mm)
    if outside_hu is not None:
        outside_hu = _check_number("outside_hu", outside_hu, minimum=-math.inf)
    shape = tuple(image.shape)
    mask = threshold_lung_mask(image) if lung_mask is None else _check_mask(lung_mask, shape)
    affine = _affine(image)
    lps = _lps_affine(affine)
    rng = np.random.default_rng(seed)
    low, high = _lung_box(mask, affine)
    breathing = _draw_breathing(rng, (low, high), amplitude)
    if sliding > 0:
        breathing = dataclasses.replace(breathing, sliding=_sliding_weight(mask, lps, sliding))
    rigid = RigidMotion(rotation, offset, tuple(float(v) for v in (low + high) / 2.0))
    _check_jacobian(breathing, rigid, shape, lps)

    fixed = image.as_tensor().detach().float().contiguous()
    work = fixed if device is None else fixed.to(device)
    code = torch.from_numpy(mask.astype(np.uint8) + _erode(mask, _radii(margin, _spacing(lps)))).to(work.device)
    rendered = _render(work, code, lps, rigid, breathing, density_change, outside_hu)
    voxels = _select_landmarks(
        rendered.moving.cpu().numpy(), rendered.candidates.cpu().numpy(), affine, int(n_landmarks), min_distance, rng
    )
    moving_landmarks = voxel_to_world(voxels.astype(np.float64), affine)
    moving = rendered.moving
    if noise > 0:
        generator = torch.Generator().manual_seed(int(seed))
        moving = moving + noise * torch.randn(shape, generator=generator).to(moving.device)
    moving = moving.to(fixed.device)
    parameters = {
        "amplitude_mm": amplitude,
        "offset_mm": list(offset),
        "rotation_deg": list(rotation),
        "n_landmarks": int(n_landmarks),
        "density_change": bool(density_change),
        "sliding": sliding,
        "noise_hu": noise,
        "margin_mm": margin,
        "min_distance_mm": min_distance,
        "outside_hu": outside_hu,
        "seed": int(seed),
    }
    pair = SyntheticPair(
        fixed=MetaTensor(fixed, affine=torch.as_tensor(affine), meta=_meta_for(image, affine, shape)),
        moving=MetaTensor(moving, affine=torch.as_tensor(affine), meta=_meta_for(image, affine, shape)),
        fixed_landmarks=np.empty((0, 3)),
        moving_landmarks=moving_landmarks,
        rigid=rigid,
        breathing=breathing,
        fixed_lung_mask=mask,
        moving_lung_mask=rendered.lung.cpu().numpy(),
        parameters=parameters,
    )
    pair.fixed_landmarks = pair.psi(moving_landmarks)
    return pair


def _motion_json(pair: SyntheticPair) -> dict:
    def plain(value):
        return value.tolist() if isinstance(value, np.ndarray) else value

    breathing = {
        name: plain(getattr(pair.breathing, name)) for name in pair.breathing.__dataclass_fields__ if name != "sliding"
    }
    breathing["sliding_strength"] = pair.breathing.sliding.strength if pair.breathing.sliding else 0.0
    rigid = {name: plain(getattr(pair.rigid, name)) for name in pair.rigid.__dataclass_fields__}
    return {
        "parameters": pair.parameters,
        "rigid": rigid,
        "breathing": breathing,
        "convention": "psi(y) = B(T(y)), LPS mm",
    }


def write_pair(pair: SyntheticPair, folder: str | os.PathLike) -> dict[str, Path]:
    """Write a pair into ``folder`` (created), every file atomically; returns ``{name: path}``.

    ``fixed.nii.gz`` / ``moving.nii.gz`` (float32, through ``ct_io.write_image``), ``fixed_lung_mask.nii.gz``
    / ``moving_lung_mask.nii.gz`` (uint8), ``fixed_landmarks.csv`` / ``moving_landmarks.csv`` (world LPS mm,
    ``landmarks.write_landmarks_csv``) and ``motion.json`` (the parameters of ``psi``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        name: folder / f"{name}{suffix}"
        for name, suffix in (
            ("fixed", ".nii.gz"),
            ("moving", ".nii.gz"),
            ("fixed_lung_mask", ".nii.gz"),
            ("moving_lung_mask", ".nii.gz"),
            ("fixed_landmarks", ".csv"),
            ("moving_landmarks", ".csv"),
            ("motion", ".json"),
        )
    }
    affine = _affine(pair.fixed)
    write_image(paths["fixed"], pair.fixed)
    write_image(paths["moving"], pair.moving)
    write_image(paths["fixed_lung_mask"], pair.fixed_lung_mask.astype(np.uint8), affine=affine)
    write_image(paths["moving_lung_mask"], pair.moving_lung_mask.astype(np.uint8), affine=affine)
    write_landmarks_csv(paths["fixed_landmarks"], pair.fixed_landmarks)
    write_landmarks_csv(paths["moving_landmarks"], pair.moving_landmarks)
    text = json.dumps(_motion_json(pair), indent=2)
    atomic_write(paths["motion"], lambda tmp: tmp.write_text(text + "\n"))
    return paths
