"""Slides made by the tests: pyramidal tiled TIFFs written with tifffile directly (independent of the package's
own writer), from an array or from a function of pixel coordinates (for slides too large to hold)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.conftest import require_data

CMU = "wsi/CMU-1-Small-Region.svs"


def write_slide(
    path: Path,
    levels: list[np.ndarray] | None = None,
    mpp: float | None = 0.5,
    shape: tuple[int, int] | None = None,
    pixels: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    downsamples: tuple[int, ...] = (1,),
    tile: int = 256,
    compression: str = "jpeg",
) -> Path:
    """A tiled TIFF slide, one page per level, with resolution tags when ``mpp`` is given.

    Either ``levels`` (RGB arrays, level 0 first) or ``shape`` + ``pixels(rows, cols) -> (h, w, 3) uint8`` evaluated
    tile by tile at every level of ``downsamples`` (level-0 coordinates of the pixel centres).
    """
    if levels is None:
        levels_spec = [((shape[0] + d - 1) // d, (shape[1] + d - 1) // d, d) for d in downsamples]
    else:
        levels_spec = [(a.shape[0], a.shape[1], round(levels[0].shape[1] / a.shape[1])) for a in levels]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for number, (height, width, d) in enumerate(levels_spec):

            def tiles(number=number, height=height, width=width, d=d):
                for r in range(0, height, tile):
                    for c in range(0, width, tile):
                        if levels is not None:
                            block = np.full((tile, tile, 3), 255, np.uint8)
                            part = levels[number][r : r + tile, c : c + tile]
                            block[: part.shape[0], : part.shape[1]] = part
                        else:
                            rows = (np.arange(r, r + tile) + 0.5) * d
                            cols = (np.arange(c, c + tile) + 0.5) * d
                            block = pixels(rows, cols)
                        yield block

            extra = {}
            if mpp is not None:
                extra = {"resolution": (1e4 / (mpp * d), 1e4 / (mpp * d)), "resolutionunit": "CENTIMETER"}
            tif.write(
                tiles(),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=1 if number else 0,
                metadata=None,
                **extra,
            )
    return path


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return require_data(CMU)


@pytest.fixture(scope="session")
def cmu_region(cmu_slide) -> np.ndarray:
    """The whole CMU-1-Small-Region level 0 as RGB (2967, 2220, 3) uint8, read with OpenSlide."""
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
