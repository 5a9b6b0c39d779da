"""A cubic B-spline displacement field over a box, evaluated at arbitrary points with its exact gradient.

Frame: points are ``q (N, 3)`` in mm along the three axes of a box, from its first corner (``0 <= q_a <=
extent_a``). Control point ``n`` (``n = 0 .. size_a - 1`` along axis ``a``) sits at ``q_a = (n - 1) *
spacing``: one control point before the box and two after it give every point of the box its full
4 x 4 x 4 support. The coefficients ``(*size, 3)`` are displacements in mm along the box axes, and::

    u(q) = sum_{i, j, k} c[i, j, k] B((q_0 / s) + 1 - i) B((q_1 / s) + 1 - j) B((q_2 / s) + 1 - k)

with ``B`` the cubic B-spline (C2, support 4 control spacings): the field is smooth by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["BSplineField"]


def _basis(fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline weights ``(..., 4)`` of the four control points around ``fraction`` (in [0, 1)), and
    their derivatives with respect to the point's position in control spacings."""
    f = fraction
    f2 = f * f
    f3 = f2 * f
    one = 1.0 - f
    weights = (
        torch.stack([one * one * one, 3.0 * f3 - 6.0 * f2 + 4.0, -3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0, f3], dim=-1)
        / 6.0
    )
    slopes = torch.stack([-one * one, 3.0 * f2 - 4.0 * f, -3.0 * f2 + 2.0 * f + 1.0, f2], dim=-1) / 2.0
    return weights, slopes


class BSplineField(torch.nn.Module):
    """The field ``u(q)`` of the module notes, with coefficients as a trainable parameter (zero at start).

    Args:
        extent_mm: ``(3,)`` size of the box along its axes.
        spacing_mm: control point spacing.
    """

    def __init__(self, extent_mm: Sequence[float], spacing_mm: float) -> None:
        super().__init__()
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}.")
        self.spacing = float(spacing_mm)
        self.size = tuple(int(math.floor(float(e) / self.spacing)) + 4 for e in extent_mm)
        self.coefficients = torch.nn.Parameter(torch.zeros(*self.size, 3))

    def _support(self, points: torch.Tensor, gradient: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices ``(N, 64)`` of the control points around each point and their weights ``(N, 64, W)``:
        the B-spline weights, then (``gradient``) their derivatives per mm along each axis (``W`` = 4)."""
        t = points / self.spacing + 1.0
        low = torch.minimum(torch.floor(t).long() - 1, torch.tensor(self.size, device=points.device) - 4).clamp(min=0)
        weights, slopes = _basis(t - (low + 1).to(t.dtype))  # (N, 3, 4) each
        stride = torch.tensor((self.size[1] * self.size[2], self.size[2], 1), device=points.device)
        offsets = torch.arange(4, device=points.device)
        index = (
            (low * stride).sum(dim=1)[:, None, None, None]
            + (offsets * stride[0])[:, None, None]
            + (offsets * stride[1])[None, :, None]
            + (offsets * stride[2])[None, None, :]
        ).reshape(-1, 64)

        def outer(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return (x[:, :, None, None] * y[:, None, :, None] * z[:, None, None, :]).reshape(-1, 64)

        wx, wy, wz = weights.unbind(1)
        columns = [outer(wx, wy, wz)]
        if gradient:
            dx, dy, dz = (slopes / self.spacing).unbind(1)
            columns += [outer(dx, wy, wz), outer(wx, dy, wz), outer(wx, wy, dz)]
        return index, torch.stack(columns, dim=-1)

    def forward(self, points: torch.Tensor, gradient: bool = False):
        """``u`` at ``points (N, 3)`` mm: ``(N, 3)`` mm; with ``gradient``, also ``grad u (N, 3, 3)``,
        ``[n, a, b] = d u_a / d q_b``."""
        index, weights = self._support(points, gradient)
        values = self.coefficients.reshape(-1, 3)[index]  # (N, 64, 3)
        out = torch.stack([(weights[:, :, w, None] * values).sum(dim=1) for w in range(weights.shape[2])], dim=1)
        if not gradient:
            return out[:, 0]
        return out[:, 0], out[:, 1:].transpose(1, 2)

    def on_grid(
        self,
        shape: Sequence[int],
        spacing_mm: Sequence[float],
        derivative: int | None = None,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> torch.Tensor:
        """``u`` (or ``d u / d q_derivative``) at the voxels ``q = origin_mm + n * spacing_mm`` of a regular grid
        of ``shape``, without gradients: ``(*shape, 3)``, by three small matrix products (the B-spline is
        separable)."""
        with torch.no_grad():
            u = self.coefficients
            for axis, (n, step, start) in enumerate(zip(shape, spacing_mm, origin_mm, strict=True)):
                matrix = self._basis_matrix(axis, int(n), float(step), float(start), derivative == axis)
                u = torch.tensordot(matrix, u, dims=([1], [axis])).movedim(0, axis)
        return u

    def _basis_matrix(self, axis: int, n: int, step: float, start: float, slope: bool) -> torch.Tensor:
        """``(n, size[axis])`` weights (``slope``: their derivatives per mm) of the control points along
        ``axis`` at ``q = start, start + step, .., start + (n - 1) step``."""
        t = (torch.arange(n, dtype=torch.float64) * step + start) / self.spacing + 1.0
        low = torch.clamp(torch.floor(t).long() - 1, 0, self.size[axis] - 4)
        weights, slopes = _basis(t - (low + 1).to(t.dtype))
        matrix = torch.zeros(n, self.size[axis], dtype=torch.float64)
        matrix.scatter_(1, low[:, None] + torch.arange(4), slopes / self.spacing if slope else weights)
        return matrix.to(self.coefficients.dtype)

    def roughness(self) -> torch.Tensor:
        """Mean squared difference of neighbouring coefficients per mm (a diffusion penalty on the field)."""
        c = self.coefficients
        terms = [c.diff(dim=axis).square().mean() for axis in (0, 1, 2)]
        return sum(terms) / (3.0 * self.spacing**2)
