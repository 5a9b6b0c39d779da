"""Benchmark of the shared layers against their loop references (and torchvision where it imports).

    python -m bench.shared_ops_bench [--device cpu|cuda] [--repeats N]

Correlation: forward and forward+backward at the three pyramid levels a 256^3 registration uses (64^3 x
32, 32^3 x 64, 16^3 x 96 channels, r = 2, batch 1). For both layers "fast" is what users get by default
(the native C kernels where they build, see ``shared_ops._native``; the row says which ran) and "torch"
the PyTorch implementation, forced with ``SHARED_OPS_NATIVE=0`` around each call. RoIAlign: 64 boxes on
(8, 512, 16, 16) features (the RoI discriminator: 48 px boxes, 3x3 output, scale 1/16) and 512 boxes on
(8, 256, 64, 64) (boxes of 16-128 px, 7x7 output, scale 1/4). Every time is a median over repeats taken
side by side in one process, once with the default allocator and once with glibc told to keep freed
memory ("warm allocator": large temporaries then reuse pages instead of faulting them in afresh, which
is much of the loop reference's cost by default); every peak memory is taken in a fresh process per
variant. The targets: speed-up (default allocator) on every row, memory ratio on forward rows. Results
go to ``bench/results/shared_ops_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterator

import torch

from bench._measure import WARM_ALLOCATOR, device_description, median_seconds, peak_memory_mb, run_worker, write_results
from shared_ops import _native
from shared_ops.correlation import local_cost_correlation_3d
from shared_ops.reference import local_cost_correlation_3d_loop, roi_align_loop
from shared_ops.roi_align import roi_align

CORRELATION_CASES = {"64^3x32": (64, 32), "32^3x64": (32, 64), "16^3x96": (16, 96)}
ROI_CASES = {
    # the RoI discriminator: whole-pixel 48 px cell boxes from the box library
    "64 boxes, (8,512,16,16)": dict(shape=(8, 512, 16, 16), boxes=64, size=(48, 48), out=3, scale=1 / 16, whole=True),
    # detection-style boxes at arbitrary sub-pixel positions
    "512 boxes, (8,256,64,64)": dict(
        shape=(8, 256, 64, 64), boxes=512, size=(16, 128), out=7, scale=1 / 4, whole=False
    ),
}
MODES = ("forward", "forward+backward")
# Speed-up targets apply to every row; the memory target to forward rows (with gradients, both variants
# must hold the output, its gradient and the input gradients, which bounds the ratio from below).
TARGETS = {"correlation": dict(speedup=3.0, memory_ratio=0.5), "roi_align": dict(speedup=10.0)}


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align as tv_roi_align
    except Exception:  # torchvision is optional and has no CPU build next to this torch
        return None
    return tv_roi_align


def _correlation_variants(case: str, device: torch.device) -> dict[str, Callable[[bool], torch.Tensor]]:
    size, channels = CORRELATION_CASES[case]
    gen = torch.Generator().manual_seed(0)
    fixed = torch.randn(1, channels, size, size, size, generator=gen).to(device)
    moving = torch.randn(1, channels, size, size, size, generator=gen).to(device)

    def layer(f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return local_cost_correlation_3d(f, m, 2, normalize="none")

    def torch_path(grad: bool) -> torch.Tensor:
        with _native_disabled():  # forward and backward both
            return _call(layer, (fixed, moving), grad)

    return {
        "loop": lambda grad: _call(lambda f, m: local_cost_correlation_3d_loop(f, m, 2), (fixed, moving), grad),
        "fast": lambda grad: _call(layer, (fixed, moving), grad),
        "torch": torch_path,
    }


@contextlib.contextmanager
def _native_disabled() -> Iterator[None]:
    """Run the layers on their PyTorch implementation (the switch is read at every call)."""
    before = os.environ.get(_native.ENV_ENABLE)
    os.environ[_native.ENV_ENABLE] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_native.ENV_ENABLE]
        else:
            os.environ[_native.ENV_ENABLE] = before


NATIVE_KERNELS = {"correlation": _native.correlation_kernels, "roi_align": _native.roi_align_kernels}


def _fast_implementation(op: str, device: torch.device) -> str:
    """Which implementation the default ("fast") of layer ``op`` runs on ``device`` in float32."""
    if device.type != "cpu":
        return "torch"
    if NATIVE_KERNELS[op]() is None:
        return f"torch (native unavailable: {_native.load_error(op)})"
    return "native"


def _roi_variants(case: str, device: torch.device) -> dict[str, Callable[[bool], torch.Tensor]]:
    spec = ROI_CASES[case]
    gen = torch.Generator().manual_seed(0)
    n, _, h, w = spec["shape"]
    image = h / spec["scale"]
    feature = torch.randn(*spec["shape"], generator=gen).to(device)
    lo, hi = spec["size"]
    sizes = lo + (hi - lo) * torch.rand(spec["boxes"], 2, generator=gen)
    corner = (image - sizes) * torch.rand(spec["boxes"], 2, generator=gen)
    if spec["whole"]:
        corner = corner.floor()
    index = torch.randint(0, n, (spec["boxes"], 1), generator=gen).float()
    rois = torch.cat([index, corner, corner + sizes], dim=1).to(device)
    args = (spec["out"], spec["out"]), spec["scale"], -1, False

    def torch_path(grad: bool) -> torch.Tensor:
        with _native_disabled():  # forward and backward both
            return _call(lambda x: roi_align(x, rois, *args), (feature,), grad)

    variants = {
        "loop": lambda grad: _call(lambda x: roi_align_loop(x, rois, *args), (feature,), grad),
        "fast": lambda grad: _call(lambda x: roi_align(x, rois, *args), (feature,), grad),
        "torch": torch_path,
    }
    tv = _torchvision_roi_align()
    if tv is not None:
        variants["torchvision"] = lambda grad: _call(lambda x: tv(x, rois, *args), (feature,), grad)
    return variants


def _call(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], backward: bool) -> torch.Tensor:
    if not backward:
        with torch.no_grad():
            return fn(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))
    return out


VARIANTS = {"correlation": _correlation_variants, "roi_align": _roi_variants}
CASES = {"correlation": CORRELATION_CASES, "roi_align": ROI_CASES}


def worker(op: str, case: str, mode: str, what: str, device: torch.device, repeats: int) -> dict:
    variants = VARIANTS[op](case, device)
    backward = mode == "forward+backward"
    if what == "time":
        for _ in range(3):  # warm-up: first calls pay for allocations the steady state reuses
            for fn in variants.values():
                fn(backward)
        return median_seconds({k: (lambda f=f: f(backward)) for k, f in variants.items()}, repeats, device)
    fn = variants[what]
    fn(backward)  # warm-up: one-off allocations of the first call are not the layer's
    return {what: peak_memory_mb(lambda: fn(backward), device)}


def _in_worker(
    args: argparse.Namespace, op: str, case: str, mode: str, what: str, env: dict[str, str] | None = None
) -> dict:
    """Run one measurement (``"time"`` for all variants, or one variant's peak memory) in a fresh process."""
    flags = ["--device", args.device, "--repeats", str(args.repeats)]
    return run_worker("bench.shared_ops_bench", [*flags, "--worker", op, case, mode, what], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=4, metavar=("OP", "CASE", "MODE", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(*args.worker, device, args.repeats)))
        return

    fast_impl = {op: _fast_implementation(op, device) for op in CASES}
    for op, impl in fast_impl.items():
        print(f"{op} fast implementation: {impl}", flush=True)
    rows = []
    for op, cases in CASES.items():
        for case in cases:
            for mode in MODES:
                times = _in_worker(args, op, case, mode, "time")
                names = list(times)
                memory = {}
                for name in names:
                    memory.update(_in_worker(args, op, case, mode, name))
                row = {"op": op, "case": case, "mode": mode}
                for name in names:
                    row[f"{name}_s"] = times[name]
                    row[f"{name}_peak_mb"] = memory[name]
                row["speedup"] = times["loop"] / times["fast"]
                if "torch" in times:
                    row["torch_speedup"] = times["loop"] / times["torch"]
                row["fast_impl"] = fast_impl[op]
                warm = _in_worker(args, op, case, mode, "time", WARM_ALLOCATOR)
                for name in names:
                    row[f"warm_{name}_s"] = warm[name]
                row["warm_speedup"] = warm["loop"] / warm["fast"]
                row["memory_ratio"] = memory["fast"] / max(memory["loop"], 1e-9)
                target = TARGETS[op]
                met = row["speedup"] >= target["speedup"]
                if "memory_ratio" in target and mode == "forward":
                    met = met and row["memory_ratio"] <= target["memory_ratio"]
                row["target_met"] = "yes" if met else "no"
                rows.append(row)
                print(json.dumps(row), flush=True)

    payload = {
        "device": device_description(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "repeats": args.repeats,
        "targets": TARGETS,
        **{f"{op}_fast_implementation": impl for op, impl in fast_impl.items()},
        "rows": rows,
    }
    columns = [
        ("op", "op"),
        ("case", "case"),
        ("mode", "mode"),
        ("fast_impl", "fast is"),
        ("loop_s", "loop s"),
        ("fast_s", "fast s"),
        ("speedup", "speed-up"),
        ("torch_s", "torch s"),
        ("torch_speedup", "torch speed-up"),
        ("warm_loop_s", "loop s, warm allocator"),
        ("warm_fast_s", "fast s, warm allocator"),
        ("warm_speedup", "speed-up, warm allocator"),
        ("warm_torch_s", "torch s, warm allocator"),
        ("loop_peak_mb", "loop peak MiB"),
        ("fast_peak_mb", "fast peak MiB"),
        ("memory_ratio", "memory ratio"),
        ("torch_peak_mb", "torch peak MiB"),
    ]
    if any("torchvision_s" in row for row in rows):
        columns += [("torchvision_s", "torchvision s"), ("torchvision_peak_mb", "torchvision peak MiB")]
    columns.append(("target_met", "target met"))
    path = write_results(
        f"shared_ops_{device.type}",
        payload,
        rows,
        columns,
        "shared_ops: fast layers against their loop references",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
