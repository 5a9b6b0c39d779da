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
6. write the side outputs (:func:`.outputs.output_paths`) under temporary names and rename everything into place
   at the end: a run killed at any moment leaves nothing under the output names.

Memory does not grow with the slide's area: one band of tiles, one overview (at most 2048 px a side).
:func:`infer_slides` runs a folder or list of slides, split across processes under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
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
from roigan_stain_transfer.wsi.outputs import (
    REGION_FIELDS,
    StagedOutputs,
    check_outputs,
    csv_text,
    json_text,
    output_paths,
    region_table,
    write_run_summary,
)
from roigan_stain_transfer.wsi.pyramid import PyramidalTiffWriter, write_pyramidal_tiff
from roigan_stain_transfer.wsi.slide import Slide, open_slide
from roigan_stain_transfer.wsi.stitching import BandBlender, RowReducer
from roigan_stain_transfer.wsi.tiling import TileGrid, tile_dataset, tissue_fractions, to_network
from roigan_stain_transfer.wsi.tissue import (
    glass_weight,
    overview_factor,
    read_overview,
    saturation,
    saturation_threshold,
    save_png,
    tissue_mask,
)
from shared_ops.architecture import decode_architecture
from shared_ops.atomic import atomic_write_text

__all__ = [
    "AMP_MODES",
    "BACKGROUND_MODES",
    "SLIDE_SUFFIXES",
    "SlideInferenceSettings",
    "SlideInferer",
    "autocast_dtype",
    "find_slides",
    "infer_slide",
    "infer_slides",
    "SlidePlan",
    "TileRunner",
    "load_generator",
    "output_paths",
    "plan_slide",
]

logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "none")
BACKGROUND_MODES = ("white", "generator")
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
        batch_size: tiles per generator call; None: 2 on CPU (faster per tile than 8 there, and a smaller
            peak: ``bench/results/wsi_cpu.md``), 8 on CUDA.
        num_workers: ``DataLoader`` processes reading tiles ahead (0: read in the main process).
        normalization: ``"kernel"`` (default: slide statistics, smoothed over neighbouring tiles, one set per
            tile), ``"dense"`` (the same interpolated at every pixel; costs a multiply-add per feature on CPU) or
            ``"tile"`` (plain instance normalisation, statistics of each tile alone). With the default overlap,
            ``kernel`` and ``dense`` remove the tone steps between tiles alike on the sample slide
            (``bench/results/wsi_seams.md``); ``kernel`` costs only the statistics pass.
        stats_stride: slide statistics are collected on every ``stats_stride``-th tile row and column.
        stats_sigma: Gaussian smoothing of the statistics, in statistics-grid nodes.
        min_tissue: tiles whose footprint holds less tissue than this fraction stay white (0: run every tile).
        background: ``"white"``: glass inside translated tiles (low saturation, bright, as in the tissue mask) is
            made white in the output, softly over a few pixels, so the slide's background is white throughout;
            ``"generator"``: the generator's output as it is.
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
    batch_size: int | None = None
    num_workers: int = 2
    normalization: str = "kernel"
    stats_stride: int = 2
    stats_sigma: float = 1.0
    min_tissue: float = 0.01
    background: str = "white"
    amp: str = "auto"
    compression: str = "jpeg"
    quality: int = 90
    backend: str = "openslide"
    min_region_um2: float = 500.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATION_MODES:
            raise ValueError(f"normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}")
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if (
            (self.batch_size is not None and int(self.batch_size) < 1)
            or int(self.num_workers) < 0
            or int(self.stats_stride) < 1
        ):
            raise ValueError("batch_size and stats_stride must be >= 1 and num_workers >= 0")
        if not 0.0 <= float(self.min_tissue) <= 1.0:
            raise ValueError(f"min_tissue must lie in [0, 1], got {self.min_tissue}")


# ----------------------------------------------------------------------------------------------------------------
# Generator, device, precision
# ----------------------------------------------------------------------------------------------------------------


def load_generator(
    weights: str | os.PathLike | None,
    num_blocks: int | None = None,
    base_channels: int | None = None,
    upsampling: str | None = None,
    key: str = "g_xy",
) -> ResnetGenerator:
    """The H&E -> IHC generator with trained ``weights`` (a bundle checkpoint holding ``key``, or a state dict).

    The sizes left ``None`` are those the weights record (the bundle's checkpoints record the generator's
    constructor settings), else :class:`ResnetGenerator`'s defaults (9 blocks, 64 channels, transposed
    upsampling); a size given that differs from the record is an error naming both values.

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
    sizes = _generator_sizes(path, state, num_blocks=num_blocks, base_channels=base_channels, upsampling=upsampling)
    generator = ResnetGenerator(**sizes, init_std=None)
    try:
        generator.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[:3]
        shown = ", ".join(f"{name}={value!r}" for name, value in sizes.items())
        raise ValueError(
            f"{path}: the weights do not fit a generator with {shown} ({' '.join(first)}); pass the sizes it was "
            "trained with"
        ) from None
    return generator.eval()


def _generator_sizes(path: Path, state: dict[str, torch.Tensor], **given: Any) -> dict[str, Any]:
    """``given`` with each ``None`` replaced by the weights' recorded setting, else the generator's default."""
    recorded: dict[str, Any] = {}
    if "_extra_state" in state:
        try:
            recorded = decode_architecture(state["_extra_state"])["settings"]
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    defaults = inspect.signature(ResnetGenerator).parameters
    return {
        name: value if value is not None else recorded.get(name, defaults[name].default)
        for name, value in given.items()
    }


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


@dataclass
class SlidePlan:
    """A slide ready for translation: the open ``slide``, its tile ``grid``, the ``overview`` (output grid reduced
    by ``factor``), the ``tissue`` mask on it, the flat indices of the tiles to translate (``selected``) and the
    saturation at or below which a pixel counts as glass (``glass_threshold``)."""

    slide: Slide
    grid: TileGrid
    factor: int
    overview: np.ndarray
    tissue: np.ndarray
    selected: np.ndarray
    glass_threshold: float


def plan_slide(slide: Slide, settings: SlideInferenceSettings) -> SlidePlan:
    """Tile grid, overview, tissue mask and the tiles with at least ``settings.min_tissue`` tissue."""
    grid = TileGrid.over(slide.grid.shape, settings.tile_size, settings.overlap)
    factor = overview_factor(slide.grid.shape)
    overview = read_overview(slide, factor)
    tissue = tissue_mask(overview)
    if settings.min_tissue <= 0:
        selected = np.arange(len(grid))
    else:
        selected = np.flatnonzero(tissue_fractions(grid, tissue, factor) >= settings.min_tissue)
    return SlidePlan(slide, grid, factor, overview, tissue, selected, saturation_threshold(saturation(overview)))


def _to_pixels(batch: torch.Tensor) -> np.ndarray:
    """Generator output ``(B, 3, T, T)`` in [-1, 1] -> ``(B, T, T, 3)`` float32 in [0, 255] (unrounded)."""
    pixels = (batch.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class TileRunner:
    """Runs a generator over tiles of a :class:`SlidePlan`, in grid order, in batches read ahead by ``DataLoader``
    workers, under autocast where the device runs it natively, with slide-consistent normalisation when the
    settings ask for it (the generator is copied, its instance-norm layers replaced in the copy)."""

    def __init__(
        self, plan: SlidePlan, generator: nn.Module, settings: SlideInferenceSettings, device: torch.device
    ) -> None:
        self.plan, self.settings, self.device = plan, settings, device
        self.generator = generator.to(device).eval()
        self.amp_dtype = autocast_dtype(device, settings.amp)
        self.batch_size = int(settings.batch_size or (8 if device.type == "cuda" else 2))
        self.norm: SlideNormalization | None = None
        if settings.normalization != "tile" and len(plan.selected):
            self.generator = copy.deepcopy(self.generator)
            grid = plan.grid
            spacing = float(grid.stride * settings.stats_stride)  # a node every stats_stride tiles, at tile centres
            shape = tuple(max(1, int((n - grid.tile_size) // spacing) + 1) for n in grid.shape)
            self.norm = SlideNormalization(
                self.generator,
                settings.normalization,
                grid_spacing=spacing,
                grid_origin=(grid.tile_size / 2.0, grid.tile_size / 2.0),
                grid_shape=shape,
                sigma=settings.stats_sigma,
            )

    def _loader(self, indices: Sequence[int]) -> DataLoader:
        workers = int(self.settings.num_workers) if len(indices) > self.batch_size else 0
        return DataLoader(
            tile_dataset(self.plan.slide, self.plan.grid, indices),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
        )

    @torch.inference_mode()
    def __call__(self, indices: np.ndarray, description: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields ``(flat tile indices (B,), translated tiles (B, T, T, 3) float32 in [0, 255])`` in order."""
        grid = self.plan.grid
        batches = tqdm(self._loader(indices), desc=description, unit="batch", disable=not self.settings.progress)
        for batch in batches:
            images = to_network(batch["image"].to(self.device, non_blocking=True))
            tiles = batch["tile"].numpy()
            placed = self.norm.tiles(torch.as_tensor(grid.origins(tiles)), grid.tile_size) if self.norm else None
            with placed or contextlib.nullcontext(), _autocast(self.device, self.amp_dtype):
                translated = self.generator(images)
            pixels = _to_pixels(translated)
            if self.settings.background == "white":
                glass = glass_weight(batch["image"], self.plan.glass_threshold).numpy()[..., None]
                pixels += glass * (255.0 - pixels)
            yield tiles, pixels

    def collect_statistics(self, label: str) -> None:
        """The statistics pass of slide-consistent normalisation: every ``stats_stride``-th tissue tile per axis."""
        if self.norm is None:
            return
        grid, selected, stride = self.plan.grid, self.plan.selected, self.settings.stats_stride
        rows, cols = np.divmod(selected, len(grid.cols))
        chosen = selected[(rows % stride == 0) & (cols % stride == 0)]
        with self.norm.collecting():
            for _ in self(chosen if len(chosen) else selected, f"{label}: statistics"):
                pass
        self.norm.finalize()


def _translate(runner: TileRunner, writer: PyramidalTiffWriter, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Translate the plan's tiles and stream the blended rows into ``writer``; returns the virtual slide's overview
    ``(h', w', 3)`` uint8 and its DAB grey ``(h', w')``."""
    plan = runner.plan
    height, width = plan.slide.grid.shape
    thumbnail = RowReducer(height, width, 3, plan.factor)
    dab = DabAccumulator(height, width, plan.factor)

    def emit(top: int, rows: np.ndarray) -> None:
        writer.write_rows(rows)
        thumbnail.add(rows)
        dab.add(rows)

    blender = BandBlender(plan.grid, emit)
    for tiles, pixels in runner(plan.selected, f"{label}: tiles"):
        for index, tile in zip(tiles, pixels, strict=True):
            blender.add(int(index), tile)
    blender.close()
    return np.clip(np.rint(thumbnail.result()), 0, 255).astype(np.uint8), dab.grey()


def _side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    spacer = np.full((left.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([left, spacer, right], axis=1)


def _write_side_outputs(
    staged: StagedOutputs, plan: SlidePlan, virtual: np.ndarray, grey: np.ndarray, settings: SlideInferenceSettings
) -> dict[str, Any]:
    """Thumbnail, tissue mask, DAB heat map and regions into their staged files; returns the DAB statistics."""
    out, factor = plan.slide.grid, plan.factor
    regions = dab_regions(grey, plan.tissue, factor)
    min_area = settings.min_region_um2 / (out.mpp * factor) ** 2  # overview pixels
    polygons = annotations.mask_to_polygons(regions.mask, factor, label="DAB positive", min_area=min_area)
    on_slide = annotations.mask_to_polygons(
        regions.mask, factor * out.downsample, label="DAB positive", min_area=min_area
    )
    props, rows = region_table(polygons, out.mpp)
    save_png(staged.path("thumbnail"), _side_by_side(plan.overview, virtual))
    save_png(staged.path("tissue"), plan.tissue)
    save_png(staged.path("dab_png"), overlay(virtual, grey, regions.mask))
    write_pyramidal_tiff(staged.path("dab_tiff"), heat_colours(grey), out.mpp * factor)
    annotations.write_geojson(staged.path("regions"), annotations.to_geojson(polygons, properties=props))
    annotations.write_geojson(staged.path("regions_he"), annotations.to_geojson(on_slide, properties=props))
    atomic_write_text(staged.path("regions_csv"), csv_text(rows, REGION_FIELDS))
    tissue_mm2 = float(plan.tissue.sum()) * (out.mpp * factor * 1e-3) ** 2
    positive_mm2 = float(sum(p["area_mm2"] for p in props))
    return {
        "threshold": regions.threshold,
        "mean_grey_in_tissue": regions.mean_grey,
        "emptied": regions.emptied,
        "regions": len(polygons),
        "positive_area_mm2": positive_mm2,
        "tissue_area_mm2": tissue_mm2,
        "positive_fraction_of_tissue": positive_mm2 / tissue_mm2 if tissue_mm2 else 0.0,
    }


def infer_slide(
    slide_path: str | os.PathLike,
    output: str | os.PathLike,
    generator: nn.Module,
    settings: SlideInferenceSettings | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Translate the slide ``slide_path`` with ``generator`` into the virtual slide ``output`` (.tif/.tiff).

    Returns the summary (also written as JSON next to the slide, see :func:`output_paths`): tiles, tissue
    fraction, seconds per stage, the grid, DAB statistics and the output paths. All outputs appear together at
    the end.
    """
    settings = settings or SlideInferenceSettings()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = output_paths(output)
    check_outputs(paths, overwrite)
    timer, started = _Timer(), time.perf_counter()
    with timer("open"):
        slide = open_slide(slide_path, settings.mpp, settings.slide_mpp, settings.backend)
    label, out = slide.path.name, slide.grid
    staged = StagedOutputs(paths)
    writer = None
    try:
        with timer("tissue"):
            plan = plan_slide(slide, settings)
        runner = TileRunner(plan, generator, settings, device)
        with timer("statistics"):
            runner.collect_statistics(label)
        description = json.dumps(
            {"software": "monai-rrn-roigan virtual IHC", "source": str(slide.path), "mpp": out.mpp}
        )
        writer = PyramidalTiffWriter(
            staged.path("slide"),
            out.shape[0],
            out.shape[1],
            out.mpp,
            compression=settings.compression,
            quality=settings.quality,
            description=description,
        )
        with timer("translate"):
            virtual, grey = _translate(runner, writer, label)
        with timer("outputs"):
            dab = _write_side_outputs(staged, plan, virtual, grey, settings)
            writer.close()
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
                "grid": len(plan.grid),
                "translated": int(len(plan.selected)),
                "tile_size": plan.grid.tile_size,
                "overlap": plan.grid.overlap,
                "batch_size": runner.batch_size,
            },
            "tissue_fraction": float(plan.tissue.mean()),
            "normalization": settings.normalization,
            "autocast": str(runner.amp_dtype).replace("torch.", "") if runner.amp_dtype else "float32",
            "device": str(device),
            "dab": dab,
            "seconds": {name: round(value, 3) for name, value in timer.seconds.items()},
            "settings": asdict(settings),
        }
        summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
        translate_s = timer.seconds["translate"]
        summary["tiles_per_second"] = len(plan.selected) / translate_s if translate_s and len(plan.selected) else None
        atomic_write_text(staged.path("summary"), json_text(summary))
        staged.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        staged.abort()
        raise
    finally:
        slide.close()
    logger.info(
        "%s: %d of %d tiles, tissue %.1f %%, %.1f s -> %s",
        label,
        summary["tiles"]["translated"],
        summary["tiles"]["grid"],
        100 * summary["tissue_fraction"],
        summary["seconds"]["total"],
        paths["slide"],
    )
    return json.loads(json_text(summary))


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
        write_run_summary(output_dir, sorted(results, key=lambda r: r["slide"]))
    return results


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
