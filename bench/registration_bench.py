"""Lung CT registration on three synthetic pairs made from real CT: ours against ITK-elastix, side by side, CPU.

    python -m bench.registration_bench [--pairs popi,one_lung,dirlab] [--workdir DIR] [--skip-tuned]

Pairs (made from the POPI phase-00 CT, ``ct/popi_phase00_dicom`` under ``$RRN_ROIGAN_DATA``, default
``../shared/data``; exact landmark correspondences from the synthetic motion):

1. ``popi``: ``synthetic_breathing_pair(popi, n_landmarks=100, seed=0)`` on POPI's own grid (512 x 512 x 141,
   0.98 x 0.98 x 2 mm): 15 mm breathing, a rigid offset of about 30 mm and a few degrees, density change, noise.
2. ``one_lung``: a harder pair: 15 mm breathing with the lungs sliding along the chest wall (the wall keeps
   30 % of the superior-inferior motion), a 35 mm offset and 3-4 degrees, density change, 20 HU noise; then
   each scan cropped to its own right lung (+ 15 mm) and resampled to 1.37 x 1.37 x 2.5 mm
   (``scanner_pair``): two grids of their own, as a baseline / follow-up pair is.
3. ``dirlab``: the same motion, both lungs (+ 30 mm), at DIR-Lab / COPDGene-like geometry 0.8 x 0.8 x 2.5 mm.

Landmarks are vessel-like points placed by the synthetic pair (at least 2 mm inside the lungs); the ones
within 10 mm of the lung boundary (pleura, diaphragm) are also reported on their own.

Methods, each in its own fresh process (peak RSS = that process's ``ru_maxrss``):

* ours: ``python -m rrn_lung_registration register`` as a user runs it, defaults, end to end: reading both
  scans, lung masks, pre-alignment, deformable optimisation, every output file written (warped image,
  displacement field, Jacobian map, mask, transform, overview, landmark reports). Stage times from its
  ``registration.json``.
* elastix default: ``GetDefaultParameterMap("affine")`` then ``("bspline")``, unchanged (Mattes MI, 4
  resolutions, 256 iterations, 2048 random samples, 10 mm final B-spline grid).
* elastix tuned: the same maps with ``AdvancedNormalizedCorrelation``, 5 resolutions, 2000 iterations per
  resolution, a 10 mm final grid (grid schedule 4, 2.83, 2, 1.41, 1) and the affine stage initialised at the
  centres of gravity.

Elastix runs on 2 threads (ITK's global default: ``SetNumberOfThreads`` crashes the B-spline stage,
ITKElastix issue #160); its time is the registration alone (reading excluded), TRE from transformix on
the fixed landmarks, the Jacobian determinant from ``transformix_jacobian`` in the fixed lung mask.

Targets, per pair: our mean and median TRE at most the tuned elastix's; our end-to-end time at most the
default elastix's registration (the timed rows, ours and the default elastix, run first for every pair, the
tuned elastix after them); no folding in the lungs (det J > 0); our peak RSS at most elastix's.
Results: ``bench/results/registration_cpu.{json,md}``. On a shared machine wrap the run in
``flock /tmp/bench.lock``: every number is one run, and the ratios only hold for an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from bench._measure import device_description, write_results
from shared_ops.atomic import atomic_write, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "RRN_ROIGAN_DATA"
POPI = "ct/popi_phase00_dicom"
PAIRS = ("popi", "one_lung", "dirlab")
ELASTIX_THREADS = 2
NEAR_BOUNDARY_MM = 10.0
SLIDING_PAIR = {  # the motion of pairs 2 and 3
    "amplitude_mm": 15.0,
    "offset_mm": (25.0, -20.0, 18.0),
    "rotation_deg": (4.0, -3.0, 3.0),
    "n_landmarks": 300,
    "sliding": 0.7,
    "noise_hu": 20.0,
    "margin_mm": 2.0,
    "min_distance_mm": 8.0,
    "seed": 1,
}
GEOMETRY = {
    "one_lung": {"spacing_mm": (1.37, 1.37, 2.5), "side": "right", "margin_mm": 15.0},
    "dirlab": {"spacing_mm": (0.8, 0.8, 2.5), "side": None, "margin_mm": 30.0},
}


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data")).resolve()


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stats(errors: np.ndarray) -> dict[str, float]:
    from rrn_lung_registration.io.landmarks import summarize_errors

    return summarize_errors(errors)


# ------------------------------------------------------------------------------------------------ workers


def _write_pair(pair, folder: Path, info: dict) -> dict:
    from scipy import ndimage

    from rrn_lung_registration.io.ct_io import write_image
    from rrn_lung_registration.io.landmarks import write_elastix_points, write_landmarks_csv
    from rrn_lung_registration.synthetic.breathing import _lps_affine

    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "fixed.mha", pair.fixed, compress=False)
    write_image(folder / "moving.mha", pair.moving, compress=False)
    write_image(folder / "fixed_lung_mask.mha", pair.fixed_lung_mask.astype(np.uint8), affine=pair.fixed.affine)
    write_landmarks_csv(folder / "fixed_landmarks.csv", pair.fixed_landmarks)
    write_landmarks_csv(folder / "moving_landmarks.csv", pair.moving_landmarks)
    write_elastix_points(folder / "fixed_points.txt", pair.fixed_landmarks)
    # distance of each fixed landmark to the lung boundary (pleura, diaphragm), mm
    lps = _lps_affine(np.asarray(pair.fixed.affine, dtype=np.float64))
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(pair.fixed_lung_mask, sampling=spacing)
    voxels = np.rint((pair.fixed_landmarks - lps[:3, 3]) @ np.linalg.inv(lps[:3, :3]).T).astype(int)
    voxels = np.clip(voxels, 0, np.asarray(pair.fixed.shape) - 1)
    distances = depth[tuple(voxels.T)]
    atomic_write(folder / "boundary_mm.npy", lambda tmp: np.save(tmp, distances))
    info = {
        **info,
        "fixed_shape": list(pair.fixed.shape),
        "moving_shape": list(pair.moving.shape),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "n_landmarks": len(pair.fixed_landmarks),
        "n_near_boundary": int((distances <= NEAR_BOUNDARY_MM).sum()),
        "tre_before_mm": _stats(np.linalg.norm(pair.fixed_landmarks - pair.moving_landmarks, axis=1)),
    }
    atomic_write_text(folder / "pair.json", json.dumps(info, indent=2) + "\n")
    return info


def prepare_worker(workdir: Path, names: list[str]) -> dict:
    """Read POPI once and write the asked pairs into ``workdir/<pair>/``."""
    from rrn_lung_registration.io.ct_io import read_ct
    from rrn_lung_registration.synthetic.breathing import scanner_pair, synthetic_breathing_pair

    popi = read_ct(data_root() / POPI)
    infos = {}
    if "popi" in names:
        start = time.perf_counter()
        pair = synthetic_breathing_pair(popi, n_landmarks=100, seed=0)
        made = round(time.perf_counter() - start, 1)
        motion = "synthetic_breathing_pair(n_landmarks=100, seed=0)"
        infos["popi"] = _write_pair(pair, workdir / "popi", {"made_s": made, "motion": motion})
    if any(name in names for name in GEOMETRY):
        start = time.perf_counter()
        sliding = synthetic_breathing_pair(popi, **SLIDING_PAIR)
        made = time.perf_counter() - start
        for name, geometry in GEOMETRY.items():
            if name in names:
                pair = scanner_pair(sliding, **geometry)
                motion = {"synthetic_breathing_pair": SLIDING_PAIR, "scanner_pair": geometry}
                infos[name] = _write_pair(pair, workdir / name, {"made_s": round(made, 1), "motion": motion})
    return infos


def ours_worker(folder: Path) -> dict:
    """``python -m rrn_lung_registration register`` on the pair, in this fresh process, end to end."""
    from rrn_lung_registration.__main__ import main

    result: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="registration-bench-") as output:
        start = time.perf_counter()
        main(
            [
                "register",
                "--fixed", str(folder / "fixed.mha"),
                "--moving", str(folder / "moving.mha"),
                "--output", output,
                "--fixed_landmarks", str(folder / "fixed_landmarks.csv"),
                "--moving_landmarks", str(folder / "moving_landmarks.csv"),
                "--device", "cpu",
            ]
        )  # fmt: skip
        result["wall_s"] = time.perf_counter() - start
        summary = json.loads(Path(output, "registration.json").read_text())
        warped = np.loadtxt(Path(output, "tre_per_landmark.csv"), delimiter=",", skiprows=1)
    result["timings_s"] = summary["timings_s"]
    result["levels"] = summary.get("deformable_levels", [])
    result["jacobian"] = summary["jacobian"]
    result["tre_mm"] = summary["tre_mm"]
    near = np.load(folder / "boundary_mm.npy") <= NEAR_BOUNDARY_MM
    result["tre_near_boundary_mm"] = _stats(warped[near, 3]) if near.any() else None
    result["rss_peak_mb"] = _rss_mb()
    return result


_OUTPUT_POINT = re.compile(r"OutputPoint\s*=\s*\[([^\]]*)\]")


def _transformix_points(moving_image, parameter_object, points_file: Path, output_dir: Path) -> np.ndarray:
    """Fixed landmarks (elastix ``point`` file, LPS mm) mapped by transformix: ``(N, 3)`` LPS mm."""
    import itk

    output_dir.mkdir(parents=True, exist_ok=True)
    itk.transformix_pointset(
        moving_image, parameter_object, fixed_point_set_file_name=str(points_file), output_directory=str(output_dir)
    )
    text = (output_dir / "outputpoints.txt").read_text()
    return np.array([[float(v) for v in match.split()] for match in _OUTPUT_POINT.findall(text)], dtype=np.float64)


def elastix_parameters(kind: str):
    """The two parameter maps (affine, B-spline) of the default or the tuned elastix."""
    import itk

    parameters = itk.ParameterObject.New()
    affine, bspline = parameters.GetDefaultParameterMap("affine"), parameters.GetDefaultParameterMap("bspline")
    if kind == "tuned":
        for chosen in (affine, bspline):
            chosen["NumberOfResolutions"] = ["5"]
            chosen["MaximumNumberOfIterations"] = ["2000"]
        affine["Metric"] = ["AdvancedNormalizedCorrelation"]
        affine["AutomaticTransformInitialization"] = ["true"]
        affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        bspline["Metric"] = ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"]
        bspline["FinalGridSpacingInPhysicalUnits"] = ["10"]
        bspline["GridSpacingSchedule"] = ["4", "2.8284271247461903", "2", "1.4142135623730951", "1"]
    parameters.AddParameterMap(affine)
    parameters.AddParameterMap(bspline)
    return parameters


def elastix_worker(folder: Path, kind: str) -> dict:
    """ITK-elastix affine + B-spline (``kind``: default or tuned) on the pair: time, peak RSS, TRE, Jacobian."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(ELASTIX_THREADS)
    fixed = itk.imread(str(folder / "fixed.mha"), itk.F)
    moving = itk.imread(str(folder / "moving.mha"), itk.F)
    from rrn_lung_registration.io.landmarks import read_landmarks_csv

    fixed_points = read_landmarks_csv(folder / "fixed_landmarks.csv")
    moving_points = read_landmarks_csv(folder / "moving_landmarks.csv")
    result: dict = {"threads": itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()}
    method = itk.ElastixRegistrationMethod.New(fixed, moving)
    method.SetParameterObject(elastix_parameters(kind))
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    start = time.perf_counter()
    method.UpdateLargestPossibleRegion()
    result["register_s"] = time.perf_counter() - start
    result["rss_after_register_mb"] = _rss_mb()
    transform = method.GetTransformParameterObject()
    with tempfile.TemporaryDirectory(prefix="registration-bench-elastix-") as scratch:
        warped = _transformix_points(moving, transform, folder / "fixed_points.txt", Path(scratch, "points"))
        # (the output folder needs its trailing separator: itk-elastix 0.25.4 appends the file names to it)
        _, determinant = itk.transformix_jacobian(moving, transform, output_directory=f"{scratch}{os.sep}")
    errors = np.linalg.norm(warped - moving_points, axis=1)
    mask = itk.GetArrayViewFromImage(itk.imread(str(folder / "fixed_lung_mask.mha"))) > 0
    lung = itk.GetArrayViewFromImage(determinant)[mask]
    result["jacobian"] = {
        "min_in_lungs": float(lung.min()),
        "max_in_lungs": float(lung.max()),
        "std_in_lungs": float(lung.std()),
        "folding_percent_in_lungs": float((lung <= 0).mean() * 100),
    }
    near = np.load(folder / "boundary_mm.npy") <= NEAR_BOUNDARY_MM
    result["tre_mm"] = {"before": _stats(np.linalg.norm(fixed_points - moving_points, axis=1)), "after": _stats(errors)}
    result["tre_near_boundary_mm"] = _stats(errors[near]) if near.any() else None
    result["rss_peak_mb"] = _rss_mb()
    return result


# ------------------------------------------------------------------------------------------------- driver


def _run(args: list[str], timeout: float | None = None) -> dict:
    """Run one worker in a fresh process; ``{"error": ...}`` instead of raising when it fails or times out."""
    command = [sys.executable, "-m", "bench.registration_bench", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"exit status {proc.returncode}: {tail}", "wall_s": time.perf_counter() - start}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "monai", "itk", "itk-elastix"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def _fmt(value, digits: int = 3) -> str:
    return "" if value is None else (f"{value:.{digits}g}" if isinstance(value, float) else str(value))


def _rows(name: str, ours: dict, default: dict, tuned: dict) -> list[dict]:
    rows = []
    for method, got, seconds in (
        ("ours (register, end to end)", ours, ours.get("timings_s", {}).get("total")),
        ("elastix default", default, default.get("register_s")),
        ("elastix tuned", tuned, tuned.get("register_s")),
    ):
        if "error" in got:
            rows.append({"pair": name, "method": method, "note": got["error"][:200]})
            continue
        tre, near, jacobian = got["tre_mm"]["after"], got.get("tre_near_boundary_mm") or {}, got["jacobian"]
        rows.append(
            {
                "pair": name,
                "method": method,
                "mean": tre["mean"],
                "median": tre["median"],
                "p95": tre["p95"],
                "max": tre["max"],
                "near_mean": near.get("mean"),
                "seconds": seconds,
                "rss_mb": round(got["rss_peak_mb"]),
                "jac_min": jacobian["min_in_lungs"],
                "jac_max": jacobian["max_in_lungs"],
                "jac_std": jacobian["std_in_lungs"],
                "folding_pct": jacobian["folding_percent_in_lungs"],
            }
        )
    return rows


def _targets(ours: dict, default: dict, tuned: dict) -> dict:
    if any("error" in got for got in (ours, default, tuned)):
        return {"met": None}
    tre, tuned_tre = ours["tre_mm"]["after"], tuned["tre_mm"]["after"]
    checks = {
        "mean_tre_at_most_tuned": tre["mean"] <= tuned_tre["mean"],
        "median_tre_at_most_tuned": tre["median"] <= tuned_tre["median"],
        "time_at_most_default": ours["timings_s"]["total"] <= default["register_s"],
        "no_folding_in_lungs": ours["jacobian"]["min_in_lungs"] > 0,
        "rss_at_most_elastix": ours["rss_peak_mb"] <= min(default["rss_peak_mb"], tuned["rss_peak_mb"]),
    }
    return {**checks, "met": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the prepared pairs here (reused when present)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    parser.add_argument("--skip-tuned", action="store_true", help="leave out the tuned elastix (the slowest row)")
    parser.add_argument("--device", default="cpu", help="ignored: the comparison runs on CPU")
    parser.add_argument("--worker", choices=("prepare", "ours", "elastix"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="default", help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # bench.run_all passes its arguments to every benchmark
        print(f"registration_bench: ignoring {' '.join(unknown)}", file=sys.stderr)
    names = [name for name in args.pairs.split(",") if name]
    if args.worker == "prepare":
        print(json.dumps(prepare_worker(args.workdir, names)))
        return 0
    if args.worker == "ours":
        print(json.dumps(ours_worker(args.workdir)))
        return 0
    if args.worker == "elastix":
        print(json.dumps(elastix_worker(args.workdir, args.kind)))
        return 0
    if set(names) - set(PAIRS):
        print(f"registration_bench: unknown pairs {sorted(set(names) - set(PAIRS))}; use {PAIRS}.", file=sys.stderr)
        return 2
    if not (data_root() / POPI).is_dir():
        print(
            f"registration_bench: the POPI CT {POPI!r} was not found under {data_root()} "
            f"(set {DATA_ENV} to the shared data folder); nothing was measured.",
            file=sys.stderr,
        )
        return 2
    try:
        version("itk-elastix")
    except PackageNotFoundError:
        print("registration_bench: itk-elastix is not installed (pip install -e '.[bench]').", file=sys.stderr)
        return 2

    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="registration-bench-pairs-") as scratch:
        workdir = args.workdir or Path(scratch)
        missing = [name for name in names if not (workdir / name / "pair.json").exists()]
        if missing:
            prepared = _run(["--worker", "prepare", "--workdir", str(workdir), "--pairs", ",".join(missing)])
            if "error" in prepared:
                print(f"registration_bench: preparing the pairs failed: {prepared['error']}", file=sys.stderr)
                return 1
        # the timed rows first (ours, default elastix), then the tuned elastix, whose time is not a target
        for name in names:
            folder = workdir / name
            results[name] = {"pair": json.loads((folder / "pair.json").read_text())}
            for key, worker in (("ours", ["--worker", "ours"]), ("elastix_default", ["--worker", "elastix"])):
                results[name][key] = _run([*worker, "--workdir", str(folder)])
                print(json.dumps({name: {key: results[name][key]}}), flush=True)
        for name in names:
            if args.skip_tuned:
                tuned = {"error": "skipped (--skip-tuned)"}
            else:
                tuned = _run(["--worker", "elastix", "--kind", "tuned", "--workdir", str(workdir / name)])
            print(json.dumps({name: {"elastix_tuned": tuned}}), flush=True)
            results[name]["elastix_tuned"] = tuned
            results[name]["targets"] = _targets(results[name]["ours"], results[name]["elastix_default"], tuned)
    load_after = os.getloadavg()
    rows = [
        row
        for name in names
        for row in _rows(name, *(results[name][k] for k in ("ours", "elastix_default", "elastix_tuned")))
    ]
    versions = _versions()
    payload = {
        "device": device_description(torch.device("cpu")),
        "torch": torch.__version__,
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "benchmark_wall_s": round(time.perf_counter() - started, 1),
        "pairs": results,
        "rows": rows,
    }
    columns = [
        ("pair", "pair"),
        ("method", "method"),
        ("mean", "TRE mean mm"),
        ("median", "median"),
        ("p95", "p95"),
        ("max", "max"),
        ("near_mean", f"mean <= {NEAR_BOUNDARY_MM:.0f} mm from pleura"),
        ("seconds", "time s"),
        ("rss_mb", "peak RSS MB"),
        ("jac_min", "det J min (lungs)"),
        ("jac_max", "max"),
        ("jac_std", "std"),
        ("folding_pct", "folding %"),
        ("note", "note"),
    ]
    path = write_results(
        "registration_cpu",
        payload,
        rows,
        columns,
        "Lung CT registration, three synthetic pairs from real CT: ours vs ITK-elastix, CPU",
    )
    lines = [
        "",
        "Targets per pair (mean and median TRE <= tuned elastix; time <= default elastix; det J > 0 in the lungs; "
        "peak RSS <= elastix):",
        "",
    ]
    for name in names:
        target = results[name]["targets"]
        pair = results[name]["pair"]
        verdict = "n/a (a method failed)" if target["met"] is None else ("**met**" if target["met"] else "**not met**")
        detail = ", ".join(f"{key} {'yes' if value else 'NO'}" for key, value in target.items() if key != "met")
        lines.append(
            f"- {name}: {verdict}{': ' + detail if detail else ''}. Fixed {pair['fixed_shape']}, moving "
            f"{pair['moving_shape']}, spacing {pair['spacing_mm']} mm, {pair['n_landmarks']} landmarks "
            f"({pair['n_near_boundary']} within {NEAR_BOUNDARY_MM:.0f} mm of the lung boundary), TRE before "
            f"{pair['tre_before_mm']['mean']:.1f} mm."
        )
        ours = results[name]["ours"]
        if "timings_s" in ours:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in ours["timings_s"].items() if isinstance(v, float | int))
            lines.append(f"  Ours per stage (s): {stages}.")
    lines += [
        "",
        f"Versions: torch {versions['torch']}, MONAI {versions['monai']}, ITK {versions['itk']}, itk-elastix "
        f"{versions['itk-elastix']}. Load average (1, 5, 15 min) before {load_before[0]:.2f}, {load_before[1]:.2f}, "
        f"{load_before[2]:.2f}; after {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f}. Benchmark wall "
        f"time {payload['benchmark_wall_s']:.0f} s. One run per row; the module notes describe pairs and methods.",
    ]
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(lines) + "\n")
    print(f"wrote {path}")
    failed = [name for name in names for k in ("ours", "elastix_default") if "error" in results[name][k]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
