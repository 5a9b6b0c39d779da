"""Benchmark of the Recursive Refinement Network: no-grad registration and a training step at 128^3 and 256^3.

    python -m bench.rrn_bench [--device cpu|cuda] [--repeats N] [--repeats-large N] [--train-sizes 128 [256]]

Network: the paper configuration (``RRN()``, 16,652,076 parameters; pyramid 16-32-64-96, flow levels 3-2-1,
radius 2, dense blocks 128-128-96-64-32, dilated refiner), seed 0, with ``field_init_std=0.01`` so that the
random network predicts fields of a few voxels, as a trained one does (the default 1e-5 gives fields of
1e-4 voxels, which would make the precision comparison meaningless). Input: one pair (batch 1) of smooth
random volumes (uniform noise on a grid 8x coarser, trilinearly upsampled), the fixed image a shifted copy of
the moving one.

Forward: ``net(moving, fixed)`` under ``torch.no_grad()`` in eval mode, in float32 and under bfloat16
autocast, and on CPU in float32 once more with ``SHARED_OPS_NATIVE=0`` (the C kernels of the correlation and
the convolutions off: what they gain, measured in the same run); one warm-up call, then the median of
``--repeats`` calls at 128^3 and of ``--repeats-large`` at 256^3. The other rows report the largest
difference of their field from the float32 field, in voxels, and the bf16 row whether this CPU has native
bf16 convolutions (oneDNN with AVX512-BF16 or AMX). Without them the network switches autocast off and runs
in float32, with a warning (see ``rrn_lung_registration.networks.rrn``'s ``_cpu_precision``): that row then
times float32 again.

Training step: ``net.train()``, forward, ``RegistrationLoss()`` (LNCC window 5 + 0.01 L1 total variation) of
the fixed image and the moving image warped by ``Warp3d``, backward, ``Adam`` step; one warm-up step (which
creates the Adam states), then the median of ``--train-repeats`` steps (``--train-repeats-large`` at 256^3,
where one step takes minutes on CPU), then one more step, untimed, whose peak of allocated tensor bytes is
read off ``torch.profiler`` (CPU) or the caching allocator (CUDA): with the parameters, gradients, Adam
states and inputs that stay allocated between steps, the "tensor peak" column, which on CPU stands in for the
GPU memory target.

Convolution speed: one float32 3x3x3 convolution 192 -> 128 channels at 64^3 through PyTorch (channels-last,
oneDNN on CPU), the case the issue's reference numbers quote (about 455 GFLOP/s on 2 cores there). With the
network's convolutions counted as direct convolutions (``direct_conv_flops``: 3.72 TFLOP at 256^3) it gives
the direct-convolution time on this machine, and the 8 s target scaled to it.

Every row also gives the fastest call ("best s"): on a shared machine other processes slow some calls a lot
(the inference path runs thousands of short two-thread operations, each waiting for both threads), and the
1-minute load average before and after the run goes into the notes.

Memory: every case runs in a fresh process; ``ru_maxrss`` (the process's peak resident set) is reported with
its baseline after imports, network and inputs, and the difference. On CUDA the caching allocator's peak of
allocated bytes is reported as well.

Targets (the issue's, 2 CPU cores): 256^3 forward within 8 s in float32 (on CPU also checked scaled to this
machine's convolution speed) and within 5 s under bf16 autocast with a field within 0.05 voxel of float32;
peak memory of a 256^3 forward at most 1.5 GiB (whole process). A 256^3 training step within 6 GiB of GPU
memory (on CPU: of allocated tensor bytes). On a shared machine wrap the run in
``flock /tmp/bench.lock``. Results go to ``bench/results/rrn_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench._measure import device_description, peak_memory_mb, run_worker, synchronize, timed_calls, write_results
from shared_ops.atomic import atomic_write_text

SIZES = (128, 256)
FIELD_INIT_STD = 0.01
GIB = 1024  # MiB
TARGETS = {
    "forward_fp32_s": 8.0,
    "forward_bf16_s": 5.0,
    "bf16_field_vox": 0.05,
    "forward_peak_mib": 1.5 * GIB,
    "cuda_train_peak_mib": 6 * GIB,
}
# the reference machine: one 3x3x3 convolution 192 -> 128 channels at 64^3 (float32, channels-last, 2
# cores) at about 455 GFLOP/s, so the network's direct-convolution FLOPs take about 8 s there: the fp32 target
REFERENCE_CONV_GFLOPS = 455.0
CONV_CASE = (192, 128, 64)  # input channels, output channels, volume side
PRECISIONS = {"fp32": None, "bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}
# the CPU float32 forward once more with the native kernels switched off: the PyTorch-only speed, side by side
NO_NATIVE = "fp32, SHARED_OPS_NATIVE=0"
PRECISIONS[NO_NATIVE] = None


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pair(size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(moving, fixed) (1, 1, size^3) in [0, 1]: smooth noise and the same shifted by (2, -1, 1) voxels."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(size // 8,) * 3, generator=gen)
    moving = F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)
    fixed = torch.roll(moving, shifts=(2, -1, 1), dims=(2, 3, 4))
    return moving.to(device), fixed.to(device)


def build_network(device: torch.device):
    from rrn_lung_registration.networks import RRN

    torch.manual_seed(0)
    return RRN(field_init_std=FIELD_INIT_STD).to(device)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively: always on CUDA; on CPU where oneDNN supports bf16 (AVX512-BF16, AMX)."""
    return device.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def direct_conv_flops(net: nn.Module, size: int) -> float:
    """FLOPs (2 per multiply-add) of every convolution of one forward at ``size^3``, counted as direct convolutions.

    This is the work the issue's 8 s floor stands for; the network's Winograd path does about 8x fewer
    multiplications in the estimators and the refiner.
    """

    def conv(c: nn.Module, voxels: int) -> float:
        return 2.0 * c.in_channels * c.out_channels * math.prod(c.kernel_size) * voxels

    def voxels(level: int) -> int:
        return (size // 2 ** (level + 1)) ** 3

    total = 0.0
    for level, block in enumerate(net.pyramid.levels[: max(net.flow_levels) + 1]):  # two images
        total += 2 * sum(conv(c, voxels(level)) for c in block if isinstance(c, nn.Conv3d))
    for level, estimator in net.estimators.items():
        total += sum(conv(layer[0], voxels(int(level))) for layer in estimator.layers)
        total += conv(estimator.to_field, voxels(int(level)))
    for level, upsampler in net.context_upsamplers.items():  # transposed: the kernel visits every input voxel
        total += conv(upsampler, voxels(int(level) + 1))
    refiner = [c for c in net.refiner.net if isinstance(c, nn.Conv3d)]
    return total + sum(conv(c, voxels(min(net.flow_levels))) for c in refiner)


def conv_worker(device: torch.device, repeats: int) -> dict:
    """One float32 3x3x3 convolution (``CONV_CASE``, channels-last, no_grad): PyTorch's own speed on this machine."""
    start_rss = _rss_mb()
    c_in, c_out, side = CONV_CASE
    torch.manual_seed(0)
    conv = nn.Conv3d(c_in, c_out, 3, padding=1).to(device)
    x = torch.rand(1, c_in, side, side, side, device=device).contiguous(memory_format=torch.channels_last_3d)
    baseline = _rss_mb()

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return conv(x)

    synchronize(device)
    t = time.perf_counter()
    forward()
    synchronize(device)
    warm_up = time.perf_counter() - t
    times, _ = timed_calls(forward, repeats, device)
    result = _timings(times, warm_up, start_rss, baseline, device)
    result["gflops"] = 2.0 * c_in * c_out * 27 * side**3 / result["seconds"] / 1e9
    return result


def forward_worker(device: torch.device, size: int, precision: str, repeats: int, reference: Path) -> dict:
    """Forward passes in this fresh process; the float32 field is saved to ``reference``, others compared with it."""
    start_rss = _rss_mb()
    net = build_network(device).eval()
    moving, fixed = synthetic_pair(size, device)
    baseline = _rss_mb()
    dtype = PRECISIONS[precision]

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return net(moving, fixed)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        synchronize(device)
        t = time.perf_counter()
        ddf = forward()
        synchronize(device)
        warm_up = time.perf_counter() - t
    fell_back = any("runs in float32" in str(w.message) for w in caught)
    del ddf
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, ddf = timed_calls(forward, repeats, device)
    result = _timings(times, warm_up, start_rss, baseline, device)
    result["ran_in_float32"] = dtype is None or fell_back
    result["field_max_abs_vox"] = ddf.float().abs().max().item()
    ddf = ddf.float().cpu()
    if precision == "fp32":
        torch.save(ddf, reference)
    elif reference.exists():
        result["max_diff_vs_fp32_vox"] = (ddf - torch.load(reference, weights_only=True)).abs().max().item()
    return result


def train_worker(device: torch.device, size: int, repeats: int) -> dict:
    """Training steps (forward, loss, backward, Adam) in this fresh process."""
    from rrn_lung_registration.losses import RegistrationLoss
    from rrn_lung_registration.warp import Warp3d

    start_rss = _rss_mb()
    net = build_network(device).train()
    loss_fn, warp = RegistrationLoss(), Warp3d()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    moving, fixed = synthetic_pair(size, device)
    baseline = _rss_mb()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        ddf = net(moving, fixed)
        loss = loss_fn(fixed, warp(moving, ddf), ddf)
        loss.backward()
        optimizer.step()
        return loss.item()

    synchronize(device)
    t = time.perf_counter()
    step()  # creates the Adam states
    warm_up = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, _ = timed_calls(step, repeats, device)
    result = _timings(times, warm_up, start_rss, baseline, device)
    # one more step, untimed, for the tensor memory: what stays allocated between steps (parameters, Adam
    # states, inputs) plus the peak of one step above it; on CUDA this is what the allocator's peak counts
    resident = [*net.parameters(), *(p.grad for p in net.parameters() if p.grad is not None), moving, fixed]
    resident += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    resident_mb = sum(t.numel() * t.element_size() for t in resident) / 2**20
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def kept_step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()

    result["tensor_peak_mb"] = resident_mb + peak_memory_mb(kept_step, device)
    result["saved_for_backward_mb"] = sum(saved.values()) / 2**20
    return result


def _timings(times: list[float], warm_up: float, start_rss: float, baseline: float, device: torch.device) -> dict:
    """The timing and memory fields every row reports (peak RSS read now, at the end of the run)."""
    result = {
        "seconds": statistics.median(times),
        "best_s": min(times),
        "times_s": times,
        "warm_up_s": warm_up,
        "rss_start_mb": start_rss,
        "rss_baseline_mb": baseline,
        "rss_peak_mb": _rss_mb(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _targets(what: str, size: int, precision: str, got: dict, device: torch.device, conv_gflops: float | None):
    """(target, met) cells of a row: the issue's targets apply at 256^3.

    The float32 forward is checked against 8 s and, on CPU, against 8 s scaled by how much slower this
    machine runs PyTorch's own 3x3x3 convolution than the issue's reference machine (``conv_gflops``
    measured in the same run): the 8 s stand for the network's direct-convolution FLOPs at that machine's
    speed. The GPU memory target is checked on CPU too, on the peak of allocated tensor bytes (the same
    tensors a GPU would hold; the CPU's resident set also counts freed memory malloc keeps).
    """
    checks: list[tuple[str, bool]] = []
    if what == "forward (no_grad)" and size == 256 and precision != NO_NATIVE:
        limit = TARGETS["forward_fp32_s" if precision == "fp32" else "forward_bf16_s"]
        checks.append((f"<= {limit:g} s", got["seconds"] <= limit))
        if device.type == "cpu" and precision == "fp32" and conv_gflops:
            scaled = limit * REFERENCE_CONV_GFLOPS / conv_gflops
            checks.append((f"<= {scaled:.1f} s at this CPU's conv speed", got["seconds"] <= scaled))
        if precision != "fp32":
            diff = got.get("max_diff_vs_fp32_vox")
            bound = TARGETS["bf16_field_vox"]
            checks.append((f"field diff < {bound:g} vox", diff is not None and diff < bound))
        if device.type == "cpu":
            checks.append(("peak RSS <= 1.5 GiB", got["rss_peak_mb"] <= TARGETS["forward_peak_mib"]))
    if what == "training step" and size == 256:
        limit = TARGETS["cuda_train_peak_mib"]
        if device.type == "cuda":
            checks.append(("GPU peak <= 6 GiB", got["cuda_peak_allocated_mb"] <= limit))
        else:
            checks.append(("tensor peak <= 6 GiB (the GPU target, on CPU)", got["tensor_peak_mb"] <= limit))
    return "; ".join(text for text, _ in checks), "; ".join("yes" if ok else "no" for _, ok in checks)


def write_report(payload: dict) -> Path:
    """``results/rrn_<device>.{json,md}`` from a run's payload: the table, then notes on setup and every row."""
    device_type, rows = payload["device_type"], payload["rows"]
    columns = [
        ("what", "measurement"),
        ("size", "size"),
        ("precision", "precision"),
        ("seconds", "median s"),
        ("best_s", "best s"),
        ("repeats", "repeats"),
        ("max_diff_vs_fp32_vox", "max abs field diff vs fp32 (voxels)"),
        ("rss_baseline_mb", "baseline RSS MiB"),
        ("rss_peak_mb", "peak RSS MiB"),
        ("rss_increase_mb", "peak - baseline MiB"),
        ("tensor_peak_mb", "tensor peak MiB"),
        *([("cuda_peak_mb", "CUDA peak allocated MiB")] if device_type == "cuda" else []),
        ("target", "target"),
        ("met", "met"),
        ("note", "note"),
    ]
    path = write_results(
        f"rrn_{device_type}",
        payload,
        payload["table"],
        columns,
        "rrn_lung_registration: RRN (paper configuration) registration and training step",
    )
    load_before, load_after = payload["load_average_1min"]
    notes = ["", f"Setup: {payload['setup']}."]
    notes.append(
        "Baseline RSS: the process after importing torch and the package and building the network and the inputs; "
        "peak RSS: `ru_maxrss` of that process over the whole run. Load average (1 min) before / after the run: "
        f"{load_before:.1f} / {load_after:.1f} on {payload['cpus']} CPUs."
    )
    for row in rows:
        if row["raw"]:
            extra = ", timed " + ", ".join(f"{t:.1f} s" for t in row["raw"]["times_s"])
            notes.append(
                f"{row['what']} {row['size']}^3 {row['precision']}: warm-up {row['raw']['warm_up_s']:.1f} s{extra}."
            )
    if device_type == "cpu" and not payload["native_bf16"]:
        notes.append(
            "This CPU has no native bfloat16 convolutions (oneDNN bf16 unsupported: no AVX512-BF16 / AMX), so under "
            "bf16 autocast the network switches autocast off and runs in float32 (a warning says so); the bf16 rows "
            "time float32 again and their field equals the float32 one. The bf16 target needs such a CPU (or CUDA)."
        )
    conv = next((row["raw"] for row in rows if row["what"].startswith("one 3x3x3 conv")), None)
    if conv:
        c_in, c_out, side = CONV_CASE
        floors = ", ".join(
            f"{gflop / 1000:.2f} TFLOP at {size}^3 ({gflop / conv['gflops']:.1f} s here, "
            f"{gflop / REFERENCE_CONV_GFLOPS:.1f} s on the reference machine)"
            for size, gflop in payload["direct_conv_gflop"].items()
        )
        notes.append(
            f"Convolution speed: PyTorch's own float32 3x3x3 convolution {c_in}->{c_out} at {side}^3 (channels-last, "
            f"oneDNN) ran at {conv['gflops']:.0f} GFLOP/s in this run, against about {REFERENCE_CONV_GFLOPS:.0f} on "
            "the issue's reference machine (2 cores with AVX512-BF16). The network's convolutions, counted as direct "
            f"convolutions, are {floors}: the issue's 8 s is that floor on the reference machine, and the "
            "'at this CPU's conv speed' target scales it by the two convolution speeds. The inference path does "
            "fewer FLOPs than that count (Winograd convolutions in the estimators and the refiner)."
        )
    if any(row["what"] == "training step" and row["raw"] for row in rows):
        notes.append(
            "Training step memory: 'tensor peak' is the parameters, their gradients, the Adam states and the inputs "
            "plus the peak of tensor bytes allocated during one more (untimed) step, read off torch.profiler's "
            "allocation events: the tensors a GPU would hold (without cuDNN workspaces), which is what the 6 GiB GPU "
            "target counts; 'kept for backward' is what autograd holds between forward and backward."
        )
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(notes) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward calls at 128^3 (default 3)")
    parser.add_argument("--repeats-large", type=int, default=2, help="timed forward calls at 256^3 (default 2)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps at 128^3 (default 2)")
    parser.add_argument("--train-repeats-large", type=int, default=1, help="timed training steps at 256^3 (default 1)")
    parser.add_argument(
        "--train-sizes", type=int, nargs="*", default=None, help="training step sizes (default: --sizes)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="volume sides (default 128 256)")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "SIZE", "PRECISION", "REFERENCE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        kind, size, precision, reference = args.worker
        size = int(size)
        if kind == "forward":
            repeats = args.repeats if size < 256 else args.repeats_large
            result = forward_worker(device, size, precision, repeats, Path(reference))
        elif kind == "conv":
            result = conv_worker(device, args.repeats)
        else:
            result = train_worker(device, size, args.train_repeats if size < 256 else args.train_repeats_large)
        print(json.dumps(result))
        return

    sizes = args.sizes
    train_sizes = args.train_sizes if args.train_sizes is not None else sizes
    precisions = ["fp32", "bf16 autocast"] + (["fp16 autocast"] if device.type == "cuda" else [NO_NATIVE])
    flags = [
        "--device", args.device,
        "--repeats", str(args.repeats),
        "--repeats-large", str(args.repeats_large),
        "--train-repeats", str(args.train_repeats),
        "--train-repeats-large", str(args.train_repeats_large),
    ]  # fmt: skip
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        c_in, c_out, side = CONV_CASE
        got = run_worker("bench.rrn_bench", [*flags, "--worker", "conv", str(side), "fp32", "-"])
        note = f"{got['gflops']:.0f} GFLOP/s"
        if device.type == "cpu":
            note += f" (issue's reference machine: {REFERENCE_CONV_GFLOPS:.0f})"
        what = f"one 3x3x3 conv {c_in}->{c_out} (PyTorch)"
        rows.append(dict(what=what, size=side, precision="fp32", note=note, raw=got))
        print(json.dumps(rows[-1]), flush=True)
        conv_gflops = got["gflops"]
        for size in sizes:
            reference = Path(tmp) / f"ddf_{size}.pt"
            for precision in precisions:
                worker = ["--worker", "forward", str(size), precision, str(reference)]
                env = {"SHARED_OPS_NATIVE": "0"} if precision == NO_NATIVE else None
                got = run_worker("bench.rrn_bench", [*flags, *worker], env=env)
                note = ""
                if precision == NO_NATIVE:
                    note = "C kernels off (correlation, convolutions): tensor operations only"
                elif precision != "fp32" and got["ran_in_float32"]:
                    note = "no native bf16 here: the network ran in float32"
                rows.append(dict(what="forward (no_grad)", size=size, precision=precision, note=note, raw=got))
                print(json.dumps(rows[-1]), flush=True)
        for size in sizes:
            if size not in train_sizes:
                rows.append(
                    dict(what="training step", size=size, precision="fp32", note="not in --train-sizes", raw=None)
                )
                continue
            got = run_worker("bench.rrn_bench", [*flags, "--worker", "train", str(size), "fp32", "-"])
            note = f"{got['saved_for_backward_mb']:.0f} MiB kept for backward"
            rows.append(dict(what="training step", size=size, precision="fp32", note=note, raw=got))
            print(json.dumps(rows[-1]), flush=True)

    load_after = os.getloadavg()[0]
    network = build_network(torch.device("cpu"))
    table = []
    for row in rows:
        got = row["raw"]
        cells = {**{k: row[k] for k in ("what", "precision", "note")}, "size": f"{row['size']}^3"}
        if got:
            cells.update(
                seconds=got["seconds"],
                best_s=got["best_s"],
                repeats=len(got["times_s"]),
                max_diff_vs_fp32_vox=got.get("max_diff_vs_fp32_vox", ""),
                rss_baseline_mb=round(got["rss_baseline_mb"]),
                rss_peak_mb=round(got["rss_peak_mb"]),
                rss_increase_mb=round(got["rss_peak_mb"] - got["rss_baseline_mb"]),
                cuda_peak_mb=round(got["cuda_peak_allocated_mb"]) if "cuda_peak_allocated_mb" in got else "",
                tensor_peak_mb=round(got["tensor_peak_mb"]) if "tensor_peak_mb" in got else "",
            )
            cells["target"], cells["met"] = _targets(
                row["what"], row["size"], row["precision"], got, device, conv_gflops
            )
        table.append(cells)

    payload = {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "native_bf16": native_bf16(device),
        "parameters": sum(p.numel() for p in network.parameters()),
        "setup": (
            "RRN paper configuration (16,652,076 parameters), batch 1, smooth random pair, field_init_std "
            f"{FIELD_INIT_STD} (fields of a few voxels); forward: 1 warm-up then median of {args.repeats} (128^3) / "
            f"{args.repeats_large} (256^3) calls under no_grad; training step: forward + RegistrationLoss() + "
            f"backward + Adam, 1 warm-up then median of {args.train_repeats} (128^3) / {args.train_repeats_large} "
            "(256^3) steps, then one untimed step for the tensor peak; every case in a fresh process"
        ),
        "load_average_1min": [load_before, load_after],
        "cpus": os.cpu_count(),
        "targets": TARGETS,
        "reference_conv_gflops": REFERENCE_CONV_GFLOPS,
        "direct_conv_gflop": {size: direct_conv_flops(network, size) / 1e9 for size in sizes},
        "rows": rows,
        "table": table,
    }
    path = write_report(payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
