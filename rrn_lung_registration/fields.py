"""Properties of displacement fields ``ddf (3, D, H, W)`` in voxels (channel ``c`` along array axis ``c``)."""

from __future__ import annotations

import numpy as np

__all__ = ["folding_fraction", "jacobian_determinant"]


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """``det(I + grad ddf)`` of the transform ``x -> x + ddf(x)`` per voxel, by central differences.

    The determinant does not depend on the voxel spacing (``I + S G S^-1`` is similar to ``I + G``), so
    voxel units suffice. Returns ``(D, H, W)`` float64: values <= 0 mean folding, < 1 local compression.
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"ddf: expected shape (3, D, H, W), got {ddf.shape}")
    grads = [np.gradient(ddf[i], axis=(0, 1, 2)) for i in range(3)]
    m = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def folding_fraction(ddf: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of voxels (inside ``mask`` if given) where the Jacobian determinant is <= 0."""
    jacobian = jacobian_determinant(ddf)
    values = jacobian if mask is None else jacobian[np.asarray(mask, dtype=bool)]
    return float((values <= 0).mean()) if values.size else 0.0
