"""The whole-slide picture of the docs and the seam measurement, made by the project on the CC0 sample slide.

1. A generator: ``--weights`` (a bundle checkpoint), or one trained here by the bundle on the demo's sample tiles
   (H&E tiles of the sample slide, IHC tiles of scikit-image; ``--iterations`` iterations of narrow networks: a
   colour mapping, not a validated virtual stain).
2. Whole-slide inference of the sample slide with per-tile instance normalisation ("tile") and with
   slide-consistent normalisation ("kernel", "dense"), each without overlap (raw tile borders) and with the
   default 32 px overlap blending.
3. The colour step across tile borders against the step across lines through tile centres
   (:func:`roigan_stain_transfer.wsi.stitching.seam_step`) for the four runs ->
   ``bench/results/wsi_seams.{json,md}``.
4. ``bundles/roigan_stain_transfer/docs/images/wsi_sample.jpg``: H&E | virtual IHC (tile, no overlap) | virtual
   IHC (kernel, overlap: the default) | virtual DAB heat map with the DAB-positive regions; below, one tile corner
   at full resolution: per-tile statistics without and with overlap blending, and kernel with overlap.

Usage: ``python scripts/wsi_docs.py [--weights model.pt --generator-blocks 9 --generator-channels 64]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from roigan_stain_transfer.box_library import build_library  # noqa: E402
from roigan_stain_transfer.samples import prepare_demo_data, sample_slide  # noqa: E402
from roigan_stain_transfer.wsi.inference import (  # noqa: E402
    SlideInferenceSettings,
    infer_slide,
    load_generator,
    output_paths,
)
from roigan_stain_transfer.wsi.stitching import seam_step  # noqa: E402
from roigan_stain_transfer.wsi.tiling import TileGrid  # noqa: E402
from shared_ops.atomic import atomic_write, atomic_write_text  # noqa: E402

BUNDLE = REPO / "bundles" / "roigan_stain_transfer"
NETWORKS = {"generator_channels": 16, "generator_blocks": 3, "patch_channels": [16, 32, 64, 64, 64]}
RUNS = (("tile", 0), ("tile", 32), ("kernel", 0), ("kernel", 32), ("dense", 0), ("dense", 32))


def train_generator(work: Path, iterations: int) -> Path:
    """Train the bundle's proposed model (narrow networks) on the demo tiles; returns models/model.pt."""
    data = prepare_demo_data(work / "data")
    train = work / "data" / "train"
    build_library(data.he_tiles, train / "he_boxes.csv", "he", masks=data.he_masks, progress=False)
    build_library(data.ihc_tiles, train / "ihc_boxes.csv", "ihc", progress=False)
    overrides = [item for key, value in NETWORKS.items() for item in (f"--{key}", json.dumps(value))]
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(BUNDLE / "configs" / "train.json"),
        "--meta_file", str(BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(work), "--num_workers", "0", "--batch_size", "4", "--max_epochs", "1",
        "--epoch_length", str(iterations), "--save_interval", str(iterations), *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"trained {iterations} iterations in {time.perf_counter() - start:.0f} s", flush=True)
    return work / "models" / "model.pt"


def _read(path: Path) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))


def _label(image: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, 8 + 7 * len(text), 18), fill=(255, 255, 255))
    draw.text((4, 3), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def _row(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    parts = []
    for image in images:
        padded = np.full((height, image.shape[1], 3), 255, np.uint8)
        padded[: image.shape[0]] = image
        parts += [padded, np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def _stack(rows: list[np.ndarray], gap: int = 8) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    parts = []
    for row in rows:
        padded = np.full((row.shape[0], width, 3), 255, np.uint8)
        padded[:, : row.shape[1]] = row
        parts += [padded, np.full((gap, width, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=0)


def _junction(grid: TileGrid, image: np.ndarray, size: int = 448) -> tuple[int, int]:
    """Top-left of a ``size`` crop centred on the tile corner with the most tissue around it."""
    best, corner = -1.0, (0, 0)
    for r in grid.rows[1:]:
        for c in grid.cols[1:]:
            top, left = max(0, r - size // 2), max(0, c - size // 2)
            crop = image[top : top + size, left : left + size]
            tissue = float((crop.min(axis=-1) < 220).mean())
            if tissue > best:
                best, corner = tissue, (top, left)
    return corner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="a trained generator (bundle checkpoint); default: train one here")
    parser.add_argument("--generator-blocks", type=int, default=NETWORKS["generator_blocks"])
    parser.add_argument("--generator-channels", type=int, default=NETWORKS["generator_channels"])
    parser.add_argument("--iterations", type=int, default=400, help="training iterations without --weights")
    parser.add_argument("--work", type=Path, default=Path("wsi_docs_work"))
    parser.add_argument("--images", type=Path, default=BUNDLE / "docs" / "images")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    weights = Path(args.weights) if args.weights else train_generator(args.work, args.iterations)
    generator = load_generator(weights, args.generator_blocks, args.generator_channels)
    slide = sample_slide()
    rows, images, summaries = [], {}, {}
    for mode, overlap in RUNS:
        out = args.work / "slides" / f"{mode}_overlap{overlap}.tiff"
        settings = SlideInferenceSettings(normalization=mode, overlap=overlap, num_workers=1, progress=False)
        summary = infer_slide(slide, out, generator, settings, overwrite=True)
        image = _read(out)
        grid = TileGrid.over(image.shape[:2], settings.tile_size, overlap)
        step = seam_step(image, grid)
        images[(mode, overlap)], summaries[(mode, overlap)] = image, summary
        rows.append({"normalization": mode, "overlap_px": overlap, **step, "seconds": summary["seconds"]["total"]})
        print(f"{mode:>6} overlap {overlap:>2}: seam {step['seam']:.2f}, within {step['within']:.2f}, "
              f"ratio {step['ratio']:.2f} ({summary['seconds']['total']:.0f} s)", flush=True)  # fmt: skip

    record = {
        "slide": "CMU-1-Small-Region (CC0), 2220 x 2967 px at 0.499 um/px",
        "generator": {"weights": str(weights), "blocks": args.generator_blocks, "channels": args.generator_channels},
        "metric": "mean |colour difference| (RGB, 0-255) between the mean colours of the 16 px on either side of a "
        "line, outside the blended overlap, per 32 px segment, tissue only: across tile borders (seam) vs across "
        "lines through tile centres (within)",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "runs": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "wsi_seams.json", json.dumps(record, indent=2) + "\n")
    lines = [
        "# Tile seams of whole-slide virtual IHC (sample slide)",
        "",
        record["metric"] + ". Ratio 1: the tile grid cannot be told from any other line.",
        "",
        "| normalisation | overlap | seam step | within-tile step | ratio |",
        "|---|---|---|---|---|",
        *[
            f"| {r['normalization']} | {r['overlap_px']} px | {r['seam']:.2f} | {r['within']:.2f} | {r['ratio']:.2f} |"
            for r in rows
        ],
        "",
        f"Generator: {args.generator_blocks} residual blocks, {args.generator_channels} channels ({weights.name}).",
        "",
    ]
    atomic_write_text(args.results / "wsi_seams.md", "\n".join(lines))

    default = summaries[("kernel", 32)]
    paths = output_paths(default["outputs"]["slide"])
    thumbnail = np.asarray(Image.open(paths["thumbnail"]).convert("RGB"))
    he = thumbnail[:, : (thumbnail.shape[1] - 8) // 2]
    overview_shape = he.shape[:2]

    def small(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize(overview_shape[::-1], Image.Resampling.BOX))

    heat = np.asarray(Image.open(paths["dab_png"]).convert("RGB"))
    top = _row(
        [
            _label(he, "H&E"),
            _label(small(images[("tile", 0)]), "virtual IHC: per-tile norm, no overlap"),
            _label(small(images[("kernel", 32)]), "virtual IHC: kernel norm, 32 px overlap (default)"),
            _label(heat, "virtual DAB + regions"),
        ]
    )
    grid = TileGrid.over(images[("tile", 0)].shape[:2], 256, 0)
    r, c = _junction(grid, images[("tile", 0)])
    crops = {key: images[key][r : r + 448, c : c + 448] for key in (("tile", 0), ("tile", 32), ("kernel", 32))}
    bottom = _row(
        [
            _label(crops[("tile", 0)], "a tile corner: per-tile norm, no overlap"),
            _label(crops[("tile", 32)], "per-tile norm, 32 px overlap"),
            _label(crops[("kernel", 32)], "kernel norm, 32 px overlap"),
        ]
    )
    picture = _stack([top, bottom])
    args.images.mkdir(parents=True, exist_ok=True)
    picture_path = args.images / "wsi_sample.jpg"
    atomic_write(picture_path, lambda tmp: Image.fromarray(picture).save(tmp, format="JPEG", quality=85))
    print(f"wrote {args.images / 'wsi_sample.jpg'} and {args.results / 'wsi_seams.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
