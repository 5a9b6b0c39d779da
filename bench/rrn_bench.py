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
creates the Adam states), then the median of ``--train-repeats`` steps. On CPU 256^3 is left out by default:
the autograd graph of a 256^3 step holds about 8x the activations of a 128^3 step (the table's 128^3 row
times 8 exceeds this machine's memory budget), and one step takes minutes; ``--train-sizes 128 256`` runs it.

Every row also gives the fastest call ("best s"): on a shared machine other processes slow some calls a lot
(the inference path runs thousands of short two-thread operations, each waiting for both threads), and the
1-minute load average before and after the run goes into the notes.

Memory: every case runs in a fresh process; ``ru_maxrss`` (the process's peak resident set) is reported with
its baseline after imports, network and inputs, and the difference. On CUDA the caching allocator's peak of
allocated bytes is reported as well.

Targets (the issue's, 2 CPU cores): 256^3 forward within 8 s in float32 and within 5 s under bf16 autocast
with a field within 0.05 voxel of float32; peak memory of a 256^3 forward at most 1.5 GiB (whole process). On
CUDA: a 256^3 training step within 6 GiB of GPU memory. On a shared machine wrap the run in
``flock /tmp/bench.lock``. Results go to ``bench/results/rrn_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
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

from bench._measure import device_description, run_worker, synchronize, timed_calls, write_results

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
    return _timings(times, warm_up, start_rss, baseline, device)


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


def _targets(what: str, size: int, precision: str, got: dict, device: torch.device) -> tuple[str, str]:
    """(target, met) cells of a row: the issue's targets apply at 256^3."""
    checks: list[tuple[str, bool]] = []
    if what == "forward (no_grad)" and size == 256 and precision != NO_NATIVE:
        limit = TARGETS["forward_fp32_s" if precision == "fp32" else "forward_bf16_s"]
        checks.append((f"<= {limit:g} s", got["seconds"] <= limit))
        if precision != "fp32":
            diff = got.get("max_diff_vs_fp32_vox")
            bound = TARGETS["bf16_field_vox"]
            checks.append((f"field diff < {bound:g} vox", diff is not None and diff < bound))
        if device.type == "cpu":
            checks.append(("peak RSS <= 1.5 GiB", got["rss_peak_mb"] <= TARGETS["forward_peak_mib"]))
    if what == "training step" and size == 256 and device.type == "cuda":
        checks.append(("GPU peak <= 6 GiB", got["cuda_peak_allocated_mb"] <= TARGETS["cuda_train_peak_mib"]))
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
    skipped = [row["size"] for row in rows if row["what"] == "training step" and not row["raw"]]
    measured = [row for row in rows if row["what"] == "training step" and row["raw"]]
    if skipped and measured:
        base = measured[-1]
        scale = (max(skipped) / base["size"]) ** 3
        increase = base["raw"]["rss_peak_mb"] - base["raw"]["rss_baseline_mb"]
        notes.append(
            f"Training step at {', '.join(f'{s}^3' for s in skipped)} skipped (the CPU default): activations, "
            f"autograd graph and step time grow with the volume, so the {base['size']}^3 row scaled by {scale:.0f} "
            f"estimates about {scale * increase / 1024:.0f} GiB over the baseline and "
            f"{scale * base['raw']['seconds']:.0f} s per step, three steps with the warm-up; run it with "
            "`--train-sizes 128 256` on a machine with the memory to spare."
        )
    path.write_text(path.read_text() + "\n".join(notes) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward calls at 128^3 (default 3)")
    parser.add_argument("--repeats-large", type=int, default=2, help="timed forward calls at 256^3 (default 2)")
    parser.add_argument("--train-repeats", type=int, default=2, help="timed training steps (default 2)")
    parser.add_argument(
        "--train-sizes", type=int, nargs="*", default=None, help="training step sizes (CPU: 128, CUDA: 128 256)"
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
        else:
            result = train_worker(device, size, args.train_repeats)
        print(json.dumps(result))
        return

    sizes = args.sizes
    train_sizes = args.train_sizes if args.train_sizes is not None else (sizes if device.type == "cuda" else sizes[:1])
    precisions = ["fp32", "bf16 autocast"] + (["fp16 autocast"] if device.type == "cuda" else [NO_NATIVE])
    flags = [
        "--device", args.device,
        "--repeats", str(args.repeats),
        "--repeats-large", str(args.repeats_large),
        "--train-repeats", str(args.train_repeats),
    ]  # fmt: skip
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
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
                    dict(what="training step", size=size, precision="fp32", note="skipped (see notes)", raw=None)
                )
                continue
            got = run_worker("bench.rrn_bench", [*flags, "--worker", "train", str(size), "fp32", "-"])
            rows.append(dict(what="training step", size=size, precision="fp32", note="", raw=got))
            print(json.dumps(rows[-1]), flush=True)

    load_after = os.getloadavg()[0]
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
            )
            cells["target"], cells["met"] = _targets(row["what"], row["size"], row["precision"], got, device)
        table.append(cells)

    payload = {
        "device": device_description(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "native_bf16": native_bf16(device),
        "parameters": sum(p.numel() for p in build_network(torch.device("cpu")).parameters()),
        "setup": (
            "RRN paper configuration (16,652,076 parameters), batch 1, smooth random pair, field_init_std "
            f"{FIELD_INIT_STD} (fields of a few voxels); forward: 1 warm-up then median of {args.repeats} (128^3) / "
            f"{args.repeats_large} (256^3) calls under no_grad; training step: forward + RegistrationLoss() + "
            f"backward + Adam, 1 warm-up then median of {args.train_repeats}; every case in a fresh process"
        ),
        "load_average_1min": [load_before, load_after],
        "cpus": os.cpu_count(),
        "targets": TARGETS,
        "rows": rows,
        "table": table,
    }
    path = write_report(payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
