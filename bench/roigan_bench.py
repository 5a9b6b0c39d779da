"""Benchmark of the region-guided CycleGAN: training iterations and generator inference at batch 8 of 256 x 256.

    python -m bench.roigan_bench [--device cpu|cuda] [--iterations N] [--repeats N]

Training: the real :meth:`roigan_stain_transfer.engines.RoIGANTrainer._iteration` (both generator and both
discriminator steps, replay buffers, Adam) with the paper's full-size networks: two 9-block ResNet generators
(64 base channels, transposed-convolution upsampling), two PatchGAN discriminators with an 8 x 8 output and two RoI
discriminators (RGB input), on one synthetic batch of 8 H&E and 8 IHC tiles with k = 8 cell boxes of 48 px per tile
(4 cancer, 4 normal: the paper's balanced sampling). One warm-up iteration, then ``--iterations`` timed ones (the
median is reported; default 1, as one iteration takes minutes on 2 CPU cores; the warm-up time is kept in the
JSON and the notes). Peak memory: the resident set size (``ru_maxrss``) of the fresh process that ran them, with its
size after building the networks; on CPU also the ``torch.profiler`` peak of live tensor bytes during the warm-up
iteration above what was alive before it (``bench._measure.peak_memory_mb``; it includes the Adam states that
first step creates, 0.3 GiB); on CUDA the caching allocator's peak over the timed iterations. On CUDA training also
runs with ``amp`` (float16 with gradient scalers).

Inference: ``G_XY`` on a batch of 8 tiles under ``torch.no_grad()``, float32 and with bfloat16 autocast (CPU) or
float16 / bfloat16 autocast (CUDA); median of ``--repeats`` calls after one warm-up, peak as above. On a CPU without
native bfloat16 (no AVX512-BF16 / AMX: oneDNN cannot run bf16 convolutions and PyTorch falls back to
``aten::_slow_conv2d_forward``) one 256 x 256 tile took 348 s in bf16 against 0.75 s in float32, so there the bf16
row times a single 64 x 64 tile instead, to show the slowdown without an hour-long run.

Every measurement runs in its own fresh process. On a shared machine wrap the run in ``flock /tmp/bench.lock``.
Results go to ``bench/results/roigan_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bench._measure import (
    device_description,
    median_seconds,
    peak_memory_mb,
    run_worker,
    synchronize,
    timed_calls,
    write_results,
)
from shared_ops.atomic import atomic_write_text

BATCH = 8
TILE = 256
BOXES_PER_TILE = 8
BOX = 48


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_batch(seed: int = 0) -> dict:
    """A collated batch like :func:`roigan_stain_transfer.data.collate_tiles` makes: 8 + 8 tiles in [-1, 1],
    ``BOXES_PER_TILE`` whole-pixel 48 px boxes per tile, half of them cancer (class 1)."""
    gen = torch.Generator().manual_seed(seed)
    batch: dict = {}
    for key in ("he", "ihc"):
        batch[key] = torch.rand(BATCH, 3, TILE, TILE, generator=gen) * 2 - 1
        corners = torch.randint(0, TILE - BOX + 1, (BATCH, BOXES_PER_TILE, 2), generator=gen).float()
        boxes = torch.cat([corners, corners + BOX], dim=2)
        classes = torch.tensor([1] * (BOXES_PER_TILE // 2) + [0] * (BOXES_PER_TILE - BOXES_PER_TILE // 2))
        batch[f"{key}_boxes"] = list(boxes.unbind(0))
        batch[f"{key}_classes"] = [classes.clone() for _ in range(BATCH)]
        batch[f"{key}_name"] = [f"{key}_{i}.png" for i in range(BATCH)]
    return batch


def build_trainer(device: torch.device, amp: bool):
    """The bundle's default (proposed) model on ``device``; a one-batch loader stands in for the tile loader."""
    from roigan_stain_transfer.engines import RoIGANTrainer, parameters_of
    from roigan_stain_transfer.losses import ReplayBuffer
    from roigan_stain_transfer.networks import PatchDiscriminator, ResnetGenerator, RoIDiscriminator

    torch.manual_seed(0)
    g_xy, g_yx = (ResnetGenerator(base_channels=64, num_blocks=9).to(device) for _ in range(2))
    d_x, d_y = (PatchDiscriminator.for_output_size(8).to(device) for _ in range(2))
    r_x, r_y = (RoIDiscriminator(3).to(device) for _ in range(2))
    g_opt = torch.optim.Adam(parameters_of(g_xy, g_yx), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(parameters_of(d_x, d_y, r_x, r_y), lr=2e-4, betas=(0.5, 0.999))
    return RoIGANTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[synthetic_batch()],
        g_xy=g_xy,
        g_yx=g_yx,
        d_x=d_x,
        d_y=d_y,
        g_optimizer=g_opt,
        d_optimizer=d_opt,
        roi_d_x=r_x,
        roi_d_y=r_y,
        buffer_x=ReplayBuffer(50, seed=1),
        buffer_y=ReplayBuffer(50, seed=2),
        amp=amp,
    )


def _peak(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MiB of live tensors during one call above those alive before it (profiler on CPU, allocator on CUDA)."""
    return peak_memory_mb(fn, device)


def train_worker(device: torch.device, iterations: int, amp: bool, profile: bool) -> dict:
    """One warm-up iteration (profiled on CPU for the tensor peak), then ``iterations`` timed ones; in this fresh
    process."""
    start_rss = _rss_mb()
    trainer = build_trainer(device, amp)
    batch = synthetic_batch()
    built_rss = _rss_mb()

    def step() -> None:
        trainer._iteration(trainer, batch)

    result: dict = {"rss_start_mb": start_rss, "rss_networks_mb": built_rss}
    synchronize(device)
    warm = time.perf_counter()
    if profile and device.type == "cpu":
        result["tensor_peak_mb"] = _peak(step, device)  # includes the Adam states the first step creates
    else:
        step()
    synchronize(device)
    result["warm_up_s"] = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, _ = timed_calls(step, iterations, device)
    result.update(iteration_s=statistics.median(times), iteration_times_s=times, rss_peak_mb=_rss_mb())
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run on fast kernels: always on CUDA; on CPU when oneDNN supports bf16 there
    (AVX512-BF16 / AMX). Without it they fall back to ``aten::_slow_conv2d_forward``, hundreds of times slower."""
    return device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_worker(device: torch.device, precision: str, repeats: int, profile: bool, small: bool = False) -> dict:
    """``G_XY`` (9 blocks, 64 channels) on 8 tiles under no_grad, in float32 or an autocast dtype.

    ``small``: one 64 x 64 tile instead (bf16 on a CPU without native bf16, where a full batch takes most of an hour).
    """
    from roigan_stain_transfer.networks import ResnetGenerator

    torch.manual_seed(0)
    generator = ResnetGenerator(base_channels=64, num_blocks=9).to(device).eval()
    batch, size = (1, 64) if small else (BATCH, TILE)
    tiles = (torch.rand(batch, 3, size, size) * 2 - 1).to(device)
    dtype = {"bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}.get(precision)

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return generator(tiles)

    forward()  # warm-up
    seconds = median_seconds({"forward": forward}, repeats, device, min_seconds=0.0)["forward"]
    result = {"batch_s": seconds, "batch": batch, "tile": size, "rss_peak_mb": _rss_mb()}
    if profile:
        result["tensor_peak_mb"] = _peak(forward, device)
    return result


def _worker_args(args: argparse.Namespace, *what: str) -> list[str]:
    flags = ["--device", args.device, "--iterations", str(args.iterations), "--repeats", str(args.repeats)]
    return [*flags, "--worker", *what]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=1, help="timed training iterations (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference calls (default 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiler peaks (CPU)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    profile = not args.no_profile
    if args.worker:
        kind, variant = args.worker
        if kind == "train":
            result = train_worker(device, args.iterations, variant == "amp", profile)
        else:
            small = variant.startswith("bf16") and not native_bf16(device)
            result = inference_worker(device, variant, args.repeats, profile, small)
        print(json.dumps(result))
        return

    extra = ["--no-profile"] if args.no_profile else []
    train_variants = ["fp32", "amp"] if device.type == "cuda" else ["fp32"]
    infer_variants = ["fp32", "bf16 autocast"] + (["fp16 autocast"] if device.type == "cuda" else [])
    rows = []
    for variant in train_variants:
        got = run_worker("bench.roigan_bench", [*_worker_args(args, "train", variant), *extra])
        row = {
            "what": "training iteration",
            "precision": variant if variant == "fp32" else "amp (fp16 + scalers)",
            "batch": BATCH,
            "seconds": got["iteration_s"],
            "per_second": 1 / got["iteration_s"],
            "tiles_per_second": BATCH / got["iteration_s"],
            "rss_networks_mb": got["rss_networks_mb"],
            "rss_peak_mb": got["rss_peak_mb"],
            "tensor_peak_mb": got.get("tensor_peak_mb", got.get("cuda_peak_allocated_mb")),
            "raw": got,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    for variant in infer_variants:
        got = run_worker("bench.roigan_bench", [*_worker_args(args, "infer", variant), *extra])
        small = got["tile"] != TILE
        row = {
            "what": "G_XY inference (no_grad)",
            "precision": variant + (" (no native bf16: 1 tile of 64x64 only)" if small else ""),
            "batch": got["batch"],
            "seconds": got["batch_s"],
            "per_second": 1 / got["batch_s"],
            "tiles_per_second": got["batch"] / got["batch_s"] if not small else "n/a (64x64 tile)",
            "rss_peak_mb": got["rss_peak_mb"],
            "tensor_peak_mb": got.get("tensor_peak_mb"),
            "raw": got,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    payload = {
        "device": device_description(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "setup": (
            f"batch {BATCH} of {TILE}x{TILE} tiles; 9-block generators (64 channels), PatchGAN 8x8, RoI "
            f"discriminators (RGB), k={BOXES_PER_TILE} boxes of {BOX} px per tile; {args.iterations} timed training "
            f"iteration(s) after 1 warm-up, median; inference median of {args.repeats} after 1 warm-up"
        ),
        "native_bf16": native_bf16(device),
        "rows": rows,
    }
    peak_label = "tensor peak MiB (profiler)" if device.type == "cpu" else "CUDA peak allocated MiB"
    columns = [
        ("what", "measurement"),
        ("precision", "precision"),
        ("batch", "batch"),
        ("seconds", "s per iteration / batch"),
        ("per_second", "iterations / batches per s"),
        ("tiles_per_second", "tiles per s"),
        ("rss_networks_mb", "RSS after building MiB"),
        ("rss_peak_mb", "peak RSS MiB"),
        ("tensor_peak_mb", peak_label),
    ]
    table = [
        {k: (round(v) if k.endswith("_mb") and isinstance(v, float) else v) for k, v in row.items() if k != "raw"}
        for row in rows
    ]
    path = write_results(
        f"roigan_{device.type}",
        payload,
        table,
        columns,
        "roigan_stain_transfer: training iteration and generator inference at batch 8 of 256 x 256",
    )
    notes = [
        "",
        f"Setup: {payload['setup']}. Peak RSS: the whole fresh process (Python, libraries, networks, optimizer states, "
        "activations). Tensor peak: live tensor bytes during one call above those alive before it.",
    ]
    notes += [
        f"Training ({row['precision']}): warm-up iteration {row['raw']['warm_up_s']:.0f} s, timed "
        + ", ".join(f"{t:.0f} s" for t in row["raw"]["iteration_times_s"])
        + "."
        for row in rows
        if row["what"] == "training iteration"
    ]
    if not payload["native_bf16"]:
        notes.append(
            "This CPU has no native bfloat16 (oneDNN bf16 unsupported): bf16 autocast convolutions fall back to "
            "aten::_slow_conv2d_forward, so the bf16 row times one 64x64 tile; one 256x256 tile took 348 s in a "
            "one-off run (float32: 0.75 s). Do not use `amp` (bf16 autocast) for training or inference on such CPUs."
        )
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(notes) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
