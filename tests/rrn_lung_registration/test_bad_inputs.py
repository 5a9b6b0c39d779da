"""Catalogue of bad inputs to ``python -m rrn_lung_registration register`` / ``warp``: each is refused before
any registration work, with a message naming the file, and nothing appears under a final output name (or,
for the cases that are only suspicious, the result is written with a warning).

Tiny synthetic volumes (the 32^3 breathing phantom) throughout; the three real runs use the smallest grid
(16^3), no pre-alignment optimisation and no optimisation steps. The command line is run in-process through
``main(argv)`` (exit codes as ``SystemExit``), and once in a subprocess.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from rrn_lung_registration import pipeline
from rrn_lung_registration.__main__ import check_options, main
from rrn_lung_registration.io import preflight
from rrn_lung_registration.io.ct_io import read_ct, read_displacement_field, write_displacement_field, write_image
from rrn_lung_registration.io.landmarks import read_landmarks_csv, write_landmarks_csv
from rrn_lung_registration.pipeline import OUTPUT_FILES, RegistrationSettings, register_files
from rrn_lung_registration.synthetic.phantom import make_breathing_pair
from tests.bundle_cli import subprocess_env
from tests.conftest import REPO_ROOT, require_data

TINY_RUN = ["--grid_size", "16", "--prealign", "none", "--instance_steps", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    make_breathing_pair((32, 32, 32), seed=3, n_landmarks=12).save(folder)
    image = read_ct(folder / "fixed.nii.gz")
    vectors = torch.zeros(*image.shape, 3)
    vectors[..., 0] = 2.0
    write_displacement_field(folder / "field.nii.gz", vectors, image.affine)
    return folder


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the command line in-process: ``(exit code, stderr)``."""
    capsys.readouterr()
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    return code, capsys.readouterr().err


def _register(phantom: Path, output: Path, *extra, fixed=None, moving=None) -> list:
    fixed = fixed or phantom / "fixed.nii.gz"
    moving = moving or phantom / "moving.nii.gz"
    return ["register", "--fixed", fixed, "--moving", moving, "--output", output, *extra]


def _no_outputs(folder: Path) -> None:
    assert not folder.exists() or not [n for n in OUTPUT_FILES if (folder / n).exists()], sorted(os.listdir(folder))


def _truncate(source: Path, target: Path, keep: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ------------------------------------------------------------------------ 1. truncated or corrupt files


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd", ".mhd"])
def test_1_truncated_files_of_every_format_are_refused(phantom, tmp_path, suffix):
    image = read_ct(phantom / "fixed.nii.gz")
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".mhd":  # header and zlib-compressed data in two files
        itk.imwrite(itk.imread(str(phantom / "fixed.nii.gz")), str(whole), compression=True)
    else:
        write_image(whole, image)
    data_file = whole.with_suffix(".zraw") if suffix == ".mhd" else whole
    _truncate(data_file, data_file)
    with pytest.raises(ValueError, match=rf"whole{suffix}: truncated or corrupt \(") as error:
        read_ct(whole)
    assert "voxel data" in str(error.value) or "stream" in str(error.value)


def test_1_truncated_or_corrupt_inputs_of_register_and_warp(phantom, tmp_path, capsys):
    cut = _truncate(phantom / "fixed.nii.gz", tmp_path / "cut.nii.gz")
    # ITK alone reads the cut file, zero-filled, without a word:
    assert (itk.array_from_image(itk.imread(str(cut))) == 0).mean() > 0.3
    output = tmp_path / "out"
    code, err = _cli(_register(phantom, output, fixed=cut), capsys)
    assert code == 1 and "cut.nii.gz: truncated or corrupt (the gzip stream ends early" in _one_error_line(err)
    code, err = _cli(_register(phantom, output, moving=cut), capsys)
    assert code == 1 and "cut.nii.gz: truncated or corrupt" in err
    flipped = bytearray((phantom / "moving.nii.gz").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(flipped))
    code, err = _cli(_register(phantom, output, moving=tmp_path / "flipped.nii.gz"), capsys)
    assert code == 1 and "flipped.nii.gz: truncated or corrupt (the gzip stream is damaged" in err
    _no_outputs(output)
    assert not output.exists()
    warped = tmp_path / "warped.nii.gz"
    code, err = _cli(["warp", cut, phantom / "field.nii.gz", warped], capsys)
    assert code == 1 and "cut.nii.gz: truncated or corrupt" in err
    cut_field = _truncate(phantom / "field.nii.gz", tmp_path / "cut_field.nii.gz")
    code, err = _cli(["warp", phantom / "moving.nii.gz", cut_field, warped], capsys)
    assert code == 1 and "cut_field.nii.gz: truncated or corrupt" in err
    assert not warped.exists() and not list(tmp_path.glob(".warped*"))


# --------------------------------------------------------------------------------- 2. NaN / inf voxels


def test_2_nan_and_inf_voxels_are_refused_with_their_count(phantom, tmp_path, capsys):
    source = nib.load(phantom / "moving.nii.gz")
    values = np.asanyarray(source.dataobj).copy()
    values[0, 0, :5] = np.nan
    values[3, 4, 5] = np.inf
    values[6, 7, 8] = -np.inf
    nib.save(nib.Nifti1Image(values, source.affine), tmp_path / "nan.nii.gz")
    with pytest.warns(UserWarning, match="7 NaN or infinite voxels in the file were read as finite"):
        assert torch.isfinite(read_ct(tmp_path / "nan.nii.gz")).all()  # what ITK makes of them: zeros
    output = tmp_path / "out"
    with pytest.warns(UserWarning, match="read as finite"):
        code, err = _cli(_register(phantom, output, moving=tmp_path / "nan.nii.gz"), capsys)
    assert code == 1 and "nan.nii.gz: 7 of 32768 voxels are NaN or infinite" in _one_error_line(err)
    assert not output.exists()
    with pytest.raises(ValueError, match="nan.nii.gz: 7 of 32768 voxels are NaN"), pytest.warns(UserWarning):
        pipeline.apply_displacement_field(tmp_path / "nan.nii.gz", phantom / "field.nii.gz", tmp_path / "w.nii.gz")
    field, affine = read_displacement_field(phantom / "field.nii.gz")
    field[1, 2, 3, 0] = float("nan")
    write_displacement_field(tmp_path / "nan_field.nii.gz", field, affine)
    code, err = _cli(["warp", phantom / "moving.nii.gz", tmp_path / "nan_field.nii.gz", tmp_path / "w.nii.gz"], capsys)
    assert code == 1 and "nan_field.nii.gz: 1 displacement values are NaN or infinite" in err
    assert not (tmp_path / "w.nii.gz").exists()


# ------------------------------------------------------------------------------------ 3. absurd geometry


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (0.001 / 9.375, r"voxel spacing outside \[0.05, 20\] mm.*spacing 0.001 x 0.001 x 0.001 mm"),
        (1000 / 9.375, r"voxel spacing outside \[0.05, 20\] mm.*spacing 1000 x 1000 x 1000 mm"),
        (0.5 / 9.375, r"physical extent no chest CT has.*extent 16 x 16 x 16 mm"),
        (0.2, r"physical extent no chest CT has.*extent 60 x 60 x 60 mm"),  # spacing in cm, not mm
    ],
)
def test_3_absurd_geometry_is_refused_before_any_allocation(phantom, tmp_path, capsys, scale, message):
    image = read_ct(phantom / "moving.nii.gz")  # 32^3 voxels of 9.375 mm
    affine = image.affine.clone()
    affine[:3, :3] *= scale
    absurd = tmp_path / "absurd.nii.gz"
    write_image(absurd, image, affine)
    output = tmp_path / "out"
    code, err = _cli(_register(phantom, output, moving=absurd), capsys)
    assert code == 1, err
    line = _one_error_line(err)
    assert "absurd.nii.gz: " in line
    assert re.search(message, line), line
    assert not output.exists()
    with pytest.raises(ValueError, match="absurd.nii.gz"):
        pipeline.apply_displacement_field(absurd, phantom / "field.nii.gz", tmp_path / "w.nii.gz")


def test_3_an_extent_longer_than_a_chest_is_refused(phantom, tmp_path):
    tall = tmp_path / "tall.nii.gz"  # 8 x 8 x 400 voxels of 4 mm: 1.6 m long
    write_image(tall, np.full((8, 8, 400), -1000, np.int16), np.diag([-4.0, -4.0, 4.0, 1.0]))
    with pytest.raises(ValueError, match=r"tall.nii.gz: physical extent no chest CT has.*32 x 32 x 1600 mm"):
        register_files(phantom / "fixed.nii.gz", tall, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- 4. landmarks


def test_4_landmarks_all_outside_the_image_are_refused(phantom, tmp_path, capsys):
    """Real DIR-Lab case-1 voxel indices (256 x 256 x 94 grid) read against a 32^3 image."""
    fixed_points = require_data("ct/dirlab_4dct_landmarks/Case1_300_T00_xyz.txt")
    moving_points = require_data("ct/dirlab_4dct_landmarks/Case1_300_T50_xyz.txt")
    output = tmp_path / "out"
    argv = _register(phantom, output, "--fixed_landmarks", fixed_points, "--moving_landmarks", moving_points)
    code, err = _cli(argv, capsys)
    line = _one_error_line(err)
    assert code == 1 and "Case1_300_T00_xyz.txt: all 300 landmarks lie outside the image" in line
    assert "fixed.nii.gz" in line and "wrong geometry" in line
    assert not output.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "x,y,z\n1,2,3\n4,5,6\n\n7,8,oops\n", r"bad.csv: line 5: expected three numbers"),
        ("short.csv", "x,y,z\n1,2,3\n4,5\n", r"short.csv: line 3: expected three numbers x,y,z, got 2"),
        ("inf.csv", "x,y,z\n1,2,3\n1,inf,3\n", r"inf.csv: line 3: landmark coordinates must be finite"),
        ("case1_300_T00_xyz.txt", "1\t2\t3\n4\t5\n", r"case1_300_T00_xyz.txt: line 2: expected three numbers"),
    ],
)
def test_4_landmark_parse_errors_name_the_file_and_line(phantom, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    output = tmp_path / "out"
    argv = _register(phantom, output, "--fixed_landmarks", tmp_path / name, "--moving_landmarks", tmp_path / name)
    code, err = _cli(argv, capsys)
    assert code == 1 and re.search(message, _one_error_line(err)), err
    assert not output.exists()


# ----------------------------------------------- 4 (some outside), 6, 7: real runs into one output folder


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_4_6_7_some_landmarks_outside_rerun_overwrite_and_stale_staging(phantom, tmp_path, capsys, caplog):
    fixed_points = read_landmarks_csv(phantom / "fixed_landmarks.csv")
    moving_points = read_landmarks_csv(phantom / "moving_landmarks.csv")
    fixed_points[:2] += 5000.0  # two landmarks far outside the image
    moving_points[:2] += 5000.0
    write_landmarks_csv(tmp_path / "fixed.csv", fixed_points)
    write_landmarks_csv(tmp_path / "moving.csv", moving_points)
    output = tmp_path / "out"
    landmarks = ["--fixed_landmarks", tmp_path / "fixed.csv", "--moving_landmarks", tmp_path / "moving.csv"]

    # 4: some landmarks outside -> a warning (log and registration.json), the result is written
    with caplog.at_level(logging.WARNING, logger="rrn_lung_registration"):
        code, err = _cli(_register(phantom, output, *landmarks, *TINY_RUN), capsys)
    assert code == 0, err
    expected = "fixed.csv: 2 of 12 landmarks lie outside the image"
    assert any(expected in record.getMessage() for record in caplog.records)
    first = json.loads((output / "registration.json").read_text())
    assert [w for w in first["warnings"] if expected in w] and len(first["warnings"]) == 2  # fixed and moving
    assert (output / "tre_per_landmark.csv").is_file() and (output / "tre_summary.json").is_file()
    before = {name: (output / name).stat().st_mtime_ns for name in first["files"]}

    # 7: staging folders of killed runs (old unnamed style, a dead process here) and of live runs
    stale_old = output / ".partial-k3j4h5g6"
    stale_dead = output / f".partial-{socket.gethostname()}-{_dead_pid()}-a1b2c3d4"
    live = output / f".partial-{socket.gethostname()}-1-e5f6g7h8"  # pid 1 runs as long as the machine does
    for folder in (stale_old, stale_dead, live):
        folder.mkdir()
        (folder / "warped_moving.nii.gz").write_bytes(b"half written")

    # 6: the same folder again, without --overwrite: refused, nothing touched
    code, err = _cli(_register(phantom, output, *TINY_RUN), capsys)
    line = _one_error_line(err)
    assert code == 1 and f"{output}: already holds the outputs of an earlier registration" in line
    assert "--overwrite" in line
    assert {name: (output / name).stat().st_mtime_ns for name in first["files"]} == before
    assert stale_old.is_dir() and stale_dead.is_dir()  # a refused run changes nothing

    # 6 + 7: with --overwrite and no landmarks: the whole earlier set goes, the stale staging folders too
    code, err = _cli(_register(phantom, output, "--overwrite", *TINY_RUN), capsys)
    assert code == 0, err
    second = json.loads((output / "registration.json").read_text())
    assert "tre_mm" not in second and second["warnings"] == []
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == sorted(second["files"])
    for stale in ("tre_per_landmark.csv", "tre_summary.json", "warped_landmarks.csv"):
        assert not (output / stale).exists(), stale
    assert not stale_old.exists() and not stale_dead.exists()
    assert live.is_dir()


# ------------------------------------------------------------------------- 5. two different patients


def test_5_an_implausible_mean_jacobian_is_a_loud_warning(phantom, tmp_path, caplog, monkeypatch):
    """The "moving patient" is the fixed scan 0.7 times the size (lungs 0.343 times the volume)."""
    fixed = read_ct(phantom / "fixed.nii.gz")
    centre = fixed.affine[:3, :3].double() @ torch.full((3,), 15.5, dtype=torch.float64) + fixed.affine[:3, 3]
    truth = torch.eye(4, dtype=torch.float64)  # fixed RAS -> moving RAS: x -> c + 0.7 (x - c)
    truth[:3, :3] *= 0.7
    truth[:3, 3] = 0.3 * centre
    small = tmp_path / "other_patient.nii.gz"
    write_image(small, fixed, truth @ fixed.affine.double())
    # the pre-alignment's answer, given at once instead of optimised (a few minutes on a CPU at this scale)
    monkeypatch.setattr(pipeline, "prealign", lambda *args, **kwargs: truth.clone())
    settings = RegistrationSettings(grid_size=16, prealign="affine", instance_steps=0, device="cpu")
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="rrn_lung_registration"):
        summary = register_files(phantom / "fixed.nii.gz", small, output, settings=settings)
    assert summary["jacobian"]["mean_in_lungs"] == pytest.approx(0.343, abs=0.01)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "mean Jacobian" in r.getMessage()]
    assert warned and "0.343, outside [0.5, 2]" in warned[0].getMessage()
    assert "same patient" in warned[0].getMessage()
    assert [w for w in summary["warnings"] if "mean Jacobian determinant in the lungs is 0.343" in w]
    assert (output / "warped_moving.nii.gz").is_file()  # not an error: the result is written


def test_5_the_band_itself():
    assert preflight.jacobian_warning(0.8) is None and preflight.jacobian_warning(1.7) is None
    assert "0.45" in preflight.jacobian_warning(0.45) and "2.5" in preflight.jacobian_warning(2.5)
    assert "folds" in preflight.jacobian_warning(-0.1)


# ------------------------------------------------------------------------------ 8. mistyped options


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gridsize", "32"], "unknown option --gridsize (did you mean --grid_size?); valid options: --fixed"),
        (["--mask", "lungs.nii.gz"], "unknown option --mask"),
        (["-x"], "unknown option -x"),
        (["--nooverwrite_all"], "unknown option --nooverwrite_all"),
        (["--weights", "--grid_size", "32"], "option --weights needs a value"),
    ],
)
def test_8_unknown_options_fail_before_any_work(phantom, tmp_path, capsys, extra, message):
    output = tmp_path / "out"
    code, err = _cli(_register(phantom, output, *extra), capsys)
    assert code == 2 and message in _one_error_line(err), err
    assert "--grid_size" in err or "unexpected" in err or "needs a value" in err
    assert not output.exists()


def test_8_options_of_warp_and_bad_values():
    assert "unknown option --fill" in check_options(["warp", "a", "b", "c", "--fill", "0"])
    assert check_options(["warp", "a", "b", "c", "--fill-hu", "0"]) is None
    assert check_options(["register", "--fixed=a", "--moving", "b", "c", "--overwrite"]) is None
    assert check_options(["register", "a", "b", "c", "--nooverwrite"]) is None
    assert "unknown command 'regster'" in check_options(["regster"])
    assert "unexpected argument(s) 'extra'" in check_options(["warp", "a", "b", "c", "0", "extra"])


def test_8_bad_option_values_fail_before_any_work(phantom, tmp_path, capsys):
    output = tmp_path / "out"
    code, err = _cli(_register(phantom, output, "--prealign", "affne"), capsys)
    assert code == 1 and "prealign must be 'affine', 'rigid' or 'none', got 'affne'" in err
    code, err = _cli(_register(phantom, output, "--grid_size", "big"), capsys)
    assert code == 1 and "grid_size must be one size or three sizes" in err
    assert not output.exists()


def test_8_the_real_command_line_exits_2_and_writes_nothing(phantom, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "rrn_lung_registration", *map(str, _register(phantom, output, "--gridsize", "32"))]
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: register: unknown option --gridsize" in done.stderr and "--grid_size" in done.stderr
    assert not output.exists()


# ----------------------------------------------------------------------------------- 9. output paths


def test_9_an_output_that_is_a_file_is_refused(phantom, tmp_path, capsys):
    taken = tmp_path / "out.txt"
    taken.write_text("not a folder")
    code, err = _cli(_register(phantom, taken), capsys)
    assert code == 1 and f"{taken}: is a file, not a folder" in _one_error_line(err)
    code, err = _cli(_register(phantom, taken / "inner"), capsys)
    assert code == 1 and f"{taken} is a file" in err
    assert taken.read_text() == "not a folder"
    code, err = _cli(["warp", phantom / "moving.nii.gz", phantom / "field.nii.gz", tmp_path], capsys)
    assert code == 1 and "is a folder; the output must be a file name" in err
    code, err = _cli(["warp", phantom / "moving.nii.gz", phantom / "field.nii.gz", tmp_path / "w.png"], capsys)
    assert code == 1 and "w.png: unsupported suffix" in err


def test_9_a_read_only_output_folder_is_refused(phantom, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    try:
        code, err = _cli(_register(phantom, locked), capsys)
        assert code == 1 and f"{locked}: cannot write there: permission denied" in _one_error_line(err)
        code, err = _cli(_register(phantom, locked / "sub"), capsys)
        assert code == 1 and f"cannot write there (in {locked})" in err
        code, err = _cli(["warp", phantom / "moving.nii.gz", phantom / "field.nii.gz", locked / "w.nii.gz"], capsys)
        assert code == 1 and "cannot write there" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------------------- 10. weights


def test_10_garbage_or_damaged_weights_are_one_line_naming_the_file(phantom, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(2000))
    torch.save({"network": {"weight": torch.zeros(3)}}, tmp_path / "whole.pt")
    _truncate(tmp_path / "whole.pt", tmp_path / "cut.pt", keep=0.5)
    (tmp_path / "pickled.pt").write_bytes(gzip.compress(b"not even a pickle"))
    output = tmp_path / "out"
    for name, detail in [
        ("garbage.pt", "cannot load these weights"),
        ("cut.pt", "cannot load these weights"),
        ("pickled.pt", "cannot load these weights"),
        ("whole.pt", "weights do not fit RRN"),
    ]:
        code, err = _cli(_register(phantom, output, "--weights", tmp_path / name), capsys)
        line = _one_error_line(err)
        assert code == 1 and f"{tmp_path / name}: " in line and detail in line, err
        assert len(line) < 700, line
    code, err = _cli(_register(phantom, output, "--weights", tmp_path / "absent.pt"), capsys)
    assert code == 1 and "absent.pt: no such weights file" in err
    assert not output.exists()
