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

import csv
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
from roigan_stain_transfer.wsi.slide import open_slide
from roigan_stain_transfer.wsi.tiling import TileGrid, tile_dataset, tissue_fractions
from roigan_stain_transfer.wsi.tissue import overview_factor, read_overview, tissue_mask
from shared_ops.atomic import atomic_write, atomic_write_text

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
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    rng = np.random.default_rng(seed)
    tiles: list[np.ndarray] = []  # HDF5 only
    masks: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    per_slide: dict[str, dict[str, int]] = {}
    staging = {key: p.with_name(f".{p.name}.partial") for key, p in paths.items() if key in ("tiles", "masks")}
    for folder in staging.values():
        shutil.rmtree(folder, ignore_errors=True)
        if format == "png":
            folder.mkdir(parents=True)
    with_masks = stain == "he"
    for slide_path in slide_paths:
        slide = open_slide(slide_path, mpp, slide_mpp, backend)
        try:
            grid = TileGrid.over(slide.grid.shape, tile_size, overlap=0)
            factor = overview_factor(slide.grid.shape)
            tissue = tissue_mask(read_overview(slide, factor))
            tissue_frac = tissue_fractions(grid, tissue, factor)
            polygons, tumour_frac = None, None
            if with_masks:
                polygons = ann.read_annotations(find_annotation(slide_path, Path(annotations)))
                d = slide.grid.downsample
                overview_tumour = ann.rasterize(polygons, tissue.shape, downsample=factor * d, labels=labels)
                tumour_frac = tissue_fractions(grid, overview_tumour, factor)
            chosen = _select_tiles(tissue_frac, tumour_frac, tiles_per_class, min_tissue, tumour_fraction, rng)
            dataset = tile_dataset(slide, grid, chosen)
            counts = {"tumour": 0, "normal": 0, "tiles": 0}
            for item in tqdm(dataset, total=len(chosen), desc=f"{slide_path.name}: tiles", disable=not progress):
                index = item["tile"]
                row, col = (int(v) for v in grid.origins([index])[0])
                image = item["image"].permute(1, 2, 0).numpy()
                name = f"{slide_path.stem}_r{row:06d}_c{col:06d}.png"
                x0, y0 = col * slide.grid.downsample, row * slide.grid.downsample
                mask = None
                if with_masks:
                    mask = ann.rasterize(
                        polygons,
                        (tile_size, tile_size),
                        downsample=slide.grid.downsample,
                        origin=(x0, y0),
                        labels=labels,
                    )
                    counts["tumour" if tumour_frac[index] >= tumour_fraction else "normal"] += 1
                counts["tiles"] += 1
                if format == "png":
                    (staging["tiles"] / name).write_bytes(_png_bytes(image))
                    if mask is not None:
                        (staging["masks"] / name).write_bytes(_png_bytes(mask.astype(np.uint8) * 255))
                else:
                    tiles.append(image)
                    if mask is not None:
                        masks.append(mask)
                rows.append(
                    {
                        "tile": name if format == "png" else f"{paths['h5'].name}:{len(tiles) - 1}",
                        "slide": str(slide_path),
                        "x": f"{x0:.1f}",
                        "y": f"{y0:.1f}",
                        "mpp": slide.grid.mpp,
                        "tissue_fraction": f"{tissue_frac[index]:.4f}",
                        "tumour_fraction": "" if tumour_frac is None else f"{tumour_frac[index]:.4f}",
                    }
                )
            per_slide[str(slide_path)] = counts
        finally:
            slide.close()
    if not rows:
        raise ValueError(f"no tiles extracted from {len(slide_paths)} slide(s): no tissue tile met the criteria")

    if format == "png":
        for key, folder in staging.items():
            if key == "masks" and not with_masks:
                folder.rmdir()
                continue
            os.replace(folder, paths[key])
    else:
        _write_h5(paths["h5"], tiles, masks if with_masks else None, rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["index"], buffer.getvalue())

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


def _write_h5(path: Path, tiles: list[np.ndarray], masks: list[np.ndarray] | None, rows: list[dict]) -> None:
    import h5py

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("x", data=np.stack(tiles), chunks=(1, *tiles[0].shape), compression="gzip")
            if masks is not None:
                handle.create_dataset("y", data=np.stack(masks), chunks=(1, *masks[0].shape), compression="gzip")
            coords = np.array([[float(r["x"]), float(r["y"])] for r in rows])
            handle.create_dataset("coords", data=coords)
            handle["x"].attrs["slides"] = [r["slide"] for r in rows]

    atomic_write(path, write)
