"""The fixed-to-moving transform a registration produces, in physical space.

A registration of ``moving`` to ``fixed`` is the world map ``phi`` taking a point ``x`` of the fixed image
(RAS mm) to the corresponding point of the moving image::

    phi(x) = A(x + U(x)),     U(x) = L u(g(x))

* ``A`` (``(4, 4)``, RAS mm -> RAS mm) is the pre-alignment (identity without one);
* ``u`` ``(3, *grid.shape)`` is the network's displacement on its grid, in voxels of that grid, channel
  ``a`` along grid axis ``a`` (MONAI ``Warp`` convention); ``g(x)`` is the grid voxel of ``x`` and ``L``
  the grid's voxel-to-mm matrix, so ``U`` is the same displacement in mm. Outside the grid (beyond the
  lung box) ``u`` keeps its border value.

This matches how the images were prepared: the moving image was resampled on the grid through ``A``
(``moving_grid(g) = moving(A(w(g)))``) and the network's ``u`` warps that (``warped(g) = moving_grid(g +
u(g))``). ITK's displacement-field convention is the same map in LPS: an output voxel at point ``p`` reads
the moving image at ``p + d(p)``, with ``d = phi - id`` written in LPS components.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rrn_lung_registration.fields import jacobian_determinant
from rrn_lung_registration.io.landmarks import LPS_TO_RAS
from rrn_lung_registration.io.spatial import Grid, apply_affine, sample_voxels, to_matrix

__all__ = ["RegistrationTransform"]

_LPS = torch.tensor(LPS_TO_RAS, dtype=torch.float64)


@dataclass
class RegistrationTransform:
    """``phi(x) = A(x + L u(g(x)))``: see the module notes.

    Attributes:
        prealign: ``A``, ``(4, 4)`` float64, fixed RAS mm -> moving RAS mm.
        grid: the network grid (over the fixed image's lung box).
        displacement: ``u``, ``(3, *grid.shape)`` float32, in voxels of ``grid``.
    """

    prealign: torch.Tensor
    grid: Grid
    displacement: torch.Tensor

    _jacobian: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.prealign = to_matrix(self.prealign)
        self.displacement = self.displacement.detach().float().cpu()
        if tuple(self.displacement.shape) != (3, *self.grid.shape):
            raise ValueError(
                f"displacement of shape {tuple(self.displacement.shape)} does not fit the grid {self.grid.shape}: "
                f"expected (3, {', '.join(map(str, self.grid.shape))})."
            )

    @classmethod
    def identity(cls, grid: Grid) -> RegistrationTransform:
        return cls(torch.eye(4, dtype=torch.float64), grid, torch.zeros(3, *grid.shape))

    def displacement_mm(self, points: torch.Tensor) -> torch.Tensor:
        """``U(x)``: the deformable part in RAS mm at RAS points ``(..., 3)``."""
        voxels = self.grid.world_to_voxel(points.to(torch.float64)).float()
        u = sample_voxels(self.displacement, voxels)  # (3, ...)
        return torch.movedim(u, 0, -1).to(torch.float64) @ self.grid.linear.T

    def map_points(self, points: torch.Tensor, deformable: bool = True) -> torch.Tensor:
        """``phi(x)`` for RAS points ``(..., 3)`` (float64); ``deformable=False`` applies ``A`` only."""
        points = points.to(torch.float64)
        moved = points + self.displacement_mm(points) if deformable else points
        return apply_affine(self.prealign, moved)

    def map_points_lps(self, points: np.ndarray, deformable: bool = True) -> np.ndarray:
        """``phi`` for LPS points ``(N, 3)`` (landmark files), returning LPS ``(N, 3)``."""
        ras = torch.as_tensor(np.asarray(points, dtype=np.float64)).reshape(-1, 3) @ _LPS
        return (self.map_points(ras, deformable) @ _LPS).numpy()

    def itk_displacement(self, grid: Grid) -> torch.Tensor:
        """``d = phi - id`` at the voxels of ``grid``, LPS mm: ``(I, J, K, 3)`` float32, component = LPS axis.

        This is the vector image of an ITK ``DisplacementFieldTransform`` on ``grid`` (for example the
        fixed image's grid).
        """
        out = torch.empty(*grid.shape, 3, dtype=torch.float32)
        for k0, k1 in grid.slabs():
            points = grid.points(torch.float64, (k0, k1))
            out[:, :, k0:k1] = ((self.map_points(points) - points) @ _LPS).float()
        return out

    def jacobian_on_grid(self) -> torch.Tensor:
        """``det D phi`` on the network grid, ``(*grid.shape)`` float32: ``det A * det(I + grad u)``.

        ``det(I + grad U)`` in mm equals ``det(I + grad u)`` in grid voxels (similar matrices), so the
        network grid's own units suffice. Values <= 0 are folding.
        """
        if self._jacobian is None:  # write_outputs asks twice (statistics and the map): compute it once
            affine_det = float(torch.linalg.det(self.prealign[:3, :3]))
            self._jacobian = torch.from_numpy(jacobian_determinant(self.displacement.numpy())).float() * affine_det
        return self._jacobian

    def jacobian_on(self, grid: Grid) -> torch.Tensor:
        """The Jacobian determinant resampled on ``grid`` (trilinear, border values outside the lung box)."""
        jacobian = self.jacobian_on_grid()
        out = torch.empty(grid.shape, dtype=torch.float32)
        for k0, k1 in grid.slabs():
            voxels = self.grid.world_to_voxel(grid.points(torch.float64, (k0, k1))).float()
            out[:, :, k0:k1] = sample_voxels(jacobian, voxels)
        return out
