"""Landmark files, voxel <-> world conversion and target registration error (TRE).

Conventions (stated once for the package):

* World coordinates are millimetres in the ITK / DICOM **LPS** frame (x: patient right -> left,
  y: anterior -> posterior, z: inferior -> superior), the frame of ITK, elastix and 3D Slicer's files.
* Image geometry is MONAI's: a ``MetaTensor`` affine maps a voxel index ``(i, j, k)`` (0-based, array
  axis order of the tensor) to **RAS** millimetres. ``LPS = diag(-1, -1, 1) @ RAS``.
* Voxel landmarks are ``(N, 3)`` float coordinates in the array axis order of the tensor they belong
  to, so that a displacement field ``ddf (3, D, H, W)`` (channel ``c`` = axis ``c``, MONAI ``Warp``
  convention: ``warped(x) = moving(x + ddf(x))``) carries a fixed-image landmark ``p`` to the
  moving-image point ``p + ddf(p)``.

Landmark CSV files hold one point per row with the header ``x,y,z`` (world LPS mm).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rrn_lung_registration.io_utils import atomic_write

__all__ = [
    "LPS_TO_RAS",
    "landmark_errors",
    "read_landmarks_csv",
    "sample_field",
    "summarize_errors",
    "voxel_to_world",
    "world_to_voxel",
    "write_landmarks_csv",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CSV_HEADER = ("x", "y", "z")


def read_landmarks_csv(path: str | os.PathLike) -> np.ndarray:
    """Read a landmark CSV (header ``x,y,z``, world LPS mm): ``(N, 3)`` float64."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: landmark file not found.")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows or tuple(cell.strip().lower() for cell in rows[0]) != CSV_HEADER:
        raise ValueError(f"{path}: expected a CSV with the header 'x,y,z' (world LPS millimetres).")
    try:
        points = np.array([[float(cell) for cell in row] for row in rows[1:]], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{path}: every landmark row must hold three numbers ({error}).") from None
    if points.size == 0 or points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
        raise ValueError(f"{path}: expected one or more rows of three finite numbers, got shape {points.shape}.")
    return points


def write_landmarks_csv(path: str | os.PathLike, points: np.ndarray) -> None:
    """Write world LPS mm points ``(N, 3)`` as a landmark CSV (atomically)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows([[f"{v:.6f}" for v in row] for row in points])

    atomic_write(Path(path), write)


def _affine(affine) -> np.ndarray:
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu(), dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"expected a (4, 4) voxel-to-RAS affine, got shape {affine.shape}.")
    return affine


def world_to_voxel(points: np.ndarray, affine) -> np.ndarray:
    """World LPS mm ``(N, 3)`` -> voxel coordinates ``(N, 3)`` of an image with voxel-to-RAS ``affine``."""
    ras = np.asarray(points, dtype=np.float64).reshape(-1, 3) @ LPS_TO_RAS
    inverse = np.linalg.inv(_affine(affine))
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def voxel_to_world(voxels: np.ndarray, affine) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` -> world LPS mm ``(N, 3)`` for an image with voxel-to-RAS ``affine``."""
    matrix = _affine(affine)
    ras = np.asarray(voxels, dtype=np.float64).reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
    return ras @ LPS_TO_RAS


def sample_field(field: torch.Tensor, points: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``field (C, D, H, W)`` at voxel ``points (N, 3)``; border values outside.

    Returns ``(N, C)`` in float64.
    """
    if field.ndim != 4:
        raise ValueError(f"expected a field (C, D, H, W), got shape {tuple(field.shape)}.")
    field = field.detach().to(torch.float64)
    points = torch.as_tensor(points, dtype=torch.float64, device=field.device).reshape(-1, 3)
    size = torch.tensor(field.shape[1:], dtype=torch.float64, device=field.device)
    points = torch.minimum(torch.clamp(points, min=0), size - 1)
    low = torch.minimum(points.floor(), size - 2).clamp(min=0).long()
    frac = points - low
    values = torch.zeros(points.shape[0], field.shape[0], dtype=torch.float64, device=field.device)
    for corner in range(8):
        offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=field.device)
        index = torch.minimum(low + offset, size.long() - 1)
        weight = torch.where(offset.bool(), frac, 1 - frac).prod(dim=1)
        values += weight[:, None] * field[:, index[:, 0], index[:, 1], index[:, 2]].T
    return values


def landmark_errors(
    ddf: torch.Tensor | None,
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    moving_affine,
    snap_to_voxel: bool = False,
) -> np.ndarray:
    """TRE per landmark pair in mm.

    Each fixed landmark ``p`` is carried to ``p + ddf(p)`` in the moving image's voxel grid and compared,
    in world millimetres, with its moving landmark.

    Args:
        ddf: ``(3, D, H, W)`` displacement in voxels (``None``: before registration, ``ddf = 0``).
        fixed_points: ``(N, 3)`` voxel coordinates in the fixed image.
        moving_points: ``(N, 3)`` voxel coordinates in the moving image.
        moving_affine: voxel-to-RAS affine ``(4, 4)`` of the moving image grid the field points into.
        snap_to_voxel: DIR-Lab style: the fixed landmark is rounded to its nearest voxel, the field read
            there, and the carried point rounded to a voxel before measuring.
    """
    fixed = np.asarray(fixed_points, dtype=np.float64).reshape(-1, 3)
    moving = np.asarray(moving_points, dtype=np.float64).reshape(-1, 3)
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving landmarks differ in number: {len(fixed)} vs {len(moving)}.")
    start = np.rint(fixed) if snap_to_voxel else fixed
    carried = start if ddf is None else start + sample_field(ddf, start).cpu().numpy()
    if snap_to_voxel:
        carried = np.rint(carried)
    linear = _affine(moving_affine)[:3, :3]
    return np.linalg.norm((carried - moving) @ linear.T, axis=1)


def summarize_errors(errors: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"mean", "std", "p95", "max", "count"}`` of per-landmark errors in mm."""
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("no landmark errors to summarise.")
    return {
        "mean": float(errors.mean()),
        "std": float(errors.std()),
        "p95": float(np.percentile(errors, 95)),
        "max": float(errors.max()),
        "count": int(errors.size),
    }
