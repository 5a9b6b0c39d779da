"""The end-to-end registration of one CT pair: physical-space outputs, ITK compatibility, TRE, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rrn_lung_registration import pipeline
from rrn_lung_registration.alignment.instance import optimise_field
from rrn_lung_registration.alignment.prealign import PrealignSettings, prealign
from rrn_lung_registration.io.ct_io import read_ct, read_displacement_field, write_image
from rrn_lung_registration.io.landmarks import LPS_TO_RAS, read_landmarks_csv, write_landmarks_csv
from rrn_lung_registration.io.spatial import Grid, apply_affine, sample_world
from rrn_lung_registration.io.transform import RegistrationTransform
from rrn_lung_registration.networks import RRN
from rrn_lung_registration.pipeline import (
    LungRegistration,
    RegistrationSettings,
    apply_displacement_field,
    register_files,
    write_outputs,
)
from rrn_lung_registration.synthetic.phantom import make_breathing_pair
from tests.bundle_cli import subprocess_env
from tests.conftest import REPO_ROOT, require_data

# a fast registration of the 48^3 phantom: 30 steps per deformable level (grid_size and instance_factors are
# the network path's, for the tests with weights)
SMALL = dict(grid_size=32, prealign_iterations=20, instance_steps=30, instance_factors=(1,))


def _rigid(angle_deg: float, offset_mm, centre: torch.Tensor) -> torch.Tensor:
    """RAS world map: rotation about the RAS z axis by ``angle_deg`` around ``centre``, then ``offset_mm``."""
    a = math.radians(angle_deg)
    rotation = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = rotation.double()
    matrix[:3, 3] = centre + torch.as_tensor(offset_mm, dtype=torch.float64) - rotation.double() @ centre
    return matrix


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    make_breathing_pair((48, 48, 48), seed=3, n_landmarks=30).save(folder)
    return folder


@pytest.fixture(scope="module")
def registered(phantom_files, tmp_path_factory):
    fixed, moving = read_ct(phantom_files / "fixed.nii.gz"), read_ct(phantom_files / "moving.nii.gz")
    settings = RegistrationSettings(**SMALL)
    result = LungRegistration(settings).register(fixed, moving)
    output = tmp_path_factory.mktemp("outputs")
    landmarks = [read_landmarks_csv(phantom_files / f"{name}_landmarks.csv") for name in ("fixed", "moving")]
    files = write_outputs(result, fixed, moving, output, *landmarks, settings=settings)
    return dict(fixed=fixed, moving=moving, result=result, output=output, files=files, landmarks=landmarks)


def test_outputs_live_on_the_fixed_grid(registered):
    fixed, output = registered["fixed"], registered["output"]
    for name in ("warped_moving", "jacobian_determinant", "fixed_lung_mask"):
        image = read_ct(output / f"{name}.nii.gz")
        assert image.shape == fixed.shape, name
        np.testing.assert_allclose(image.affine.numpy(), fixed.affine.numpy(), atol=1e-4, err_msg=name)
    vectors, affine = read_displacement_field(output / "displacement_field.nii")
    assert vectors.shape == (*fixed.shape, 3)
    np.testing.assert_allclose(affine.numpy(), fixed.affine.numpy(), atol=1e-4)
    summary = json.loads((output / "registration.json").read_text())
    assert set(summary["files"]) == {path.name for path in registered["files"].values()}
    assert summary["jacobian"]["folding_percent"] == 0.0
    overview = Image.open(output / "overview.png")
    assert overview.size[0] > 100 and overview.size[1] > 100
    assert not [p for p in output.iterdir() if p.name.startswith(".")], "staging files left behind"


def test_itk_resampler_with_the_field_reproduces_the_warped_image(registered, tmp_path):
    """ITK's own resampler + our displacement field == our warped moving image."""
    import itk

    output = registered["output"]
    write_image(tmp_path / "moving.mha", registered["moving"].float())
    moving = itk.imread(str(tmp_path / "moving.mha"), itk.F)
    field = itk.imread(str(output / "displacement_field.nii"))
    field_d = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    field_d.CopyInformation(field)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field_d)
    reference = itk.imread(str(output / "warped_moving.nii.gz"), itk.F)
    resampled = itk.resample_image_filter(
        moving, transform=transform, use_reference_image=True, reference_image=reference, default_pixel_value=-1000.0
    )
    ours, theirs = itk.array_from_image(reference), itk.array_from_image(resampled)
    assert np.ptp(ours) > 500  # a real image, not a constant
    np.testing.assert_allclose(theirs, ours, atol=0.05)
    # the same through the package's own command
    again = apply_displacement_field(tmp_path / "moving.mha", output / "displacement_field.nii", tmp_path / "w.nii.gz")
    np.testing.assert_allclose(read_ct(again).numpy(), read_ct(output / "warped_moving.nii.gz").numpy(), atol=0.02)


def test_prealign_file_is_the_itk_affine_of_the_transform(registered):
    import itk

    transform = itk.transformread(str(registered["output"] / "prealign.tfm"))[0]
    fixed_points = registered["landmarks"][0][:5]
    ours = registered["result"].transform.map_points_lps(fixed_points, deformable=False)
    theirs = np.array([list(transform.TransformPoint([float(v) for v in p])) for p in fixed_points])
    np.testing.assert_allclose(theirs, ours, atol=1e-6)


def test_landmark_report(registered):
    output, transform = registered["output"], registered["result"].transform
    tre = json.loads((output / "tre_summary.json").read_text())
    assert set(tre) == {"before", "prealign", "after", "after_snapped"}
    assert tre["after"]["mean"] < 0.5 * tre["before"]["mean"]
    assert tre["after"]["count"] == 30
    warped = read_landmarks_csv(output / "warped_landmarks.csv")
    np.testing.assert_allclose(warped, transform.map_points_lps(registered["landmarks"][0]), atol=1e-3)
    rows = (output / "tre_per_landmark.csv").read_text().splitlines()
    assert rows[0].split(",") == [
        "landmark",
        "tre_before_mm",
        "tre_prealign_mm",
        "tre_after_mm",
        "tre_after_snapped_mm",
    ]
    assert len(rows) == 31


def test_transform_composes_prealign_and_displacement():
    grid = Grid((8, 9, 10), np.diag([-2.0, -1.5, 2.5, 1.0]))
    centre = grid.voxel_to_world(torch.tensor([3.5, 4.0, 4.5], dtype=torch.float64))
    matrix = _rigid(10.0, (5.0, -3.0, 2.0), centre)
    u = torch.zeros(3, *grid.shape)
    u[0], u[2] = 1.0, -0.5  # a constant shift in grid voxels
    transform = RegistrationTransform(matrix, grid, u)
    points = grid.points(torch.float64)[2:5, 3, 4]
    expected = apply_affine(matrix, points + torch.tensor([1.0, 0.0, -0.5], dtype=torch.float64) @ grid.linear.T)
    np.testing.assert_allclose(transform.map_points(points).numpy(), expected.numpy(), atol=1e-5)
    identity = RegistrationTransform.identity(grid)
    assert identity.itk_displacement(grid).abs().max() == 0
    np.testing.assert_allclose(identity.jacobian_on_grid().numpy(), 1.0)
    with pytest.raises(ValueError, match="does not fit the grid"):
        RegistrationTransform(matrix, grid, torch.zeros(3, 8, 9, 9))


def test_prealign_recovers_a_rigid_offset(phantom_files):
    """A 30 mm offset with a 6 degree turn is found to within a fraction of the 6 mm voxels."""
    from rrn_lung_registration.masking.lung_mask import lung_mask

    fixed = read_ct(phantom_files / "fixed.nii.gz")
    grid = Grid.of(fixed)
    truth = _rigid(6.0, (20.0, -15.0, 15.0), grid.voxel_to_world(torch.tensor([24.0, 24.0, 24.0])).double())
    # moving(y) = fixed(truth^-1 y): the fixed point x sits at truth(x) in the moving image
    inverse = torch.linalg.inv(truth)
    moving = sample_world(fixed.as_tensor().float(), grid.affine, apply_affine(inverse, grid.points()), fill=-1000.0)
    spacing = grid.spacing.tolist()
    masks = [torch.from_numpy(lung_mask(v.numpy(), spacing)) for v in (fixed.as_tensor().float(), moving)]
    settings = PrealignSettings(mode="rigid", spacings_mm=(8.0, 4.0), iterations=(40, 20))
    found = prealign(fixed.as_tensor(), grid.affine, moving, grid.affine, *masks, settings)
    lungs = grid.voxel_to_world(torch.nonzero(masks[0]).double())
    error = (apply_affine(found, lungs) - apply_affine(truth, lungs)).norm(dim=1)
    assert error.mean() < 2.0, error.mean()


def test_optimise_field_recovers_a_shift():
    """A smooth blob moved by 2 voxels along each axis: the field found in the middle is that shift."""
    axes = torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij")
    blob = lambda c: torch.exp(-sum((a - ci) ** 2 for a, ci in zip(axes, c, strict=True)) / 30.0)  # noqa: E731
    fixed = blob((15.0, 16.0, 17.0))[None, None]
    moving = blob((17.0, 18.0, 19.0))[None, None]  # moving(x + 2) = fixed(x)
    ddf = optimise_field(fixed, moving, steps=30, factors=(2, 1))
    np.testing.assert_allclose(ddf[0, :, 16, 16, 17].numpy(), [2.0, 2.0, 2.0], atol=0.4)


def test_network_weights_and_instance_modes(phantom_files, tmp_path):
    kwargs = dict(pyramid_channels=(4, 8, 8, 8), estimator_channels=(8, 8, 8, 8, 8), refiner_channels=(8, 8, 3),
                  refiner_dilations=(1, 2, 1))  # fmt: skip
    torch.save(RRN(**kwargs).state_dict(), tmp_path / "weights.pt")
    fixed, moving = read_ct(phantom_files / "fixed.nii.gz"), read_ct(phantom_files / "moving.nii.gz")
    for mode in ("field", "network"):
        settings = RegistrationSettings(
            **{**SMALL, "instance_steps": 2, "prealign": "none"},
            weights=str(tmp_path / "weights.pt"),
            network=kwargs,
            instance_mode=mode,
        )
        result = LungRegistration(settings).register(fixed, moving)
        assert torch.isfinite(result.transform.displacement).all()
        assert {"network", "instance_optimisation"} <= set(result.timings)
    with pytest.raises(ValueError, match="needs weights|give weights"):
        LungRegistration(RegistrationSettings(instance_mode="network"))


def test_command_line_register_and_warp(phantom_files, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "rrn_lung_registration", "register",
               "--fixed", str(phantom_files / "fixed.nii.gz"), "--moving", str(phantom_files / "moving.nii.gz"),
               "--output", str(output), "--fixed_landmarks", str(phantom_files / "fixed_landmarks.csv"),
               "--moving_landmarks", str(phantom_files / "moving_landmarks.csv"),
               "--grid_size", "32", "--prealign", "rigid", "--instance_steps", "5"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TRE" in done.stdout and "registration.json" in done.stdout  # the summary line, then where the details are
    assert json.loads((output / "registration.json").read_text())["tre_mm"]["after"]["count"] == 30
    assert (output / "displacement_field.nii").is_file() and (output / "overview.png").is_file()
    command = [sys.executable, "-m", "rrn_lung_registration", "warp", str(phantom_files / "moving.nii.gz"),
               str(output / "displacement_field.nii"), str(tmp_path / "again.nii.gz")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(
        read_ct(tmp_path / "again.nii.gz").numpy(), read_ct(output / "warped_moving.nii.gz").numpy(), atol=0.02
    )


# ------------------------------------------------------------------------------------------ bad input


def _assert_nothing_written(folder):
    assert not folder.exists() or not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


def test_bad_inputs_name_the_file_and_write_nothing(phantom_files, tmp_path):
    fixed, moving = phantom_files / "fixed.nii.gz", phantom_files / "moving.nii.gz"
    output = tmp_path / "out"
    empty = tmp_path / "no_dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a DICOM file")
    with pytest.raises(FileNotFoundError, match="no_dicom"):
        register_files(empty, moving, output)
    image = read_ct(fixed)
    flat = tmp_path / "flat.nii.gz"  # a 2-D image
    import itk

    itk.imwrite(itk.image_from_array(image.numpy()[:, :, 0].astype(np.float32)), str(flat))
    with pytest.raises(ValueError, match="flat.nii.gz.*3-D"):
        register_files(fixed, flat, output)
    scaled = tmp_path / "scaled.nii.gz"  # intensities in [0, 1], not HU
    write_image(scaled, (image.float() + 1000) / 2000, image.affine)
    with pytest.raises(ValueError, match="scaled.nii.gz.*Hounsfield"):
        register_files(scaled, moving, output)
    no_lungs = tmp_path / "no_lungs.nii.gz"  # air around a soft-tissue body, no lungs
    body = np.where(image.numpy() > -950, 40.0, -1000.0).astype(np.float32)
    write_image(no_lungs, body, image.affine)
    with pytest.raises(ValueError, match="no_lungs.nii.gz.*lung"):
        register_files(fixed, no_lungs, output)
    short = tmp_path / "short.csv"
    write_landmarks_csv(short, read_landmarks_csv(phantom_files / "moving_landmarks.csv")[:10])
    with pytest.raises(ValueError, match="short.csv"):
        register_files(fixed, moving, output, phantom_files / "fixed_landmarks.csv", short)
    _assert_nothing_written(output)


def test_a_field_that_does_not_match_the_image(registered, tmp_path):
    field = registered["output"] / "displacement_field.nii"
    image = read_ct(registered["output"] / "warped_moving.nii.gz")
    far = image.affine.clone()
    far[:3, 3] += 5000.0  # the same image a few metres away
    elsewhere = tmp_path / "elsewhere.nii.gz"
    write_image(elsewhere, image, far)
    with pytest.raises(ValueError, match="displacement_field.nii does not match .*elsewhere.nii.gz"):
        apply_displacement_field(elsewhere, field, tmp_path / "out.nii.gz")
    with pytest.raises(ValueError, match="warped_moving.nii.gz: expected a displacement field"):
        apply_displacement_field(elsewhere, registered["output"] / "warped_moving.nii.gz", tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_failure_while_writing_leaves_no_partial_outputs(registered, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "save_overview", broken)
    output = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        write_outputs(registered["result"], registered["fixed"], registered["moving"], output)
    _assert_nothing_written(output)


# ------------------------------------------------------------------------------------------ real CT


def test_popi_synthetic_breathing_pair_with_a_30_mm_offset():
    """POPI (downsampled) moved by a synthetic breathing motion and a 30 mm / 4 degree repositioning:
    pre-alignment + instance optimisation, with no trained weights, cut the landmark TRE by at least 80 %."""
    from rrn_lung_registration.synthetic.breathing import downsample_ct, synthetic_breathing_pair

    ct = read_ct(require_data("ct/popi_phase00_dicom"))
    pair = synthetic_breathing_pair(downsample_ct(ct, factor=(4, 4, 2)), n_landmarks=60, seed=0)
    before = pair.initial_errors()
    assert 25.0 < before.mean() < 40.0
    settings = RegistrationSettings(instance_steps=60)
    result = LungRegistration(settings).register(pair.fixed, pair.moving)
    grid = Grid.of(pair.fixed)
    errors, _ = pipeline.landmark_report(result.transform, pair.fixed_landmarks, pair.moving_landmarks, grid, grid)
    reduction = 1 - errors["after"].mean() / before.mean()
    assert reduction >= 0.8, (before.mean(), errors["prealign"].mean(), errors["after"].mean())
    assert errors["after"].mean() < errors["prealign"].mean()
    assert (result.transform.jacobian_on_grid() > 0).all()


def test_lps_convention_of_the_field(registered):
    """The field's vectors are LPS: RAS displacements with x and y negated."""
    transform = registered["result"].transform
    grid = Grid.of(registered["fixed"])
    vectors = transform.itk_displacement(grid)
    point = grid.points(torch.float64)[20, 21, 22]
    ras = transform.map_points(point) - point
    np.testing.assert_allclose(vectors[20, 21, 22].double().numpy(), (ras.numpy() @ LPS_TO_RAS), atol=1e-4)
