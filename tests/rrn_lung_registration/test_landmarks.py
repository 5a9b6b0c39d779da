"""Landmark files, voxel <-> world conversion and TRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rrn_lung_registration.landmarks import (
    landmark_errors,
    read_landmarks_csv,
    sample_field,
    summarize_errors,
    voxel_to_world,
    world_to_voxel,
    write_landmarks_csv,
)
from rrn_lung_registration.phantom import sample_field as scipy_sample_field

OBLIQUE = np.array(
    [
        [-0.9, 0.1, 0.05, 120.0],
        [0.08, -1.1, 0.2, -40.5],
        [0.0, 0.15, 2.5, 300.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_csv_round_trip(tmp_path):
    points = np.random.default_rng(0).normal(size=(7, 3)) * 100
    write_landmarks_csv(tmp_path / "points.csv", points)
    assert (tmp_path / "points.csv").read_text().splitlines()[0] == "x,y,z"
    np.testing.assert_allclose(read_landmarks_csv(tmp_path / "points.csv"), points, atol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("z_mm,y_mm,x_mm\n1,2,3\n", "header 'x,y,z'"),
        ("x,y,z\n1,2\n", "three"),
        ("x,y,z\n1,2,abc\n", "three numbers"),
        ("x,y,z\n", "one or more rows"),
        ("x,y,z\n1,nan,3\n", "finite"),
    ],
)
def test_bad_csv_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_landmarks_csv(path)
    assert "bad.csv" in str(error.value)


def test_missing_csv_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        read_landmarks_csv(tmp_path / "absent.csv")


def test_world_voxel_round_trip_with_an_oblique_affine():
    voxels = np.random.default_rng(1).uniform(0, 50, size=(20, 3))
    world = voxel_to_world(voxels, OBLIQUE)
    np.testing.assert_allclose(world_to_voxel(world, OBLIQUE), voxels, atol=1e-9)
    # world is LPS: the first two RAS axes change sign
    ras = voxels @ OBLIQUE[:3, :3].T + OBLIQUE[:3, 3]
    np.testing.assert_allclose(world, ras * np.array([-1, -1, 1]), atol=1e-9)


def test_sample_field_matches_scipy_trilinear():
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(3, 9, 11, 10, generator=gen)
    points = np.random.default_rng(2).uniform(-1.5, 11.5, size=(50, 3))  # some outside: border values
    np.testing.assert_allclose(
        sample_field(field, points).numpy(), scipy_sample_field(field.numpy(), points), atol=1e-6
    )


def test_errors_are_world_distances():
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    fixed = np.array([[10.0, 10.0, 5.0], [3.0, 4.0, 2.0]])
    moving = fixed + np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]])
    np.testing.assert_allclose(landmark_errors(None, fixed, moving, affine), [0.7, np.hypot(1.4, 2.5)])
    # a constant field equal to the offset of the first pair registers it exactly
    ddf = torch.zeros(3, 16, 16, 8)
    ddf[0] = 1.0
    np.testing.assert_allclose(landmark_errors(ddf, fixed, moving, affine), [0.0, np.hypot(0.7, np.hypot(1.4, 2.5))])


def test_snap_to_voxel_rounds_start_and_end():
    affine = np.eye(4)
    fixed = np.array([[4.4, 4.0, 4.0]])
    moving = np.array([[5.0, 4.0, 4.0]])
    ddf = torch.zeros(3, 10, 10, 10)
    ddf[0] = 0.7  # 4.4 -> 5.1 sub-voxel; 4 -> 4.7 -> 5 snapped
    np.testing.assert_allclose(landmark_errors(ddf, fixed, moving, affine), [0.1], atol=1e-6)
    np.testing.assert_allclose(landmark_errors(ddf, fixed, moving, affine, snap_to_voxel=True), [0.0])


def test_mismatched_landmark_counts_raise():
    with pytest.raises(ValueError, match="differ in number"):
        landmark_errors(None, np.zeros((3, 3)), np.zeros((4, 3)), np.eye(4))


def test_summary():
    summary = summarize_errors([1.0, 2.0, 3.0, 4.0])
    assert summary["mean"] == 2.5 and summary["max"] == 4.0 and summary["count"] == 4
    assert summary["p95"] == pytest.approx(3.85)
    with pytest.raises(ValueError):
        summarize_errors([])
