"""Opening a slide through MONAI's ``WSIReader`` and choosing the raster to work on by microns per pixel.

:func:`open_slide` returns a :class:`Slide`: the reader, the backend's slide object, and the :class:`OutputGrid`
at the requested resolution. The grid is chosen by microns per pixel, never by level index:

1. The slide's own resolution comes from its metadata (``openslide.mpp-x/y``, or TIFF resolution tags with an
   explicit unit). A slide without it is an error unless the caller states it (``slide_mpp``, the command line's
   ``--slide_mpp``): a guessed resolution would silently give tiles at the wrong magnification.
2. The reader's own mpp selection (``WSIReader.get_valid_level``, 5 % relative tolerance) picks the level that
   matches; the grid is then that level, pixel for pixel, and keeps the level's exact mpp.
3. When no level matches, tiles are read from the finest level that is at least as fine as requested
   (the coarsest such level) and resampled by area averaging (:attr:`OutputGrid.scale` > 1). Asking for a
   resolution finer than the slide's level 0 is an error: it would invent detail.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import WSIReader

__all__ = [
    "BACKENDS",
    "MPP_RANGE",
    "OutputGrid",
    "Slide",
    "SlideError",
    "open_slide",
    "resolve_grid",
    "slide_mpp_from_metadata",
]

#: ``WSIReader`` backends this package supports (cuCIM only where installed).
BACKENDS = ("openslide", "tifffile", "cucim")
#: Plausible level-0 resolutions of a microscope slide, um/px; anything outside is treated as missing metadata.
MPP_RANGE = (0.05, 50.0)
#: Relative tolerance of the reader's level selection by mpp, and of the square-pixel check.
MPP_RTOL = 0.05


class SlideError(ValueError):
    """A slide that cannot be used as asked; the message names the file and what was expected."""


@dataclass(frozen=True)
class OutputGrid:
    """The raster tiles are cut from and the virtual slide is written on.

    Attributes:
        shape: ``(height, width)`` of the grid in pixels.
        mpp: microns per pixel of the grid.
        level: slide level the pixels are read from.
        level_mpp: microns per pixel of that level.
        level_downsample: level pixels -> level-0 pixels.
        base_mpp: microns per pixel of level 0.
        slide_shape: ``(height, width)`` of level 0.
    """

    shape: tuple[int, int]
    mpp: float
    level: int
    level_mpp: float
    level_downsample: float
    base_mpp: float
    slide_shape: tuple[int, int]

    @property
    def scale(self) -> float:
        """Level pixels per grid pixel: 1 when the grid is the level itself, > 1 when tiles are resampled."""
        return self.mpp / self.level_mpp

    @property
    def resampled(self) -> bool:
        return not math.isclose(self.scale, 1.0, rel_tol=1e-6)

    @property
    def downsample(self) -> float:
        """Level-0 pixels per grid pixel (multiply grid coordinates by this to get slide coordinates)."""
        return self.mpp / self.base_mpp

    def read_window(self, row: int, col: int, size: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where to read the grid window of ``size`` x ``size`` px at grid ``(row, col)``.

        Returns ``(location, read_size)``: the top-left corner ``(row, col)`` in level-0 pixels (MONAI's
        ``location``) and the ``(height, width)`` to read at :attr:`level`, clipped to the level's extent.
        """
        d = self.downsample
        location = (int(round(row * d)), int(round(col * d)))
        level_h = int(self.slide_shape[0] / self.level_downsample)
        level_w = int(self.slide_shape[1] / self.level_downsample)
        top = location[0] / self.level_downsample
        left = location[1] / self.level_downsample
        read = int(round(size * self.scale))
        return location, (max(1, min(read, level_h - int(top))), max(1, min(read, level_w - int(left))))


@dataclass
class Slide:
    """An open slide: ``path``, MONAI ``reader``, the backend's slide object ``wsi`` and the chosen ``grid``."""

    path: Path
    reader: WSIReader
    wsi: Any
    grid: OutputGrid

    @property
    def backend(self) -> str:
        return self.reader.backend

    def level_shape(self, level: int) -> tuple[int, int]:
        return tuple(int(v) for v in self.reader.get_size(self.wsi, level))

    def read(self, location: tuple[int, int], size: tuple[int, int], level: int) -> np.ndarray:
        """RGB ``(H, W, 3)`` uint8 of ``size`` at ``level``, top-left ``location`` in level-0 ``(row, col)``."""
        patch, _ = self.reader.get_data(self.wsi, location=location, size=size, level=level)
        return np.moveaxis(np.asarray(patch), 0, -1)

    def close(self) -> None:
        closer = getattr(self.wsi, "close", None)
        if callable(closer):
            closer()


def _properties(wsi: Any) -> dict[str, str]:
    properties = getattr(wsi, "properties", None)
    return dict(properties) if properties is not None else {}


def slide_mpp_from_metadata(reader: WSIReader, wsi: Any, path: Path) -> float:
    """Level-0 microns per pixel from the slide's metadata; :class:`SlideError` when it has none.

    With OpenSlide, only ``openslide.mpp-x/y`` or TIFF resolution tags with an explicit centimetre or inch unit
    count (MONAI would otherwise assume micrometres for a TIFF without a unit). Pixels must be square within
    5 %, and the value a microscope's (:data:`MPP_RANGE`).
    """
    hint = "give the slide's level-0 resolution explicitly (--slide_mpp, in micrometres per pixel)"
    properties = _properties(wsi)
    if reader.backend == "openslide" and "openslide.mpp-x" not in properties:
        unit = properties.get("tiff.ResolutionUnit", "").lower()
        if unit not in ("centimeter", "inch"):
            raise SlideError(f"{path}: no resolution metadata (microns per pixel) in the slide; {hint}")
    try:
        mpp_y, mpp_x = (float(v) for v in reader.get_mpp(wsi, 0))
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as error:
        raise SlideError(f"{path}: no resolution metadata (microns per pixel) in the slide ({error}); {hint}") from None
    if not all(math.isfinite(v) for v in (mpp_x, mpp_y)) or not MPP_RANGE[0] <= mpp_x <= MPP_RANGE[1]:
        raise SlideError(
            f"{path}: the slide's resolution metadata says {mpp_x:g} um/px, outside the range of a microscope slide "
            f"{MPP_RANGE}; {hint}"
        )
    if not math.isclose(mpp_x, mpp_y, rel_tol=MPP_RTOL):
        raise SlideError(f"{path}: pixels are not square ({mpp_x:g} x {mpp_y:g} um); expected equal x and y mpp")
    return mpp_x


def resolve_grid(reader: WSIReader, wsi: Any, path: Path, mpp: float, slide_mpp: float | None = None) -> OutputGrid:
    """The :class:`OutputGrid` at ``mpp`` um/px (see the module docstring for the rules)."""
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise SlideError(f"{path}: the requested resolution must be a positive number of um/px, got {mpp!r}")
    if slide_mpp is not None:
        if not (math.isfinite(slide_mpp) and MPP_RANGE[0] <= slide_mpp <= MPP_RANGE[1]):
            raise SlideError(f"{path}: --slide_mpp must lie in {MPP_RANGE} um/px, got {slide_mpp!r}")
        base_mpp = float(slide_mpp)
    else:
        base_mpp = slide_mpp_from_metadata(reader, wsi, path)
    count = reader.get_level_count(wsi)
    downsamples = [float(reader.get_downsample_ratio(wsi, level)) for level in range(count)]
    level_mpps = [base_mpp * d for d in downsamples]
    slide_shape = tuple(int(v) for v in reader.get_size(wsi, 0))

    level = None
    if slide_mpp is None:
        try:  # the reader's own selection: a level within its tolerance of the request
            level = int(reader.get_valid_level(wsi, None, float(mpp), None))
        except ValueError:
            level = None
    else:
        matches = [i for i, m in enumerate(level_mpps) if math.isclose(m, mpp, rel_tol=MPP_RTOL)]
        level = min(matches, key=lambda i: abs(level_mpps[i] - mpp)) if matches else None
    if level is not None:
        shape = tuple(int(v) for v in reader.get_size(wsi, level))
        return OutputGrid(shape, level_mpps[level], level, level_mpps[level], downsamples[level], base_mpp, slide_shape)

    finer = [i for i, m in enumerate(level_mpps) if m <= mpp]
    if not finer:
        raise SlideError(
            f"{path}: the slide's finest level is {level_mpps[0]:.4g} um/px; it cannot be read at {mpp:g} um/px "
            "(finer than the scan). Ask for a coarser resolution (--mpp)."
        )
    level = max(finer, key=lambda i: level_mpps[i])
    shape = (int(round(slide_shape[0] * base_mpp / mpp)), int(round(slide_shape[1] * base_mpp / mpp)))
    return OutputGrid(shape, float(mpp), level, level_mpps[level], downsamples[level], base_mpp, slide_shape)


def open_slide(
    path: str | os.PathLike, mpp: float = 0.5, slide_mpp: float | None = None, backend: str = "openslide"
) -> Slide:
    """Open ``path`` with MONAI's ``WSIReader`` (``backend``) and resolve the grid at ``mpp`` um/px.

    Errors name the file: missing, unreadable or corrupt slides, no resolution metadata (unless ``slide_mpp``),
    a resolution finer than the scan, a backend that is not installed.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown WSI backend {backend!r}; expected one of {BACKENDS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slide not found")
    try:
        reader = WSIReader(backend=backend)
    except Exception as error:  # missing optional backend (cuCIM) or its native library
        raise SlideError(f"{path}: the {backend!r} WSI backend is not available here ({error})") from None
    try:
        wsi = reader.read(str(path))
    except Exception as error:  # OpenSlideError, TiffFileError, OSError, ...
        raise SlideError(
            f"{path}: cannot read the slide with the {backend} backend ({type(error).__name__}: {error}); "
            "expected a whole-slide image (SVS, NDPI, MRXS, tiled TIFF, ...)"
        ) from None
    grid = resolve_grid(reader, wsi, path, mpp, slide_mpp)
    if min(grid.shape) < 1:
        raise SlideError(f"{path}: the slide is empty at {grid.mpp:g} um/px (grid {grid.shape})")
    return Slide(path=path, reader=reader, wsi=wsi, grid=grid)
