"""Datalists, input checks and landmark geometry through the bundle's preprocessing."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Resized

from rrn_lung_registration.io.landmarks import landmark_errors, read_landmarks_csv
from rrn_lung_registration.synthetic.phantom import make_dataset
from rrn_lung_registration.training.data import CheckSameShaped, CheckVolumed, LandmarksToVoxeld, load_datalist

KEYS = ["fixed", "moving"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("phantom"), n_pairs=2, shape=(24, 28, 26), seed=5, n_validation=1)


def _pipeline(orientation: str, size) -> Compose:
    return Compose(
        [
            LoadImaged(KEYS, image_only=True),
            CheckVolumed(KEYS),
            EnsureChannelFirstd(KEYS, channel_dim="no_channel"),
            Orientationd(KEYS, axcodes=orientation, labels=None),
            Resized(KEYS, spatial_size=size, mode="trilinear"),
            CheckSameShaped(KEYS),
            LandmarksToVoxeld(),
        ]
    )


def test_datalist_sections_and_absolute_paths(dataset):
    training = load_datalist(dataset, "training")
    validation = load_datalist(dataset, "validation")
    assert len(training) == len(validation) == 1
    assert all(Path(training[0][key]).is_absolute() and Path(training[0][key]).is_file() for key in KEYS)


def test_datalist_missing_file_names_the_file(dataset, tmp_path):
    content = json.loads(dataset.read_text())
    content["training"][0]["moving"] = "nowhere/moving.nii.gz"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match=r"broken.json: pair 0 \('moving'\): file not found: .*nowhere/moving"):
        load_datalist(broken, "training", base_dir=dataset.parent)


def test_datalist_structure_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="section 'test'"):
        load_datalist(dataset, "test")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"fixed": "a.nii.gz"}]))
    with pytest.raises(ValueError, match="lacks the key"):
        load_datalist(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(bad)
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        load_datalist(tmp_path / "absent.json")


@contextlib.contextmanager
def _raises_from_compose(pattern: str):
    """MONAI's Compose re-raises a transform's error as the cause of a RuntimeError: match that cause."""
    with pytest.raises(Exception) as caught:
        yield
    error = caught.value
    while isinstance(error, RuntimeError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), f"expected a ValueError, got {error!r}"
    assert re.search(pattern, str(error)), f"{str(error)!r} does not match {pattern!r}"


def _write(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), str(path))
    return str(path)


def test_two_dimensional_image_is_rejected_with_its_name(tmp_path):
    pair = {
        "fixed": _write(tmp_path / "flat.nii.gz", np.zeros((12, 14))),
        "moving": _write(tmp_path / "m.nii.gz", np.zeros((12, 14, 9))),
    }
    with _raises_from_compose(r"flat.nii.gz: expected a 3-D volume, got shape \(12, 14\)"):
        Compose([LoadImaged(KEYS, image_only=True), CheckVolumed(KEYS)])(pair)


def test_nan_voxels_are_rejected_with_the_file_name(tmp_path):
    volume = np.zeros((8, 9, 10))
    volume[2, 3, 4] = np.nan
    pair = {
        "fixed": _write(tmp_path / "f.nii.gz", np.zeros((8, 9, 10))),
        "moving": _write(tmp_path / "nan.nii.gz", volume),
    }
    with _raises_from_compose(r"nan.nii.gz: 1 voxel\(s\) are NaN"):
        Compose([LoadImaged(KEYS, image_only=True), CheckVolumed(KEYS)])(pair)


def test_pair_of_different_sizes_is_rejected_on_the_native_grid(tmp_path):
    pair = {
        "fixed": _write(tmp_path / "f.nii.gz", np.zeros((8, 9, 10))),
        "moving": _write(tmp_path / "m.nii.gz", np.zeros((8, 9, 11))),
    }
    pipeline = Compose(
        [
            LoadImaged(KEYS, image_only=True),
            EnsureChannelFirstd(KEYS, channel_dim="no_channel"),
            Resized(KEYS, spatial_size=(-1, -1, -1)),
            CheckSameShaped(KEYS),
        ]
    )
    with _raises_from_compose(r"f.nii.gz \(8, 9, 10\), .*m.nii.gz \(8, 9, 11\)"):
        pipeline(pair)


def test_landmark_files_of_different_lengths_are_rejected(dataset, tmp_path):
    pair = load_datalist(dataset, "training")[0]
    short = tmp_path / "short.csv"
    short.write_text("\n".join(Path(pair["moving_landmarks"]).read_text().splitlines()[:5]) + "\n")
    pair["moving_landmarks"] = str(short)
    with _raises_from_compose(r"same number of points: .*\(300 points\), .*short.csv \(4 points\)"):
        _pipeline("RAS", (20, 20, 20))(pair)


def test_tre_before_registration_is_the_world_distance_after_reorientation_and_resampling(dataset):
    pair = load_datalist(dataset, "training")[0]
    d = _pipeline("RAS", (20, 30, 17))(pair)
    world = np.linalg.norm(
        read_landmarks_csv(pair["fixed_landmarks"]) - read_landmarks_csv(pair["moving_landmarks"]), axis=1
    )
    errors = landmark_errors(None, d["fixed_landmarks"].numpy(), d["moving_landmarks"].numpy(), d["moving"].affine)
    np.testing.assert_allclose(errors, world, atol=1e-4)


def test_ground_truth_field_registers_the_landmarks_on_the_native_grid(dataset):
    pair = load_datalist(dataset, "training")[0]
    d = _pipeline("LPS", (-1, -1, -1))(pair)  # the phantom's own orientation: no flip, no resampling
    ddf = np.load(Path(pair["fixed"]).parent / "ddf.npy")  # (3, D, H, W) in the phantom's (z, y, x) order
    ddf_nifti_order = torch.from_numpy(np.ascontiguousarray(ddf[::-1].transpose(0, 3, 2, 1)))
    errors = landmark_errors(
        ddf_nifti_order, d["fixed_landmarks"].numpy(), d["moving_landmarks"].numpy(), d["moving"].affine
    )
    assert errors.max() < 1e-3
