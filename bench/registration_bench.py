"""Benchmark of a whole lung CT registration at full size on CPU: our pipeline against ITK-elastix.

    python -m bench.registration_bench [--skip-network] [--network-timeout S] [--workdir DIR]

Pair: the POPI phase-00 CT (``ct/popi_phase00_dicom`` under ``$RRN_ROIGAN_DATA``, default ``../shared/data``;
512 x 512 x 141 voxels of 0.977 x 0.977 x 2 mm) is the fixed (inhale) image, and
``synthetic_breathing_pair(popi, n_landmarks=100, seed=0)`` makes the moving (exhale) image at the same size,
with 100 exact landmark pairs (breathing of 15 mm at the lung base plus a rigid offset of about 30 mm and a
few degrees). A preparation process reads POPI, makes the pair and writes both images as float32 MHA (ITK
geometry, LPS), the landmarks (world LPS mm) and an elastix ``point`` file of the fixed landmarks into a work
folder; every method then runs in its own fresh process that reads them, so that its peak resident set size
(``ru_maxrss``, the whole process: Python, libraries, images and everything the method allocates) is its own.

Methods:

1. ``LungRegistration(RegistrationSettings(device="cpu"))``, the defaults otherwise: no trained weights, lung
   masks, rigid then affine pre-alignment, network grid 256^3 over the fixed lung box, instance optimisation
   of the field, 100 steps per level at block-averaging factors (4, 2). Wall time per stage
   (``result.timings``), of the whole ``register`` call and of ``write_outputs`` (every output file, with the
   landmarks) into a temporary folder; TRE (mean, std, p95, max) before, after the pre-alignment and after,
   from ``pipeline.landmark_report``.
2. The same pipeline with ``weights=`` a randomly initialised paper-size ``RRN()`` (seed 0) and
   ``instance_steps=0``: what the pipeline with trained weights would run, the network stage being a no-grad
   256^3 forward. The weights are untrained, so only its time and memory are reported, not its TRE.
3. ITK-elastix (``itk-elastix``, the ``bench`` extra): the default ``affine`` then the default ``bspline``
   parameter maps (``itk.ParameterObject.GetDefaultParameterMap``, unchanged: Mattes mutual information, 4
   resolutions, 256 iterations, 2048 random samples, B-spline grid 10 mm, result image resampled), 2 threads
   (ITK's global default: ``SetNumberOfThreads`` crashes the B-spline stage, ITKElastix issue #160), no log;
   fixed = POPI, moving = the synthetic image, both read with ``itk.imread(..., itk.F)``. Wall time of the
   registration, then TRE from transformix on the fixed landmarks (elastix maps fixed-space points into the
   moving image, as our transform does), after the affine map alone and after affine + B-spline.

Target: a lower mean TRE than elastix's default affine + B-spline in less wall time (``register`` against the
elastix registration; the notes also compare with our output writing included). Results go to
``bench/results/registration_cpu.{json,md}``. On a shared machine wrap the run in ``flock /tmp/bench.lock``.
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
N_LANDMARKS = 100
SEED = 0
ELASTIX_THREADS = 2
FILES = {
    "fixed": "fixed.mha",
    "moving": "moving.mha",
    "fixed_landmarks": "fixed_landmarks.npy",
    "moving_landmarks": "moving_landmarks.npy",
    "fixed_points": "fixed_points.txt",
    "weights": "rrn_random.pt",
    "pair": "pair.json",
}


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data")).resolve()


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tre(errors: np.ndarray) -> dict[str, float]:
    from rrn_lung_registration.io.landmarks import summarize_errors

    return summarize_errors(errors)


# ------------------------------------------------------------------------------------------------ workers


def prepare_worker(workdir: Path) -> dict:
    """Read POPI, make the synthetic exhale image and landmarks, write them and random RRN weights."""
    from rrn_lung_registration.io.ct_io import read_ct, write_image
    from rrn_lung_registration.io.landmarks import write_elastix_points
    from rrn_lung_registration.networks import RRN
    from rrn_lung_registration.synthetic.breathing import synthetic_breathing_pair

    start = time.perf_counter()
    popi = read_ct(data_root() / POPI)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    pair = synthetic_breathing_pair(popi, n_landmarks=N_LANDMARKS, seed=SEED)
    pair_s = time.perf_counter() - start
    write_image(workdir / FILES["fixed"], pair.fixed, compress=False)
    write_image(workdir / FILES["moving"], pair.moving, compress=False)
    atomic_write(workdir / FILES["fixed_landmarks"], lambda tmp: np.save(tmp, pair.fixed_landmarks))
    atomic_write(workdir / FILES["moving_landmarks"], lambda tmp: np.save(tmp, pair.moving_landmarks))
    write_elastix_points(workdir / FILES["fixed_points"], pair.fixed_landmarks)
    torch.manual_seed(SEED)
    weights = RRN().state_dict()
    atomic_write(workdir / FILES["weights"], lambda tmp: torch.save(weights, tmp))
    spacing = [float(s) for s in torch.linalg.norm(torch.as_tensor(pair.fixed.affine)[:3, :3], dim=0)]
    info = {
        "source": str(data_root() / POPI),
        "shape": list(pair.fixed.shape),
        "spacing_mm": [round(s, 4) for s in spacing],
        "n_landmarks": len(pair.moving_landmarks),
        "parameters": pair.parameters,
        "read_popi_s": round(read_s, 2),
        "make_pair_s": round(pair_s, 2),
        "tre_before_mm": _tre(pair.initial_errors()),
    }
    atomic_write_text(workdir / FILES["pair"], json.dumps(info, indent=2) + "\n")
    return info


def _read_pair(workdir: Path):
    from rrn_lung_registration.io.ct_io import read_ct

    fixed, moving = read_ct(workdir / FILES["fixed"]), read_ct(workdir / FILES["moving"])
    landmarks = (np.load(workdir / FILES["fixed_landmarks"]), np.load(workdir / FILES["moving_landmarks"]))
    return fixed, moving, landmarks


def pipeline_worker(workdir: Path, network: bool) -> dict:
    """``LungRegistration`` on the pair in this fresh process: stage times, total, outputs, TRE, peak RSS.

    ``network``: with the random RRN weights and ``instance_steps=0`` (time only; no outputs written).
    """
    from rrn_lung_registration.io.spatial import Grid
    from rrn_lung_registration.pipeline import LungRegistration, RegistrationSettings, landmark_report, write_outputs

    fixed, moving, (fixed_points, moving_points) = _read_pair(workdir)
    result: dict = {"torch_threads": torch.get_num_threads(), "rss_inputs_mb": _rss_mb()}
    if network:
        settings = RegistrationSettings(device="cpu", weights=str(workdir / FILES["weights"]), instance_steps=0)
    else:
        settings = RegistrationSettings(device="cpu")
    registration = LungRegistration(settings)
    start = time.perf_counter()
    registered = registration.register(fixed, moving)
    result["register_s"] = time.perf_counter() - start
    result["timings"] = dict(registered.timings)
    result["rss_after_register_mb"] = _rss_mb()
    if network:
        result["rss_peak_mb"] = _rss_mb()
        return result
    errors, _ = landmark_report(registered.transform, fixed_points, moving_points, Grid.of(fixed), Grid.of(moving))
    result["tre_mm"] = {name: _tre(values) for name, values in errors.items()}
    with tempfile.TemporaryDirectory(prefix="registration-bench-") as output:
        start = time.perf_counter()
        files = write_outputs(registered, fixed, moving, output, fixed_points, moving_points, settings=settings)
        result["outputs_s"] = time.perf_counter() - start
        result["output_files"] = sorted(files)
        result["outputs_mb"] = round(sum(path.stat().st_size for path in files.values()) / 2**20, 1)
    result["rss_peak_mb"] = _rss_mb()
    return result


_OUTPUT_POINT = re.compile(r"OutputPoint\s*=\s*\[([^\]]*)\]")


def _transformix_points(moving_image, parameter_object, points_file: Path, output_dir: Path) -> np.ndarray:
    """Fixed landmarks (elastix ``point`` file, LPS mm) mapped by transformix: ``(N, 3)`` LPS mm."""
    import itk

    output_dir.mkdir(parents=True, exist_ok=True)
    itk.transformix_pointset(
        moving_image,
        parameter_object,
        fixed_point_set_file_name=str(points_file),
        output_directory=str(output_dir),
    )
    text = (output_dir / "outputpoints.txt").read_text()
    return np.array([[float(v) for v in match.split()] for match in _OUTPUT_POINT.findall(text)], dtype=np.float64)


def elastix_worker(workdir: Path) -> dict:
    """ITK-elastix default affine + B-spline on the pair in this fresh process: time, peak RSS, TRE."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(ELASTIX_THREADS)
    fixed = itk.imread(str(workdir / FILES["fixed"]), itk.F)
    moving = itk.imread(str(workdir / FILES["moving"]), itk.F)
    fixed_points, moving_points = (np.load(workdir / FILES[name]) for name in ("fixed_landmarks", "moving_landmarks"))
    threads = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    result: dict = {"threads": threads, "rss_inputs_mb": _rss_mb()}
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    method = itk.ElastixRegistrationMethod.New(fixed, moving)
    method.SetParameterObject(parameters)
    # The thread count comes from ITK's global default set above: SetNumberOfThreads(2) on the method makes the
    # default B-spline map (MultiMetricMultiResolutionRegistration) crash with a segmentation fault (ITKElastix
    # issue #160, still there in itk-elastix 0.25.4 with ITK 5.4.7).
    method.SetLogToConsole(False)
    method.SetLogToFile(False)
    start = time.perf_counter()
    method.UpdateLargestPossibleRegion()
    result["register_s"] = time.perf_counter() - start
    result["rss_after_register_mb"] = _rss_mb()
    transform_parameters = method.GetTransformParameterObject()
    affine_only = itk.ParameterObject.New()
    affine_only.AddParameterMap(transform_parameters.GetParameterMap(0))
    with tempfile.TemporaryDirectory(prefix="registration-bench-elastix-") as scratch:
        start = time.perf_counter()
        warped = _transformix_points(moving, transform_parameters, workdir / FILES["fixed_points"], Path(scratch, "a"))
        result["transformix_points_s"] = time.perf_counter() - start
        warped_affine = _transformix_points(moving, affine_only, workdir / FILES["fixed_points"], Path(scratch, "b"))
    if warped.shape != fixed_points.shape:
        raise RuntimeError(f"transformix returned {warped.shape[0]} points for {fixed_points.shape[0]} landmarks.")
    result["tre_mm"] = {
        "before": _tre(np.linalg.norm(fixed_points - moving_points, axis=1)),
        "affine": _tre(np.linalg.norm(warped_affine - moving_points, axis=1)),
        "after": _tre(np.linalg.norm(warped - moving_points, axis=1)),
    }
    result["parameter_maps"] = {
        name: {key: list(value) for key, value in parameters.GetDefaultParameterMap(name).items()}
        for name in ("affine", "bspline")
    }
    result["rss_peak_mb"] = _rss_mb()
    return result


# ------------------------------------------------------------------------------------------------- driver


def _run(kind: str, workdir: Path, timeout: float | None = None) -> dict:
    """Run one worker in a fresh process; ``{"error": ...}`` instead of raising when it fails or times out."""
    command = [sys.executable, "-m", "bench.registration_bench", "--worker", kind, "--workdir", str(workdir)]
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


def _stage_rows(ours: dict, network: dict, elastix: dict) -> list[dict]:
    rows: list[dict] = []
    method = "ours (no weights: instance optimisation)"
    if "error" in ours:
        rows.append({"method": method, "stage": "failed", "note": ours["error"]})
    else:
        timings = ours["timings"]
        stages = ("lung_masks", "prealign", "resample", "instance_optimisation")
        for stage in stages:
            rows.append({"method": method, "stage": stage, "seconds": timings.get(stage)})
        other = ours["register_s"] - sum(timings.get(name, 0.0) for name in ("lung_masks", "prealign", "deformable"))
        other -= timings.get("resample", 0.0)
        rows.append(
            {
                "method": method,
                "stage": "other (first resample onto the grid, checks)",
                "seconds": other,
                "note": "register() minus the stages above: timings['resample'] holds only the last of the two "
                "resampling blocks",
            }
        )
        rows.append(
            {
                "method": method,
                "stage": "register() total",
                "seconds": ours["register_s"],
                "rss_mb": ours["rss_peak_mb"],
            }
        )
        rows.append(
            {
                "method": method,
                "stage": "write_outputs (all files)",
                "seconds": ours["outputs_s"],
                "note": f"{len(ours['output_files'])} files, {ours['outputs_mb']} MB",
            }
        )
        rows.append(
            {
                "method": method,
                "stage": "total with outputs",
                "seconds": ours["register_s"] + ours["outputs_s"],
                "rss_mb": ours["rss_peak_mb"],
                "note": f"peak RSS of the whole process; {ours['rss_inputs_mb']:.0f} MB after reading the pair",
            }
        )
    method = "ours + random RRN weights, instance_steps=0"
    if "error" in network:
        rows.append({"method": method, "stage": "network", "note": f"untrained: time only; failed: {network['error']}"})
    else:
        rows.append(
            {
                "method": method,
                "stage": "network (256^3 no-grad forward)",
                "seconds": network["timings"].get("network"),
                "rss_mb": network["rss_peak_mb"],
                "note": "untrained: time only; peak RSS of the whole process (masks, pre-alignment, forward)",
            }
        )
        rows.append(
            {
                "method": method,
                "stage": "register() total",
                "seconds": network["register_s"],
                "rss_mb": network["rss_peak_mb"],
                "note": "untrained: time only",
            }
        )
    method = "ITK-elastix default affine + B-spline"
    if "error" in elastix:
        rows.append({"method": method, "stage": "failed", "note": elastix["error"]})
    else:
        rows.append(
            {
                "method": method,
                "stage": "registration (incl. result image)",
                "seconds": elastix["register_s"],
                "rss_mb": elastix["rss_after_register_mb"],
                "note": f"{elastix['threads']} threads; {elastix['rss_inputs_mb']:.0f} MB after reading the pair",
            }
        )
        rows.append(
            {
                "method": method,
                "stage": "transformix (100 points)",
                "seconds": elastix["transformix_points_s"],
                "rss_mb": elastix["rss_peak_mb"],
            }
        )
    return rows


def _tre_rows(pair: dict, ours: dict, elastix: dict) -> list[dict]:
    def row(method: str, stats: dict) -> dict:
        return {"method": method, **{key: stats[key] for key in ("mean", "std", "p95", "max")}}

    rows = [row("before registration", pair["tre_before_mm"])]
    if "tre_mm" in ours:
        rows.append(row("ours: after pre-alignment (rigid + affine)", ours["tre_mm"]["prealign"]))
        rows.append(row("ours: after instance optimisation", ours["tre_mm"]["after"]))
        rows.append(row("ours: after, snapped to voxels (DIR-Lab practice)", ours["tre_mm"]["after_snapped"]))
    if "tre_mm" in elastix:
        rows.append(row("elastix: after default affine", elastix["tre_mm"]["affine"]))
        rows.append(row("elastix: after default affine + B-spline", elastix["tre_mm"]["after"]))
    return rows


def _target(ours: dict, elastix: dict) -> dict:
    if "tre_mm" not in ours or "tre_mm" not in elastix:
        return {"met": None, "why": "a method failed; see the rows"}
    lower_tre = ours["tre_mm"]["after"]["mean"] < elastix["tre_mm"]["after"]["mean"]
    faster = ours["register_s"] < elastix["register_s"]
    faster_with_outputs = ours["register_s"] + ours["outputs_s"] < elastix["register_s"]
    return {
        "met": bool(lower_tre and faster),
        "lower_mean_tre": bool(lower_tre),
        "less_wall_time_register": bool(faster),
        "less_wall_time_including_our_outputs": bool(faster_with_outputs),
        "ours_mean_tre_mm": ours["tre_mm"]["after"]["mean"],
        "elastix_mean_tre_mm": elastix["tre_mm"]["after"]["mean"],
        "ours_register_s": ours["register_s"],
        "ours_register_and_outputs_s": ours["register_s"] + ours["outputs_s"],
        "elastix_register_s": elastix["register_s"],
    }


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the prepared pair here (reused when present)")
    parser.add_argument("--skip-network", action="store_true", help="leave out the random-weights network row")
    parser.add_argument("--network-timeout", type=float, default=1800.0, help="seconds (default 1800)")
    parser.add_argument("--device", default="cpu", help="ignored: the comparison runs on CPU")
    parser.add_argument("--worker", choices=("prepare", "ours", "network", "elastix"), help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # bench.run_all passes its arguments to every benchmark
        print(f"registration_bench: ignoring {' '.join(unknown)}", file=sys.stderr)
    if args.device != "cpu" and not args.worker:
        print(f"registration_bench: runs on CPU only (--device {args.device} ignored)", file=sys.stderr)
    if args.worker:
        workdir = args.workdir
        if args.worker == "prepare":
            result = prepare_worker(workdir)
        elif args.worker == "elastix":
            result = elastix_worker(workdir)
        else:
            result = pipeline_worker(workdir, network=args.worker == "network")
        print(json.dumps(result))
        return 0

    popi = data_root() / POPI
    if not popi.is_dir():
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
    with tempfile.TemporaryDirectory(prefix="registration-bench-pair-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if all((workdir / name).exists() for name in FILES.values()):
            pair = json.loads((workdir / FILES["pair"]).read_text())
            print(f"reusing the pair in {workdir}", flush=True)
        else:
            pair = _run("prepare", workdir)
            if "error" in pair:
                print(f"registration_bench: preparing the pair failed: {pair['error']}", file=sys.stderr)
                return 1
        print(json.dumps({"pair": pair}), flush=True)
        ours = _run("ours", workdir)
        print(json.dumps({"ours": ours}), flush=True)
        elastix = _run("elastix", workdir)
        print(json.dumps({"elastix": {k: v for k, v in elastix.items() if k != "parameter_maps"}}), flush=True)
        if args.skip_network:
            network = {"error": "skipped (--skip-network)"}
        else:
            network = _run("network", workdir, timeout=args.network_timeout)
        print(json.dumps({"network": network}), flush=True)
    load_after = os.getloadavg()

    stage_rows = _stage_rows(ours, network, elastix)
    tre_rows = _tre_rows(pair, ours, elastix)
    target = _target(ours, elastix)
    versions = _versions()
    device = torch.device("cpu")
    payload = {
        "device": device_description(device),
        "torch": torch.__version__,
        "versions": versions,
        "date": datetime.date.today().isoformat(),
        "load_average_1_5_15": {"before": list(load_before), "after": list(load_after)},
        "benchmark_wall_s": round(time.perf_counter() - started, 1),
        "pair": pair,
        "target": {"text": "lower TRE than elastix default affine + B-spline in less wall time", **target},
        "stages": stage_rows,
        "tre_mm": tre_rows,
        "raw": {"ours": ours, "network": network, "elastix": elastix},
    }
    columns = [
        ("method", "method"),
        ("stage", "stage"),
        ("seconds", "time s"),
        ("rss_mb", "peak RSS MB"),
        ("note", "note"),
    ]
    table = [{k: (round(v) if k == "rss_mb" and isinstance(v, float) else v) for k, v in r.items()} for r in stage_rows]
    path = write_results(
        "registration_cpu",
        payload,
        table,
        columns,
        "Lung CT registration at full size (POPI 512x512x141 + synthetic exhale): ours vs ITK-elastix, CPU",
    )
    lines = ["", "TRE (mm, 100 landmarks, world distance):", ""]
    lines.append("| method | mean | std | p95 | max |")
    lines.append("|---|---|---|---|---|")
    lines += [
        f"| {r['method']} | " + " | ".join(_fmt(r[k]) for k in ("mean", "std", "p95", "max")) + " |" for r in tre_rows
    ]
    met = target["met"]
    lines += ["", f"Target: {payload['target']['text']}: **{'n/a' if met is None else ('yes' if met else 'no')}**."]
    if met is not None:
        lines.append(
            f"Mean TRE {target['ours_mean_tre_mm']:.2f} mm (ours) vs {target['elastix_mean_tre_mm']:.2f} mm (elastix); "
            f"wall time {target['ours_register_s']:.0f} s (ours, register) / "
            f"{target['ours_register_and_outputs_s']:.0f} s (ours, with every output file) vs "
            f"{target['elastix_register_s']:.0f} s (elastix registration)."
        )
    lines += [
        "",
        f"Versions: torch {versions['torch']}, MONAI {versions['monai']}, ITK {versions['itk']}, itk-elastix "
        f"{versions['itk-elastix']}. Load average (1, 5, 15 min) before {load_before[0]:.2f}, {load_before[1]:.2f}, "
        f"{load_before[2]:.2f}; after {load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} (2 cores shared "
        f"with other jobs). Benchmark wall time {payload['benchmark_wall_s']:.0f} s.",
        f"Pair: {pair['source']}, shape {pair['shape']}, spacing {pair['spacing_mm']} mm; synthetic_breathing_pair("
        f"n_landmarks={N_LANDMARKS}, seed={SEED}), made in {pair['make_pair_s']:.0f} s. Every method runs in its own "
        "fresh process; peak RSS is that process's ru_maxrss (Python, torch / ITK, the two images and the method).",
        "Ours: LungRegistration(RegistrationSettings(device='cpu')) defaults (grid 256^3, affine pre-alignment, "
        "instance optimisation 100 steps per level at factors (4, 2)); the network row runs the same pipeline with "
        "random paper-size RRN weights and instance_steps=0 (an untrained network's TRE means nothing: time only).",
        "Elastix: GetDefaultParameterMap('affine') then ('bspline'), unchanged (no masks, no automatic transform "
        f"initialisation), {ELASTIX_THREADS} threads; TRE from transformix on the fixed landmarks.",
    ]
    atomic_write_text(path, path.read_text(encoding="utf-8") + "\n".join(lines) + "\n")
    print(f"wrote {path}")
    failed = [name for name, got in (("ours", ours), ("elastix", elastix)) if "error" in got]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
