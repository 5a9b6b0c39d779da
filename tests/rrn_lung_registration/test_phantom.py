"""synthetic.phantom: shapes, determinism, anatomy, motion, exactness of the ground truth, files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp
from scipy import ndimage

from rrn_lung_registration.io.landmarks import read_landmarks_csv, world_to_voxel
from rrn_lung_registration.synthetic import phantom
from rrn_lung_registration.synthetic.phantom import (
    PhantomPair,
    jacobian_determinant,
    load_nifti_volume,
    make_breathing_pair,
    make_dataset,
    physical_to_voxel,
    sample_field,
    target_registration_error,
)


def warp(image: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    """MONAI Warp (bilinear, border padding) of a ``(D, H, W)`` image by ``ddf (3, D, H, W)``."""
    warper = Warp(mode="bilinear", padding_mode="border")
    moving = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return warper(moving, torch.from_numpy(np.ascontiguousarray(ddf))[None])[0, 0].numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def pair() -> PhantomPair:
    return make_breathing_pair((48, 48, 48), seed=0)


@pytest.fixture(scope="module")
def clean_pair() -> PhantomPair:
    """No acquisition noise, so that intensity comparisons see only interpolation and the density change."""
    return make_breathing_pair((48, 48, 48), seed=2, noise_std=0.0)


def test_shapes_dtypes_and_geometry_for_an_odd_grid():
    shape = (33, 40, 37)
    p = make_breathing_pair(shape, seed=1, n_landmarks=50)
    assert p.shape == shape
    for volume in (p.fixed, p.moving):
        assert volume.shape == shape and volume.dtype == np.float32 and np.isfinite(volume).all()
    assert p.ddf.shape == (3, *shape) and p.ddf.dtype == np.float32
    for mask in (p.fixed_lung_mask, p.moving_lung_mask):
        assert mask.shape == shape and mask.dtype == bool and mask.any()
    for landmarks in (p.fixed_landmarks, p.moving_landmarks):
        assert landmarks.shape == (50, 3) and landmarks.dtype == np.float64
    np.testing.assert_allclose(p.spacing, [300.0 / n for n in shape])
    assert p.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(p.direction, np.eye(3))


def test_same_seed_same_pair_other_seed_other_pair():
    a = make_breathing_pair((24, 20, 22), seed=5, n_landmarks=20)
    b = make_breathing_pair((24, 20, 22), seed=5, n_landmarks=20)
    c = make_breathing_pair((24, 20, 22), seed=6, n_landmarks=20)
    for name in ("fixed", "moving", "ddf", "fixed_lung_mask", "fixed_landmarks", "moving_landmarks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("fixed", "moving", "ddf", "fixed_landmarks"):
        assert not np.array_equal(getattr(a, name), getattr(c, name)), name


def test_hounsfield_units_are_plausible(pair):
    assert -1150 < pair.fixed.min() and pair.fixed.max() < 1000
    corners = pair.fixed[:, :3, :3]  # air outside the body, all slices
    assert abs(float(corners.mean()) + 1000) < 5
    inhale = float(np.median(pair.fixed[pair.fixed_lung_mask]))
    exhale = float(np.median(pair.moving[pair.moving_lung_mask]))
    assert -900 < inhale < -700
    assert inhale + 15 < exhale < -650  # denser lungs at exhale
    body = (pair.fixed > -500) & ~pair.fixed_lung_mask
    assert -200 < float(np.median(pair.fixed[body])) < 150
    bone = pair.fixed > 300
    assert 0.001 < bone.mean() < 0.05 and pair.fixed.max() > 500  # spine and ribs


def test_vessel_trees_inside_the_lungs(pair):
    for image, mask in ((pair.fixed, pair.fixed_lung_mask), (pair.moving, pair.moving_lung_mask)):
        bright = float((image[mask] > -500).mean())
        assert 0.01 < bright < 0.2


def test_motion_is_a_smooth_breathing_without_folding(pair):
    jac = jacobian_determinant(pair.ddf)
    assert jac.min() > 0.3 and jac.max() < 2.0
    assert jac[pair.fixed_lung_mask].mean() < 0.95  # lungs smaller at exhale
    assert jacobian_determinant(make_breathing_pair((32, 32, 32), seed=3, amplitude=2.5).ddf).min() > 0
    lung_z = np.flatnonzero(pair.fixed_lung_mask.any(axis=(1, 2)))
    height_mm = (lung_z[-1] - lung_z[0] + 1) * pair.spacing[0]
    si_mm = pair.ddf[0][pair.fixed_lung_mask] * pair.spacing[0]
    assert si_mm.mean() > 0  # the diaphragm rises at exhale (axis 0 points superior)
    assert 0.08 < si_mm.max() / height_mm < 0.2
    assert np.abs(pair.ddf[0]).max() > 2 * np.abs(pair.ddf[1:]).max()  # mostly cranio-caudal
    np.testing.assert_array_equal(pair.ddf[:, :, :2, :2], 0.0)  # outside the body: static
    spine = (pair.fixed > 300) & (np.abs(np.arange(48) - 23.5) < 2)[None, None, :]
    assert np.abs(pair.ddf[:, spine]).max() < 0.2 * np.abs(pair.ddf).max()


def test_zero_amplitude_is_no_motion():
    p = make_breathing_pair((24, 24, 24), seed=0, amplitude=0.0, noise_std=0.0, n_landmarks=10)
    np.testing.assert_array_equal(p.ddf, 0.0)
    np.testing.assert_array_equal(p.fixed_lung_mask, p.moving_lung_mask)
    np.testing.assert_allclose(p.moving, p.fixed, atol=1e-3)
    np.testing.assert_array_equal(p.fixed_landmarks, p.moving_landmarks)


def test_warped_moving_lung_mask_matches_fixed_mask():
    p = make_breathing_pair((96, 96, 96), seed=3, n_landmarks=0)
    warped = warp(p.moving_lung_mask.astype(np.float32), p.ddf) > 0.5
    assert dice(warped, p.fixed_lung_mask) > 0.97
    assert dice(p.moving_lung_mask, p.fixed_lung_mask) < 0.9


def test_warping_moving_reproduces_fixed_without_density_change():
    p = make_breathing_pair((48, 48, 48), seed=2, noise_std=0.0, mass_preserving=False, n_landmarks=0)
    lungs = p.fixed_lung_mask
    before = np.abs(p.moving - p.fixed)
    after = np.abs(warp(p.moving, p.ddf) - p.fixed)
    assert after[lungs].mean() < 0.3 * before[lungs].mean()
    assert after.mean() < 0.45 * before.mean()
    assert np.median(after[lungs]) < min(15.0, 0.4 * np.median(before[lungs]))  # interpolation error only


def test_exhale_density_conserves_lung_mass(clean_pair):
    p = clean_pair
    warped = warp(p.moving, p.ddf)
    jac = jacobian_determinant(p.ddf)
    parenchyma = ndimage.binary_erosion(p.fixed_lung_mask, iterations=2) & (p.fixed < -700)
    parenchyma &= ndimage.minimum_filter(p.fixed, size=3) > -1000  # not next to a vessel or edge
    parenchyma &= ndimage.maximum_filter(p.fixed, size=3) < -650
    expected = -1000.0 + (p.fixed + 1000.0) / jac  # HU + 1000 is proportional to density
    assert parenchyma.sum() > 500
    assert np.median(np.abs(warped - expected)[parenchyma]) < 6.0
    assert np.median((warped - p.fixed)[parenchyma]) > 15.0


def test_landmarks_are_consistent_with_the_ddf(pair):
    fixed, moving = pair.fixed_landmarks, pair.moving_landmarks
    assert fixed.shape == (300, 3) and len(np.unique(fixed, axis=0)) == 300
    # independent trilinear sampling of the ddf (grid_sample, align_corners=True)
    size = torch.tensor(pair.shape[::-1], dtype=torch.float64)
    grid = torch.from_numpy(fixed[:, ::-1].copy()) / (size - 1) * 2 - 1
    sampled = torch.nn.functional.grid_sample(
        torch.from_numpy(pair.ddf.astype(np.float64))[None], grid.view(1, 1, 1, -1, 3), align_corners=True
    )[0, :, 0, 0].T.numpy()
    np.testing.assert_allclose(moving, fixed + sampled, atol=1e-5)
    np.testing.assert_allclose(sample_field(pair.ddf, fixed), sampled, atol=1e-5)
    nearest = np.rint(fixed).astype(int)
    assert ((nearest >= 0) & (nearest < np.array(pair.shape))).all()
    assert pair.fixed_lung_mask[tuple(nearest.T)].all()
    in_moving = pair.moving_lung_mask[tuple(np.rint(moving).astype(int).T)]
    assert in_moving.mean() > 0.95


def test_target_registration_error(pair):
    before = pair.target_registration_error()
    assert before.shape == (300,)
    assert 3.0 < before.mean() < 25.0 and before.max() < 50.0
    manual = np.linalg.norm((pair.moving_landmarks - pair.fixed_landmarks) * np.array(pair.spacing), axis=1)
    np.testing.assert_allclose(before, manual)
    assert target_registration_error(pair.fixed_landmarks, pair.moving_landmarks, pair.spacing, pair.ddf).max() < 1e-4
    zero = target_registration_error(pair.fixed_landmarks, pair.moving_landmarks, pair.spacing, np.zeros_like(pair.ddf))
    np.testing.assert_allclose(zero, before)


def test_nifti_and_csv_round_trip(pair, tmp_path):
    paths = pair.save(tmp_path / "case")
    assert sorted(p.name for p in (tmp_path / "case").iterdir()) == sorted(p.name for p in paths.values())
    image, spacing = load_nifti_volume(paths["fixed"])
    np.testing.assert_array_equal(image, pair.fixed)
    np.testing.assert_allclose(spacing, pair.spacing, rtol=1e-6)
    raw = nib.load(str(paths["moving"]))
    assert raw.shape == pair.shape[::-1]
    assert nib.aff2axcodes(raw.affine) == ("L", "P", "S")
    np.testing.assert_allclose(raw.header.get_zooms(), pair.spacing[::-1], rtol=1e-6)
    mask, _ = load_nifti_volume(paths["moving_lung_mask"])
    np.testing.assert_array_equal(mask.astype(bool), pair.moving_lung_mask)
    for name in ("fixed_landmarks", "moving_landmarks"):
        lps = read_landmarks_csv(paths[name])  # world LPS (x, y, z) = array order (z, y, x) reversed
        np.testing.assert_allclose(lps[:, ::-1], getattr(pair, name) * np.array(pair.spacing), atol=1e-5)
        np.testing.assert_allclose(physical_to_voxel(lps[:, ::-1], pair.spacing), getattr(pair, name), atol=1e-5)
        # the NIfTI affine places the landmarks on the same voxels, (i, j, k) = (x, y, z) = array index reversed
        np.testing.assert_allclose(world_to_voxel(lps, raw.affine), getattr(pair, name)[:, ::-1], atol=1e-5)
    np.testing.assert_array_equal(np.load(paths["ddf"]), pair.ddf)


def test_make_dataset_writes_a_datalist(tmp_path):
    datalist = make_dataset(tmp_path / "data", n_pairs=3, shape=(20, 24, 22), seed=4, n_validation=1, n_landmarks=10)
    sections = json.loads(datalist.read_text())
    assert [len(sections["training"]), len(sections["validation"])] == [2, 1]
    entries = sections["training"]
    for entry in entries:
        assert {"fixed", "moving", "fixed_landmarks", "moving_landmarks"} <= set(entry)
        for relative in entry.values():
            assert not relative.startswith("/") and (datalist.parent / relative).is_file()
    first, second = (load_nifti_volume(datalist.parent / e["fixed"])[0] for e in entries)
    assert first.shape == (20, 24, 22) and not np.array_equal(first, second)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shape": (32, 32)},
        {"shape": (15, 32, 32)},
        {"shape": (32.0, 32, 32)},
        {"shape": "abc"},
        {"amplitude": -0.5},
        {"amplitude": float("nan")},
        {"amplitude": 3.0},
        {"n_landmarks": -1},
        {"n_landmarks": 2.5},
        {"seed": -3},
        {"noise_std": -1.0},
        {"field_of_view_mm": (0.0, 300.0, 300.0)},
        {"lung_hu": 100.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        make_breathing_pair(**{"shape": (16, 16, 16), **kwargs})


def test_bad_dataset_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="n_pairs"):
        make_dataset(tmp_path, n_pairs=0)
    with pytest.raises(ValueError, match="n_validation"):
        make_dataset(tmp_path, n_pairs=2, n_validation=2)


def test_vessel_blocks_match_brute_force():
    """The moving image draws each vessel only on a block of voxels; no voxel it reaches may be missed."""
    rng = np.random.default_rng(0)
    half_fov = np.full(3, 150.0)
    anat = phantom._sample_anatomy(rng, half_fov)
    vessels = phantom._grow_vessels(rng, anat, root_radius=5.5)
    subset = phantom._Vessels(
        *(a[::7] for a in (vessels.starts, vessels.ends)),
        vessels.radius_start[::7],
        vessels.radius_end[::7],
        vessels.bifurcations,
    )
    motion = phantom._sample_motion(rng, anat, phantom.MAX_AMPLITUDE)
    grid = phantom._Grid((26, 30, 28), 2 * half_fov / np.array([26, 30, 28]))
    edge = float(grid.spacing.mean())
    u = phantom._displacement_mm(motion, grid.points())
    ddf = u / grid.spacing.reshape(3, 1, 1, 1)
    x_inv = phantom._invert_motion(motion, grid.points())
    moving_grid = phantom._Grid(grid.shape, grid.spacing, max_shift_mm=1.5 * float(np.abs(u).max()) + edge)
    fast = phantom._rasterise_vessels(subset, x_inv, moving_grid, edge, ddf)
    brute = np.zeros_like(fast)
    for seg in zip(subset.starts, subset.ends, subset.radius_start, subset.radius_end, strict=True):
        brute = np.maximum(brute, phantom._segment_occupancy(x_inv, seg, edge))
    assert (brute > 0).sum() > 100
    np.testing.assert_allclose(fast, brute, atol=1e-6)
