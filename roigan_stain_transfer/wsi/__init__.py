"""Whole-slide images in and out: MONAI ``WSIReader`` tiling by microns per pixel, tissue detection, annotations,
streaming whole-slide inference into pyramidal TIFF, slide-consistent normalisation, virtual DAB regions.

Conventions (stated once, used by every module of this subpackage):

* Slide pixel coordinates are continuous ``(x, y)`` with ``x`` = column and ``y`` = row, in the frame of the
  slide's level 0, pixel ``(col, row)`` covering ``[col, col + 1) x [row, row + 1)`` (its centre at ``+0.5``),
  as in QuPath, ASAP and OpenSlide. A point or pixel of another raster with downsample ``d`` relative to
  level 0 maps to level 0 by multiplying by ``d``.
* Arrays are row-major: masks ``(H, W)`` bool, RGB images ``(H, W, 3)`` uint8; MONAI's reader returns
  ``(3, H, W)`` and network tiles are ``(B, 3, H, W)`` in ``[-1, 1]``. ``location`` arguments handed to MONAI are
  ``(row, col)`` of the top-left corner in level-0 pixels, as ``WSIReader.get_data`` expects.
* The "output grid" is the raster at the requested resolution (microns per pixel) on which tiles are cut and
  the virtual slide is written; its pixel ``(r, c)`` covers level-0 pixels ``[c * s, (c + 1) * s)`` with
  ``s = output mpp / level-0 mpp``.

Modules (imported on first access, so that ``roigan_stain_transfer.wsi.inference`` works in bundle configs):
``slide`` (open by mpp), ``tissue`` (overview, tissue mask), ``tiling`` (tile grid, MONAI patch dataset),
``stitching`` (blending into row bands), ``pyramid`` (streaming pyramidal TIFF writer), ``normalization``
(slide-consistent instance normalisation), ``dab`` (virtual DAB heat map and regions), ``annotations`` (ASAP XML,
QuPath GeoJSON), ``inference`` (whole-slide inference, many slides, torchrun) and ``extraction`` (training tiles
and box libraries from slides).
"""

# no ``from __future__ import annotations`` here: it would bind the name ``annotations`` in this package and hide
# the submodule of that name
import importlib
from types import ModuleType

SUBMODULES = (
    "annotations",
    "dab",
    "extraction",
    "inference",
    "normalization",
    "pyramid",
    "slide",
    "stitching",
    "tiling",
    "tissue",
)

__all__ = list(SUBMODULES)


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
