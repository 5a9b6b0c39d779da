"""Properties of displacement fields ``ddf (3, D, H, W)`` in voxels (channel ``c`` along array axis ``c``)."""

from __future__ import annotations

import numpy as np

__all__ = ["folding_fraction", "jacobian_determinant"]


def jacobian_determinant(ddf: np.ndarray, slab: int = 16) -> np.ndarray:
    """``det(I + grad ddf)`` of the transform ``x -> x + ddf(x)`` per voxel, by central differences.

    The determinant does not depend on the voxel spacing (``I + S G S^-1`` is similar to ``I + G``), so
    voxel units suffice. Returns ``(D, H, W)``: values <= 0 mean folding, < 1 local compression; float32 for a
    float32 field, float64 otherwise. Computed ``slab`` planes at a time (with the one-plane halo the
    differences read), so that the nine derivative volumes are never held for the whole field.
    """
    ddf = np.asarray(ddf)
    ddf = ddf if ddf.dtype == np.float32 else ddf.astype(np.float64)
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"ddf: expected shape (3, D, H, W), got {ddf.shape}")
    depth = ddf.shape[1]
    out = np.empty(ddf.shape[1:], dtype=ddf.dtype)
    for start in range(0, depth, slab):
        stop = min(start + slab, depth)
        low, high = max(0, start - 1), min(depth, stop + 1)
        part = ddf[:, low:high]
        if part.shape[1] < 2:  # a single plane: no difference along it
            grads = [[np.zeros_like(part[i]), *np.gradient(part[i], axis=(1, 2))] for i in range(3)]
        else:
            grads = [list(np.gradient(part[i], axis=(0, 1, 2))) for i in range(3)]
        m = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
        det = (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )
        out[start:stop] = det[start - low : start - low + stop - start]
    return out


def folding_fraction(ddf: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of voxels (inside ``mask`` if given) where the Jacobian determinant is <= 0."""
    jacobian = jacobian_determinant(ddf)
    values = jacobian if mask is None else jacobian[np.asarray(mask, dtype=bool)]
    return float((values <= 0).mean()) if values.size else 0.0
