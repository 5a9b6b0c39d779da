"""From raw slides and annotations to a training run: tiles, tumour masks, coordinates and the box library.

:func:`extract_training_tiles` cuts non-overlapping tiles at the requested microns per pixel from slides with
enough tissue (:mod:`.tissue`), reads them through MONAI's ``PatchWSIDataset`` (:mod:`.tiling`) and writes
them where the bundle's configs look (``output`` is the bundle's ``--dataset_dir``):

============  ==========================================================================================
split train   ``train/he/*.png`` + ``train/he_masks/*.png`` + ``train/he_boxes.csv`` (H&E, with annotations);
              ``train/ihc/*.png`` + ``train/ihc_boxes.csv`` (IHC)
split test    ``test/he/*.png`` + ``test/masks/*.png`` (``evaluate.json``)
always        ``<split>/<stain>_tiles.csv``: tile, slide, level-0 x/y of the top-left corner, mpp, tissue and
              tumour fractions
============  ==========================================================================================

With ``format="hdf5"`` the tiles go to ``<split>/<stain>.h5`` instead (dataset ``x`` (N, T, T, 3) uint8, ``y``
(N, T, T) bool masks for H&E, ``coords`` (N, 2) level-0 x/y), which the configs read when pointed at the file.

H&E tiles are balanced: per slide, as many tumour tiles (annotated fraction >= ``tumour_fraction``) as
normal tiles (no annotated pixel), at most ``tiles_per_class`` of each, drawn at random (``seed``). Tumour
masks are rasterised from CAMELYON16/ASAP XML or QuPath GeoJSON polygons at the tile's own resolution, holes
and exclusion regions (CAMELYON16 group ``_2``) removed (:mod:`.annotations`).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from roigan_stain_transfer.wsi import annotations as ann
from roigan_stain_transfer.wsi.outputs import csv_text
from roigan_stain_transfer.wsi.slide import open_slide
from roigan_stain_transfer.wsi.tiling import TileGrid, tile_dataset, tissue_fractions
from roigan_stain_transfer.wsi.tissue import overview_factor, read_overview, tissue_mask
from shared_ops.atomic import atomic_write_text, file_mode, temporary_sibling

__all__ = ["ANNOTATION_SUFFIXES", "extract_training_tiles", "find_annotation"]

ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")
_FIELDS = ("tile", "slide", "x", "y", "mpp", "tissue_fraction", "tumour_fraction")


def find_annotation(slide: Path, annotations: Path) -> Path:
    """The annotation file of ``slide``: ``annotations`` itself when a file, else ``<slide stem>.{xml,geojson,json}``
    in the folder ``annotations``."""
    if annotations.is_file():
        return annotations
    if not annotations.is_dir():
        raise FileNotFoundError(f"{annotations}: annotation file or folder not found")
    for suffix in ANNOTATION_SUFFIXES:
        candidate = annotations / f"{slide.stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{slide}: no annotation {slide.stem}{{{','.join(ANNOTATION_SUFFIXES)}}} in {annotations}; "
        "H&E tiles need tumour annotations"
    )


def _layout(output: Path, split: str, stain: str) -> dict[str, Path]:
    base = output / split
    masks = base / ("masks" if split == "test" else f"{stain}_masks")
    return {
        "tiles": base / stain,
        "masks": masks,
        "h5": base / f"{stain}.h5",
        "library": base / f"{stain}_boxes.csv",
        "index": base / f"{stain}_tiles.csv",
    }


def _sample(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if len(candidates) <= count:
        return np.sort(candidates)
    return np.sort(rng.choice(candidates, size=count, replace=False))


def _select_tiles(
    tissue_frac: np.ndarray,
    tumour_frac: np.ndarray | None,
    tiles_per_class: int,
    min_tissue: float,
    tumour_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Flat grid indices of the tiles to extract (balanced tumour / normal when ``tumour_frac`` is given)."""
    tissue_tiles = np.flatnonzero(tissue_frac >= min_tissue)
    if tumour_frac is None:
        return _sample(tissue_tiles, tiles_per_class, rng)
    tumour = np.flatnonzero(tumour_frac >= tumour_fraction)
    normal = tissue_tiles[tumour_frac[tissue_tiles] == 0]
    count = min(len(tumour), len(normal), tiles_per_class)
    return np.sort(np.concatenate([_sample(tumour, count, rng), _sample(normal, count, rng)]))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _PngTiles:
    """Tiles (and masks) as PNG files in staging folders, renamed into place at :meth:`commit`."""

    def __init__(self, tiles: Path, masks: Path | None) -> None:
        self.final = {"tiles": tiles, "masks": masks}
        self.staging = {k: p.with_name(f".{p.name}.partial") for k, p in self.final.items() if p is not None}
        for folder in self.staging.values():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.count = 0

    def add(self, name: str, image: np.ndarray, mask: np.ndarray | None) -> str:
        (self.staging["tiles"] / name).write_bytes(_png_bytes(image))
        if mask is not None:
            (self.staging["masks"] / name).write_bytes(_png_bytes(mask.astype(np.uint8) * 255))
        self.count += 1
        return name

    def commit(self) -> None:
        for key, folder in self.staging.items():
            os.replace(folder, self.final[key])

    def abort(self) -> None:
        for folder in self.staging.values():
            shutil.rmtree(folder, ignore_errors=True)


class _Hdf5Tiles:
    """Tiles in dataset ``x`` (N, T, T, 3) uint8, masks in ``y`` (N, T, T) bool and level-0 corners in ``coords``
    (N, 2) float64 of one HDF5 file, appended tile by tile to a temporary file renamed at :meth:`commit`."""

    def __init__(self, path: Path, tile_size: int, with_masks: bool) -> None:
        import h5py

        self.path = path
        self.tmp = temporary_sibling(path)
        self.handle = h5py.File(self.tmp, "w")
        size = (tile_size, tile_size)
        self.x = self.handle.create_dataset(
            "x", (0, *size, 3), np.uint8, maxshape=(None, *size, 3), chunks=(1, *size, 3), compression="gzip"
        )
        self.y = None
        if with_masks:
            self.y = self.handle.create_dataset("y", (0, *size), bool, maxshape=(None, *size), chunks=(1, *size))
        self.coords = self.handle.create_dataset("coords", (0, 2), np.float64, maxshape=(None, 2))
        self.count = 0

    def add(self, name: str, image: np.ndarray, mask: np.ndarray | None, corner: tuple[float, float]) -> str:
        for dataset, value in ((self.x, image), (self.y, mask), (self.coords, np.asarray(corner))):
            if dataset is not None:
                dataset.resize(self.count + 1, axis=0)
                dataset[self.count] = value
        self.count += 1
        return f"{self.path.name}:{self.count - 1}"

    def commit(self) -> None:
        self.handle.close()
        os.chmod(self.tmp, file_mode())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def extract_training_tiles(
    slides: str | os.PathLike | Iterable[str | os.PathLike],
    output: str | os.PathLike,
    stain: str = "he",
    annotations: str | os.PathLike | None = None,
    split: str = "train",
    mpp: float = 0.5,
    slide_mpp: float | None = None,
    tile_size: int = 256,
    tiles_per_class: int = 500,
    min_tissue: float = 0.5,
    tumour_fraction: float = 0.25,
    labels: Sequence[str] | None = None,
    format: str = "png",
    build_library: bool = True,
    preset: str = "released_code",
    seed: int = 0,
    backend: str = "openslide",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract tiles (and tumour masks) from ``slides`` into the dataset folder ``output`` (module docstring).

    Returns a summary: tiles per slide (tumour / normal), output paths and, with ``build_library``, the box
    counts of the library.
    """
    from roigan_stain_transfer.box_library import build_library as build_box_library
    from roigan_stain_transfer.wsi.inference import find_slides

    stain = str(stain).lower()
    if stain not in ("he", "ihc"):
        raise ValueError(f"stain must be 'he' or 'ihc', got {stain!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if format not in ("png", "hdf5"):
        raise ValueError(f"format must be 'png' or 'hdf5', got {format!r}")
    if stain == "he" and annotations is None:
        raise ValueError("H&E tiles need tumour annotations (--annotations: ASAP XML or QuPath GeoJSON)")
    slide_paths = find_slides(slides)
    paths = _layout(Path(output), split, stain)
    targets = [paths["h5"]] if format == "hdf5" else [paths["tiles"], paths["masks"]]
    existing = [p for p in (*targets, paths["index"], paths["library"]) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the tile set")

    rng = np.random.default_rng(seed)
    with_masks = stain == "he"
    rows: list[dict[str, Any]] = []
    per_slide: dict[str, dict[str, int]] = {}
    if format == "png":
        sink = _PngTiles(paths["tiles"], paths["masks"] if with_masks else None)
    else:
        sink = _Hdf5Tiles(paths["h5"], tile_size, with_masks)
    try:
        for slide_path in slide_paths:
            per_slide[str(slide_path)] = _extract_slide(
                slide_path,
                sink,
                rows,
                annotations=annotations if with_masks else None,
                mpp=mpp,
                slide_mpp=slide_mpp,
                tile_size=tile_size,
                tiles_per_class=tiles_per_class,
                min_tissue=min_tissue,
                tumour_fraction=tumour_fraction,
                labels=labels,
                backend=backend,
                rng=rng,
                progress=progress,
            )
        if not rows:
            raise ValueError(f"no tiles extracted from {len(slide_paths)} slide(s): no tissue tile met the criteria")
        for path in existing:  # the earlier tile set goes only once the new one is complete
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    atomic_write_text(paths["index"], csv_text(rows, _FIELDS))

    result: dict[str, Any] = {"tiles": len(rows), "per_slide": per_slide, "index": str(paths["index"])}
    result["source"] = str(paths["h5"] if format == "hdf5" else paths["tiles"])
    if with_masks:
        result["masks"] = str(paths["h5"] if format == "hdf5" else paths["masks"])
    if build_library and split == "train":
        result["library"] = build_box_library(
            result["source"],
            paths["library"],
            stain=stain,
            masks=result.get("masks"),
            preset=preset,
            progress=progress,
        )
    return result


def _extract_slide(
    slide_path: Path,
    sink: _PngTiles | _Hdf5Tiles,
    rows: list[dict[str, Any]],
    *,
    annotations: str | os.PathLike | None,
    mpp: float,
    slide_mpp: float | None,
    tile_size: int,
    tiles_per_class: int,
    min_tissue: float,
    tumour_fraction: float,
    labels: Sequence[str] | None,
    backend: str,
    rng: np.random.Generator,
    progress: bool,
) -> dict[str, int]:
    """Extract one slide's tiles into ``sink``, appending their index rows; returns the counts."""
    slide = open_slide(slide_path, mpp, slide_mpp, backend)
    try:
        grid = TileGrid.over(slide.grid.shape, tile_size, overlap=0)
        factor = overview_factor(slide.grid.shape)
        tissue = tissue_mask(read_overview(slide, factor))
        tissue_frac = tissue_fractions(grid, tissue, factor)
        polygons, tumour_frac = None, None
        d = slide.grid.downsample
        if annotations is not None:
            polygons = ann.read_annotations(find_annotation(slide_path, Path(annotations)))
            tumour_frac = tissue_fractions(
                grid, ann.rasterize(polygons, tissue.shape, factor * d, labels=labels), factor
            )
        chosen = _select_tiles(tissue_frac, tumour_frac, tiles_per_class, min_tissue, tumour_fraction, rng)
        counts = {"tumour": 0, "normal": 0, "tiles": 0}
        dataset = tile_dataset(slide, grid, chosen)
        for item in tqdm(dataset, total=len(chosen), desc=f"{slide_path.name}: tiles", disable=not progress):
            index = item["tile"]
            row, col = (int(v) for v in grid.origins([index])[0])
            corner = (col * d, row * d)
            mask = None
            if polygons is not None:
                mask = ann.rasterize(polygons, (tile_size, tile_size), downsample=d, origin=corner, labels=labels)
                counts["tumour" if tumour_frac[index] >= tumour_fraction else "normal"] += 1
            counts["tiles"] += 1
            image = np.ascontiguousarray(item["image"].permute(1, 2, 0).numpy())
            name = f"{slide_path.stem}_r{row:06d}_c{col:06d}.png"
            args = (corner,) if isinstance(sink, _Hdf5Tiles) else ()
            tile_id = sink.add(name, image, mask, *args)
            rows.append(
                {
                    "tile": tile_id,
                    "slide": str(slide_path),
                    "x": f"{corner[0]:.1f}",
                    "y": f"{corner[1]:.1f}",
                    "mpp": slide.grid.mpp,
                    "tissue_fraction": f"{tissue_frac[index]:.4f}",
                    "tumour_fraction": "" if tumour_frac is None else f"{tumour_frac[index]:.4f}",
                }
            )
        return counts
    finally:
        slide.close()
