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
"""
