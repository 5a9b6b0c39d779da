"""Benchmark of whole-slide inference: the pipeline against pure compute and against a naive tile loop.

    python -m bench.wsi_bench [--device cpu|cuda] [--large-size N] [--naive-tiles N] [--out DIR] [--quick]

Two slides: CMU-1-Small-Region (2220 x 2967 px at 0.499 um/px, from the real-data folder ``$RRN_ROIGAN_DATA``,
default ``../shared/data``; skipped with a note when absent) and a synthetic pyramidal JPEG TIFF of
``--large-size``^2 px at 0.5 um/px (default 12,288 on CPU, 20,480 on CUDA): three tissue-like discs on white
glass covering about 5 % of it, written into a temporary folder first. The generator is the default
``ResnetGenerator`` (9 blocks, 64 channels, random weights with the default ``init_std``, eval mode,
``torch.manual_seed(0)``); ``--quick`` uses 8 channels and 1 block, a 4,096 px synthetic slide and 4 naive tiles
(a smoke run, not a measurement).

Cases, per slide, side by side in one run and in this order (so that load from other jobs on a shared machine
falls on neighbouring cases alike; the load average is recorded with every case):

(a) pure compute: the generator alone over the tissue tiles ``infer_slide`` translates (same selection, read
    into memory once beforehand through ``tile_dataset``), in batches of the same size (8), under the same
    autocast as (c); one warm-up batch, then one timed pass. A pass runs just before and just after every (c)
    run of the same precision (autocast and float32), and each (c)/(a) ratio uses those two.
(b) naive loop: for every position of the plain (non-overlapping) 256 px grid, no tissue mask, OpenSlide
    ``read_region`` of one tile at level 0, the generator on it alone (batch 1, float32, no autocast) and the
    result written into a ``tifffile.memmap`` (an uncompressed TIFF); what a first script would do. It runs on
    the first ``--naive-tiles`` grid tiles (default 48 on CPU, every tile on CUDA) and is extrapolated to the
    whole grid (fixed costs + mean seconds per tile x grid tiles), marked as such.
(c) end to end: ``infer_slide`` with the default settings (tissue mask, batch 8, two ``DataLoader`` workers
    reading ahead, ``amp="auto"``: bfloat16 on a CPU with AVX512-BF16/AMX, JPEG pyramid), with
    ``normalization="tile"`` and ``"dense"`` (the default), and ``"tile"`` in float32 (``amp="none"``). Each run
    is a fresh process: its peak RSS (``ru_maxrss``) is its own. Counted: the main process (the model, the
    blending band, the TIFF writer and its encoder thread, the overview and DAB accumulators) and, separately,
    the largest ``DataLoader`` worker (``RUSAGE_CHILDREN``); a worker is forked from the main process, so most
    of its RSS is pages shared with it, and the two are not added.
(d) diagnostic: ``infer_slide`` (``"tile"``) with ``torch.nn.Identity`` as the generator: what the reading,
    blending, encoding and writing cost on their own, with the CPU seconds they take (main process + workers).

Ratios: (c)/(a) tiles per second over the translated tiles (``translate`` stage; target >= 0.8 on CPU: reading,
blending and writing hidden behind compute), (b)/(c) seconds per slide (GPU target >= 3x), peak RSS of the large
slide over the small one (target: independent of slide size), and the bfloat16 gain.

Results go to ``<out>/wsi_<device>.{json,md}`` (default ``bench/results``). A full default CPU run takes about
22 minutes on 2 otherwise idle cores (AVX512-BF16). On a shared machine wrap the run in ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench._measure import RESULTS, run_worker, synchronize
from shared_ops.atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "RRN_ROIGAN_DATA"
CMU = "wsi/CMU-1-Small-Region.svs"
TILE = 256
BATCH = 8  # tiles per batch in every case, (c) included (infer_slide's own default on CPU is 2)
#: The synthetic slide's discs ``(centre row, centre col, radius)`` as fractions of its side (the 20,480 px
#: slide of tests/roigan_stain_transfer/wsi/test_inference.py: discs at (4000, 5000), (12000, 15000),
#: (17000, 4000) px with radii 1400, 2000, 900 px; about 5 % of the slide).
DISCS = tuple(
    (r / 20480, c / 20480, radius / 20480)
    for r, c, radius in ((4000, 5000, 1400), (12000, 15000, 2000), (17000, 4000, 900))
)


# ----------------------------------------------------------------------------------------------------------------
# Slides and generator
# ----------------------------------------------------------------------------------------------------------------


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data")).resolve()


def disc_pixels(size: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``pixels(rows, cols) -> (h, w, 3) uint8`` of a ``size``^2 slide: white glass with three tissue-like discs,
    a pink texture varying smoothly with position (level-0 coordinates of the pixel centres)."""
    discs = [(fr * size, fc * size, frad * size) for fr, fc, frad in DISCS]

    def pixels(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        r, c = np.meshgrid(rows, cols, indexing="ij")
        inside = np.zeros(r.shape, dtype=bool)
        for cy, cx, radius in discs:
            inside |= (r - cy) ** 2 + (c - cx) ** 2 < radius**2
        tile = np.full((*r.shape, 3), 255, dtype=np.uint8)
        shade = (np.sin(r / 37.0) * np.cos(c / 53.0) * 40).astype(np.int16)
        for channel, base in enumerate((200, 120, 180)):
            tile[..., channel] = np.where(inside, np.clip(base + shade, 0, 255), 255)
        return tile

    return pixels


def write_synthetic_slide(path: Path, size: int, downsamples=(1, 4, 16, 64), mpp: float = 0.5) -> Path:
    """A pyramidal tiled JPEG TIFF of ``size``^2 px written tile by tile with tifffile (never held whole)."""
    import tifffile

    pixels = disc_pixels(size)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for number, d in enumerate(downsamples):
            height = width = -(-size // d)

            def tiles(height=height, width=width, d=d):
                for r in range(0, height, TILE):
                    for c in range(0, width, TILE):
                        yield pixels((np.arange(r, r + TILE) + 0.5) * d, (np.arange(c, c + TILE) + 0.5) * d)

            tif.write(
                tiles(),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                subfiletype=1 if number else 0,
                metadata=None,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
            )
    return path


def build_generator(quick: bool) -> torch.nn.Module:
    from roigan_stain_transfer.networks import ResnetGenerator

    torch.manual_seed(0)
    if quick:
        return ResnetGenerator(base_channels=8, num_blocks=1).eval()
    return ResnetGenerator().eval()


def source_fingerprint() -> str:
    """Short sha256 of the code measured (``roigan_stain_transfer/wsi/*.py`` and ``networks.py``): the results
    record which version of a package under active development each case ran."""
    import hashlib

    package = REPO_ROOT / "roigan_stain_transfer"
    digest = hashlib.sha256()
    for path in sorted([*(package / "wsi").glob("*.py"), package / "networks.py"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _rss_now_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size, MiB (Linux reports ``ru_maxrss`` in KiB; for RUSAGE_CHILDREN the largest child)."""
    return resource.getrusage(who).ru_maxrss / 1024


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------------------------------------
# (c), (d): end to end, in a fresh process
# ----------------------------------------------------------------------------------------------------------------


def end_to_end_worker(slide: str, workdir: str, normalization: str, amp: str, identity: bool, quick: bool, device):
    """``infer_slide`` with the default settings but ``normalization`` / ``amp``, in this fresh process."""
    from roigan_stain_transfer.wsi.inference import SlideInferenceSettings, infer_slide

    source = source_fingerprint()
    generator = torch.nn.Identity() if identity else build_generator(quick)
    settings = SlideInferenceSettings(normalization=normalization, amp=amp, batch_size=BATCH, progress=False)
    start_rss, start_peak = _rss_now_mb(), _peak_rss_mb()
    cpu_self, cpu_children = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    out = Path(workdir) / f"{Path(slide).stem}_{normalization}_{amp}{'_identity' if identity else ''}.tiff"
    summary = infer_slide(slide, out, generator, settings, device=device, overwrite=True)
    return {
        "seconds": summary["seconds"],
        "tiles": summary["tiles"],
        "tiles_per_second": summary["tiles_per_second"],
        "tissue_fraction": summary["tissue_fraction"],
        "autocast": summary["autocast"],
        "rss_before_mb": start_rss,
        "rss_peak_before_mb": start_peak,
        "rss_peak_mb": _peak_rss_mb(),
        "workers_peak_rss_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
        "cpu_s_main": _cpu_seconds(resource.RUSAGE_SELF) - cpu_self,
        "cpu_s_workers": _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_children,
        "torch_threads": torch.get_num_threads(),
        "source": source,
    }


def end_to_end(
    slide: Path, workdir: Path, normalization: str, amp: str, device: torch.device, quick: bool, identity=False
):
    args = ["--worker", "end2end", "--slide", str(slide), "--workdir", str(workdir), "--device", str(device)]
    args += ["--normalization", normalization, "--amp", amp] + (["--identity"] if identity else [])
    args += ["--quick"] if quick else []
    load = _load()
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    got = run_worker("bench.wsi_bench", args, env={"PYTHONPATH": pythonpath})
    got["load_before"], got["load_after"] = load, _load()
    translated = got["tiles"]["translated"]
    got["seconds_per_slide"] = got["seconds"]["total"]
    got["tiles_per_second_slide"] = translated / got["seconds"]["total"]
    got["cpu_s_per_tile"] = (got["cpu_s_main"] + got["cpu_s_workers"]) / max(1, translated)
    got["cpu_share"] = (got["cpu_s_main"] + got["cpu_s_workers"]) / (got["seconds"]["total"] * (os.cpu_count() or 1))
    for path in workdir.glob(f"{slide.stem}_*"):
        path.unlink()
    return got


# ----------------------------------------------------------------------------------------------------------------
# (a) pure compute, (b) naive loop: in this process
# ----------------------------------------------------------------------------------------------------------------


def tissue_tiles(slide_path: Path) -> dict:
    """The tiles ``infer_slide`` translates with the default settings, read into memory as uint8 batches of
    ``BATCH`` (through ``tile_dataset``, in this process), with the seconds the reads took."""
    from torch.utils.data import DataLoader

    from roigan_stain_transfer.wsi.inference import SlideInferenceSettings
    from roigan_stain_transfer.wsi.slide import open_slide
    from roigan_stain_transfer.wsi.tiling import TileGrid, tile_dataset, tissue_fractions
    from roigan_stain_transfer.wsi.tissue import overview_factor, read_overview, tissue_mask

    settings = SlideInferenceSettings()
    slide = open_slide(slide_path, settings.mpp, settings.slide_mpp, settings.backend)
    try:
        grid = TileGrid.over(slide.grid.shape, settings.tile_size, settings.overlap)
        factor = overview_factor(slide.grid.shape)
        tissue = tissue_mask(read_overview(slide, factor))
        selected = np.flatnonzero(tissue_fractions(grid, tissue, factor) >= settings.min_tissue)
        start = time.perf_counter()
        loader = DataLoader(tile_dataset(slide, grid, selected), batch_size=BATCH, shuffle=False, num_workers=0)
        batches = [batch["image"].clone() for batch in loader]
        read_s = time.perf_counter() - start
    finally:
        slide.close()
    return {
        "shape": list(slide.grid.shape),
        "mpp": slide.grid.mpp,
        "grid_tiles": len(grid),
        "tissue_tiles": int(len(selected)),
        "tissue_fraction": float(tissue.mean()),
        "batches": batches,
        "read_s_per_tile": read_s / max(1, len(selected)),
    }


def pure_compute(generator: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, dtype) -> dict:
    """(a): the generator over ``batches`` already in memory; one warm-up batch, then one timed pass."""
    from roigan_stain_transfer.wsi.tiling import to_network

    generator = generator.to(device)
    context = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), context():
            return generator(to_network(batch.to(device, non_blocking=True)))

    load = _load()
    run(batches[0])
    synchronize(device)
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu
    tiles = sum(len(b) for b in batches)
    return {
        "seconds": seconds,
        "tiles": tiles,
        "tiles_per_second": tiles / seconds,
        "cpu_s_per_tile": cpu / tiles,
        "cpu_share": cpu / (seconds * (os.cpu_count() or 1)),
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "load_before": load,
        "load_after": _load(),
    }


def naive_loop(slide_path: Path, generator: torch.nn.Module, device: torch.device, workdir: Path, limit: int) -> dict:
    """(b): every plain-grid tile read alone with OpenSlide, run alone in float32, written into a TIFF memmap;
    the first ``limit`` tiles (0: all) are run and the whole grid is extrapolated from them."""
    import openslide
    import tifffile

    load = _load()
    generator = generator.to(device)
    out_path = workdir / f"{slide_path.stem}_naive.tif"
    start = time.perf_counter()
    slide = openslide.OpenSlide(str(slide_path))
    width, height = slide.dimensions
    out = tifffile.memmap(out_path, shape=(height, width, 3), dtype=np.uint8, photometric="rgb")
    positions = [(r, c) for r in range(0, height, TILE) for c in range(0, width, TILE)]
    run = positions if limit <= 0 else positions[:limit]
    setup_s = time.perf_counter() - start
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with torch.no_grad():
        for r, c in run:
            tile = np.array(slide.read_region((c, r), 0, (TILE, TILE)).convert("RGB"))
            x = torch.from_numpy(tile).permute(2, 0, 1)[None].to(device, torch.float32) / 127.5 - 1.0
            y = generator(x)
            pixels = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
            h, w = min(TILE, height - r), min(TILE, width - c)
            out[r : r + h, c : c + w] = pixels[:h, :w]
    tiles_s = time.perf_counter() - start
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu
    start = time.perf_counter()
    out.flush()
    del out
    slide.close()
    setup_s += time.perf_counter() - start
    out_path.unlink()
    per_tile = tiles_s / len(run)
    extrapolated = len(run) < len(positions)
    return {
        "seconds": setup_s + per_tile * len(positions),
        "seconds_measured": setup_s + tiles_s,
        "extrapolated": extrapolated,
        "tiles_run": len(run),
        "tiles": len(positions),
        "seconds_per_tile": per_tile,
        "tiles_per_second": 1 / per_tile,
        "fixed_seconds": setup_s,
        "cpu_s_per_tile": cpu / len(run),
        "cpu_share": cpu / (tiles_s * (os.cpu_count() or 1)),
        "precision": "float32",
        "load_before": load,
        "load_after": _load(),
    }


# ----------------------------------------------------------------------------------------------------------------
# One slide, all cases
# ----------------------------------------------------------------------------------------------------------------


def _mean_passes(passes: list[dict]) -> dict:
    """One (a) row from several timed passes over the same tiles: mean seconds and CPU figures."""
    seconds = sum(p["seconds"] for p in passes) / len(passes)
    return {
        **passes[0],
        "seconds": seconds,
        "tiles_per_second": passes[0]["tiles"] / seconds,
        "passes_seconds": [p["seconds"] for p in passes],
        "cpu_s_per_tile": sum(p["cpu_s_per_tile"] for p in passes) / len(passes),
        "cpu_share": sum(p["cpu_share"] for p in passes) / len(passes),
        "load_after": passes[-1]["load_after"],
    }


def bench_slide(
    name: str, path: Path, generator, device: torch.device, amp_dtype, workdir: Path, naive_tiles: int, quick: bool
) -> dict:
    """Every case on one slide, in the order of the module docstring; prints each as it finishes."""

    def done(case: str, result: dict) -> dict:
        brief = {k: result[k] for k in ("seconds", "tiles_per_second") if k in result}
        print(f"  {name} {case}: {json.dumps(brief)}", flush=True)
        return result

    info = tissue_tiles(path)
    batches = info.pop("batches")
    print(f"== {name}: {info['tissue_tiles']} of {info['grid_tiles']} tiles in tissue", flush=True)
    cases: dict[str, dict] = {}
    auto = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"

    def pure(label: str, dtype) -> dict:
        return done(label, pure_compute(generator, batches, device, dtype))

    def e2e(label: str, normalization: str, amp: str, identity: bool = False) -> dict:
        return done(label, end_to_end(path, workdir, normalization, amp, device, quick, identity))

    # every (c) run between two (a) passes of the same precision: its reference is their mean
    passes = [pure(f"a_pure_{auto} (1)", amp_dtype)]
    cases["c_tile_" + auto] = e2e(f"c_tile_{auto}", "tile", "auto")
    passes.append(pure(f"a_pure_{auto} (2)", amp_dtype))
    cases["c_dense_" + auto] = e2e(f"c_dense_{auto}", "dense", "auto")
    passes.append(pure(f"a_pure_{auto} (3)", amp_dtype))
    cases["a_pure_" + auto] = _mean_passes(passes)
    cases["d_identity"] = e2e("d_identity", "tile", "auto", identity=True)
    cases["b_naive"] = done("b_naive", naive_loop(path, generator, device, workdir, naive_tiles))
    if amp_dtype is not None:
        passes32 = [pure("a_pure_float32 (1)", None)]
        cases["c_tile_float32"] = e2e("c_tile_float32", "tile", "none")
        passes32.append(pure("a_pure_float32 (2)", None))
        cases["a_pure_float32"] = _mean_passes(passes32)
    for case in cases.values():
        if isinstance(case.get("tiles"), dict) and case["tiles"]["translated"] != info["tissue_tiles"]:
            raise RuntimeError(f"{name}: infer_slide translated {case['tiles']} but (a) ran {info['tissue_tiles']}")

    order = ["a_pure_" + auto, "a_pure_float32", "b_naive", "c_tile_" + auto, "c_dense_" + auto, "c_tile_float32"]
    cases = {key: cases[key] for key in [*order, "d_identity"] if key in cases}
    a, c_tile, c_dense = cases["a_pure_" + auto], cases["c_tile_" + auto], cases["c_dense_" + auto]

    def neighbours(p: list[dict], i: int) -> float:
        """Tiles/s of the mean of (a) passes i and i + 1 (the ones run just before and after a (c) run)."""
        return p[i]["tiles"] * 2 / (p[i]["seconds"] + p[i + 1]["seconds"])

    ratios = {
        "c_tile_over_a": c_tile["tiles_per_second"] / neighbours(passes, 0),
        "c_dense_over_a": c_dense["tiles_per_second"] / neighbours(passes, 1),
        "c_dense_slide_over_a": c_dense["tiles_per_second_slide"] / neighbours(passes, 1),
        "c_tile_over_a_cpu": a["cpu_s_per_tile"] / c_tile["cpu_s_per_tile"],
        "c_dense_over_a_cpu": a["cpu_s_per_tile"] / c_dense["cpu_s_per_tile"],
        "naive_over_c_tile_seconds": cases["b_naive"]["seconds"] / c_tile["seconds_per_slide"],
        "naive_over_c_dense_seconds": cases["b_naive"]["seconds"] / c_dense["seconds_per_slide"],
    }
    if amp_dtype is not None:
        a32, c32 = cases["a_pure_float32"], cases["c_tile_float32"]
        ratios["c_tile_float32_over_a_float32"] = c32["tiles_per_second"] / neighbours(passes32, 0)
        ratios["c_tile_float32_over_a_float32_cpu"] = a32["cpu_s_per_tile"] / c32["cpu_s_per_tile"]
        ratios["bf16_gain_pure"] = a["tiles_per_second"] / a32["tiles_per_second"]
        ratios["bf16_gain_pure_cpu"] = a32["cpu_s_per_tile"] / a["cpu_s_per_tile"]
        ratios["bf16_gain_end_to_end"] = c_tile["tiles_per_second"] / c32["tiles_per_second"]
    return {"slide": str(path), **info, "cases": cases, "ratios": ratios}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu}"
    return {
        "device": described,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_supported": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if device.type == "cpu"
        else bool(torch.cuda.is_bf16_supported()),
        "date": datetime.date.today().isoformat(),
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else "n/a"
    return "" if value is None else str(value)


def _stages(seconds: dict) -> str:
    keys = ("open", "tissue", "statistics", "translate", "outputs")
    return ", ".join(f"{k} {seconds[k]:.3g}" for k in keys if k in seconds)


CASE_LABELS = {
    "a_pure": "(a) pure compute, generator alone, tiles in memory",
    "b_naive": "(b) naive loop: whole plain grid, batch 1, no mask",
    "c_tile": "(c) infer_slide, normalization=tile",
    "c_dense": "(c) infer_slide, normalization=dense",
    "d_identity": "(d) infer_slide with Identity generator (pipeline alone)",
}


def table_rows(slides: dict) -> list[list[str]]:
    rows = []
    for name, result in slides.items():
        for key, case in result["cases"].items():
            kind = "_".join(key.split("_")[:2]) if not key.startswith(("b_", "d_")) else key
            precision = case.get("autocast", case.get("precision", ""))
            if key == "d_identity":
                precision = "n/a"
            if key.startswith(("c_", "d_")):
                tiles = case["tiles"]["translated"]
                seconds = case["seconds_per_slide"]
                stages = _stages(case["seconds"])
                rss = (
                    f"{case['rss_peak_mb']:.0f} (start {case['rss_before_mb']:.0f}) / {case['workers_peak_rss_mb']:.0f}"
                )
                slide_tps = case["tiles_per_second_slide"]
                note = f"load {case['load_before']}-{case['load_after']}"
            elif key.startswith("b_"):
                tiles = case["tiles"]
                seconds = case["seconds"]
                stages = ""
                rss = ""
                slide_tps = tiles / seconds
                note = (
                    f"EXTRAPOLATED from the first {case['tiles_run']} of {tiles} tiles "
                    f"({case['seconds_per_tile']:.3g} s/tile + {case['fixed_seconds']:.2g} s fixed)"
                    if case["extrapolated"]
                    else f"measured, all {tiles} tiles"
                ) + f"; load {case['load_before']}-{case['load_after']}"
            else:
                tiles = case["tiles"]
                seconds = case["seconds"]
                stages = ""
                rss = ""
                slide_tps = None
                note = "generator only"
                if "passes_seconds" in case:
                    passes = ", ".join(f"{s:.3g}" for s in case["passes_seconds"])
                    note += f"; mean of {len(case['passes_seconds'])} passes ({passes} s)"
                note += f"; load {case['load_before']}-{case['load_after']}"
            label = CASE_LABELS.get(kind, kind)
            rows.append(
                [
                    name,
                    label,
                    precision,
                    _fmt(tiles),
                    _fmt(float(seconds)) + (" (extrapolated)" if case.get("extrapolated") else ""),
                    _fmt(float(case["tiles_per_second"])) if case.get("tiles_per_second") else "",
                    _fmt(slide_tps) if slide_tps else "",
                    _fmt(float(case["cpu_s_per_tile"])),
                    f"{100 * case['cpu_share']:.0f} %",
                    stages,
                    rss,
                    note,
                ]
            )
    return rows


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# roigan_stain_transfer.wsi: whole-slide inference against pure compute and a naive tile loop",
        "",
        f"Device: {m['device']}, {m['cores']} cores, {m['torch_threads']} torch threads. torch {m['torch']}. "
        f"bf16 supported: {m['bf16_supported']}. {m['date']}.",
        "",
        payload["setup"],
        "",
        "| slide | case | precision | tiles | s per slide | tiles/s (translate stage) | tiles/s (whole slide) "
        "| CPU s per tile | CPU share | stage s | peak RSS MiB: main (start) / largest worker | notes |",
        "|" + "---|" * 12,
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(payload["slides"])]
    lines += ["", "## Ratios", "", "| slide | ratio | value | target |", "|---|---|---|---|"]
    targets = {
        "c_tile_over_a": ">= 0.8 (CPU)",
        "c_dense_over_a": ">= 0.8 (CPU)",
        "c_dense_slide_over_a": "",
        "c_tile_over_a_cpu": ">= 0.8 (CPU)",
        "c_dense_over_a_cpu": ">= 0.8 (CPU)",
        "c_tile_float32_over_a_float32": "",
        "c_tile_float32_over_a_float32_cpu": "",
        "bf16_gain_pure_cpu": "",
        "naive_over_c_tile_seconds": ">= 3 (GPU)",
        "naive_over_c_dense_seconds": ">= 3 (GPU)",
        "bf16_gain_pure": "",
        "bf16_gain_end_to_end": "",
    }
    explain = {
        "c_tile_over_a": "(c) tile / (a), tiles/s (translate stage; (a) passes just before and after)",
        "c_dense_over_a": "(c) dense / (a), tiles/s (translate stage; (a) passes just before and after)",
        "c_dense_slide_over_a": "(c) dense / (a), tiles/s over the whole slide (statistics pass included)",
        "c_tile_over_a_cpu": "(c) tile / (a) by CPU s per tile (contention-robust estimate, see notes)",
        "c_dense_over_a_cpu": "(c) dense / (a) by CPU s per tile (whole run, statistics pass included)",
        "c_tile_float32_over_a_float32": "(c) tile / (a), both float32",
        "c_tile_float32_over_a_float32_cpu": "(c) tile / (a), both float32, by CPU s per tile",
        "bf16_gain_pure_cpu": "bf16 / float32, (a) by CPU s per tile",
        "naive_over_c_tile_seconds": "(b) / (c) tile, seconds per slide",
        "naive_over_c_dense_seconds": "(b) / (c) dense, seconds per slide",
        "bf16_gain_pure": "bf16 / float32, (a) tiles/s",
        "bf16_gain_end_to_end": "bf16 / float32, (c) tile tiles/s",
    }
    for name, result in payload["slides"].items():
        for key, value in result["ratios"].items():
            lines.append(f"| {name} | {explain.get(key, key)} | {value:.3g} | {targets.get(key, '')} |")
    for key, value in payload.get("memory", {}).items():
        lines.append(f"| large / small | peak RSS of the main process, {key} | {value:.3g} | ~1 (size-independent) |")
    lines += ["", *payload["notes"]]
    return "\n".join(lines) + "\n"


def memory_ratios(slides: dict) -> dict:
    if len(slides) < 2:
        return {}
    small, large = list(slides.values())[:2]
    ratios = {}
    for key, case in large["cases"].items():
        if key.startswith(("c_", "d_")) and key in small["cases"]:
            ratios[key] = case["rss_peak_mb"] / small["cases"][key]["rss_peak_mb"]
    return ratios


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--large-size", type=int, help="side of the synthetic slide, px (12288 on CPU, 20480 on CUDA)")
    parser.add_argument("--naive-tiles", type=int, help="(b) runs on the first N grid tiles (48 on CPU; 0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (not a measurement)")
    parser.add_argument("--worker", choices=("end2end",), help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--normalization", default="dense", help=argparse.SUPPRESS)
    parser.add_argument("--amp", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--identity", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        result = end_to_end_worker(
            args.slide, args.workdir, args.normalization, args.amp, args.identity, args.quick, device
        )
        print(json.dumps(result))
        return

    from roigan_stain_transfer.wsi.inference import autocast_dtype

    cpu = device.type == "cpu"
    large = args.large_size or (4096 if args.quick else 12288 if cpu else 20480)
    naive_tiles = args.naive_tiles if args.naive_tiles is not None else (4 if args.quick else 48 if cpu else 0)
    amp_dtype = autocast_dtype(device, "auto")
    source_start = source_fingerprint()
    generator = build_generator(args.quick)
    notes: list[str] = []
    started = time.perf_counter()
    slides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="wsi_bench_") as tmp:
        workdir = Path(tmp)
        cmu = data_root() / CMU
        paths: list[tuple[str, Path]] = []
        if cmu.is_file():
            paths.append(("CMU-1-Small-Region", cmu))
        else:
            notes.append(f"CMU-1-Small-Region skipped: {cmu} not found (set {DATA_ENV} to the data folder).")
            print(notes[-1], flush=True)
        start = time.perf_counter()
        synthetic = write_synthetic_slide(workdir / f"synthetic_{large}.tif", large)
        written_s = time.perf_counter() - start
        paths.append((f"synthetic {large}^2", synthetic))
        for name, path in paths:
            slides[name] = bench_slide(name, path, generator, device, amp_dtype, workdir, naive_tiles, args.quick)
    total_s = time.perf_counter() - started
    source_end = source_fingerprint()
    sources = {source_start}
    sources |= {case["source"] for result in slides.values() for case in result["cases"].values() if "source" in case}

    m = machine(device)
    generator_desc = (
        "ResnetGenerator(base_channels=8, num_blocks=1)" if args.quick else "ResnetGenerator() (9 blocks, 64 channels)"
    )
    setup = (
        f"Generator: {generator_desc}, random weights (init_std default, torch.manual_seed(0)), eval mode. "
        f"Tiles {TILE} px, overlap 32, batch {BATCH}; autocast 'auto' = "
        f"{str(amp_dtype).replace('torch.', '') if amp_dtype else 'float32'} here. "
        f"Synthetic slide: {large}^2 px at 0.5 um/px, pyramidal JPEG TIFF (downsamples 1, 4, 16, 64), three discs "
        f"(~5 % tissue), written in {written_s:.0f} s before the run. Whole run {total_s / 60:.1f} min."
        + (" QUICK smoke configuration: not a measurement." if args.quick else "")
    )
    notes += [
        "Cases run per slide in this order: (a) pass 1, (c) tile, (a) pass 2, (c) dense, (a) pass 3, (d), (b), "
        "(a) float32 pass 1, (c) tile float32, (a) float32 pass 2. Each (a) row is the mean of its passes; each "
        "(c)/(a) wall-time ratio uses the two passes run just before and after that (c) run. 'load' is the 1-minute "
        "load average before and after each case (other jobs share this machine; above the core count means "
        "contention).",
        "(a): the generator alone over exactly the tiles infer_slide translates (tissue mask, min_tissue 0.01), read "
        "into memory beforehand; one warm-up batch excluded.",
        "(b): plain non-overlapping 256 px grid over level 0, every position (no tissue mask), OpenSlide read_region, "
        "batch 1 float32 under no_grad, written into a tifffile.memmap (uncompressed TIFF, no pyramid, no blending). "
        "'s per slide' is extrapolated from the first N tiles where marked: fixed costs + mean s/tile x grid tiles.",
        "(c): infer_slide with default settings (batch 8, num_workers=2, JPEG pyramid, thumbnail, DAB outputs); "
        "'tiles/s (translate stage)' is summary['tiles_per_second'] (translated tiles / translate-stage seconds), "
        "'tiles/s (whole slide)' is translated tiles / total seconds (dense includes its statistics pass). Each (c) "
        "and (d) run is a fresh process. Peak RSS: ru_maxrss of that process (main: model, blending band, TIFF "
        "writer and encoder thread, overview, DAB accumulator), with its RSS at the start (after imports and building "
        "the generator), and the largest DataLoader worker (RUSAGE_CHILDREN, forked from the main process so mostly "
        "shared pages; not added to the main figure).",
        "(d): infer_slide with torch.nn.Identity: the reading, blending, encoding and writing alone; its CPU s/tile "
        "(main + workers) is what competes with the generator for the cores in (c).",
        "CPU s per tile: CPU time (user + system) of the case over its tiles: for (a) and (b) this process during "
        "the timed loop, for (c) and (d) the worker process and its DataLoader workers over the whole run. CPU share: "
        "that CPU time over wall time x cores; well under 100 % for (a) means other jobs took the cores (oneDNN's "
        "threads spin while waiting, so it is ~100 % on an idle machine). The '(c)/(a) by CPU s per tile' ratios "
        "divide (a)'s CPU s per tile by (c)'s (main + workers, whole run): what (c)/(a) would be on an idle machine "
        "if the generator kept every core busy and the pipeline's own CPU work were the only loss; unlike the "
        "wall-time ratios they hardly move when other jobs take cores.",
    ]
    if len(sources) == 1:
        notes.append(
            f"Code measured: roigan_stain_transfer/wsi/*.py + networks.py with sha256 prefix {source_start}, the same "
            "for every case"
            + (
                f" (it changed after the last case: {source_end} at the end of the run)."
                if source_end != source_start
                else "."
            )
        )
    else:
        notes.append(
            f"WARNING: the measured code changed during the run (sha256 prefixes {sorted(sources)}; this process "
            f"loaded {source_start}); each (c)/(d) case's own is in the JSON ('source')."
        )
    if not args.quick and cpu and large != 20480:
        notes.append(
            f"The synthetic slide is {large}^2 rather than 20,480^2 to keep a full CPU run under ~25 minutes "
            "(at 20,480^2, ~540 tissue tiles, the float32 cases alone would take ~15 minutes); the tissue fraction is "
            "the same."
        )
    payload = {
        **m,
        "machine": m,
        "setup": setup,
        "quick": args.quick,
        "large_size": large,
        "naive_tiles": naive_tiles,
        "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "slides": slides,
        "memory": memory_ratios(slides),
        "run_seconds": total_s,
        "source": source_start,
        "sources_seen": sorted(sources),
        "source_at_end": source_end,
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"wsi_{device.type}.json", args.out / f"wsi_{device.type}.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown(payload))
    print(f"wrote {md_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
