"""Command line of the stain-transfer package: whole slides in and out.

``python -m roigan_stain_transfer infer-slide --input SLIDE --output OUT.tiff --weights model.pt``
    Translate an H&E slide (or a folder / JSON datalist of slides, with ``--output`` a folder) into virtual
    IHC: a pyramidal TIFF that QuPath and OpenSlide open, a thumbnail, the DAB heat map and the DAB-positive
    regions as QuPath GeoJSON (:mod:`roigan_stain_transfer.wsi.inference`). Under
    ``torchrun --nproc_per_node N -m roigan_stain_transfer infer-slide ...`` the slides are split across
    processes.

``python -m roigan_stain_transfer extract-tiles --slides SLIDES --output DATASET_DIR [--annotations A]``
    Cut training tiles (and tumour masks from CAMELYON16/ASAP XML or QuPath GeoJSON annotations) from slides
    into the layout the bundle's ``train.json`` / ``evaluate.json`` read, and build the box library
    (:mod:`roigan_stain_transfer.wsi.extraction`).

Options are checked before any work: a mistyped option is an error, not a silently ignored default.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["extract_tiles", "infer_slide", "main"]


def infer_slide(
    input: str,
    output: str,
    weights: str | None = None,
    mpp: float = 0.5,
    slide_mpp: float | None = None,
    tile_size: int = 256,
    overlap: int = 32,
    batch_size: int | None = None,
    num_workers: int = 2,
    normalization: str = "kernel",
    stats_stride: int = 2,
    min_tissue: float = 0.01,
    background: str = "white",
    amp: str = "auto",
    compression: str = "jpeg",
    quality: int = 90,
    backend: str = "openslide",
    generator_blocks: int | None = None,
    generator_channels: int | None = None,
    upsampling: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Translate the H&E slide INPUT into the virtual IHC slide OUTPUT (.tiff); INPUT may be a folder or a JSON
    datalist of slides, OUTPUT then a folder.

    Args:
        input: slide (SVS, NDPI, MRXS, tiled TIFF, ...), folder of slides, or JSON datalist.
        output: the virtual slide (.tif/.tiff), or a folder for several slides.
        weights: the trained H&E -> IHC generator (bundle checkpoint models/model.pt or a state dict). Required.
        mpp: resolution of the tiles and of the output, um/px (0.5 = 20x).
        slide_mpp: the slide's level-0 um/px, for slides whose metadata lacks it.
        tile_size, overlap: tile side and overlap, px.
        batch_size, num_workers: tiles per generator call (default 2 on CPU, 8 on CUDA); DataLoader processes
            reading ahead.
        normalization: "kernel" or "dense" (slide-consistent instance norm) or "tile" (per tile, as trained).
        stats_stride: slide statistics from every n-th tile row and column.
        min_tissue: tiles with less tissue than this fraction stay white (0 runs every tile).
        background: "white" (glass in translated tiles made white) or "generator" (output as it is).
        amp: "auto", "bf16", "fp16" (CUDA) or "none".
        compression, quality: "jpeg" (quality) or "deflate" (lossless).
        backend: MONAI WSIReader backend: "openslide", "tifffile" or "cucim".
        generator_blocks, generator_channels, upsampling: the generator's architecture; default: what the
            weights record (the bundle's checkpoints do), else 9, 64, "transposed". A value that
            differs from the record is an error naming both.
        device: "cpu", "cuda", "cuda:1"... (default: CUDA when available).
        overwrite: replace existing outputs.
        progress: show progress bars.
    """
    from roigan_stain_transfer.wsi import inference

    settings = inference.SlideInferenceSettings(
        mpp=mpp,
        slide_mpp=slide_mpp,
        tile_size=tile_size,
        overlap=overlap,
        batch_size=batch_size,
        num_workers=num_workers,
        normalization=normalization,
        stats_stride=stats_stride,
        min_tissue=min_tissue,
        background=background,
        amp=amp,
        compression=compression,
        quality=quality,
        backend=backend,
        progress=progress,
    )
    generator = inference.load_generator(weights, generator_blocks, generator_channels, upsampling)
    source = Path(input)
    if source.is_file() and source.suffix.lower() != ".json":
        summary = inference.infer_slide(source, output, generator, settings, device, overwrite)
        print(_summary_line(summary))
        return
    try:
        results = inference.SlideInferer(generator, settings, device, overwrite)(source, output)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None
    for result in results:
        print(_summary_line(result))


def _summary_line(summary: dict) -> str:
    if "error" in summary:
        return f"{summary['slide']}: FAILED: {summary['error']}"
    return (
        f"{summary['slide']}: {summary['tiles']['translated']} tiles, tissue {100 * summary['tissue_fraction']:.1f} %, "
        f"{summary['seconds']['total']:.1f} s, {summary['dab']['regions']} DAB regions -> {summary['outputs']['slide']}"
    )


def extract_tiles(
    slides: str,
    output: str,
    stain: str = "he",
    annotations: str | None = None,
    split: str = "train",
    mpp: float = 0.5,
    slide_mpp: float | None = None,
    tile_size: int = 256,
    tiles_per_class: int = 500,
    min_tissue: float = 0.5,
    tumour_fraction: float = 0.25,
    labels: str | None = None,
    format: str = "png",
    library: bool = True,
    preset: str = "released_code",
    seed: int = 0,
    backend: str = "openslide",
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Cut training (or test) tiles from SLIDES into OUTPUT, the bundle's dataset folder, and build the box library.

    Args:
        slides: slide, folder of slides or JSON datalist.
        output: dataset folder (the bundle's --dataset_dir); tiles go to OUTPUT/SPLIT/...
        stain: "he" (tumour masks from the annotations) or "ihc" (no annotations needed).
        annotations: for H&E: an annotation file (one slide) or a folder of them named like the slides
            (CAMELYON16/ASAP .xml, QuPath .geojson/.json).
        split: "train" (tiles, masks, box library) or "test" (tiles and masks as evaluate.json reads them).
        mpp: tile resolution, um/px; slide_mpp: the slide's level-0 um/px where its metadata lacks it.
        tile_size: tile side, px.
        tiles_per_class: at most this many tumour and as many normal tiles per slide (H&E); tissue tiles (IHC).
        min_tissue: least tissue fraction of a tile.
        tumour_fraction: least annotated fraction of a tumour tile (normal tiles have none).
        labels: comma-separated annotation labels that count as tumour (default: all but exclusions "_2").
        format: "png" (folders) or "hdf5" (one file per stain, datasets x, y, coords).
        library: build the box library after extraction (split train).
        preset: box-library preset, "released_code" or "paper".
        seed: seed of the tile sampling.
        backend: MONAI WSIReader backend.
        overwrite: replace an existing tile set.
        progress: show progress bars.
    """
    from roigan_stain_transfer.wsi import extraction

    result = extraction.extract_training_tiles(
        slides,
        output,
        stain=stain,
        annotations=annotations,
        split=split,
        mpp=mpp,
        slide_mpp=slide_mpp,
        tile_size=tile_size,
        tiles_per_class=tiles_per_class,
        min_tissue=min_tissue,
        tumour_fraction=tumour_fraction,
        labels=None if labels is None else [s.strip() for s in str(labels).split(",") if s.strip()],
        format=format,
        build_library=library,
        preset=preset,
        seed=seed,
        backend=backend,
        overwrite=overwrite,
        progress=progress,
    )
    print(json.dumps(result, indent=2))


COMMANDS: dict[str, Callable[..., None]] = {"infer-slide": infer_slide, "extract-tiles": extract_tiles}


def check_options(argv: list[str], commands: dict[str, Callable[..., None]] = COMMANDS) -> str | None:
    """An error message for a command line ``argv`` (without the program name) naming an unknown command or
    option, or None when every ``--option`` is a parameter of the command (``-`` and ``_`` both accepted)."""
    if not argv or argv[0] in ("-h", "--help"):
        return None
    command = commands.get(argv[0]) or commands.get(argv[0].replace("_", "-"))
    if command is None:
        return f"unknown command {argv[0]!r}; expected one of {', '.join(commands)}"
    known = set(inspect.signature(command).parameters)
    for token in argv[1:]:
        if token == "--":  # fire's own flags follow
            break
        if token.startswith("--") and token not in ("--help",):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            if name.startswith("no") and name[2:] in known:  # fire's --noflag
                continue
            if name not in known:
                return f"{argv[0]}: unknown option --{name}; expected one of " + ", ".join(f"--{k}" for k in known)
    return None


def main(argv: list[str] | None = None) -> None:
    import fire

    argv = sys.argv[1:] if argv is None else argv
    problem = check_options(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire({name.replace("-", "_"): command for name, command in COMMANDS.items()} | COMMANDS, command=argv)


if __name__ == "__main__":
    main()
