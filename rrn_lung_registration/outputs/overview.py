"""A PNG overview of one registration: images, differences, field magnitude and Jacobian determinant.

Every panel is the same slice through volumes on the fixed image's grid, ``(D, H, W)`` arrays in RAS
orientation (the bundle's preprocessing), with the displacement ``ddf (3, D, H, W)`` in voxels of that grid
(channel ``c`` along axis ``c``). Slices are shown with the last remaining axis vertical and its high end
(superior, for a RAS coronal or sagittal slice) at the top.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rrn_lung_registration.fields import jacobian_determinant
from shared_ops.atomic import atomic_write

__all__ = ["save_overview"]

_LABEL_HEIGHT = 14


def _panel(values: np.ndarray, low: float, high: float, label: str, scale: int) -> Image.Image:
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    image = Image.fromarray((255 * scaled).astype(np.uint8)).resize(
        (values.shape[1] * scale, values.shape[0] * scale), Image.NEAREST
    )
    canvas = Image.new("L", (image.width, image.height + _LABEL_HEIGHT), 0)
    canvas.paste(image, (0, _LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), label, fill=255)
    return canvas


def save_overview(
    path: str | os.PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axis: int = 1,
    index: int | None = None,
    jacobian: np.ndarray | None = None,
) -> Path:
    """Write a two-row PNG of one slice (default: the middle one along ``axis``).

    Row 1: fixed, moving, warped moving. Row 2: |moving - fixed|, |warped - fixed| (same scale), field
    magnitude in mm, Jacobian determinant (0 -> black, 2 -> white; <= 0 is folding). Intensities are shown
    on the fixed image's range. Written atomically. ``jacobian`` ``(D, H, W)``: the determinant map when it
    is already known (otherwise computed from ``ddf``).
    """
    volumes = [np.asarray(v) for v in (fixed, moving, warped)]
    if any(v.shape != volumes[0].shape or v.ndim != 3 for v in volumes) or np.shape(ddf) != (3, *volumes[0].shape):
        raise ValueError(
            "save_overview expects fixed, moving, warped (D, H, W) on one grid and ddf (3, D, H, W); got "
            f"{[v.shape for v in volumes]} and {np.shape(ddf)}."
        )
    index = volumes[0].shape[axis] // 2 if index is None else index

    def cut(volume: np.ndarray, at: int = axis) -> np.ndarray:  # the slice first, then float64
        return np.rot90(np.take(volume, index, axis=at).astype(np.float64))

    fixed_s, moving_s, warped_s = (cut(v) for v in volumes)
    ddf_s = np.stack([cut(component) for component in np.asarray(ddf)])
    magnitude = np.linalg.norm(ddf_s * np.asarray(spacing, float)[:, None, None], axis=0)
    jacobian = cut(jacobian_determinant(ddf) if jacobian is None else np.asarray(jacobian))
    low, high = float(fixed_s.min()), float(fixed_s.max())
    diff_before, diff_after = np.abs(moving_s - fixed_s), np.abs(warped_s - fixed_s)
    diff_high = float(max(diff_before.max(), 1e-6))
    scale = max(1, 256 // max(fixed_s.shape))
    rows = [
        [
            _panel(fixed_s, low, high, "fixed", scale),
            _panel(moving_s, low, high, "moving", scale),
            _panel(warped_s, low, high, "warped moving", scale),
        ],
        [
            _panel(diff_before, 0, diff_high, f"|moving-fixed| {diff_before.mean():.3f}", scale),
            _panel(diff_after, 0, diff_high, f"|warped-fixed| {diff_after.mean():.3f}", scale),
            _panel(magnitude, 0, float(max(magnitude.max(), 1e-6)), f"|u| max {magnitude.max():.1f} mm", scale),
            _panel(jacobian, 0, 2, f"det J {jacobian.min():.2f}..{jacobian.max():.2f}", scale),
        ],
    ]
    width = max(sum(p.width for p in row) for row in rows)
    height = sum(max(p.height for p in row) for row in rows)
    sheet = Image.new("L", (width, height), 0)
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width
        y += max(p.height for p in row)
    path = Path(path)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
