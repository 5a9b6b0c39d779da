"""Automatic cell box library of the region-guided CycleGAN (Boyd et al., MICCAI 2022).

The region-guided CycleGAN is trained with boxes around *cancer* and *normal* cells in both domains (H&E and
IHC tiles). The boxes are found automatically, without annotation beyond a coarse tumour mask for H&E:

1. **Stain separation.** ``skimage.color.rgb2hed`` splits a tile into haematoxylin (H), eosin (E) and DAB
   concentrations. Each stain of interest is converted back to RGB alone (the other channels zero) with
   ``hed2rgb`` and then to grey with ``rgb2gray`` ("H grey", "DAB grey"; dark = much stain).
2. **Blob detection.** Cells are Laplacian-of-Gaussian blobs of the smoothed, inverted grey:
   ``blob_log(1 - gaussian(grey, g), min_sigma, max_sigma, threshold=..., exclude_border=True)``.
   Each blob centre ``(row, col)`` gives a ``box_size`` square box centred on it, kept only when it lies
   fully inside the tile.
3. **H&E tiles** come with an expert tumour mask. Small nuclei (normal cells, mostly lymphocytes) are grouped
   by single linkage (two cells are linked when their centres are at most ``cluster_distance`` px apart).
   Clusters of at least ``min_cluster_size`` cells are drawn as filled convex hulls (boundary pixels
   included), smaller clusters as single pixels at their centres; that drawing is dilated by a disk of
   ``exclusion_radius`` px and removed from the tumour mask. Large nuclei (cancer cells) count only when their
   centre pixel is in what remains of the mask; normal boxes come only from cells in the large clusters.
4. **IHC tiles** are split by a DAB mask (see :func:`dab_mask`): cancer cells are DAB blobs inside it,
   normal cells are H blobs outside it.
5. The boxes of all tiles form a library stored as CSV with columns ``tile, xmin, ymin, xmax, ymax, class``
   (class 1 = cancer, 0 = normal).

Conventions: tiles are RGB ``uint8`` arrays ``(H, W, 3)``; masks are boolean ``(H, W)``; cell centres are
integer ``(row, col)`` pairs; boxes are integer pixel coordinates ``[xmin, ymin, xmax, ymax]`` with
``x`` = column and ``y`` = row, ``xmax - xmin == ymax - ymin == box_size`` and a box centred on cell
``(r, c)`` spanning ``[c - box_size // 2, r - box_size // 2, xmin + box_size, ymin + box_size]``.

The two parameter presets differ only in the clustering distance: :data:`PAPER` (25 px, as written in the
paper) and :data:`RELEASED_CODE` (35 px, as in the authors' released code).

Command line::

    python -m roigan_stain_transfer.box_library build --source tiles/ --output boxes.csv --stain he --masks masks/
    python -m roigan_stain_transfer.box_library build --source IHC_patches.h5 --output ihc_boxes.csv --stain ihc
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist
from skimage.color import hed2rgb, rgb2gray, rgb2hed
from skimage.feature import blob_log
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import closing, dilation, disk

from shared_ops.atomic import atomic_write

__all__ = [
    "CANCER",
    "CSV_COLUMNS",
    "NORMAL",
    "PAPER",
    "PRESETS",
    "RELEASED_CODE",
    "BlobParams",
    "BoxLibrary",
    "BoxLibraryParams",
    "BoxRecord",
    "DabMaskInfo",
    "TileBoxes",
    "blob_centres",
    "boxes_around",
    "build_library",
    "cluster_labels",
    "convex_hull",
    "dab_grey",
    "dab_mask",
    "haematoxylin_grey",
    "he_tile_boxes",
    "ihc_tile_boxes",
    "iter_tiles",
    "main",
    "normal_cluster_image",
    "read_library_csv",
    "records_for_tile",
    "resolve_preset",
    "validate_mask",
    "validate_tile",
    "write_library_csv",
]

CANCER = 1
NORMAL = 0
CSV_COLUMNS = ("tile", "xmin", "ymin", "xmax", "ymax", "class")

# Channel indices of ``rgb2hed`` output.
_H, _E, _DAB = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobParams:
    """Parameters of one ``blob_log`` detection on ``1 - gaussian(grey, smoothing_sigma)``."""

    smoothing_sigma: float
    min_sigma: float
    max_sigma: float
    threshold: float


@dataclass(frozen=True)
class BoxLibraryParams:
    """Every parameter of the box library (defaults: the released-code values).

    Attributes:
        box_size: side of the square box around each cell, in pixels.
        he_normal: normal-cell detection on the H grey of H&E tiles.
        he_cancer: cancer-cell detection on the H grey of H&E tiles.
        cluster_distance: single-linkage distance (px, inclusive) grouping H&E normal cells.
        min_cluster_size: clusters with at least this many cells become convex hulls and give normal boxes.
        exclusion_radius: radius of the disk dilating the normal-cluster drawing before its removal from the
            tumour mask.
        ihc_normal: normal-cell detection on the H grey of IHC tiles.
        ihc_cancer: cancer-cell detection on ``1 - DAB grey`` of IHC tiles.
        dab_smoothing_sigma: Gaussian sigma smoothing the DAB grey before Otsu thresholding.
        dab_closing_radius: radius of the disk closing the thresholded DAB mask.
        dab_empty_mean: when the mean smoothed DAB grey exceeds this, the tile has (almost) no DAB and the
            mask is emptied.
    """

    box_size: int = 48
    he_normal: BlobParams = field(default_factory=lambda: BlobParams(2.0, 1.0, 2.0, 0.1))
    he_cancer: BlobParams = field(default_factory=lambda: BlobParams(1.0, 10.0, 12.0, 0.01))
    cluster_distance: float = 35.0
    min_cluster_size: int = 3
    exclusion_radius: int = 10
    ihc_normal: BlobParams = field(default_factory=lambda: BlobParams(2.0, 1.0, 3.0, 0.08))
    ihc_cancer: BlobParams = field(default_factory=lambda: BlobParams(2.0, 7.0, 10.0, 0.02))
    dab_smoothing_sigma: float = 1.0
    dab_closing_radius: int = 9
    dab_empty_mean: float = 0.85


#: Parameters as written in the paper (normal cells clustered within 25 px).
PAPER = BoxLibraryParams(cluster_distance=25.0)
#: Parameters of the authors' released code (normal cells clustered within 35 px).
RELEASED_CODE = BoxLibraryParams(cluster_distance=35.0)
PRESETS: dict[str, BoxLibraryParams] = {"paper": PAPER, "released_code": RELEASED_CODE}


def resolve_preset(preset: str | BoxLibraryParams) -> BoxLibraryParams:
    """Return the parameters named ``preset`` (``"paper"`` or ``"released_code"``), or ``preset`` itself."""
    if isinstance(preset, BoxLibraryParams):
        return preset
    key = str(preset).lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[key]


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


def validate_tile(tile: np.ndarray, name: str = "tile") -> np.ndarray:
    """Check that ``tile`` is an RGB ``uint8`` array ``(H, W, 3)`` and return it; ``name`` labels errors."""
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"{name}: expected an RGB tile (H, W, 3) uint8, got {tile.shape} {tile.dtype}")
    return tile


def validate_mask(mask: np.ndarray, tile_shape: Sequence[int], name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a boolean ``(H, W)`` array after checking it matches a tile of ``tile_shape``."""
    mask = np.asarray(mask)
    if mask.shape != tuple(tile_shape[:2]):
        raise ValueError(f"{name}: expected a mask of shape {tuple(tile_shape[:2])} like its tile, got {mask.shape}")
    return mask.astype(bool)


# ----------------------------------------------------------------------------------------------------------------
# Stains, blobs, boxes
# ----------------------------------------------------------------------------------------------------------------


def _single_stain_grey(tile: np.ndarray, channel: int) -> np.ndarray:
    """Grey ``(H, W)`` float image of one ``rgb2hed`` channel rendered alone back to RGB (dark = stained)."""
    hed = rgb2hed(tile)
    only = np.zeros_like(hed)
    only[..., channel] = hed[..., channel]
    return rgb2gray(hed2rgb(only))


def haematoxylin_grey(tile: np.ndarray) -> np.ndarray:
    """H grey ``(H, W)`` in [0, 1] of an RGB tile ``(H, W, 3)``."""
    return _single_stain_grey(tile, _H)


def dab_grey(tile: np.ndarray) -> np.ndarray:
    """DAB grey ``(H, W)`` in [0, 1] of an RGB tile ``(H, W, 3)``."""
    return _single_stain_grey(tile, _DAB)


def blob_centres(grey: np.ndarray, params: BlobParams) -> np.ndarray:
    """Centres ``(N, 2)`` int64 ``(row, col)`` of dark blobs of ``grey`` ``(H, W)``, in ``blob_log`` order."""
    smoothed = gaussian(grey, params.smoothing_sigma)
    blobs = blob_log(
        1.0 - smoothed,
        min_sigma=params.min_sigma,
        max_sigma=params.max_sigma,
        threshold=params.threshold,
        exclude_border=True,
    )
    return np.rint(blobs[:, :2]).astype(np.int64).reshape(-1, 2)


def boxes_around(centres: np.ndarray, shape: Sequence[int], box_size: int) -> np.ndarray:
    """Boxes ``(K, 4)`` int64 ``[xmin, ymin, xmax, ymax]`` centred on ``centres`` ``(N, 2)`` ``(row, col)``.

    A box starts ``box_size // 2`` px left of and above its centre and is ``box_size`` wide and high; only boxes
    fully inside an image of ``shape`` ``(H, W, ...)`` are kept (``xmin, ymin >= 0``, ``xmax <= W``,
    ``ymax <= H``), in the order of ``centres``.
    """
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    height, width = int(shape[0]), int(shape[1])
    half = box_size // 2
    xmin = centres[:, 1] - half
    ymin = centres[:, 0] - half
    boxes = np.stack([xmin, ymin, xmin + box_size, ymin + box_size], axis=1)
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)
    return boxes[inside]


def _centres_in_mask(centres: np.ndarray, mask: np.ndarray, inside: bool = True) -> np.ndarray:
    """The centres ``(N, 2)`` ``(row, col)`` whose pixel of ``mask`` is ``inside`` (True) or not (False)."""
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    hits = mask[centres[:, 0], centres[:, 1]]
    return centres[hits == inside]


# ----------------------------------------------------------------------------------------------------------------
# H&E: clusters of normal cells
# ----------------------------------------------------------------------------------------------------------------


def cluster_labels(centres: np.ndarray, distance: float) -> np.ndarray:
    """Single-linkage cluster label ``(N,)`` of each centre ``(N, 2)``: linked when at most ``distance`` apart."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) == 0:
        return np.zeros(0, dtype=np.int64)
    linked = cdist(centres, centres) <= distance
    _, labels = connected_components(linked, directed=False)
    return labels.astype(np.int64)


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """z component of ``(a - o) x (b - o)``: positive for a counter-clockwise turn."""
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices ``(V, 2)`` of ``points`` ``(N, 2)`` (monotone chain, collinear points dropped).

    Works in the coordinates given (any axis order). Degenerate inputs give one vertex (all points equal) or
    the two end points of a segment (all points collinear).
    """
    pts = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)
    if len(pts) <= 2:
        return pts

    def half_hull(ordered: np.ndarray) -> list[np.ndarray]:
        chain: list[np.ndarray] = []
        for p in ordered:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    lower = half_hull(pts)
    upper = half_hull(pts[::-1])
    return np.array(lower[:-1] + upper[:-1])


def normal_cluster_image(
    centres: np.ndarray, labels: np.ndarray, shape: Sequence[int], min_cluster_size: int
) -> np.ndarray:
    """Boolean ``(H, W)`` drawing of the normal-cell clusters.

    Clusters of at least ``min_cluster_size`` cells become filled convex hulls with their boundary pixels
    (PIL ``ImageDraw.polygon`` with both fill and outline); smaller clusters become single pixels at their cell
    centres. ``centres`` are ``(N, 2)`` ``(row, col)``, ``labels`` ``(N,)``.
    """
    height, width = int(shape[0]), int(shape[1])
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 2)
    for label in np.unique(labels):
        members = centres[labels == label]
        if len(members) >= min_cluster_size:
            hull_xy = convex_hull(members[:, ::-1])  # PIL wants (x, y) = (col, row)
            vertices = [(float(x), float(y)) for x, y in hull_xy]
            if len(vertices) == 1:
                draw.point(vertices, fill=1)
            else:
                draw.polygon(vertices, fill=1, outline=1)
        else:
            for row, col in members:
                draw.point((int(col), int(row)), fill=1)
    return np.asarray(canvas, dtype=bool)


# ----------------------------------------------------------------------------------------------------------------
# Per-tile box detection
# ----------------------------------------------------------------------------------------------------------------


class TileBoxes(NamedTuple):
    """Boxes of one tile: ``normal`` ``(N, 4)`` and ``cancer`` ``(M, 4)`` int64 ``[xmin, ymin, xmax, ymax]``."""

    normal: np.ndarray
    cancer: np.ndarray


def he_tile_boxes(
    tile: np.ndarray, tumour_mask: np.ndarray, params: BoxLibraryParams = RELEASED_CODE, name: str = "tile"
) -> TileBoxes:
    """Normal and cancer boxes of an H&E tile ``(H, W, 3)`` uint8 with its expert tumour mask ``(H, W)`` bool.

    Boxes follow ``blob_log`` order of their cells; ``name`` labels errors.
    """
    tile = validate_tile(tile, name)
    if tumour_mask is None:
        raise ValueError(f"{name}: H&E tiles need an expert tumour mask (H, W) bool, got None")
    tumour_mask = validate_mask(tumour_mask, tile.shape, f"mask of {name}")
    grey = haematoxylin_grey(tile)

    normal = blob_centres(grey, params.he_normal)
    labels = cluster_labels(normal, params.cluster_distance)
    clusters = normal_cluster_image(normal, labels, tile.shape, params.min_cluster_size)
    excluded = dilation(clusters, disk(params.exclusion_radius))
    cancer_region = tumour_mask & ~excluded

    sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    clustered = normal[sizes[labels] >= params.min_cluster_size] if len(labels) else normal
    cancer = _centres_in_mask(blob_centres(grey, params.he_cancer), cancer_region)
    return TileBoxes(
        normal=boxes_around(clustered, tile.shape, params.box_size),
        cancer=boxes_around(cancer, tile.shape, params.box_size),
    )


@dataclass(frozen=True)
class DabMaskInfo:
    """Summary of :func:`dab_mask`: Otsu ``threshold``, ``mean_grey`` of the smoothed DAB grey, ``coverage``
    (fraction of mask pixels after closing, 0 when emptied) and whether the mask was ``emptied``."""

    threshold: float
    mean_grey: float
    coverage: float
    emptied: bool


def dab_mask(
    tile: np.ndarray, params: BoxLibraryParams = RELEASED_CODE, name: str = "tile"
) -> tuple[np.ndarray, DabMaskInfo]:
    """DAB-positive mask ``(H, W)`` bool of an RGB tile ``(H, W, 3)`` uint8, with its :class:`DabMaskInfo`.

    The DAB grey is smoothed (Gaussian, ``dab_smoothing_sigma``), thresholded at its Otsu value ``T``
    (mask = grey <= T, i.e. the darker, stained side) and closed with a disk of ``dab_closing_radius``. When the
    mean smoothed grey exceeds ``dab_empty_mean`` the tile carries too little DAB and the mask is all False.
    Used both to pick IHC cells and to binarise real or synthetic IHC the same way in evaluation.
    """
    tile = validate_tile(tile, name)
    grey = gaussian(dab_grey(tile), params.dab_smoothing_sigma)
    threshold = float(threshold_otsu(grey))
    mean_grey = float(grey.mean())
    emptied = mean_grey > params.dab_empty_mean
    if emptied:
        mask = np.zeros(grey.shape, dtype=bool)
    else:
        mask = closing(grey <= threshold, disk(params.dab_closing_radius))
    return mask, DabMaskInfo(threshold=threshold, mean_grey=mean_grey, coverage=float(mask.mean()), emptied=emptied)


def ihc_tile_boxes(tile: np.ndarray, params: BoxLibraryParams = RELEASED_CODE, name: str = "tile") -> TileBoxes:
    """Normal and cancer boxes of an IHC tile ``(H, W, 3)`` uint8: H blobs outside / DAB blobs inside the DAB mask.

    Boxes follow ``blob_log`` order of their cells; ``name`` labels errors.
    """
    tile = validate_tile(tile, name)
    mask, _ = dab_mask(tile, params, name)
    normal = _centres_in_mask(blob_centres(haematoxylin_grey(tile), params.ihc_normal), mask, inside=False)
    cancer = _centres_in_mask(blob_centres(1.0 - dab_grey(tile), params.ihc_cancer), mask, inside=True)
    return TileBoxes(
        normal=boxes_around(normal, tile.shape, params.box_size),
        cancer=boxes_around(cancer, tile.shape, params.box_size),
    )


# ----------------------------------------------------------------------------------------------------------------
# Library records and CSV storage
# ----------------------------------------------------------------------------------------------------------------


class BoxRecord(NamedTuple):
    """One row of the library: box ``[xmin, ymin, xmax, ymax]`` (x = column) of ``tile``, ``cls`` 1 = cancer."""

    tile: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int
    cls: int


def records_for_tile(tile: str, boxes: TileBoxes) -> list[BoxRecord]:
    """Library rows of one tile: its normal boxes (class 0) then its cancer boxes (class 1)."""
    rows = [BoxRecord(tile, *map(int, box), NORMAL) for box in boxes.normal]
    rows += [BoxRecord(tile, *map(int, box), CANCER) for box in boxes.cancer]
    return rows


def _record_problem(record: BoxRecord) -> str | None:
    """Why ``record`` is invalid, or None when it is fine (coordinates already ints)."""
    if not record.tile:
        return "empty tile id"
    if min(record.xmin, record.ymin) < 0:
        return f"negative coordinate in box {list(record[1:5])}"
    if record.xmax <= record.xmin or record.ymax <= record.ymin:
        return f"box {list(record[1:5])} needs xmax > xmin and ymax > ymin"
    if record.cls not in (NORMAL, CANCER):
        return f"class {record.cls} is not 0 (normal) or 1 (cancer)"
    return None


def write_library_csv(path: str | os.PathLike, records: Iterable[BoxRecord | Sequence]) -> Path:
    """Write ``records`` to the CSV ``path`` atomically (:func:`shared_ops.atomic.atomic_write`)."""
    path = Path(path)
    rows = [BoxRecord(str(r[0]), *(int(v) for v in r[1:6])) for r in records]
    for number, row in enumerate(rows):
        problem = _record_problem(row)
        if problem:
            raise ValueError(f"record {number} for {path}: {problem}")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    return atomic_write(path, write)


def _parse_int(text: str, column: str, where: str) -> int:
    """``text`` as an int (digits only, no decimal point); ``where`` labels errors."""
    try:
        return int(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"{where}: column {column!r} expected an integer, got {text!r}") from None


def _parse_row(row: dict[str, str], where: str) -> BoxRecord:
    """One validated record from a CSV row; ``where`` (file and line) labels errors."""
    values = [_parse_int(row[column], column, where) for column in CSV_COLUMNS[1:]]
    record = BoxRecord((row["tile"] or "").strip(), *values)
    problem = _record_problem(record)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return record


@dataclass(frozen=True)
class BoxLibrary:
    """Box records read from a library CSV, with per-tile access. Tiles without boxes are absent."""

    records: tuple[BoxRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[BoxRecord]:
        return iter(self.records)

    def tiles(self) -> list[str]:
        """Tile ids in order of first appearance."""
        return list(dict.fromkeys(record.tile for record in self.records))

    def boxes_for_tile(self, tile: str) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(K, 4)`` int64 ``[xmin, ymin, xmax, ymax]`` and classes ``(K,)`` int64 of ``tile`` (K may be 0)."""
        rows = [record for record in self.records if record.tile == tile]
        boxes = np.array([record[1:5] for record in rows], dtype=np.int64).reshape(-1, 4)
        classes = np.array([record.cls for record in rows], dtype=np.int64)
        return boxes, classes

    def by_tile(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{tile: (boxes (K, 4), classes (K,))}`` for every tile with boxes."""
        return {tile: self.boxes_for_tile(tile) for tile in self.tiles()}


def read_library_csv(path: str | os.PathLike) -> BoxLibrary:
    """Read and validate a library CSV (columns ``tile, xmin, ymin, xmax, ymax, class``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box library {path} not found")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [column for column in CSV_COLUMNS if column not in header]
        if missing:
            raise ValueError(f"box library {path}: missing columns {missing}; expected columns {list(CSV_COLUMNS)}")
        reader.fieldnames = header
        records = tuple(_parse_row(row, f"box library {path}, line {reader.line_num}") for row in reader)
    return BoxLibrary(records)


# ----------------------------------------------------------------------------------------------------------------
# Tile sources and the build command
# ----------------------------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    """One tile of a source: ``name`` (its id in the library), ``label`` (for errors), image and optional mask."""

    name: str
    label: str
    image: np.ndarray
    mask: np.ndarray | None


def _png_files(folder: Path) -> list[Path]:
    """Sorted PNG files of ``folder``; an error when there are none."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise ValueError(f"tile folder {folder} holds no PNG tiles")
    return files


def _read_png(path: Path) -> np.ndarray:
    """Pixels of the PNG ``path`` as stored (``(H, W, 3)`` for RGB, ``(H, W)`` for grey)."""
    with Image.open(path) as image:
        return np.asarray(image)


def _open_h5(path: Path):
    """Open the HDF5 file ``path`` for reading, with an error naming it when it is not one."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"{path} is not a readable HDF5 file (expected a folder of PNG tiles or HDF5): {error}"
        ) from None


def _h5_dataset(path: Path, name: str):
    """``(file handle, dataset)`` of dataset ``name`` in the HDF5 file ``path``; the caller closes the handle."""
    handle = _open_h5(path)
    if name not in handle:
        present = sorted(handle.keys())
        handle.close()
        raise ValueError(f"HDF5 file {path} has no dataset {name!r} (datasets: {present})")
    return handle, handle[name]


def _count_tiles(source: Path) -> int:
    """Number of tiles in a PNG folder or an HDF5 file's dataset ``x``."""
    if source.is_dir():
        return len(_png_files(source))
    handle, tiles = _h5_dataset(source, "x")
    with handle:
        return int(tiles.shape[0])


def _iter_png_tiles(folder: Path, masks: Path | None) -> Iterator[_Tile]:
    """Tiles of a PNG folder with masks from the same-named PNGs of ``masks``."""
    if masks is not None and not masks.is_dir():
        raise ValueError(f"mask folder {masks} for PNG tiles in {folder} is not a folder")
    for file in _png_files(folder):
        mask = None
        if masks is not None:
            mask_file = masks / file.name
            if not mask_file.is_file():
                raise FileNotFoundError(f"tile {file.name} of {folder}: mask {mask_file} not found")
            mask = _read_png(mask_file)
            if mask.ndim == 3:
                raise ValueError(f"mask {mask_file}: expected a single-channel (H, W) mask, got {mask.shape}")
            mask = mask > 0
        yield _Tile(file.name, f"tile {file.name} of {folder}", _read_png(file), mask)


def _iter_h5_tiles(source: Path, masks: Path | None) -> Iterator[_Tile]:
    """Tiles of dataset ``x`` of an HDF5 file with masks from dataset ``y`` of the HDF5 file ``masks``."""
    handle, tiles = _h5_dataset(source, "x")
    with handle:
        mask_handle, mask_set = (None, None)
        if masks is not None:
            mask_handle, mask_set = _h5_dataset(masks, "y")
        try:
            if mask_set is not None and mask_set.shape[0] != tiles.shape[0]:
                raise ValueError(
                    f"HDF5 masks {masks}: {mask_set.shape[0]} masks in 'y' for {tiles.shape[0]} tiles of {source}"
                )
            for index in range(tiles.shape[0]):
                mask = None if mask_set is None else np.asarray(mask_set[index])
                label = f"tile {index} of {source.name}"
                yield _Tile(f"{source.name}:{index}", label, np.asarray(tiles[index]), mask)
        finally:
            if mask_handle is not None:
                mask_handle.close()


def iter_tiles(source: str | os.PathLike, masks: str | os.PathLike | None = None) -> Iterator[_Tile]:
    """Yield ``(name, label, tile, mask)`` from a folder of PNG tiles or an HDF5 file (dataset ``x``).

    PNG tiles are named by file name and take their mask (any non-zero pixel is True) from the PNG of the same
    name in the ``masks`` folder. HDF5 tiles are named ``"<file name>:<index>"`` and take their mask from dataset
    ``y`` of the HDF5 file ``masks``. ``mask`` is None without ``masks``.
    """
    source = Path(source)
    masks = None if masks is None else Path(masks)
    if source.is_dir():
        yield from _iter_png_tiles(source, masks)
    elif source.is_file():
        yield from _iter_h5_tiles(source, masks)
    else:
        raise FileNotFoundError(f"tile source {source} is neither a folder of PNG tiles nor an HDF5 file")


def _default_h5_masks(source: Path) -> Path | None:
    """``source`` itself when it is an HDF5 file with a ``y`` dataset, else None."""
    if not source.is_file():
        return None
    with _open_h5(source) as handle:
        return source if "y" in handle else None


def build_library(
    source: str | os.PathLike,
    output_csv: str | os.PathLike,
    stain: str = "he",
    masks: str | os.PathLike | None = None,
    preset: str | BoxLibraryParams = "released_code",
    progress: bool = True,
) -> dict[str, object]:
    """Detect the boxes of every tile of ``source`` and write the library CSV ``output_csv``.

    Args:
        source: folder of PNG tiles or HDF5 file with tiles in dataset ``x`` ``(N, H, W, 3)`` uint8.
        output_csv: library CSV to write (atomically).
        stain: ``"he"`` (needs tumour masks) or ``"ihc"``.
        masks: for H&E, the folder of mask PNGs named like the tiles, or the HDF5 file with dataset ``y``
            ``(N, H, W)`` (default: ``source`` itself when it has ``y``).
        preset: ``"released_code"``, ``"paper"`` or a :class:`BoxLibraryParams`.
        progress: show a tqdm progress bar.

    Returns:
        ``{"output": path, "tiles": n, "normal": n, "cancer": n}``.
    """
    from tqdm import tqdm

    stain = str(stain).lower()
    if stain not in ("he", "ihc"):
        raise ValueError(f"unknown stain {stain!r}: expected 'he' or 'ihc'")
    params = resolve_preset(preset)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"tile source {source} is neither a folder of PNG tiles nor an HDF5 file")
    if stain == "he" and masks is None:
        masks = _default_h5_masks(source)
        if masks is None:
            raise ValueError(f"H&E tiles of {source} need tumour masks: pass masks=<mask folder or HDF5 file>")

    records: list[BoxRecord] = []
    total = _count_tiles(source)
    for tile in tqdm(iter_tiles(source, masks if stain == "he" else None), total=total, disable=not progress):
        if stain == "he":
            boxes = he_tile_boxes(tile.image, tile.mask, params, name=tile.label)
        else:
            boxes = ihc_tile_boxes(tile.image, params, name=tile.label)
        records += records_for_tile(tile.name, boxes)

    written = write_library_csv(output_csv, records)
    return {
        "output": str(written),
        "tiles": total,
        "normal": sum(r.cls == NORMAL for r in records),
        "cancer": sum(r.cls == CANCER for r in records),
    }


def main() -> None:
    """Command line: ``python -m roigan_stain_transfer.box_library build --source ... --output ...``."""
    import fire

    def build(
        source: str,
        output: str,
        stain: str = "he",
        masks: str | None = None,
        preset: str = "released_code",
        progress: bool = True,
    ) -> dict[str, object]:
        """Build a box library CSV from a folder of PNG tiles or an HDF5 file."""
        return build_library(source, output, stain=stain, masks=masks, preset=preset, progress=progress)

    fire.Fire({"build": build})


if __name__ == "__main__":
    main()
