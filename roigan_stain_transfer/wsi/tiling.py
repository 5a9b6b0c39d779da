"""The tile grid over a slide's output grid, its blending window, and the MONAI dataset that reads the tiles.

Tiles are ``tile_size`` px squares on the output grid (see :mod:`roigan_stain_transfer.wsi.slide`), ``overlap``
px apart from their neighbours: along each axis the origins are ``0, s, 2s, ...`` with stride
``s = tile_size - overlap``, and the last tile is moved back to end exactly at the edge, so every tile lies
inside the slide (no padding, no out-of-slide reads). Overlapping tiles are blended with a separable window
that ramps linearly over the overlap (:func:`blend_window`); the sum of the windows over the grid is separable
too (:meth:`TileGrid.weight_sums`), which is what lets :mod:`roigan_stain_transfer.wsi.stitching` normalise
row bands as soon as they are complete.

Tiles are read by MONAI's :class:`monai.data.PatchWSIDataset` (one datalist entry per tile: level-0 location,
read size and level), followed by MONAI transforms (area resampling when the grid is not a slide level). A
``DataLoader`` over it reads ahead in worker processes; tiles stay uint8 until :func:`to_network` scales a
batch to the generator's ``[-1, 1]`` on its device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import PatchWSIDataset
from monai.transforms import Compose, Lambda, Lambdad, Resized, ToTensord

from roigan_stain_transfer.wsi.slide import OutputGrid, Slide

__all__ = [
    "SlidePatchDataset",
    "TileGrid",
    "axis_origins",
    "blend_window",
    "tile_dataset",
    "tissue_fractions",
    "to_network",
]


def axis_origins(length: int, tile_size: int, overlap: int) -> np.ndarray:
    """Tile origins ``(n,)`` int64 along an axis of ``length`` px: stride ``tile_size - overlap``, last at the edge."""
    if length < tile_size:
        raise ValueError(f"the slide is {length} px along an axis, smaller than one tile of {tile_size} px")
    stride = tile_size - overlap
    count = max(1, math.ceil((length - tile_size) / stride) + 1)
    return np.minimum(np.arange(count, dtype=np.int64) * stride, length - tile_size)


def blend_window(tile_size: int, overlap: int) -> np.ndarray:
    """1-D blending weights ``(tile_size,)`` float32: 1 in the middle, a linear ramp over ``overlap`` px at each
    end (never 0, so a tile alone at the slide's edge still has weight)."""
    centres = np.arange(tile_size, dtype=np.float64) + 0.5
    if overlap == 0:
        return np.ones(tile_size, dtype=np.float32)
    ramp = np.minimum(centres, tile_size - centres) / overlap
    return np.minimum(ramp, 1.0).astype(np.float32)


@dataclass(frozen=True)
class TileGrid:
    """Tile origins on an output grid of ``shape`` ``(H, W)``.

    Attributes:
        shape: output grid ``(height, width)``.
        tile_size: tile side in px.
        overlap: px shared by neighbouring tiles (before the last tile of an axis is moved to the edge).
        rows: ``(ny,)`` top rows of the tile rows; cols: ``(nx,)`` left columns of the tile columns.
    """

    shape: tuple[int, int]
    tile_size: int
    overlap: int
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def over(cls, shape: Sequence[int], tile_size: int = 256, overlap: int = 32) -> TileGrid:
        tile_size, overlap = int(tile_size), int(overlap)
        if tile_size <= 0 or tile_size % 4:
            raise ValueError(f"tile_size must be a positive multiple of 4 (the generator's stride), got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap must lie in [0, tile_size), got {overlap} for tiles of {tile_size}")
        height, width = (int(v) for v in shape)
        return cls(
            shape=(height, width),
            tile_size=tile_size,
            overlap=overlap,
            rows=axis_origins(height, tile_size, overlap),
            cols=axis_origins(width, tile_size, overlap),
        )

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(ny, nx)``: tile rows and columns."""
        return len(self.rows), len(self.cols)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def origins(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Top-left ``(row, col)`` of tiles ``(N, 2)`` int64, row-major, or of the flat ``indices`` given."""
        rr, cc = np.meshgrid(self.rows, self.cols, indexing="ij")
        origins = np.stack([rr.ravel(), cc.ravel()], axis=1)
        return origins if indices is None else origins[np.asarray(indices, dtype=np.int64)]

    def window(self) -> np.ndarray:
        """2-D blending window ``(tile_size, tile_size)`` float32 (outer product of :func:`blend_window`)."""
        w = blend_window(self.tile_size, self.overlap)
        return np.outer(w, w)

    def weight_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Sums of the 1-D windows over all tile positions: ``(H,)`` along rows, ``(W,)`` along columns.

        The 2-D sum of the windows of all tiles is their outer product; every entry is positive.
        """
        w = blend_window(self.tile_size, self.overlap).astype(np.float64)
        sums = []
        for origins, length in ((self.rows, self.shape[0]), (self.cols, self.shape[1])):
            total = np.zeros(length, dtype=np.float64)
            for origin in origins:
                total[origin : origin + self.tile_size] += w
            sums.append(total.astype(np.float32))
        return sums[0], sums[1]


def tissue_fractions(grid: TileGrid, tissue: np.ndarray, factor: float) -> np.ndarray:
    """Fraction of tissue in each tile's footprint ``(len(grid),)`` float64, row-major.

    ``tissue`` is a ``(h, w)`` bool mask whose pixel covers ``factor`` x ``factor`` output-grid pixels.
    """
    tissue = np.asarray(tissue, dtype=bool)
    integral = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = tissue.cumsum(0, dtype=np.int64).cumsum(1)
    origins = grid.origins()

    def span(start: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(start / factor).astype(np.int64), 0, limit - 1)
        hi = np.clip(np.ceil((start + grid.tile_size) / factor).astype(np.int64), lo + 1, limit)
        return lo, hi

    r0, r1 = span(origins[:, 0], tissue.shape[0])
    c0, c1 = span(origins[:, 1], tissue.shape[1])
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return inside / ((r1 - r0) * (c1 - c0))


class _PadWhite:
    """Pads a ``(3, h, w)`` uint8 patch read at a slide's edge to ``size`` with white (picklable for workers)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, patch: torch.Tensor) -> torch.Tensor:
        h, w = patch.shape[-2:]
        if (h, w) == self.size:
            return patch
        out = torch.full((patch.shape[0], *self.size), 255, dtype=torch.uint8)
        out[:, :h, :w] = patch[:, : self.size[0], : self.size[1]]
        return out


def _round_to_uint8(image: torch.Tensor) -> torch.Tensor:
    return image.round().clamp(0, 255).to(torch.uint8)


def _tile_index(item: dict) -> dict:
    """Moves the tile's flat index from the patch metadata to the item's ``"tile"`` key."""
    item["tile"] = int(item["image"].meta["tile"])
    return item


class SlidePatchDataset(PatchWSIDataset):
    """MONAI's ``PatchWSIDataset`` keeping each slide open in each process.

    MONAI's dataset reopens an OpenSlide slide for every patch (about 20 ms for an SVS file here); this one
    keeps one handle per slide and process (DataLoader workers open their own after the fork).
    """

    def _get_wsi_object(self, sample: dict):
        key = (os.getpid(), sample["image"])
        if key not in self.wsi_object_dict:
            self.wsi_object_dict[key] = self.wsi_reader.read(sample["image"])
        return self.wsi_object_dict[key]

    def _get_data(self, sample: dict):
        wsi = self._get_wsi_object(sample)
        patch, meta = self.wsi_reader.get_data(
            wsi=wsi, location=self._get_location(sample), size=self._get_size(sample), level=self._get_level(sample)
        )
        return (patch if patch.flags.writeable else patch.copy()), meta  # OpenSlide's pixels are read-only


def tile_dataset(slide: Slide, grid: TileGrid, indices: Sequence[int]) -> SlidePatchDataset:
    """MONAI patch dataset over the tiles ``indices`` (flat, row-major) of ``grid`` on ``slide``.

    Item ``i``: ``{"image": (3, tile_size, tile_size) uint8 tensor (RGB), "tile": flat index}``, read at the
    grid's level (``slide.grid``), resampled by area averaging when the grid is not a slide level. Tiles travel
    from the workers as uint8 (four times less than float32); :func:`to_network` scales a batch for the generator.
    """
    out: OutputGrid = slide.grid
    size = grid.tile_size
    read_size = (int(round(size * out.scale)),) * 2
    data = []
    for index, (row, col) in zip(indices, grid.origins(indices), strict=True):
        location, clipped = out.read_window(int(row), int(col), size)
        data.append(
            {"image": str(slide.path), "location": location, "size": clipped, "level": out.level, "tile": int(index)}
        )
    transforms = [
        Lambda(_tile_index),
        ToTensord("image", track_meta=False),  # plain tensors: MetaTensor bookkeeping costs more than the reads
        Lambdad("image", _PadWhite(read_size)),
    ]
    if out.resampled:
        transforms += [
            Resized("image", spatial_size=(size, size), mode="area"),
            Lambdad("image", _round_to_uint8),
        ]
    return SlidePatchDataset(
        data,
        patch_size=None,
        patch_level=None,
        transform=Compose(transforms),
        include_label=False,
        center_location=False,
        additional_meta_keys=["tile"],
        reader=slide.backend,
    )


def to_network(batch: torch.Tensor) -> torch.Tensor:
    """uint8 RGB tiles ``(B, 3, T, T)`` -> the generator's float32 input in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    return batch.to(torch.float32).div_(127.5).sub_(1.0)
