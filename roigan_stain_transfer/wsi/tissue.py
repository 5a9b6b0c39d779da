"""A low-resolution overview of the slide and the tissue mask computed on it.

The overview is the output grid reduced by an integer ``factor`` (:func:`overview_factor`: at most
:data:`OVERVIEW_MAX_SIZE` px on its longer side, so its memory does not grow with the slide), read from the
coarsest slide level that is still at least as fine as the overview, in horizontal strips, each reduced by
area averaging as it arrives: a single-level 100,000 px slide never sits in memory whole.

Tissue is where the HSV saturation ``(max - min) / max`` of the RGB values exceeds its Otsu threshold over the
overview: glass is grey-white, stained tissue is coloured. It is computed in float32, a few bytes per overview
pixel (MONAI's ``ForegroundMask`` with an ``"S"`` threshold gives the same mask but converts all three HSV
channels to float64: 1.3 GB for a 4096 px overview). The threshold is kept within :data:`SATURATION_LIMITS`, so a
slide that is all tissue (Otsu would split light from dark tissue) or all glass (Otsu would split noise) still
comes out right. Small specks are removed and small holes filled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from roigan_stain_transfer.wsi.slide import Slide
from shared_ops.atomic import atomic_write

__all__ = [
    "OVERVIEW_MAX_SIZE",
    "glass_weight",
    "SATURATION_LIMITS",
    "overview_factor",
    "read_overview",
    "saturation",
    "saturation_threshold",
    "save_png",
    "tissue_mask",
]

#: Longest side of the overview, px.
OVERVIEW_MAX_SIZE = 2048
#: Smallest reduction of the output grid for the overview (a tile of 256 px spans 64 overview px at most).
OVERVIEW_MIN_FACTOR = 4
#: Bounds of the saturation threshold (HSV S in [0, 1]).
SATURATION_LIMITS = (0.04, 0.15)
#: Strip height budget when reading the overview: source pixels per strip.
_STRIP_PIXELS = 4_000_000


def overview_factor(shape: tuple[int, int], max_size: int = OVERVIEW_MAX_SIZE) -> int:
    """Output-grid pixels per overview pixel (an integer >= :data:`OVERVIEW_MIN_FACTOR`)."""
    return max(OVERVIEW_MIN_FACTOR, math.ceil(max(shape) / max_size))


def _source_level(slide: Slide, factor: int) -> int:
    """Coarsest slide level whose pixels are no larger than an overview pixel."""
    grid = slide.grid
    limit = factor * grid.downsample  # level-0 px per overview px
    count = slide.reader.get_level_count(slide.wsi)
    levels = [i for i in range(count) if slide.reader.get_downsample_ratio(slide.wsi, i) <= limit * (1 + 1e-6)]
    return max(levels, key=lambda i: slide.reader.get_downsample_ratio(slide.wsi, i)) if levels else 0


def read_overview(slide: Slide, factor: int) -> np.ndarray:
    """RGB overview ``(ceil(H / factor), ceil(W / factor), 3)`` uint8 of the output grid ``(H, W)``.

    Read in strips from the coarsest level at least as fine as the overview and area-averaged (PIL's box
    filter, fractional source boxes included), so peak memory is one strip plus the overview.
    """
    grid = slide.grid
    out_h, out_w = math.ceil(grid.shape[0] / factor), math.ceil(grid.shape[1] / factor)
    level = _source_level(slide, factor)
    level_ds = float(slide.reader.get_downsample_ratio(slide.wsi, level))
    level_h, level_w = slide.level_shape(level)
    k = factor * grid.downsample / level_ds  # level px per overview px
    rows_per_strip = max(1, int(_STRIP_PIXELS / max(1.0, level_w * k)))
    overview = np.empty((out_h, out_w, 3), dtype=np.uint8)
    need_w = int(math.ceil(out_w * k))
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        top = int(math.floor(r0 * k))
        bottom = max(top + 1, int(math.ceil(r1 * k)))
        strip = slide.read((int(round(top * level_ds)), 0), (min(bottom, level_h) - top, level_w), level)
        # the last overview row / column may reach past the slide: repeat its edge pixels there
        strip = np.pad(strip, ((0, bottom - top - len(strip)), (0, max(0, need_w - level_w)), (0, 0)), mode="edge")
        box = (0.0, r0 * k - top, out_w * k, r1 * k - top)
        overview[r0:r1] = np.asarray(
            Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX, box=box), dtype=np.uint8
        )
    return overview


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(h, w)`` float32 in [0, 1] of an RGB ``(h, w, 3)`` uint8 image (0 where it is black)."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def saturation_threshold(values: np.ndarray) -> float:
    """Otsu threshold of saturation ``values``, kept within :data:`SATURATION_LIMITS`."""
    values = np.asarray(values).ravel()
    otsu = float(threshold_otsu(values)) if values.size and np.ptp(values) > 0 else SATURATION_LIMITS[1]
    return float(np.clip(otsu, *SATURATION_LIMITS))


def tissue_mask(overview: np.ndarray, min_object_px: int = 16) -> np.ndarray:
    """Tissue ``(h, w)`` bool of an RGB overview ``(h, w, 3)`` uint8 (module docstring: saturation + Otsu).

    Components smaller than ``min_object_px`` overview pixels are dropped, holes of that size filled.
    """
    overview = np.asarray(overview)
    if overview.ndim != 3 or overview.shape[-1] != 3 or overview.dtype != np.uint8:
        raise ValueError(
            f"tissue_mask: expected an RGB (h, w, 3) uint8 overview, got {overview.shape} {overview.dtype}"
        )
    sat = saturation(overview)
    mask = sat > saturation_threshold(sat)
    if min_object_px > 1:
        mask = remove_small_objects(mask, max_size=min_object_px - 1)
        mask = remove_small_holes(mask, max_size=min_object_px - 1)
    return mask


def glass_weight(tiles: torch.Tensor, threshold: float, min_value: int = 200, smoothing: int = 7) -> torch.Tensor:
    """How much each pixel of RGB tiles ``(B, 3, H, W)`` uint8 is glass: ``(B, H, W)`` float32 in [0, 1].

    A pixel is glass when its saturation is at most ``threshold`` (the slide's tissue threshold) and its
    brightest channel at least ``min_value`` (dark grey debris and pen are not glass); the 0/1 map is averaged
    over ``smoothing`` x ``smoothing`` px so that tissue edges blend instead of stepping.
    """
    pixels = tiles.to(torch.float32)
    high = pixels.amax(dim=1)
    low = pixels.amin(dim=1)
    saturation = torch.where(high > 0, (high - low) / high.clamp(min=1.0), torch.zeros_like(high))
    glass = ((saturation <= threshold) & (high >= min_value)).to(torch.float32)[:, None]
    if smoothing > 1:
        glass = torch.nn.functional.avg_pool2d(
            glass, smoothing, stride=1, padding=smoothing // 2, count_include_pad=False
        )
    return glass[:, 0]


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB ``(h, w, 3)`` or grey/bool ``(h, w)`` image as PNG, atomically."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
