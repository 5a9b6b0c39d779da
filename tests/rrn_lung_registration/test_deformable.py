"""The deformable optimisation without weights: B-spline field, MIND-SSC, grid choice, and a harder real-CT pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rrn_lung_registration.alignment.bspline import BSplineField
from rrn_lung_registration.alignment.deformable import (
    NATIVE_MARGIN,
    DeformableSettings,
    _ChannelLast,
    _Plateau,
    finest_spacing,
    mind_ssc,
    register_deformable,
)
from rrn_lung_registration.io.ct_io import read_ct
from rrn_lung_registration.io.spatial import Grid
from rrn_lung_registration.pipeline import LungRegistration, RegistrationSettings, write_outputs
from tests.conftest import require_data


def _random_field(extent=(40.0, 50.0, 60.0), spacing=8.0, seed=0) -> BSplineField:
    torch.manual_seed(seed)
    field = BSplineField(extent, spacing).double()
    with torch.no_grad():
        field.coefficients.normal_()
    return field


def test_bspline_gradient_is_the_derivative_of_the_field():
    field = _random_field()
    points = torch.rand(64, 3, dtype=torch.float64) * torch.tensor([40.0, 50.0, 60.0], dtype=torch.float64)
    _, gradient = field(points, gradient=True)
    for axis in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[axis] = 1e-5
        numeric = (field(points + step) - field(points - step)) / 2e-5
        np.testing.assert_allclose(gradient[:, :, axis].detach().numpy(), numeric.detach().numpy(), atol=1e-8)


def test_bspline_reproduces_constants_and_linear_fields():
    field = BSplineField((30.0, 30.0, 30.0), 6.0).double()
    points = torch.rand(50, 3, dtype=torch.float64) * 30
    with torch.no_grad():
        field.coefficients.fill_(2.5)
        np.testing.assert_allclose(field(points).numpy(), 2.5, atol=1e-12)
        # control point n sits at q = (n - 1) * spacing: coefficients equal to a linear function of their
        # position give that linear function everywhere (cubic B-splines reproduce linear polynomials)
        n = torch.arange(field.size[0], dtype=torch.float64)
        field.coefficients.zero_()
        field.coefficients[..., 0] = ((n - 1) * 6.0 * 0.1)[:, None, None]
        np.testing.assert_allclose(field(points)[:, 0].numpy(), 0.1 * points[:, 0].numpy(), atol=1e-10)


def test_bspline_on_a_grid_equals_the_pointwise_values_and_gradients():
    field = _random_field()
    shape, spacing = (10, 12, 9), torch.tensor([3.1, 2.9, 4.0], dtype=torch.float64)
    index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    points = index.double() * spacing
    values, gradient = field(points, gradient=True)
    np.testing.assert_allclose(
        field.on_grid(shape, spacing).reshape(-1, 3).numpy(), values.detach().numpy(), atol=1e-12
    )
    for axis in range(3):
        on_grid = field.on_grid(shape, spacing, derivative=axis).reshape(-1, 3)
        np.testing.assert_allclose(on_grid.numpy(), gradient[:, :, axis].detach().numpy(), atol=1e-12)


def test_mind_features_ignore_the_intensity_scale():
    torch.manual_seed(0)
    image = torch.rand(1, 1, 12, 14, 16)
    features = mind_ssc(image)
    assert features.shape == (1, 12, 12, 14, 16)
    assert float(features.min()) >= 0 and torch.allclose(features.amax(dim=1), torch.ones(1, 12, 14, 16))
    # a brighter, offset copy (a denser lung at exhale, in the simplest form) has the same descriptors
    torch.testing.assert_close(mind_ssc(3.0 * image + 0.5), features, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(1, 1, I, J, K\)"):
        mind_ssc(torch.rand(12, 14, 16))


def _mind_by_definition(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC straight from its definition, voxel windows read with numpy (valid away from the border)."""
    volume = image[0, 0].double().numpy()
    pad = dilation + radius
    padded = np.pad(volume, pad, mode="edge")
    size = volume.shape
    offsets = [np.array(o) * dilation for o in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))]

    def read(start, shift):
        return padded[tuple(slice(s + v, s + v + n) for s, v, n in zip(start, shift, size, strict=True))]

    distances = []
    for a in range(6):
        for b in range(a + 1, 6):
            if np.dot(offsets[a], offsets[b]) != 0:
                continue  # opposite neighbours are not a pair
            total = np.zeros(size)
            for box in np.ndindex(*(2 * radius + 1,) * 3):
                at = [pad + o - radius for o in box]
                total += (read(at, offsets[a]) - read(at, offsets[b])) ** 2
            distances.append(total / (2 * radius + 1) ** 3)
    distance = np.stack(distances)
    features = np.exp(-distance / distance.mean(axis=0))
    return torch.from_numpy(features / features.max(axis=0))[None].float()


def test_mind_features_match_their_definition_away_from_the_border():
    torch.manual_seed(1)
    image = torch.rand(1, 1, 15, 13, 17)
    inner = (..., slice(3, -3), slice(3, -3), slice(3, -3))  # dilation 2 + radius 1 from each face
    torch.testing.assert_close(mind_ssc(image)[inner], _mind_by_definition(image)[inner], atol=1e-5, rtol=1e-5)


def test_feature_rows_sample_like_grid_sample_inside_and_beyond_the_border():
    torch.manual_seed(0)
    volume = torch.rand(1, 12, 9, 11, 13)
    last = torch.tensor([8.0, 10.0, 12.0])
    voxels = torch.cat([torch.rand(500, 3) * last, torch.rand(50, 3) * (last + 6) - 3, last[None], torch.zeros(1, 3)])
    voxels.requires_grad_(True)
    grid = (2 * voxels / last - 1).flip(-1).reshape(1, -1, 1, 1, 3)
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)
    expected = expected.reshape(12, -1).T
    sampled = _ChannelLast(volume).at(voxels)
    torch.testing.assert_close(sampled, expected, atol=5e-4, rtol=0)  # rows are float16
    weights = torch.rand(12)
    (grad,) = torch.autograd.grad((sampled * weights).sum(), voxels)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), voxels)
    inside = ((voxels > 0.01) & (voxels < last - 0.01)).all(1)  # grid_sample's gradient at a face is one-sided
    torch.testing.assert_close(grad[inside], expected_grad[inside], atol=5e-3, rtol=0)


def test_features_computed_in_slabs_equal_those_of_the_whole_volume():
    torch.manual_seed(0)
    values = torch.rand(70, 23, 19) * 1000 - 1000  # HU
    whole = _ChannelLast(mind_ssc((values + 1000.0)[None, None] / 1000.0))
    for slab in (16, 32, 100):
        torch.testing.assert_close(_ChannelLast.mind(values, (-1000.0, 0.0), slab=slab).rows, whole.rows)


def _box(shape, spacing) -> Grid:
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return Grid(shape, affine)


def test_the_finest_level_follows_the_images_voxels_and_a_size_cap():
    box = _box((101, 101, 101), (1.0, 1.0, 1.0))  # a 100 mm cube
    one_mm = [torch.tensor([1.37, 1.37, 2.5]), torch.tensor([0.8, 0.8, 2.5])]
    assert finest_spacing(box, one_mm, max_voxels=10**8) == pytest.approx(1.0)  # never below 1 mm
    coarse = [torch.tensor([1.37, 1.37, 2.5]), torch.tensor([1.5, 1.5, 2.0])]
    # a little coarser than the finest voxels, so that fixed samples are not all at voxel centres
    assert finest_spacing(box, coarse, max_voxels=10**8) == pytest.approx(NATIVE_MARGIN * 1.37)
    # 100^3 mm^3 in at most 125,000 voxels: 2 mm
    assert finest_spacing(box, coarse, max_voxels=125_000) == pytest.approx(2.0)


def test_levels_finer_than_the_images_are_not_made(tmp_path):
    """A phantom of 9.4 mm voxels: the 6 and 3 mm levels are sampled at about its voxel size, and a zero step budget
    leaves the field zero."""
    from rrn_lung_registration.synthetic.phantom import make_breathing_pair

    pair = make_breathing_pair((32, 32, 32), seed=1, n_landmarks=5)
    pair.save(tmp_path)
    fixed, moving = read_ct(tmp_path / "fixed.nii.gz"), read_ct(tmp_path / "moving.nii.gz")
    grid = Grid.of(fixed)
    mask = torch.from_numpy(np.asarray(pair.fixed_lung_mask, dtype=bool))
    settings = DeformableSettings(max_steps=(5, 5, 5))
    found, u, levels = register_deformable(
        fixed.as_tensor(), grid.affine, moving.as_tensor(), grid.affine, torch.eye(4), mask, grid, settings
    )
    voxel = float(grid.spacing.min())
    assert voxel > 6.0 and [level.spacing_mm for level in levels] == pytest.approx([NATIVE_MARGIN * voxel] * 3)
    assert u.shape == (3, *found.shape) and torch.isfinite(u).all()
    _, zero, none = register_deformable(
        fixed.as_tensor(), grid.affine, moving.as_tensor(), grid.affine, torch.eye(4), mask, grid,
        DeformableSettings(max_steps=(0, 0, 0)),
    )  # fmt: skip
    assert none == [] and zero.abs().max() == 0


def test_settings_need_one_value_per_level():
    with pytest.raises(ValueError, match="control_mm needs one value per level"):
        DeformableSettings(levels_mm=(6.0, None), control_mm=(24.0, 12.0, 8.0)).check()
    with pytest.raises(ValueError, match="only the last level"):
        DeformableSettings(levels_mm=(None, 3.0, 2.0)).check()
    with pytest.raises(ValueError, match="deformable"):
        RegistrationSettings(deformable={"no_such_setting": 1}).check()


def test_a_plateau_halves_the_step_then_ends_the_level():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    plateau = _Plateau(optimizer, tolerance=1e-3, patience=5, decays=2)
    steps = 0
    while not plateau.converged(1.0):  # a flat loss: every window is a plateau
        steps += 1
        assert steps < 1000
    assert plateau.halvings == 2 and optimizer.param_groups[0]["lr"] == 0.25


# ------------------------------------------------------------------------------------------ real CT


def test_a_harder_real_ct_pair_registers_without_folding(tmp_path):
    """POPI (downsampled) with lungs sliding along the chest wall, a 35 mm / 4 degree offset, density change and
    noise, each scan cropped to its own right lung at 5 mm slices: the registration beats its pre-alignment on
    the landmarks and does not fold inside the lungs."""
    from rrn_lung_registration.synthetic.breathing import downsample_ct, scanner_pair, synthetic_breathing_pair

    ct = downsample_ct(read_ct(require_data("ct/popi_phase00_dicom")), factor=(4, 4, 2))
    sliding = synthetic_breathing_pair(
        ct, offset_mm=(25.0, -20.0, 18.0), rotation_deg=(4.0, -3.0, 3.0), n_landmarks=80, sliding=0.7,
        noise_hu=20.0, margin_mm=2.0, min_distance_mm=8.0, seed=1,
    )  # fmt: skip
    pair = scanner_pair(sliding, (4.0, 4.0, 5.0), side="right")
    assert pair.fixed.shape != pair.moving.shape and len(pair.fixed_landmarks) >= 20
    settings = RegistrationSettings(device="cpu")
    result = LungRegistration(settings).register(pair.fixed, pair.moving)
    write_outputs(result, pair.fixed, pair.moving, tmp_path, pair.fixed_landmarks, pair.moving_landmarks, settings)
    summary = json.loads((tmp_path / "registration.json").read_text())
    tre = summary["tre_mm"]
    assert tre["after"]["mean"] < 0.7 * tre["prealign"]["mean"], tre
    assert tre["after"]["median"] < tre["prealign"]["median"], tre
    assert summary["jacobian"]["min_in_lungs"] > 0 and summary["jacobian"]["folding_percent_in_lungs"] == 0
    assert [level["spacing_mm"] >= 4.0 for level in summary["deformable_levels"]] == [True] * 3
