"""Whole-slide stain transfer: an H&E slide in, a virtual IHC slide and its DAB regions out.

:func:`infer_slide` runs one slide:

1. open it with MONAI's ``WSIReader`` at the requested microns per pixel (:mod:`.slide`);
2. read an overview and find the tissue (:mod:`.tissue`); tiles with less than ``min_tissue`` of tissue are
   never sent to the generator and stay white;
3. with slide-consistent normalisation (``normalization="kernel"`` or ``"dense"``, :mod:`.normalization`), run
   the generator once over every ``stats_stride``-th tissue tile of each axis to collect the instance-norm
   statistics, and smooth them over the slide;
4. translate the tissue tiles in batches, read ahead by ``DataLoader`` workers through MONAI's
   ``PatchWSIDataset`` (:mod:`.tiling`), under autocast where the device runs it natively (bf16 on CPUs with
   AVX512-BF16/AMX, bf16 or fp16 on CUDA);
5. blend the overlapping tiles into finished row bands (:mod:`.stitching`) that stream into the pyramidal TIFF
   writer (:mod:`.pyramid`, encoding in a background thread), the thumbnail and the DAB accumulator;
6. write the side outputs (:func:`output_paths`), then rename the TIFF into place: a run killed at any moment
   leaves nothing under the output's name.

Memory does not grow with the slide's area: one band of tiles, one overview (at most 4096 px a side).
:func:`infer_slides` runs a folder or list of slides, split across processes under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from roigan_stain_transfer.networks import ResnetGenerator
from roigan_stain_transfer.wsi import annotations
from roigan_stain_transfer.wsi.dab import DabAccumulator, dab_regions, heat_colours, overlay
from roigan_stain_transfer.wsi.normalization import NORMALIZATION_MODES, SlideNormalization
from roigan_stain_transfer.wsi.pyramid import PyramidalTiffWriter, write_pyramidal_tiff
from roigan_stain_transfer.wsi.slide import Slide, open_slide
from roigan_stain_transfer.wsi.stitching import BandBlender, RowReducer
from roigan_stain_transfer.wsi.tiling import TileGrid, tile_dataset, tissue_fractions, to_network
from roigan_stain_transfer.wsi.tissue import overview_factor, read_overview, save_png, tissue_mask
from shared_ops.atomic import atomic_write_text

__all__ = [
    "AMP_MODES",
    "SLIDE_SUFFIXES",
    "SlideInferenceSettings",
    "SlideInferer",
    "autocast_dtype",
    "find_slides",
    "infer_slide",
    "infer_slides",
    "load_generator",
    "output_paths",
]

logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "none")
#: File suffixes taken as slides when a folder is given.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")


@dataclass(frozen=True)
class SlideInferenceSettings:
    """Settings of whole-slide inference (defaults: 20x, the paper's 256 px tiles).

    Attributes:
        mpp: resolution of the tiles and of the virtual slide, um/px (0.5 = "20x").
        slide_mpp: the slide's level-0 resolution when its metadata lacks it (else None: read from the slide).
        tile_size: tile side, px (a multiple of 4).
        overlap: px shared by neighbouring tiles, blended linearly.
        batch_size: tiles per generator call.
        num_workers: ``DataLoader`` processes reading tiles ahead (0: read in the main process).
        normalization: ``"dense"`` (slide statistics interpolated per pixel), ``"kernel"`` (per tile) or
            ``"tile"`` (plain instance normalisation, statistics of each tile alone).
        stats_stride: slide statistics are collected on every ``stats_stride``-th tile row and column.
        stats_sigma: Gaussian smoothing of the statistics, in statistics-grid nodes.
        min_tissue: tiles whose footprint holds less tissue than this fraction stay white (0: run every tile).
        amp: ``"auto"`` (bf16 where the CPU runs it natively, bf16/fp16 on CUDA), ``"bf16"``, ``"fp16"``, ``"none"``.
        compression: ``"jpeg"`` or ``"deflate"`` (lossless) for the virtual slide.
        quality: JPEG quality.
        backend: ``WSIReader`` backend (``"openslide"``, ``"tifffile"``, ``"cucim"``).
        min_region_um2: DAB-positive regions smaller than this are not reported.
        progress: show progress bars.
    """

    mpp: float = 0.5
    slide_mpp: float | None = None
    tile_size: int = 256
    overlap: int = 32
    batch_size: int = 8
    num_workers: int = 2
    normalization: str = "dense"
    stats_stride: int = 2
    stats_sigma: float = 1.0
    min_tissue: float = 0.01
    amp: str = "auto"
    compression: str = "jpeg"
    quality: int = 90
    backend: str = "openslide"
    min_region_um2: float = 500.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if int(self.batch_size) < 1 or int(self.num_workers) < 0 or int(self.stats_stride) < 1:
            raise ValueError("batch_size and stats_stride must be >= 1 and num_workers >= 0")
        if not 0.0 <= float(self.min_tissue) <= 1.0:
            raise ValueError(f"min_tissue must lie in [0, 1], got {self.min_tissue}")


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def output_paths(output: str | os.PathLike) -> dict[str, Path]:
    """Every file :func:`infer_slide` writes for the virtual slide ``output`` (``.tif`` / ``.tiff``).

    ``slide``: the virtual IHC slide; ``thumbnail``: H&E | virtual IHC PNG; ``tissue``: tissue mask PNG;
    ``dab_tiff`` / ``dab_png``: DAB heat map as pyramidal TIFF and as PNG overlay; ``regions``: DAB-positive
    regions as QuPath GeoJSON on the virtual slide, ``regions_he`` the same on the H&E slide's level 0;
    ``regions_csv``: one row per region; ``summary``: JSON of the run.
    """
    output = Path(output)
    if output.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{output}: the virtual slide is a pyramidal TIFF; expected a .tif or .tiff output name")
    stem = output.with_suffix("")
    return {
        "slide": output,
        "thumbnail": stem.with_name(stem.name + ".thumbnail.png"),
        "tissue": stem.with_name(stem.name + ".tissue.png"),
        "dab_tiff": stem.with_name(stem.name + ".dab.tiff"),
        "dab_png": stem.with_name(stem.name + ".dab.png"),
        "regions": stem.with_name(stem.name + ".dab_regions.geojson"),
        "regions_he": stem.with_name(stem.name + ".dab_regions.he.geojson"),
        "regions_csv": stem.with_name(stem.name + ".dab_regions.csv"),
        "summary": stem.with_name(stem.name + ".json"),
    }


def check_outputs(paths: dict[str, Path], overwrite: bool, remove_stale: bool = True) -> None:
    """Refuse before any work: existing outputs (unless ``overwrite``), a folder that cannot be written.

    With ``remove_stale``, temporary files a killed run left for the same output are deleted (one run per
    output at a time).
    """
    folder = paths["slide"].parent
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder}: the output folder is a file")
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists ({len(existing)} output file(s)); pass --overwrite to replace them"
        )
    if any(p.is_dir() for p in paths.values()):
        raise IsADirectoryError(f"{paths['slide']}: an output name is taken by a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: the output folder is not writable")
    if not remove_stale:
        return
    stem = paths["slide"].stem
    for stale in folder.glob(f".{stem}*-*.partial*"):  # left by a killed run on the same output
        stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Generator, device, precision
# ----------------------------------------------------------------------------------------------------------------


def load_generator(
    weights: str | os.PathLike | None,
    num_blocks: int = 9,
    base_channels: int = 64,
    upsampling: str = "transposed",
    key: str = "g_xy",
) -> ResnetGenerator:
    """The H&E -> IHC generator with trained ``weights`` (a bundle checkpoint holding ``key``, or a state dict).

    A missing ``weights`` is an error: no weights were published, and an untrained generator's output would
    look like a result.
    """
    if weights is None or str(weights) == "":
        raise ValueError(
            "--weights is required: no trained generator ships with this package. Train one with the bundle "
            "(configs/train.json writes models/model.pt) and pass that file."
        )
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a PyTorch checkpoint or state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of the generator or a checkpoint with a {key!r} entry")
    generator = ResnetGenerator(
        num_blocks=num_blocks, base_channels=base_channels, upsampling=upsampling, init_std=None
    )
    try:
        generator.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[:3]
        raise ValueError(
            f"{path}: the weights do not fit a generator with num_blocks={num_blocks}, base_channels={base_channels}, "
            f"upsampling={upsampling!r} ({' '.join(first)}); pass the sizes it was trained with"
        ) from None
    return generator.eval()


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: float32)."""
    if amp == "none":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16":
        raise ValueError("amp='fp16' is for CUDA; on CPU use 'bf16' or 'none'")
    if amp == "bf16":
        return torch.bfloat16
    return (
        torch.bfloat16
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else None
    )


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# One slide
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _loader(slide: Slide, grid: TileGrid, indices: Sequence[int], settings: SlideInferenceSettings) -> DataLoader:
    workers = int(settings.num_workers) if len(indices) > settings.batch_size else 0
    return DataLoader(
        tile_dataset(slide, grid, indices),
        batch_size=int(settings.batch_size),
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def _statistics_grid(grid: TileGrid, stride: int) -> tuple[float, tuple[float, float], tuple[int, int]]:
    """Spacing, origin and shape of the statistics grid: a node every ``stride`` tiles, at tile centres."""
    spacing = float(grid.stride * stride)
    half = grid.tile_size / 2.0
    shape = tuple(int(math.floor((n - grid.tile_size) / spacing)) + 1 for n in grid.shape)
    return spacing, (half, half), (max(1, shape[0]), max(1, shape[1]))


def _statistics_tiles(grid: TileGrid, selected: np.ndarray, stride: int) -> np.ndarray:
    """Tissue tiles on every ``stride``-th grid row and column (all selected tiles when that leaves none)."""
    rows, cols = np.divmod(selected, len(grid.cols))
    chosen = selected[(rows % stride == 0) & (cols % stride == 0)]
    return chosen if len(chosen) else selected


def _to_pixels(batch: torch.Tensor) -> np.ndarray:
    """Generator output ``(B, 3, T, T)`` in [-1, 1] -> ``(B, T, T, 3)`` float32 in [0, 255] (unrounded)."""
    pixels = (batch.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    spacer = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


def _region_rows(polygons, mpp_frame: float) -> tuple[list[dict], list[dict]]:
    """Per-region GeoJSON properties and CSV rows (areas in mm^2 with ``mpp_frame`` um per coordinate unit)."""
    props, rows = [], []
    for number, polygon in enumerate(polygons, start=1):
        area_mm2 = annotations.polygon_area(polygon) * (mpp_frame * 1e-3) ** 2
        x0, y0 = polygon.exterior.min(axis=0)
        x1, y1 = polygon.exterior.max(axis=0)
        props.append({"name": f"DAB region {number}", "area_mm2": round(area_mm2, 6)})
        rows.append(
            {
                "region": number,
                "area_mm2": f"{area_mm2:.6f}",
                "centroid_x": f"{polygon.exterior[:, 0].mean():.1f}",
                "centroid_y": f"{polygon.exterior[:, 1].mean():.1f}",
                "xmin": f"{x0:.1f}",
                "ymin": f"{y0:.1f}",
                "xmax": f"{x1:.1f}",
                "ymax": f"{y1:.1f}",
                "holes": len(polygon.holes),
            }
        )
    return props, rows


def _csv_text(rows: list[dict], fields: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


_REGION_FIELDS = ("region", "area_mm2", "centroid_x", "centroid_y", "xmin", "ymin", "xmax", "ymax", "holes")


def infer_slide(
    slide_path: str | os.PathLike,
    output: str | os.PathLike,
    generator: nn.Module,
    settings: SlideInferenceSettings | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Translate the slide ``slide_path`` with ``generator`` into the virtual slide ``output`` (.tif/.tiff).

    Returns the summary (also written as JSON, see :func:`output_paths`): tiles, tissue fraction, seconds per
    stage, the grid, DAB statistics and the output paths.
    """
    settings = settings or SlideInferenceSettings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = output_paths(output)
    check_outputs(paths, overwrite)
    timer = _Timer()
    started = time.perf_counter()

    with timer("open"):
        slide = open_slide(slide_path, settings.mpp, settings.slide_mpp, settings.backend)
    out = slide.grid
    grid = TileGrid.over(out.shape, settings.tile_size, settings.overlap)
    with timer("tissue"):
        factor = overview_factor(out.shape)
        overview = read_overview(slide, factor)
        tissue = tissue_mask(overview)
        fractions = tissue_fractions(grid, tissue, factor)
    selected = np.arange(len(grid)) if settings.min_tissue <= 0 else np.flatnonzero(fractions >= settings.min_tissue)

    generator = generator.to(device).eval()
    norm = None
    if settings.normalization != "tile" and len(selected):
        generator = copy.deepcopy(generator)  # the statistics layers replace the generator's own
        spacing, origin, shape = _statistics_grid(grid, settings.stats_stride)
        norm = SlideNormalization(
            generator,
            settings.normalization,
            grid_spacing=spacing,
            grid_origin=origin,
            grid_shape=shape,
            sigma=settings.stats_sigma,
        )
    amp_dtype = autocast_dtype(device, settings.amp)
    label = slide.path.name

    @torch.inference_mode()
    def run(indices: np.ndarray, description: str):
        """Yields ``(tile indices, generator output as pixels)`` for the tiles ``indices``, in order."""
        for batch in tqdm(
            _loader(slide, grid, indices, settings), desc=description, unit="batch", disable=not settings.progress
        ):
            images = to_network(batch["image"].to(device, non_blocking=True))
            tiles = batch["tile"].numpy()
            context = (
                norm.tiles(torch.as_tensor(grid.origins(tiles)), grid.tile_size) if norm else contextlib.nullcontext()
            )
            with context, _autocast(device, amp_dtype):
                translated = generator(images)
            yield tiles, _to_pixels(translated)

    if norm is not None:
        with timer("statistics"), norm.collecting():
            for _ in run(_statistics_tiles(grid, selected, settings.stats_stride), f"{label}: statistics"):
                pass
        norm.finalize()

    thumbnail = RowReducer(out.shape[0], out.shape[1], 3, factor)
    dab = DabAccumulator(out.shape[0], out.shape[1], factor)
    description = json.dumps({"software": "monai-rrn-roigan virtual IHC", "source": str(slide.path), "mpp": out.mpp})
    writer = PyramidalTiffWriter(
        paths["slide"],
        out.shape[0],
        out.shape[1],
        out.mpp,
        compression=settings.compression,
        quality=settings.quality,
        description=description,
    )
    try:

        def emit(top: int, rows: np.ndarray) -> None:
            writer.write_rows(rows)
            thumbnail.add(rows)
            dab.add(rows)

        blender = BandBlender(grid, emit)
        with timer("translate"):
            for tiles, pixels in run(selected, f"{label}: tiles"):
                for index, tile in zip(tiles, pixels, strict=True):
                    blender.add(int(index), tile)
            blender.close()

        with timer("outputs"):
            grey = dab.grey()
            regions = dab_regions(grey, tissue, factor)
            min_area_px = settings.min_region_um2 / (out.mpp * factor) ** 2
            polygons = annotations.mask_to_polygons(
                regions.mask, downsample=factor, label="DAB positive", min_area=min_area_px
            )
            props, csv_rows = _region_rows(polygons, out.mpp)
            virtual = np.clip(np.rint(thumbnail.result()), 0, 255).astype(np.uint8)
            save_png(paths["thumbnail"], _side_by_side(overview, virtual))
            save_png(paths["tissue"], tissue)
            save_png(paths["dab_png"], overlay(virtual, grey, regions.mask))
            write_pyramidal_tiff(paths["dab_tiff"], heat_colours(grey), out.mpp * factor)
            annotations.write_geojson(paths["regions"], annotations.to_geojson(polygons, properties=props))
            he_polygons = annotations.mask_to_polygons(
                regions.mask, downsample=factor * out.downsample, label="DAB positive", min_area=min_area_px
            )
            annotations.write_geojson(paths["regions_he"], annotations.to_geojson(he_polygons, properties=props))
            atomic_write_text(paths["regions_csv"], _csv_text(csv_rows, _REGION_FIELDS))
            writer.close()  # last: the virtual slide appears only when everything else is written
    except BaseException:
        writer.abort()
        raise
    finally:
        slide.close()

    tissue_area_mm2 = float(tissue.sum()) * (out.mpp * factor * 1e-3) ** 2
    positive_mm2 = sum(float(p["area_mm2"]) for p in props)
    summary = {
        "slide": str(slide.path),
        "outputs": {name: str(path) for name, path in paths.items()},
        "grid": {
            "shape": list(out.shape),
            "mpp": out.mpp,
            "level": out.level,
            "level_mpp": out.level_mpp,
            "resampled": out.resampled,
        },
        "tiles": {
            "grid": len(grid),
            "translated": int(len(selected)),
            "tile_size": grid.tile_size,
            "overlap": grid.overlap,
        },
        "tissue_fraction": float(tissue.mean()),
        "tissue_area_mm2": tissue_area_mm2,
        "normalization": settings.normalization,
        "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "device": str(device),
        "dab": {
            "threshold": _finite_or_none(regions.threshold),
            "mean_grey_in_tissue": _finite_or_none(regions.mean_grey),
            "emptied": regions.emptied,
            "regions": len(polygons),
            "positive_area_mm2": positive_mm2,
            "positive_fraction_of_tissue": positive_mm2 / tissue_area_mm2 if tissue_area_mm2 else 0.0,
        },
        "seconds": {name: round(value, 3) for name, value in timer.seconds.items()},
        "settings": asdict(settings),
    }
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    translate_s = timer.seconds.get("translate", 0.0)
    summary["tiles_per_second"] = len(selected) / translate_s if translate_s else None
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2, allow_nan=False, default=_json_default))
    logger.info(
        "%s: %d of %d tiles, tissue %.1f %%, %.1f s -> %s",
        label,
        len(selected),
        len(grid),
        100 * summary["tissue_fraction"],
        summary["seconds"]["total"],
        paths["slide"],
    )
    return summary


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Many slides, many processes
# ----------------------------------------------------------------------------------------------------------------


def find_slides(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Slides named by ``inputs``: one slide, a folder (files with :data:`SLIDE_SUFFIXES`, sorted), a JSON datalist
    (a list of paths or of ``{"image": path}``, or ``{"slides": [...]}``; relative paths from the JSON's folder),
    or a list of any of these."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    slides: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no slides ({', '.join(SLIDE_SUFFIXES)}) in this folder")
            slides += found
        elif path.suffix.lower() == ".json":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: datalist not found")
            try:
                entries = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from None
            entries = entries.get("slides", entries.get("testing", [])) if isinstance(entries, dict) else entries
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"{path}: expected a non-empty list of slide paths or of {{'image': path}} entries")
            for entry in entries:
                name = entry.get("image") if isinstance(entry, dict) else entry
                if not isinstance(name, str):
                    raise ValueError(f"{path}: entry {entry!r} names no slide")
                slides.append((path.parent / name) if not Path(name).is_absolute() else Path(name))
        else:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: slide not found")
            slides.append(path)
    return slides


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``, initialising the default process group under torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def infer_slides(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    generator: nn.Module,
    settings: SlideInferenceSettings | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Translate every slide of ``inputs`` (:func:`find_slides`) into ``output_dir/<slide stem>.tiff``.

    Under ``torchrun`` each rank takes every ``world``-th slide (on ``cuda:LOCAL_RANK`` where CUDA exists) and
    rank 0 gathers the summaries into ``output_dir/summary.csv`` and ``summary.json``. A slide that fails is
    reported there with its error and the others still run; the caller should treat any failure as an error
    (the command line exits 1). Returns the gathered summaries on rank 0, this rank's elsewhere.
    """
    slides = find_slides(inputs)
    output_dir = Path(output_dir)
    names = [s.stem for s in slides]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two slides share the name {duplicate!r}; their outputs would collide in {output_dir}")
    targets = [output_dir / f"{s.stem}.tiff" for s in slides]
    for target in targets:  # refuse before any work, on every rank
        check_outputs(output_paths(target), overwrite, remove_stale=False)
    rank, world = _distributed()
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    results = []
    for slide, target in list(zip(slides, targets, strict=True))[rank::world]:
        try:
            results.append(infer_slide(slide, target, generator, settings, device, overwrite))
        except Exception as error:  # reported in the summary; the run as a whole fails
            logger.error("%s: %s", slide, error)
            results.append({"slide": str(slide), "error": f"{type(error).__name__}: {error}"})
        results[-1]["rank"] = rank
    if world > 1:
        import torch.distributed as dist

        gathered: list[list[dict]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank == 0:
        _write_run_summary(output_dir, sorted(results, key=lambda r: r["slide"]))
    return results


def _write_run_summary(output_dir: Path, results: list[dict[str, Any]]) -> None:
    fields = (
        "slide",
        "status",
        "output",
        "tiles",
        "tissue_fraction",
        "seconds",
        "dab_regions",
        "dab_area_mm2",
        "error",
    )
    rows = []
    for r in results:
        ok = "error" not in r
        rows.append(
            {
                "slide": r["slide"],
                "status": "ok" if ok else "failed",
                "output": r["outputs"]["slide"] if ok else "",
                "tiles": r["tiles"]["translated"] if ok else "",
                "tissue_fraction": f"{r['tissue_fraction']:.4f}" if ok else "",
                "seconds": r["seconds"]["total"] if ok else "",
                "dab_regions": r["dab"]["regions"] if ok else "",
                "dab_area_mm2": f"{r['dab']['positive_area_mm2']:.4f}" if ok else "",
                "error": r.get("error", ""),
            }
        )
    atomic_write_text(output_dir / "summary.csv", _csv_text(rows, fields))
    atomic_write_text(output_dir / "summary.json", json.dumps(results, indent=2, default=_json_default))


class SlideInferer:
    """Whole-slide inference as one callable, for bundle configs and the command line.

    ``SlideInferer(network, settings, device, overwrite)(slides, output_dir)`` runs :func:`infer_slides` and
    raises ``RuntimeError`` naming the slides that failed (after the others have run), so that a run with a
    failed slide never ends with exit code 0.
    """

    def __init__(
        self,
        network: nn.Module,
        settings: SlideInferenceSettings | None = None,
        device: str | torch.device | None = None,
        overwrite: bool = False,
    ) -> None:
        self.network = network
        self.settings = settings or SlideInferenceSettings()
        self.device = device
        self.overwrite = overwrite

    def __call__(
        self, slides: str | os.PathLike | Iterable[str | os.PathLike], output_dir: str | os.PathLike
    ) -> list[dict[str, Any]]:
        results = infer_slides(slides, output_dir, self.network, self.settings, self.device, self.overwrite)
        failed = [r for r in results if "error" in r]
        if failed:
            details = "; ".join(f"{r['slide']}: {r['error']}" for r in failed)
            raise RuntimeError(
                f"{len(failed)} of {len(results)} slide(s) failed ({details}); see {output_dir}/summary.csv"
            )
        return results
