"""rrn_lung_registration.synthetic.breathing: exact breathing pairs made from one CT, downsampling, files, errors."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from rrn_lung_registration.io.ct_io import read_ct
from rrn_lung_registration.io.landmarks import (
    read_landmarks_csv,
    sample_field,
    voxel_to_world,
    world_to_voxel,
)
from rrn_lung_registration.synthetic.breathing import (
    AIR_HU,
    PARENCHYMA_HU,
    SyntheticPair,
    downsample_ct,
    scanner_pair,
    sliding_region,
    synthetic_breathing_pair,
    threshold_lung_mask,
    write_pair,
)
from tests.conftest import require_data

OFFSET = (20.0, -15.0, 15.0)  # the default rigid offset, about 29 mm
AMPLITUDE = 15.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: OpenMP start-up costs more than it saves on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_ct(shape=(64, 56, 40), spacing=(3.0, 3.5, 4.0), seed=0) -> tuple[MetaTensor, np.ndarray]:
    """A small thorax-like CT in HU and its lungs ``(I, J, K)``.

    Non-trivial geometry: anisotropic spacing, non-zero origin, axes rotated 10 degrees about z and the
    K axis running from head to feet (as in many DICOM series). Air outside an elliptic body (40 HU), two
    ellipsoid lungs (-850 HU with a little texture) holding bright Gaussian dots (vessels).
    """
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    lps = np.eye(4)
    lps[:3, :3] = rotation @ np.diag([1.0, 1.0, -1.0]) @ np.diag(spacing)
    centre_voxel = (np.asarray(shape) - 1) / 2.0
    lps[:3, 3] = np.array([12.0, -30.0, -150.0]) - lps[:3, :3] @ centre_voxel  # body centre at (12, -30, -150)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    x, y, z = np.moveaxis((index - centre_voxel) @ lps[:3, :3].T, -1, 0)  # LPS mm from the body centre
    hu = np.full(shape, AIR_HU)
    hu[(x / 85.0) ** 2 + (y / 75.0) ** 2 <= 1.0] = 40.0
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        lungs |= ((x - side * 40.0) / 30.0) ** 2 + (y / 45.0) ** 2 + (z / 60.0) ** 2 <= 1.0
    dots = np.zeros(shape)
    inside = np.argwhere(ndimage.binary_erosion(lungs, iterations=2))
    dots[tuple(inside[rng.choice(len(inside), 150, replace=False)].T)] = 1.0
    vessels = ndimage.gaussian_filter(dots, sigma=3.0 / np.asarray(spacing))
    vessels /= vessels.max()
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) * 40.0
    hu[lungs] = (-850.0 + texture + 950.0 * vessels)[lungs]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return MetaTensor(torch.tensor(hu, dtype=torch.float32), affine=torch.tensor(ras)), lungs


@pytest.fixture(scope="module")
def toy():
    return toy_ct()


@pytest.fixture(scope="module")
def clean_pair(toy) -> SyntheticPair:
    """Noise-free, no density change: moving(y) = fixed(psi(y)) holds up to interpolation."""
    image, lungs = toy
    return synthetic_breathing_pair(image, lungs, n_landmarks=60, noise_hu=0.0, density_change=False)


@pytest.fixture(scope="module")
def pair(toy) -> SyntheticPair:
    """The defaults: density change and 10 HU noise, lungs from the threshold fallback."""
    image, _ = toy
    return synthetic_breathing_pair(image, n_landmarks=60, seed=3)


def _values(image: MetaTensor, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear values of ``image`` at world LPS points ``(N, 3)``."""
    voxels = world_to_voxel(points_lps, image.affine)
    return sample_field(image.as_tensor()[None], voxels)[:, 0].numpy()


def _mask_at(mask: np.ndarray, points_lps: np.ndarray, affine) -> np.ndarray:
    voxels = np.rint(world_to_voxel(points_lps, affine)).astype(int)
    return mask[tuple(voxels.T)]


# --- the pair ---------------------------------------------------------------------------------------


def test_pair_shapes_geometry_and_types(toy, clean_pair):
    image, _ = toy
    for volume in (clean_pair.fixed, clean_pair.moving):
        assert isinstance(volume, MetaTensor) and volume.shape == image.shape and volume.dtype == torch.float32
        np.testing.assert_allclose(volume.affine.numpy(), image.affine.numpy())
    np.testing.assert_array_equal(clean_pair.fixed.numpy(), image.numpy())  # the input, unchanged
    for points in (clean_pair.fixed_landmarks, clean_pair.moving_landmarks):
        assert points.shape == (60, 3) and points.dtype == np.float64 and np.isfinite(points).all()
    assert len(np.unique(clean_pair.moving_landmarks, axis=0)) == 60
    voxels = world_to_voxel(clean_pair.moving_landmarks, image.affine)
    np.testing.assert_allclose(voxels, np.rint(voxels), atol=1e-6)  # moving landmarks are voxel centres
    for mask in (clean_pair.fixed_lung_mask, clean_pair.moving_lung_mask):
        assert mask.shape == tuple(image.shape) and mask.dtype == bool and mask.any()


def test_moving_is_the_fixed_image_at_psi(clean_pair):
    fixed_values = _values(clean_pair.fixed, clean_pair.fixed_landmarks)
    moving_values = _values(clean_pair.moving, clean_pair.moving_landmarks)
    np.testing.assert_allclose(moving_values, fixed_values, atol=0.05)
    np.testing.assert_allclose(clean_pair.psi(clean_pair.moving_landmarks), clean_pair.fixed_landmarks)
    # the landmarks sit on distinctive points (vessel dots), not on flat parenchyma
    assert np.median(fixed_values) > -600.0


def test_initial_error_is_the_rigid_offset_plus_breathing(clean_pair):
    errors = clean_pair.initial_errors()
    offset = np.linalg.norm(OFFSET)
    assert offset - AMPLITUDE - 5.0 < errors.min() and errors.max() < offset + AMPLITUDE + 5.0
    assert abs(errors.mean() - offset) < 0.5 * AMPLITUDE


def test_landmarks_lie_well_inside_the_lungs(toy, clean_pair):
    image, lungs = toy
    assert _mask_at(lungs, clean_pair.fixed_landmarks, image.affine).all()
    assert _mask_at(clean_pair.moving_lung_mask, clean_pair.moving_landmarks, image.affine).all()
    spacing = np.linalg.norm(image.affine.numpy()[:3, :3], axis=0)
    depth = ndimage.distance_transform_edt(lungs, sampling=spacing)
    voxels = world_to_voxel(clean_pair.fixed_landmarks, image.affine)
    inside = ndimage.map_coordinates(depth, voxels.T, order=1)
    assert inside.min() >= 5.0 - spacing.max()  # margin_mm = 5, up to the box erosion's voxel steps


def test_warping_back_matches_up_to_noise_and_density_change(pair):
    """Independent of the construction: each landmark pair shows the same anatomy in the two images."""
    fixed_values = _values(pair.fixed, pair.fixed_landmarks)
    moving_values = _values(pair.moving, pair.moving_landmarks)
    assert np.corrcoef(fixed_values, moving_values)[0, 1] > 0.9
    # the documented mass-preserving model: HU_ex + 1000 = (HU_in + 1000) J in parenchyma, vessels kept
    jacobian = pair.breathing.jacobian_determinant(pair.rigid(pair.moving_landmarks))
    low, high = PARENCHYMA_HU
    weight = np.clip((high - fixed_values) / (high - low), 0.0, 1.0)
    expected = fixed_values + weight * (fixed_values - AIR_HU) * (jacobian - 1.0)
    assert np.abs(moving_values - expected).max() < 5.0 * pair.parameters["noise_hu"]


def test_exhale_lungs_are_smaller_and_denser(pair):
    fixed, moving = pair.fixed.numpy(), pair.moving.numpy()
    fixed_mask, moving_mask = pair.fixed_lung_mask, pair.moving_lung_mask
    assert fixed_mask.sum() / moving_mask.sum() > 1.05  # inhale / exhale lung volume
    assert moving[moving_mask].mean() > fixed[fixed_mask].mean() + 20.0
    # J_B is the volume change of psi: integrated over the exhale lungs it gives the inhale lung volume
    moving_points = voxel_to_world(np.argwhere(moving_mask).astype(np.float64), pair.moving.affine)
    jacobian = pair.breathing.jacobian_determinant(pair.rigid(moving_points))
    assert jacobian.mean() > 1.05  # the inhale lung is expanded: J > 1 on the whole, exhale denser
    assert abs(jacobian.sum() / fixed_mask.sum() - 1.0) < 0.03


def test_breathing_map_is_smooth_invertible_and_mostly_cranio_caudal(toy, clean_pair):
    image, _ = toy
    breathing = clean_pair.breathing
    shape = np.asarray(image.shape)
    corners = np.stack(np.meshgrid(*[np.linspace(-0.5, n - 0.5, 25) for n in shape], indexing="ij"), axis=-1)
    points = voxel_to_world(corners.reshape(-1, 3), image.affine)
    points = np.concatenate([points, points * 1.5 + [0.0, 0.0, 40.0]])  # well beyond the image too
    jacobian = breathing.jacobian_determinant(points)
    assert jacobian.min() > 0.5 and jacobian.max() < 2.0
    # analytic Jacobian == central differences of u
    step = 1e-4
    columns = [
        (breathing.displacement(points + step * e) - breathing.displacement(points - step * e)) / (2 * step)
        for e in np.eye(3)
    ]
    numeric = np.linalg.det(np.stack(columns, axis=-1) + np.eye(3))
    np.testing.assert_allclose(jacobian, numeric, atol=1e-6)
    # inhale points lie inferior to exhale points: about amplitude_mm at the lung base, little at the apex
    centre, half = breathing.centre, breathing.half_size
    grid = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 5), np.linspace(-0.5, 0.5, 5), indexing="ij"), -1)
    footprint = centre[:2] + grid.reshape(-1, 2) * half[:2]
    base = np.column_stack([footprint, np.full(len(footprint), breathing.z_bottom)])
    apex = np.column_stack([footprint, np.full(len(footprint), centre[2] + half[2])])
    si_base, si_apex = breathing.displacement(base)[:, 2], breathing.displacement(apex)[:, 2]
    assert -1.3 * AMPLITUDE < si_base.mean() < -0.7 * AMPLITUDE
    assert abs(si_apex).mean() < 0.2 * AMPLITUDE
    lateral = np.abs(breathing.displacement(base)[:, :2]).max(axis=1)
    assert (lateral < np.abs(si_base)).all()


def test_zero_motion_gives_the_fixed_image(toy):
    image, lungs = toy
    same = synthetic_breathing_pair(
        image,
        lungs,
        amplitude_mm=0.0,
        offset_mm=(0, 0, 0),
        rotation_deg=(0, 0, 0),
        noise_hu=0.0,
        density_change=False,
        n_landmarks=20,
    )
    np.testing.assert_allclose(same.moving.numpy(), image.numpy(), atol=0.05)
    np.testing.assert_allclose(same.fixed_landmarks, same.moving_landmarks, atol=1e-9)
    np.testing.assert_array_equal(same.moving_lung_mask, lungs)


def test_same_seed_same_pair(toy, pair):
    image, _ = toy
    again = synthetic_breathing_pair(image, n_landmarks=60, seed=3)
    np.testing.assert_array_equal(again.moving.numpy(), pair.moving.numpy())
    np.testing.assert_array_equal(again.fixed_landmarks, pair.fixed_landmarks)
    np.testing.assert_array_equal(again.moving_landmarks, pair.moving_landmarks)
    other = synthetic_breathing_pair(image, n_landmarks=60, seed=4)
    assert not np.array_equal(other.moving.numpy(), pair.moving.numpy())


def test_fallback_lung_mask_finds_the_lungs(toy):
    image, lungs = toy
    mask = threshold_lung_mask(image)
    dice = 2.0 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.95


def test_write_pair_round_trip(tmp_path, clean_pair):
    paths = write_pair(clean_pair, tmp_path / "pair")
    assert {"fixed", "moving", "fixed_landmarks", "moving_landmarks"} <= set(paths)
    assert all(path.is_file() for path in paths.values())
    assert not [p for p in (tmp_path / "pair").iterdir() if p.name.startswith(".")]  # no temporary files left
    moving = read_ct(paths["moving"])
    np.testing.assert_allclose(moving.numpy(), clean_pair.moving.numpy(), atol=1e-4)
    np.testing.assert_allclose(moving.affine.numpy(), clean_pair.moving.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(read_landmarks_csv(paths["fixed_landmarks"]), clean_pair.fixed_landmarks, atol=1e-5)
    np.testing.assert_allclose(read_landmarks_csv(paths["moving_landmarks"]), clean_pair.moving_landmarks, atol=1e-5)


# --- downsampling -----------------------------------------------------------------------------------


def _centre_world(image: MetaTensor) -> np.ndarray:
    return voxel_to_world((np.asarray(image.shape, dtype=np.float64) - 1) / 2.0, image.affine)


def test_downsample_averages_blocks_and_keeps_the_centre(toy):
    image, _ = toy
    small = downsample_ct(image, (2, 4, 1))
    assert tuple(small.shape) == (32, 14, 40) and small.dtype == torch.float32
    np.testing.assert_allclose(small.numpy()[3, 5, 7], image.numpy()[6:8, 20:24, 7].mean(), rtol=1e-5)
    np.testing.assert_allclose(_centre_world(small), _centre_world(image), atol=1e-9)
    # output voxel (0, 0, 0) sits at the centre of the input block it averages
    np.testing.assert_allclose(
        voxel_to_world(np.zeros((1, 3)), small.affine), voxel_to_world([[0.5, 1.5, 0.0]], image.affine), atol=1e-9
    )
    spacing = np.linalg.norm(small.affine.numpy()[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [6.0, 14.0, 4.0])
    np.testing.assert_allclose(small.meta["spacing"], spacing)
    np.testing.assert_allclose(small.meta["original_affine"], small.affine.numpy())
    # a target spacing picks the factors; odd remainders are split between both ends
    by_spacing = downsample_ct(image, spacing_mm=9.0)
    assert tuple(by_spacing.shape) == (21, 18, 20)  # factors 3, 3 (3.5 mm -> 2.57), 2
    np.testing.assert_allclose(_centre_world(by_spacing), _centre_world(image), atol=3.5)


def test_downsample_rejects_bad_arguments(toy):
    image, _ = toy
    with pytest.raises(ValueError, match="exactly one"):
        downsample_ct(image)
    with pytest.raises(ValueError, match="integers >= 1"):
        downsample_ct(image, 0)
    with pytest.raises(ValueError, match="exceed"):
        downsample_ct(image, (1, 1, 50))
    with pytest.raises(ValueError, match="3-D"):
        downsample_ct(image[None], 2)


# --- bad input --------------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(toy):
    image, lungs = toy
    with pytest.raises(ValueError, match="3-D volume"):
        synthetic_breathing_pair(image[None], lungs[None])
    with pytest.raises(ValueError, match="MetaTensor"):
        synthetic_breathing_pair(image.as_tensor(), lungs)
    with pytest.raises(ValueError, match=r"n_landmarks=100000 but only \d+"):
        synthetic_breathing_pair(image, lungs, n_landmarks=100_000)
    with pytest.raises(ValueError, match="lung_mask"):
        synthetic_breathing_pair(image, lungs[:-1])
    with pytest.raises(ValueError, match="empty"):
        synthetic_breathing_pair(image, np.zeros_like(lungs))
    with pytest.raises(ValueError, match="amplitude_mm"):
        synthetic_breathing_pair(image, lungs, amplitude_mm=-1.0)
    with pytest.raises(ValueError, match="offset_mm"):
        synthetic_breathing_pair(image, lungs, offset_mm=(1.0, 2.0))
    with pytest.raises(ValueError, match="no lung-like region"):
        threshold_lung_mask(MetaTensor(torch.zeros(8, 8, 8)))


# --- real CT: POPI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def popi_small() -> tuple[MetaTensor, MetaTensor]:
    image = read_ct(require_data("ct/popi_phase00_dicom"))
    return image, downsample_ct(image, (4, 4, 1))


def test_popi_downsampled_keeps_extent_and_centre(popi_small):
    image, small = popi_small
    assert tuple(small.shape) == (128, 128, 141)
    np.testing.assert_allclose(_centre_world(small), _centre_world(image), atol=1e-6)
    for volume in (image, small):  # outer corners of the first and last voxels
        spacing = np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0)
        extent = np.asarray(volume.shape) * spacing
        np.testing.assert_allclose(extent, [500.0, 500.0, 282.0])
    values = image.numpy()[:4, :4, 70].astype(np.float64).mean()
    np.testing.assert_allclose(small.numpy()[0, 0, 70], values, rtol=1e-6)


def test_popi_pair_is_fast_and_its_landmarks_are_in_the_lungs(popi_small):
    _, small = popi_small
    start = time.perf_counter()
    pair = synthetic_breathing_pair(small, n_landmarks=100)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"pair generation took {elapsed:.1f} s"
    voxel_ml = np.prod(np.linalg.norm(small.affine.numpy()[:3, :3], axis=0)) / 1000.0
    assert 2.0 < pair.fixed_lung_mask.sum() * voxel_ml / 1000.0 < 9.0  # litres of lung
    assert pair.fixed.numpy()[pair.fixed_lung_mask].mean() < -600.0
    assert _mask_at(pair.fixed_lung_mask, pair.fixed_landmarks, small.affine).all()
    assert _mask_at(pair.moving_lung_mask, pair.moving_landmarks, small.affine).all()
    errors = pair.initial_errors()
    assert 15.0 < errors.mean() < 45.0
    fixed_values = _values(pair.fixed, pair.fixed_landmarks)
    moving_values = _values(pair.moving, pair.moving_landmarks)
    assert np.corrcoef(fixed_values, moving_values)[0, 1] > 0.8


# ------------------------------------------------------------------------------------ sliding, scanner pairs


@pytest.fixture(scope="module")
def sliding_pair(toy) -> SyntheticPair:
    image, lungs = toy
    return synthetic_breathing_pair(image, lungs, n_landmarks=40, sliding=0.7, noise_hu=0.0, seed=2)


def test_sliding_lungs_move_more_than_the_chest_wall_beside_them(toy, sliding_pair):
    """Outside the lung region the superior-inferior breathing keeps 30 % of itself; inside, all of it."""
    image, lungs = toy
    plain = synthetic_breathing_pair(image, lungs, n_landmarks=40, noise_hu=0.0, seed=2)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=np.float64)
    region = sliding_region(lungs, lps)
    assert region.sum() > lungs.sum()  # the lungs and what lies below them
    deep_inside = ndimage.binary_erosion(region, iterations=3)
    far_outside = ~ndimage.binary_dilation(region, iterations=3)
    # the same draw without its waves (sliding scales the breathing term, not the waves)
    still = np.zeros_like(plain.breathing.wave_amplitudes)
    with_sliding = dataclasses.replace(sliding_pair.breathing, wave_amplitudes=still)
    without = dataclasses.replace(plain.breathing, wave_amplitudes=still)
    for chosen, share in ((deep_inside, 1.0), (far_outside, 0.3)):
        points = np.argwhere(chosen)[::7] @ lps[:3, :3].T + lps[:3, 3]
        slid, free = with_sliding.displacement(points), without.displacement(points)
        np.testing.assert_allclose(slid[:, :2], free[:, :2], atol=1e-9)  # sliding scales u_z only
        moving = np.abs(free[:, 2]) > 0.5  # where there is superior-inferior motion to share
        assert moving.sum() > 20
        np.testing.assert_allclose(slid[moving, 2] / free[moving, 2], share, atol=0.05)


def test_sliding_jacobian_is_analytic_and_positive(sliding_pair):
    breathing = sliding_pair.breathing
    rng = np.random.default_rng(0)
    low, high = breathing.centre - 1.3 * breathing.half_size, breathing.centre + 1.3 * breathing.half_size
    points = torch.from_numpy(rng.uniform(low, high, (400, 3)))
    analytic = breathing.jacobian_determinant(points).numpy()
    step = 1e-3
    columns = []
    for axis in range(3):
        shift = torch.zeros(3, dtype=torch.float64)
        shift[axis] = step
        columns.append(((breathing(points + shift) - breathing(points - shift)) / (2 * step)).numpy())
    numeric = np.linalg.det(np.stack(columns, axis=-1))
    # d w / d p comes from the smoothed region's central differences, interpolated: within 0.03 of the
    # derivative of the interpolated weight itself
    np.testing.assert_allclose(analytic, numeric, atol=0.03)
    assert analytic.min() > 0.1


def test_sliding_is_a_share(toy):
    image, lungs = toy
    with pytest.raises(ValueError, match="sliding"):
        synthetic_breathing_pair(image, lungs, sliding=1.5)


def test_scanner_pair_crops_each_scan_to_its_own_lung(sliding_pair):
    scanned = scanner_pair(sliding_pair, (4.0, 4.0, 6.0), side="right", margin_mm=10.0)
    for image in (scanned.fixed, scanned.moving):
        spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, [4.0, 4.0, 6.0], atol=1e-9)
    assert not np.allclose(np.asarray(scanned.fixed.affine), np.asarray(scanned.moving.affine))  # own grids
    assert 0 < len(scanned.fixed_landmarks) < len(sliding_pair.fixed_landmarks)  # one lung only
    # the kept pairs are the original ones, unchanged, and lie inside both images
    kept = [np.flatnonzero((sliding_pair.fixed_landmarks == row).all(axis=1))[0] for row in scanned.fixed_landmarks]
    np.testing.assert_array_equal(sliding_pair.moving_landmarks[kept], scanned.moving_landmarks)
    for points, image in ((scanned.fixed_landmarks, scanned.fixed), (scanned.moving_landmarks, scanned.moving)):
        values = _values(image, points)
        assert np.isfinite(values).all() and (values > AIR_HU + 1).mean() > 0.9  # inside the scan, not padding
    with pytest.raises(ValueError, match="side"):
        scanner_pair(sliding_pair, (4.0, 4.0, 6.0), side="middle")
