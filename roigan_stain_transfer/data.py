"""Training, evaluation and inference data of the region-guided CycleGAN (Boyd et al., MICCAI 2022).

Tile sources
    A :class:`TileSource` is a folder of PNG tiles (named by file name) or an HDF5 file whose dataset ``x`` holds
    ``(N, H, W, 3)`` uint8 tiles (named ``"<file name>:<index>"``), as in the released code. These are the tile
    ids of the box library CSV written by :func:`roigan_stain_transfer.box_library.build_library`.
    Tiles are read on demand and checked: RGB ``uint8`` ``(H, W, 3)``, of ``tile_size`` when one is given; errors
    name the file (and index).

Training samples
    :class:`UnpairedTileDataset` yields, per H&E tile that has library boxes, the H&E tile and an unpaired IHC tile
    (drawn at random among the IHC tiles with boxes), each scaled to ``[-1, 1]`` as ``(3, H, W)`` float32, with
    boxes drawn from that tile's library boxes (:class:`BoxSampling`) as ``(k, 4)`` float32 ``(x1, y1, x2, y2)``
    (x = column, ``x2``/``y2`` exclusive, the library's ``[xmin, ymin, xmax, ymax]``) and classes ``(k,)`` int64
    (1 = cancer = positive, 0 = normal = negative). Random horizontal / vertical flips move the boxes with the
    image. Tiles without library boxes are skipped.

Randomness
    Every random choice of a sample (the IHC partner, the boxes, the flips) comes from a NumPy generator seeded
    with ``(dataset seed, epoch, index)``; :class:`TileSampler` yields ``(index, epoch)`` keys, so a sample is a
    pure function of its key. The sampler's order depends only on its seed and the epoch, and it can start an
    epoch part-way (:meth:`TileSampler.set_start`), which is how a resumed run replays exactly the batches the
    interrupted one would have seen. Nothing here touches torch's or NumPy's global generators.

Batches
    :func:`collate_tiles` stacks the tiles to ``(B, 3, H, W)`` and keeps boxes and classes as lists of ``B``
    tensors (tiles may carry different numbers of boxes under the released-code sampling).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from roigan_stain_transfer.box_library import CANCER, NORMAL, BoxLibrary, read_library_csv
from roigan_stain_transfer.networks import GENERATOR_MULTIPLE

__all__ = [
    "BOX_SAMPLING_PRESETS",
    "HE_KEY",
    "IHC_KEY",
    "IMAGE_KEY",
    "MASK_KEY",
    "NAME_KEY",
    "PAPER_BOX_SAMPLING",
    "RELEASED_BOX_SAMPLING",
    "AnnotatedTileDataset",
    "BoxSampling",
    "MaskSource",
    "TileDataset",
    "TileSampler",
    "TileSource",
    "UnpairedTileDataset",
    "collate_tiles",
    "flip_boxes",
    "resolve_box_sampling",
    "sample_boxes",
    "to_network",
]

HE_KEY = "he"
IHC_KEY = "ihc"
IMAGE_KEY = "image"
MASK_KEY = "mask"
NAME_KEY = "name"
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


# ----------------------------------------------------------------------------------------------------------------
# Tile and mask sources
# ----------------------------------------------------------------------------------------------------------------


def _png_files(folder: Path, what: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise ValueError(f"{what} folder {folder} holds no PNG files")
    return files


class _HDF5Array:
    """One dataset of an HDF5 file, opened lazily in each process (h5py handles do not survive a fork)."""

    def __init__(self, path: Path, dataset: str) -> None:
        self.path, self.dataset = path, dataset
        self._handle = None
        self._pid = None
        data = self._data()
        self.shape, self.dtype = tuple(data.shape), data.dtype
        self.close()  # reopened on first read, in whichever (worker) process reads

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._pid = None

    def _data(self):
        if self._handle is None or self._pid != os.getpid():
            import h5py

            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as error:
                raise ValueError(f"{self.path}: not a readable HDF5 file ({error})") from None
            self._pid = os.getpid()
            if self.dataset not in self._handle:
                present = sorted(self._handle.keys())
                raise ValueError(f"{self.path}: no dataset {self.dataset!r} (datasets: {present})")
        return self._handle[self.dataset]

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self._data()[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = state["_pid"] = None
        return state


class TileSource:
    """RGB tiles of a folder of PNG files or of dataset ``x`` of an HDF5 file.

    Args:
        path: a folder of ``*.png`` tiles, or an HDF5 file (``.h5``/``.hdf5``) with dataset ``dataset`` of shape
            ``(N, H, W, 3)`` uint8.
        tile_size: expected height and width (int, or ``(H, W)``); None accepts any size.
        dataset: the HDF5 dataset holding the tiles.
        multiple: height and width must be multiples of this (the datasets of this module ask for
            ``GENERATOR_MULTIPLE``: their tiles go through the generators).

    Attributes:
        names: tile ids, as in the box library: PNG file names, or ``"<HDF5 file name>:<index>"``.
        file_names: PNG file names for outputs derived from each tile (``"<HDF5 stem>_<index>.png"`` for HDF5).

    :meth:`read` returns tile ``i`` as ``(H, W, 3)`` uint8; wrong size, channel count, mode or dtype raise a
    ValueError naming the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tile_size: int | Sequence[int] | None = None,
        dataset: str = "x",
        multiple: int = 1,
    ):
        self.path = Path(path)
        self.multiple = int(multiple)
        if tile_size is not None:
            tile_size = (int(tile_size), int(tile_size)) if np.isscalar(tile_size) else tuple(map(int, tile_size))
            if len(tile_size) != 2 or min(tile_size) <= 0:
                raise ValueError(f"tile_size must be a positive int or (H, W), got {tile_size}")
        self.tile_size: tuple[int, int] | None = tile_size
        self._files: list[Path] | None = None
        self._array: _HDF5Array | None = None
        if self.path.is_dir():
            self._files = _png_files(self.path, "tile")
            self.names = [p.name for p in self._files]
            self.file_names = list(self.names)
        elif self.path.is_file():
            self._array = _HDF5Array(self.path, dataset)
            shape, dtype = self._array.shape, self._array.dtype
            if len(shape) != 4 or shape[3] != 3:
                raise ValueError(
                    f"{self.path}: dataset {dataset!r} must hold RGB tiles (N, H, W, 3), got shape {shape}"
                )
            if dtype != np.uint8:
                raise ValueError(f"{self.path}: dataset {dataset!r} must hold uint8 tiles, got {dtype}")
            self._check_size(shape[1:3], f"{self.path} (dataset {dataset!r})")
            self.names = [f"{self.path.name}:{i}" for i in range(shape[0])]
            self.file_names = [f"{self.path.stem}_{i}.png" for i in range(shape[0])]
        else:
            raise FileNotFoundError(f"tile source {self.path} is neither a folder of PNG tiles nor an HDF5 file")
        if not self.names:
            raise ValueError(f"tile source {self.path} holds no tiles")
        self._index = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"TileSource({str(self.path)!r}, {len(self)} tiles)"

    def label(self, index: int) -> str:
        """Where tile ``index`` comes from, for error messages."""
        return str(self._files[index]) if self._files is not None else f"{self.path} (tile {index})"

    def index_of(self, name: str) -> int | None:
        """Position of the tile id ``name``, or None."""
        return self._index.get(name)

    def _check_size(self, size: Sequence[int], label: str) -> None:
        if self.tile_size is not None and tuple(size) != self.tile_size:
            raise ValueError(
                f"{label}: expected {self.tile_size[0]} x {self.tile_size[1]} tiles, got {size[0]} x {size[1]}"
            )
        if size[0] % self.multiple or size[1] % self.multiple:
            raise ValueError(
                f"{label}: tile height and width must be multiples of {self.multiple} (the generator halves them "
                f"twice), got {size[0]} x {size[1]}; crop or pad the tiles"
            )

    def size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of tile ``index`` (PNG: from the file header only)."""
        if self._array is not None:
            return int(self._array.shape[1]), int(self._array.shape[2])
        with Image.open(self._files[index]) as image:
            return image.height, image.width

    def read(self, index: int) -> np.ndarray:
        """Tile ``index`` as an RGB ``(H, W, 3)`` uint8 array."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {self!r}")
        if self._array is not None:
            return self._array[index]
        path = self._files[index]
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ValueError(
                    f"{path}: expected an RGB image (mode 'RGB', 3 channels), got mode {image.mode!r} "
                    f"with {len(image.getbands())} channel(s)"
                )
            tile = np.asarray(image)
        if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
            raise ValueError(f"{path}: expected an RGB tile (H, W, 3) uint8, got {tile.shape} {tile.dtype}")
        self._check_size(tile.shape[:2], str(path))
        return tile


class MaskSource:
    """Binary annotation masks ``(H, W)`` bool: same-named PNGs of a folder, or dataset ``y`` of an HDF5 file.

    A PNG mask is True where its (single-channel) pixel is non-zero; HDF5 masks ``(N, H, W)`` are matched to tiles
    by index. Errors name the file.
    """

    def __init__(self, path: str | os.PathLike, dataset: str = "y") -> None:
        self.path = Path(path)
        self._array: _HDF5Array | None = None
        if self.path.is_file():
            self._array = _HDF5Array(self.path, dataset)
            if len(self._array.shape) != 3:
                raise ValueError(
                    f"{self.path}: dataset {dataset!r} must hold masks (N, H, W), got shape {self._array.shape}"
                )
        elif not self.path.is_dir():
            raise FileNotFoundError(f"mask source {self.path} is neither a folder of PNG masks nor an HDF5 file")

    def read(self, tiles: TileSource, index: int) -> np.ndarray:
        """Mask of tile ``index`` of ``tiles`` as ``(H, W)`` bool, checked against the tile size."""
        if self._array is not None:
            if index >= self._array.shape[0]:
                raise ValueError(f"{self.path}: {self._array.shape[0]} masks, no mask for tile {index} of {tiles}")
            mask = self._array[index]
            label = f"{self.path} (mask {index})"
        else:
            path = self.path / tiles.file_names[index]
            if not path.is_file():
                raise FileNotFoundError(f"mask {path} for tile {tiles.label(index)} not found")
            with Image.open(path) as image:
                mask = np.asarray(image)
            label = str(path)
            if mask.ndim != 2:
                raise ValueError(f"{label}: expected a single-channel mask (H, W), got shape {mask.shape}")
        size = tiles.size(index)
        if mask.shape != tuple(size):
            raise ValueError(f"{label}: mask shape {mask.shape} does not match its tile {size[0]} x {size[1]}")
        return mask > 0


def to_network(tile: np.ndarray) -> torch.Tensor:
    """RGB ``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in ``[-1, 1]`` (``uint8 / 127.5 - 1``)."""
    tile = np.ascontiguousarray(np.moveaxis(np.asarray(tile), -1, 0))
    return torch.from_numpy(tile).float().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Box sampling and flips
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxSampling:
    """How many boxes to draw (with replacement) from a tile, by the classes its library boxes hold.

    Attributes:
        negative_only: boxes drawn from a tile holding only normal (negative) boxes.
        positive_only: boxes drawn from a tile holding only cancer (positive) boxes.
        mixed: ``(positives, negatives)`` drawn from a tile holding both.
    """

    negative_only: int
    positive_only: int
    mixed: tuple[int, int]

    def __post_init__(self) -> None:
        counts = (self.negative_only, self.positive_only, *self.mixed)
        if len(self.mixed) != 2 or min(counts) < 0 or min(self.negative_only, self.positive_only, sum(self.mixed)) < 1:
            raise ValueError(f"BoxSampling: every kind of tile needs at least one box, got {self}")

    @classmethod
    def balanced(cls, boxes_per_tile: int = 8) -> BoxSampling:
        """``k`` boxes per tile, half positive and half negative where the tile has both (paper: k = 8)."""
        k = int(boxes_per_tile)
        if k < 1:
            raise ValueError(f"boxes_per_tile must be >= 1, got {boxes_per_tile}")
        return cls(negative_only=k, positive_only=k, mixed=(k - k // 2, k // 2))


#: Paper: k = 8 boxes per tile, balanced between positive and negative, drawn with replacement.
PAPER_BOX_SAMPLING = BoxSampling.balanced(8)
#: Released code (per batch of 4 tiles with cancer boxes and 4 without): purely negative tile 6 negatives,
#: purely positive tile 10 positives, mixed tile 8 positives + 2 negatives.
RELEASED_BOX_SAMPLING = BoxSampling(negative_only=6, positive_only=10, mixed=(8, 2))
BOX_SAMPLING_PRESETS = {"paper": PAPER_BOX_SAMPLING, "released_code": RELEASED_BOX_SAMPLING}


def resolve_box_sampling(preset: str | BoxSampling = "paper", boxes_per_tile: int | None = None) -> BoxSampling:
    """``"paper"`` (balanced, ``boxes_per_tile`` boxes, default 8), ``"released_code"`` or a :class:`BoxSampling`."""
    if isinstance(preset, BoxSampling):
        return preset
    key = str(preset).lower().replace("-", "_")
    if key == "paper":
        return BoxSampling.balanced(8 if boxes_per_tile is None else boxes_per_tile)
    if key not in BOX_SAMPLING_PRESETS:
        raise ValueError(f"unknown box sampling {preset!r}: expected one of {sorted(BOX_SAMPLING_PRESETS)}")
    return BOX_SAMPLING_PRESETS[key]


def sample_boxes(
    boxes: np.ndarray, classes: np.ndarray, rng: np.random.Generator, sampling: BoxSampling = PAPER_BOX_SAMPLING
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a tile's training boxes from its library boxes, with replacement.

    Args:
        boxes: ``(L, 4)`` library boxes ``[xmin, ymin, xmax, ymax]`` of one tile, ``L >= 1``.
        classes: ``(L,)`` classes (1 = cancer / positive, 0 = normal / negative).
        rng: the generator making the draws.
        sampling: how many of each class (:class:`BoxSampling`).

    Returns:
        ``(k, 4)`` boxes and ``(k,)`` classes: the positives first, then the negatives.
    """
    boxes, classes = np.asarray(boxes).reshape(-1, 4), np.asarray(classes).reshape(-1)
    if len(boxes) == 0 or len(boxes) != len(classes):
        raise ValueError(f"sample_boxes: need L >= 1 boxes with one class each, got {len(boxes)} and {len(classes)}")
    positives = np.flatnonzero(classes == CANCER)
    negatives = np.flatnonzero(classes == NORMAL)
    if len(positives) and len(negatives):
        n_pos, n_neg = sampling.mixed
    elif len(positives):
        n_pos, n_neg = sampling.positive_only, 0
    else:
        n_pos, n_neg = 0, sampling.negative_only
    chosen = np.concatenate(
        [rng.choice(positives, n_pos, replace=True) if n_pos else np.zeros(0, np.int64)]
        + [rng.choice(negatives, n_neg, replace=True) if n_neg else np.zeros(0, np.int64)]
    ).astype(np.int64)
    return boxes[chosen], classes[chosen]


def flip_boxes(boxes: np.ndarray, height: int, width: int, horizontal: bool, vertical: bool) -> np.ndarray:
    """Boxes ``(K, 4)`` ``(x1, y1, x2, y2)`` (``x2``, ``y2`` exclusive) of a tile flipped left-right / up-down.

    A horizontal flip maps column ``c`` to ``W - 1 - c``, so ``[x1, x2)`` becomes ``[W - x2, W - x1)``; a
    vertical flip does the same to rows with ``H``.
    """
    boxes = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    if horizontal:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if vertical:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    return boxes


def _flip_tile(tile: np.ndarray, horizontal: bool, vertical: bool) -> np.ndarray:
    """``(H, W, C)`` tile flipped left-right (columns) and/or up-down (rows)."""
    if horizontal:
        tile = tile[:, ::-1]
    if vertical:
        tile = tile[::-1]
    return tile


# ----------------------------------------------------------------------------------------------------------------
# Library checks
# ----------------------------------------------------------------------------------------------------------------


def _load_library(library: str | os.PathLike | BoxLibrary) -> tuple[BoxLibrary, str]:
    if isinstance(library, BoxLibrary):
        return library, "box library"
    return read_library_csv(library), f"box library {library}"


def _tiles_with_boxes(
    source: TileSource, library: str | os.PathLike | BoxLibrary
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """``[(tile index, boxes (L, 4) int64, classes (L,) int64)]`` of the tiles of ``source`` with library boxes.

    Raises ValueError for an empty library, tile ids missing from ``source`` and boxes outside their tile; the
    messages name the library file and the tile.
    """
    library, label = _load_library(library)
    if len(library) == 0:
        raise ValueError(f"{label} holds no boxes: build it with `python -m roigan_stain_transfer.box_library build`")
    grouped: dict[str, list] = {}
    for record in library.records:  # one pass (BoxLibrary.by_tile scans all records once per tile)
        grouped.setdefault(record.tile, []).append(record)
    usable = []
    for name, records in grouped.items():
        boxes = np.array([record[1:5] for record in records], dtype=np.int64).reshape(-1, 4)
        classes = np.array([record.cls for record in records], dtype=np.int64)
        index = source.index_of(name)
        if index is None:
            raise ValueError(
                f"{label}: tile {name!r} is not in tile source {source.path} (its tiles are named like "
                f"{source.names[0]!r})"
            )
        height, width = source.size(index)
        outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
        if outside.any():
            box = boxes[np.flatnonzero(outside)[0]].tolist()
            raise ValueError(f"{label}: box {box} of tile {name!r} lies outside the {width} x {height} tile")
        usable.append((index, boxes, classes))
    usable.sort(key=lambda item: item[0])
    return usable


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------


def _key(key: int | Sequence[int]) -> tuple[int, int]:
    """``(index, epoch)`` from a dataset key: an int index (epoch 0) or the pair yielded by :class:`TileSampler`."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise KeyError(f"expected an index or an (index, epoch) pair, got {key!r}")
        return int(key[0]), int(key[1])
    return int(key), 0


def _as_source(source: str | os.PathLike | TileSource, tile_size) -> TileSource:
    return source if isinstance(source, TileSource) else TileSource(source, tile_size, multiple=GENERATOR_MULTIPLE)


class UnpairedTileDataset(Dataset):
    """Unpaired H&E / IHC training samples with sampled cell boxes (see the module docstring).

    Args:
        he_source, ihc_source: :class:`TileSource` or its path (PNG folder or HDF5 file).
        he_library, ihc_library: box library CSV (or :class:`BoxLibrary`) of each source.
        box_sampling: ``"paper"`` (balanced, ``boxes_per_tile`` per tile), ``"released_code"`` or a
            :class:`BoxSampling`.
        boxes_per_tile: ``k`` of the paper's balanced sampling.
        flips: random horizontal and vertical flips (each with probability 1/2, per tile).
        tile_size: expected tile height and width (None: any, but one size per batch).
        seed: seed of the per-sample generators.

    ``len(dataset)`` is the number of H&E tiles with library boxes. ``dataset[key]`` (``key`` an index or an
    ``(index, epoch)`` pair) is a dict::

        he: (3, H, W) float32 in [-1, 1]      ihc: (3, H, W) float32 in [-1, 1]
        he_boxes: (k, 4) float32              ihc_boxes: (k', 4) float32      (x1, y1, x2, y2)
        he_classes: (k,) int64                ihc_classes: (k',) int64        (1 = cancer)
        he_name: str                          ihc_name: str                   (tile ids)
    """

    def __init__(
        self,
        he_source: str | os.PathLike | TileSource,
        ihc_source: str | os.PathLike | TileSource,
        he_library: str | os.PathLike | BoxLibrary,
        ihc_library: str | os.PathLike | BoxLibrary,
        box_sampling: str | BoxSampling = "paper",
        boxes_per_tile: int = 8,
        flips: bool = True,
        tile_size: int | Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.sources = {HE_KEY: _as_source(he_source, tile_size), IHC_KEY: _as_source(ihc_source, tile_size)}
        self.tiles = {
            HE_KEY: _tiles_with_boxes(self.sources[HE_KEY], he_library),
            IHC_KEY: _tiles_with_boxes(self.sources[IHC_KEY], ihc_library),
        }
        for domain, library in ((HE_KEY, he_library), (IHC_KEY, ihc_library)):
            if not self.tiles[domain]:
                raise ValueError(f"no tile of {self.sources[domain].path} has boxes in {library}")
        self.sampling = resolve_box_sampling(box_sampling, boxes_per_tile)
        self.flips = bool(flips)
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")

    def __len__(self) -> int:
        return len(self.tiles[HE_KEY])

    def _domain_sample(self, domain: str, position: int, rng: np.random.Generator) -> dict[str, Any]:
        source = self.sources[domain]
        index, boxes, classes = self.tiles[domain][position]
        tile = source.read(index)
        boxes, classes = sample_boxes(boxes, classes, rng, self.sampling)
        if self.flips:
            horizontal, vertical = (bool(v) for v in rng.random(2) < 0.5)
            tile = _flip_tile(tile, horizontal, vertical)
            boxes = flip_boxes(boxes, tile.shape[0], tile.shape[1], horizontal, vertical)
        return {
            domain: to_network(tile),
            f"{domain}_boxes": torch.from_numpy(boxes.astype(np.float32)),
            f"{domain}_classes": torch.from_numpy(classes.astype(np.int64)),
            f"{domain}_name": source.names[index],
        }

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        index, epoch = _key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} H&E tiles with boxes")
        rng = np.random.default_rng([self.seed, max(epoch, 0), index])
        partner = int(rng.integers(len(self.tiles[IHC_KEY])))
        sample = self._domain_sample(HE_KEY, index, rng)
        sample.update(self._domain_sample(IHC_KEY, partner, rng))
        return sample


class TileDataset(Dataset):
    """Tiles of one source for inference: ``{"image": (3, H, W) float32 in [-1, 1], "name": output file name}``.

    ``name`` is the PNG file name for a folder source and ``"<HDF5 stem>_<index>.png"`` for an HDF5 source.

    With ``transform`` (e.g. the bundle's ``preprocessing``), items are ``transform({"image": tile, "name": ...})``
    of the tile as read, RGB ``(H, W, 3)`` uint8, instead: the form MONAI Deploy hands the bundle's
    ``preprocessing``, so that the bundle's own inference runs the same steps.
    """

    def __init__(
        self,
        source: str | os.PathLike | TileSource,
        tile_size: int | Sequence[int] | None = None,
        image_key: str = IMAGE_KEY,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.source = _as_source(source, tile_size)
        self.image_key = image_key
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        tile, name = self.source.read(index), self.source.file_names[index]
        if self.transform is not None:
            return self.transform({self.image_key: np.array(tile, copy=True), NAME_KEY: name})
        return {self.image_key: to_network(tile), NAME_KEY: name}


class AnnotatedTileDataset(Dataset):
    """Held-out H&E tiles with annotation masks (and optionally the paired real IHC tiles) for evaluation.

    Args:
        he_source: H&E tiles (PNG folder or HDF5 file).
        mask_source: annotation masks: PNG folder with masks named like the H&E files, or HDF5 file with
            dataset ``y`` ``(N, H, W)`` in the order of the H&E tiles.
        ihc_source: paired IHC tiles in the same order / with the same names, or None.
        tile_size: expected tile size (None: any).

    Items: ``{"he": (3, H, W) float32, "mask": (H, W) bool, "name": str}`` plus ``"ihc": (3, H, W)`` with a pair.
    """

    def __init__(
        self,
        he_source: str | os.PathLike | TileSource,
        mask_source: str | os.PathLike | MaskSource,
        ihc_source: str | os.PathLike | TileSource | None = None,
        tile_size: int | Sequence[int] | None = None,
    ) -> None:
        self.he = _as_source(he_source, tile_size)
        self.masks = mask_source if isinstance(mask_source, MaskSource) else MaskSource(mask_source)
        self.ihc = None if ihc_source is None else _as_source(ihc_source, tile_size)
        if self.ihc is not None and len(self.ihc) != len(self.he):
            raise ValueError(
                f"paired IHC tiles {self.ihc.path} ({len(self.ihc)}) and H&E tiles {self.he.path} ({len(self.he)}) "
                "differ in number"
            )

    def __len__(self) -> int:
        return len(self.he)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        item = {
            HE_KEY: to_network(self.he.read(index)),
            MASK_KEY: torch.from_numpy(self.masks.read(self.he, index)),
            NAME_KEY: self.he.file_names[index],
        }
        if self.ihc is not None:
            ihc = self.ihc.read(index)
            if ihc.shape[:2] != self.he.size(index):
                raise ValueError(f"{self.ihc.label(index)}: IHC tile {ihc.shape[:2]} differs from its H&E tile")
            item[IHC_KEY] = to_network(ihc)
        return item


# ----------------------------------------------------------------------------------------------------------------
# Sampler and collation
# ----------------------------------------------------------------------------------------------------------------


class TileSampler(DistributedSampler):
    """Epoch-seeded sample order that yields ``(index, epoch)`` keys and can start an epoch part-way.

    A :class:`torch.utils.data.DistributedSampler` (so MONAI workflows call :meth:`set_epoch` at every epoch
    start): the order of epoch ``e`` is a permutation drawn from ``seed + e`` (or ``0 .. N-1`` without
    ``shuffle``), split between ``num_replicas`` ranks. ``num_replicas`` and ``rank`` default to the initialised
    process group, else to a single process. :meth:`set_start` makes the next iteration skip the first ``start``
    keys of this rank (used on resume, then reset to 0).

    ``samples_per_epoch`` (per rank) decouples the epoch from the dataset, as the released code's epochs of 200
    batches: each rank then reads an endless stream of passes over its share (pass ``p`` in the order above for
    ``e = p``, with keys ``(index, p)``, so a tile seen twice gets new boxes and flips), and epoch ``e`` is items
    ``e * samples_per_epoch`` to ``(e + 1) * samples_per_epoch - 1`` of that stream. Without it an epoch is one
    pass, exactly as before.
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if samples_per_epoch is not None and int(samples_per_epoch) < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 (or None: one pass per epoch), got {samples_per_epoch}")
        if self.num_samples < 1:
            raise ValueError(f"TileSampler: {len(dataset)} samples leave none for rank {rank} of {num_replicas}")
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.start = 0

    def __len__(self) -> int:
        return self.num_samples if self.samples_per_epoch is None else self.samples_per_epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` keys of the next pass over this rank's share."""
        if int(start) < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = int(start)

    def _pass(self, number: int) -> list[tuple[int, int]]:
        """This rank's keys of pass ``number``: the order of ``DistributedSampler`` at epoch ``number``."""
        epoch, self.epoch = self.epoch, number
        try:
            return [(int(index), number) for index in super().__iter__()]
        finally:
            self.epoch = epoch

    def __iter__(self):
        if self.samples_per_epoch is None:
            keys = self._pass(int(self.epoch))
        else:
            length, share = self.samples_per_epoch, self.num_samples
            first = int(self.epoch) * length
            keys = []
            for number in range(first // share, (first + length - 1) // share + 1):
                keys += self._pass(number)
            keys = keys[first % share : first % share + length]
        start, self.start = self.start, 0
        return iter(keys[start:])


def collate_tiles(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: image tensors stacked to ``(B, ...)``; box and class tensors kept as lists of ``B``
    tensors (their lengths may differ); other tensors stacked; everything else (names) as lists."""
    if not items:
        raise ValueError("collate_tiles: empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key.endswith("_boxes") or key.endswith("_classes"):
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"collate_tiles: {key!r} tensors of different shapes {sorted(shapes)} in one batch")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
