"""Timing and peak-memory helpers shared by the benchmark scripts.

Peak memory is the highest total of tensor bytes allocated during the measured call and still alive at
that moment, over what was alive before it. On CPU it is read off the allocation events recorded by
``torch.profiler`` (exact, and independent of how malloc recycles memory); on CUDA the caching
allocator's own peak counter is used. Each measured variant still runs in its own process.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shared_ops.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Extra memory (MiB) at the peak of one call of ``fn`` above what was in use before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def timed_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[list[float], object]:
    """Wall time of ``repeats`` calls of ``fn`` in a row, and the last call's result.

    Each earlier result is dropped before the next call, so that two results are never alive together.
    """
    times: list[float] = []
    result = None
    for _ in range(repeats):
        result = None
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, min_seconds: float = 2.0
) -> dict[str, float]:
    """Median wall time of each function, the functions called in turn, side by side.

    Each round calls every function once; rounds go on until there are at least ``repeats`` of them and
    the slowest function has run for ``min_seconds`` in total (at most 200 rounds), so that fast
    functions get enough samples for a stable median on a noisy machine.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or (max(sum(v) for v in times.values()) < min_seconds and rounds < 200):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


# glibc settings that keep freed memory in the process: repeated large allocations then reuse pages
# instead of faulting fresh ones in, as in a long-running job whose allocation pattern has settled.
WARM_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def run_worker(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module args`` in a fresh process (extra ``env``) and parse the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {module} {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict, table: list[dict], columns: list[tuple[str, str]], title: str) -> Path:
    """Write ``results/<name>.json`` and a markdown table ``results/<name>.md``, both atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    md_path = RESULTS / f"{name}.md"
    lines = [f"# {title}", "", f"Device: {payload['device']}. torch {payload['torch']}. {payload['date']}.", ""]
    lines.append("| " + " | ".join(header for _, header in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path
