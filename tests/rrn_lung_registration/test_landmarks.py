"""Landmark files, voxel <-> world conversion and TRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from rrn_lung_registration.io.ct_io import DIRLAB_GEOMETRY, dirlab_affine
from rrn_lung_registration.io.landmarks import (
    detect_landmark_format,
    dirlab_to_world,
    landmark_errors,
    read_dirlab_landmarks,
    read_elastix_points,
    read_landmark_pair,
    read_landmarks,
    read_landmarks_csv,
    sample_field,
    summarize_errors,
    voxel_to_world,
    world_to_dirlab,
    world_to_voxel,
    write_elastix_points,
    write_landmarks_csv,
)
from rrn_lung_registration.synthetic.phantom import sample_field as scipy_sample_field
from tests.conftest import require_data

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


# --- DIR-Lab landmark files ------------------------------------------------------------------------

# Mean landmark displacement (mm) between the two phases, as DIR-Lab publishes it for each case.
DIRLAB_MEAN_DISPLACEMENT = {
    "case1": 3.89,
    "case2": 4.34,
    "case3": 6.94,
    "case4": 9.83,
    "case5": 7.48,
    "case6": 10.89,
    "case7": 11.03,
    "case8": 14.99,
    "case9": 7.92,
    "case10": 7.30,
    "copd1": 26.34,
    "copd2": 21.79,
    "copd3": 12.64,
    "copd4": 29.58,
}


def _dirlab_pair(case: str):
    number = int(case[4:])
    if case.startswith("case"):
        folder = require_data("ct/dirlab_4dct_landmarks")
        return folder / f"Case{number}_300_T00_xyz.txt", folder / f"Case{number}_300_T50_xyz.txt"
    folder = require_data("ct/dirlab_copd_landmarks")
    return folder / f"copd{number}_300_iBH_xyz_r1.txt", folder / f"copd{number}_300_eBH_xyz_r1.txt"


@pytest.mark.parametrize("case", sorted(DIRLAB_MEAN_DISPLACEMENT, key=lambda c: (c[:4], int(c[4:]))))
def test_dirlab_files_parse(case):
    paths = _dirlab_pair(case)
    if not all(path.is_file() for path in paths):
        pytest.skip(f"DIR-Lab landmarks of {case} not in the shared data")
    shape = np.array(DIRLAB_GEOMETRY[case].shape)
    for path in paths:
        points = read_dirlab_landmarks(path)
        assert points.shape == (300, 3) and points.dtype == np.float64
        # 1-based voxel indices inside the published image size
        assert points.min() >= 1 and (points <= shape).all()
        assert detect_landmark_format(path) == "dirlab"
    # through the published geometry the pair reproduces DIR-Lab's mean displacement
    affine = dirlab_affine(case)
    fixed, moving = read_landmark_pair(*paths, fixed_image=affine, moving_image=affine)
    displacement = np.linalg.norm(fixed - moving, axis=1).mean()
    assert displacement == pytest.approx(DIRLAB_MEAN_DISPLACEMENT[case], abs=0.02)
    # and TRE before registration, measured in voxels of the moving grid, agrees
    voxels = [read_dirlab_landmarks(path) - 1 for path in paths]
    np.testing.assert_allclose(
        landmark_errors(None, voxels[0], voxels[1], affine), np.linalg.norm(fixed - moving, axis=1)
    )


def test_dirlab_layouts(tmp_path):
    # 4D-CT: tab-separated integers, CRLF; COPDGene eBH: floats, leading spaces, trailing tab;
    # COPDGene iBH: an elastix 'index' header over 1-based values
    (tmp_path / "Case1_300_T00_xyz.txt").write_bytes(b"211\t139\t66\r\n27\t131\t72\r\n")
    (tmp_path / "copd1_300_eBH_xyz_r1.txt").write_text(" 194.000000\t 257.000000\t 7.000000\t\n 2.5\t 3\t 4\t\n")
    (tmp_path / "copd1_300_iBH_xyz_r1.txt").write_text("index\n2\n188\t260\t4\n10\t20\t30\n")
    expected = {
        "Case1_300_T00_xyz.txt": [[211, 139, 66], [27, 131, 72]],
        "copd1_300_eBH_xyz_r1.txt": [[194, 257, 7], [2.5, 3, 4]],
        "copd1_300_iBH_xyz_r1.txt": [[188, 260, 4], [10, 20, 30]],
    }
    for name, points in expected.items():
        np.testing.assert_array_equal(read_dirlab_landmarks(tmp_path / name), points)
        assert detect_landmark_format(tmp_path / name) == "dirlab"
        world = read_landmarks(tmp_path / name, image=np.diag([-0.5, -0.5, 2.0, 1.0]))
        np.testing.assert_allclose(world, (np.array(points) - 1) * [0.5, 0.5, 2.0])


def test_dirlab_voxel_world_round_trip():
    voxels = np.random.default_rng(5).uniform(1, 100, size=(25, 3))
    world = dirlab_to_world(voxels, OBLIQUE)
    np.testing.assert_allclose(world, voxel_to_world(voxels - 1, OBLIQUE))
    np.testing.assert_allclose(world_to_dirlab(world, OBLIQUE), voxels, atol=1e-9)
    # DIR-Lab (1, 1, 1) is the first voxel: the origin of the image
    np.testing.assert_allclose(dirlab_to_world([[1, 1, 1]], OBLIQUE)[0], OBLIQUE[:3, 3] * [-1, -1, 1])


def test_voxel_formats_use_the_grid_of_the_file(tmp_path):
    """A MetaTensor that went through MONAI spatial transforms still converts with its file's affine."""
    path = tmp_path / "Case2_300_T50_xyz.txt"
    path.write_text("10\t20\t30\n")
    image = MetaTensor(torch.zeros(4, 4, 4), affine=torch.as_tensor(np.diag([3.0, 3.0, 3.0, 1.0])))
    image.meta["original_affine"] = np.diag([-1.0, -1.0, 2.5, 1.0])
    np.testing.assert_allclose(read_landmarks(path, image=image), [[9.0, 19.0, 72.5]])
    with pytest.raises(ValueError, match="image=") as error:
        read_landmarks(path)
    assert "Case2_300_T50_xyz.txt" in str(error.value)


# --- elastix point sets ----------------------------------------------------------------------------


def test_elastix_points_round_trip(tmp_path):
    points = np.random.default_rng(6).normal(size=(9, 3)) * 80
    path = tmp_path / "fixed_points.txt"
    write_elastix_points(path, points)
    lines = path.read_text().splitlines()
    assert lines[:2] == ["point", "9"] and len(lines) == 11
    kind, back = read_elastix_points(path)
    assert kind == "point"
    np.testing.assert_array_equal(back, points)
    assert detect_landmark_format(path) == "elastix"
    np.testing.assert_array_equal(read_landmarks(path), points)  # world: no image needed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed_points.txt"]


def test_elastix_index_files_are_zero_based_voxels(tmp_path):
    path = tmp_path / "indices.txt"
    path.write_text("INDEX\n2\n0 0 0\n1.5 2 3\n")
    kind, voxels = read_elastix_points(path)
    assert kind == "index"
    assert detect_landmark_format(path) == "elastix"
    np.testing.assert_allclose(read_landmarks(path, image=OBLIQUE), voxel_to_world(voxels, OBLIQUE))
    with pytest.raises(ValueError, match="indices.txt"):
        read_landmarks(path)


def test_csv_through_read_landmarks(tmp_path):
    points = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    write_landmarks_csv(tmp_path / "points.csv", points)
    assert detect_landmark_format(tmp_path / "points.csv") == "csv"
    np.testing.assert_allclose(read_landmarks(tmp_path / "points.csv"), points)


@pytest.mark.parametrize(
    ("reader", "content", "message"),
    [
        (read_dirlab_landmarks, "", "empty"),
        (read_dirlab_landmarks, "1\t2\n", "three numbers"),
        (read_dirlab_landmarks, "1\t2\t3\t4\n", "three numbers"),
        (read_dirlab_landmarks, "1\t2\tx\n", "line 1"),
        (read_dirlab_landmarks, "1 2 3\n4 5 nan\n", "finite"),
        (read_dirlab_landmarks, "index\n3\n1 2 3\n", "announces 3 points"),
        (read_dirlab_landmarks, "index\n", "number of points"),
        (read_dirlab_landmarks, "point\n1\n1 2 3\n", "world coordinates"),
        (read_elastix_points, "1 2 3\n", "'point' or 'index'"),
        (read_elastix_points, "point\nthree\n1 2 3\n", "line 2"),
        (read_elastix_points, "point\n0\n", "no landmarks"),
        (read_elastix_points, "point\n2\n1 2 3\n4 5\n", "line 4"),
    ],
)
def test_malformed_point_files_name_the_file(tmp_path, reader, content, message):
    path = tmp_path / "broken_points.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        reader(path)
    assert "broken_points.txt" in str(error.value)


def test_missing_point_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        read_landmarks(tmp_path / "absent.txt")
    (tmp_path / "points.txt").write_text("point\n1\n1 2 3\n")
    with pytest.raises(ValueError, match="unknown landmark format"):
        read_landmarks(tmp_path / "points.txt", format="fcsv")


def test_pairs_of_different_length_name_both_files(tmp_path):
    write_elastix_points(tmp_path / "fixed.txt", np.zeros((3, 3)))
    write_elastix_points(tmp_path / "moving.txt", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same number of points") as error:
        read_landmark_pair(tmp_path / "fixed.txt", tmp_path / "moving.txt")
    assert "fixed.txt has 3" in str(error.value) and "moving.txt has 4" in str(error.value)
