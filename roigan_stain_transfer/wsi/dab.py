"""The virtual DAB of a translated slide: heat map, DAB-positive regions, their areas.

The DAB grey of each output pixel is computed exactly as the IHC box library does it
(:func:`roigan_stain_transfer.box_library.dab_grey`: ``rgb2hed``, the DAB channel alone back to RGB, then grey;
dark = stained) and averaged over the overview pixels of :mod:`roigan_stain_transfer.wsi.tissue` while the
rows stream out (:class:`DabAccumulator`). The box library's per-tile rule then becomes a per-slide rule:

* threshold: Otsu over the tissue pixels of the overview's DAB grey (the library: Otsu over one tile);
* a slide whose mean DAB grey over tissue exceeds ``dab_empty_mean`` (0.85) has no DAB-positive region (the
  library empties such a tile's mask); the mean is taken over tissue, because glass would push every slide
  above it;
* positive = grey <= threshold, inside tissue, closed with a disk of the library's radius (9 px at the
  output resolution) scaled to the overview (at least 1 px).

The Gaussian smoothing (sigma 1 px) of the library is subsumed by the area averaging over at least 4 x 4 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk

from roigan_stain_transfer.box_library import RELEASED_CODE, BoxLibraryParams, dab_grey
from roigan_stain_transfer.wsi.stitching import RowReducer, spans

__all__ = ["DabAccumulator", "DabRegions", "dab_regions", "heat_colours", "overlay"]

#: Colour ramp of the heat map, from no DAB (transparent white) to strong DAB (dark brown): (position, RGB).
_RAMP = (
    (0.0, (255, 255, 255)),
    (0.25, (255, 230, 120)),
    (0.5, (240, 150, 40)),
    (0.75, (190, 70, 20)),
    (1.0, (100, 30, 10)),
)


def _dab_grey_of_content(rows: np.ndarray) -> np.ndarray:
    """DAB grey ``(h, W)`` float32 of a band ``(h, W, 3)`` uint8, computed only on the column spans that are not
    pure white (white, the background, has grey exactly 1)."""
    grey = np.ones(rows.shape[:2], dtype=np.float32)
    content = (np.bitwise_and.reduce(rows, axis=0) != 255).any(axis=-1)
    for start, stop in spans(content):
        grey[:, start:stop] = dab_grey(rows[:, start:stop])
    return grey


class DabAccumulator(RowReducer):
    """Mean DAB grey per overview pixel of an output slide streamed as RGB row bands ``(h, W, 3)`` uint8."""

    def __init__(self, height: int, width: int, factor: int) -> None:
        super().__init__(height, width, 1, factor, transform=_dab_grey_of_content)

    def grey(self) -> np.ndarray:
        """DAB grey ``(h', w')`` float32 in [0, 1] (1 = no DAB)."""
        return self.result()[..., 0]


@dataclass(frozen=True)
class DabRegions:
    """DAB-positive overview pixels and how they were found.

    Attributes:
        mask: ``(h', w')`` bool, positive pixels.
        threshold: Otsu threshold of the DAB grey over tissue (NaN without tissue).
        mean_grey: mean DAB grey over tissue (NaN without tissue).
        emptied: True when ``mean_grey`` exceeded the library's ``dab_empty_mean`` and the mask was cleared.
    """

    mask: np.ndarray
    threshold: float
    mean_grey: float
    emptied: bool


def dab_regions(
    grey: np.ndarray, tissue: np.ndarray, factor: int, params: BoxLibraryParams = RELEASED_CODE
) -> DabRegions:
    """DAB-positive regions of an overview DAB ``grey`` ``(h', w')`` within ``tissue`` (same shape).

    ``factor`` is output pixels per overview pixel (scales the closing radius). See the module docstring.
    """
    if grey.shape != tissue.shape:
        raise ValueError(f"dab_regions: grey {grey.shape} and tissue {tissue.shape} must have the same shape")
    values = grey[tissue]
    if values.size == 0:
        return DabRegions(np.zeros(grey.shape, dtype=bool), math.nan, math.nan, False)
    mean_grey = float(values.mean())
    threshold = float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values[0])
    if mean_grey > params.dab_empty_mean:
        return DabRegions(np.zeros(grey.shape, dtype=bool), threshold, mean_grey, True)
    radius = max(1, int(round(params.dab_closing_radius / factor)))
    mask = closing((grey <= threshold) & tissue, disk(radius)) & tissue
    return DabRegions(mask, threshold, mean_grey, False)


def heat_colours(grey: np.ndarray) -> np.ndarray:
    """RGB heat map ``(h', w', 3)`` uint8 of a DAB grey ``(h', w')``: white (no DAB) to dark brown (strong DAB)."""
    strength = np.clip(1.0 - np.asarray(grey, dtype=np.float32), 0.0, 1.0)
    positions = [p for p, _ in _RAMP]
    out = np.empty((*strength.shape, 3), dtype=np.uint8)
    for i in range(3):
        out[..., i] = np.rint(np.interp(strength, positions, [c[i] for _, c in _RAMP]))
    return out


def overlay(image: np.ndarray, grey: np.ndarray, positive: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``image`` ``(h', w', 3)`` uint8 with the heat map blended in (weighted by DAB strength) and the outlines of
    the ``positive`` regions drawn in blue."""
    from skimage.segmentation import find_boundaries

    weight = alpha * np.clip((1.0 - np.asarray(grey, dtype=np.float32)) * 2.0, 0.0, 1.0)[..., None]
    out = image.astype(np.float32)
    out *= 1 - weight
    out += heat_colours(grey) * weight
    out[find_boundaries(positive, mode="inner")] = (20, 60, 230)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
