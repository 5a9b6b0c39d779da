"""Automatic lung masks, lung boxes and the LungMaskd / CropToLungd transforms.

Synthetic chests check the mask against a known truth (whole field of view and a crop cutting through the
lungs); the real POPI thorax and the two chest crops check plausibility (skipped when the data is absent).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage

from rrn_lung_registration.io.ct_io import read_ct
from rrn_lung_registration.masking.lung_mask import (
    CropToLungd,
    LungMaskd,
    axial_axis_from_affine,
    check_ct_intensities,
    lung_bounding_box,
    lung_mask,
    lung_volume_litres,
)
from tests.conftest import require_data

POPI = "ct/popi_phase00_dicom"
SPACING = (0.8, 1.0, 2.5)  # anisotropic, and fine enough in-plane for the 2 mm working grid to be coarser
SHAPE = (120, 84, 40)  # 96 x 84 x 100 mm


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _synthetic_chest(lung_semi_mm=(13.0, 20.0, 40.0), with_lungs=True, open_airway=False, seed=0):
    """A chest ``(I, J, K)`` in HU on ``SPACING``: an elliptic body cylinder (40 HU) in air (-1000 HU) with two
    ellipsoidal lungs (-850 HU) holding vessels (+50 HU tubes, one along K and one along I per lung).
    ``open_airway`` adds an airway (-1000 HU) rising from one lung to the top slices, where it opens through
    the body wall to the outside air, as the mouth does in a scan reaching the head.

    Returns ``(volume float32, lungs bool incl. vessels, body bool, vessels bool)``.
    """
    centre = (np.asarray(SHAPE) - 1) / 2.0
    x, y, z = (
        (np.arange(n) - c) * s for n, c, s in zip(SHAPE, centre, SPACING, strict=True)
    )  # mm from the volume centre
    x, y, z = np.meshgrid(x, y, z, indexing="ij")
    body = (x / 42.0) ** 2 + (y / 32.0) ** 2 <= 1.0
    lungs = np.zeros(SHAPE, dtype=bool)
    vessels = np.zeros(SHAPE, dtype=bool)
    a, b, c = lung_semi_mm
    for side in (-1.0, 1.0):
        dx = x - side * 18.0
        lungs |= (dx / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0
        vessels |= (dx**2 + y**2 <= 2.5**2) & (np.abs(z) < 0.6 * c)  # along K, ends inside the lung
        vessels |= ((y - 5.0) ** 2 + (z - 10.0) ** 2 <= 2.0**2) & (np.abs(dx) < 0.6 * a)  # along I
    vessels &= lungs
    volume = np.full(SHAPE, -1000.0, dtype=np.float32)
    volume[body] = 40.0
    if with_lungs:
        volume[lungs] = -850.0
        volume[vessels] = 50.0
    if open_airway:
        airway = ((x - 18.0) ** 2 + y**2 <= 3.0**2) & (z > 30.0)
        airway |= ((x - 18.0) ** 2 + (z - 46.0) ** 2 <= 3.0**2) & (y < 0.0)  # out through the front
        volume[airway & ~lungs] = -1000.0
    volume += np.random.default_rng(seed).normal(0.0, 15.0, SHAPE).astype(np.float32)
    return volume, lungs, body, vessels


@pytest.fixture(scope="module")
def chest():
    return _synthetic_chest()


def _metatensor(volume: np.ndarray, filename: str = "synthetic_chest.nii.gz", channel: bool = True) -> MetaTensor:
    """``volume`` as a ``MetaTensor`` with a flipped, shifted RAS affine of ``SPACING``."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [40.0, -12.5, 300.0]
    values = torch.as_tensor(volume)
    return MetaTensor(values[None] if channel else values, affine=affine, meta={"filename_or_obj": filename})


# --- synthetic chests ---------------------------------------------------------------------------------------


def test_synthetic_mask_recovers_the_lungs(chest):
    volume, lungs, body, vessels = chest
    mask = lung_mask(volume, SPACING)
    assert mask.shape == volume.shape and mask.dtype == bool
    assert _dice(mask, lungs) > 0.95
    assert not (mask & ~body).any(), "air outside the body is in the mask"
    assert np.count_nonzero(mask & vessels) > 0.95 * np.count_nonzero(vessels), "vessels are not filled"
    np.testing.assert_allclose(lung_volume_litres(mask, SPACING), lung_volume_litres(lungs, SPACING), rtol=0.05)


def test_the_full_grid_and_the_working_grid_agree(chest):
    volume, lungs, _, _ = chest
    full = lung_mask(volume, SPACING, working_mm=0.0)
    assert _dice(full, lungs) > 0.95
    assert _dice(full, lung_mask(volume, SPACING)) > 0.97


@pytest.mark.parametrize(
    "crop",
    [
        (slice(30, 90), slice(None), slice(6, 34)),  # x within +-24 mm: both lungs reach the I edges
        (slice(30, 90), slice(31, None), slice(None)),  # and y > -10 mm: cut on two adjacent sides too
    ],
)
def test_a_crop_cutting_through_the_lungs_keeps_them(chest, crop):
    """Lungs cut by the in-plane edges of a crop (and by its first and last slices) are not outside air."""
    volume, lungs, body, _ = chest
    assert lungs[crop][0].any() and lungs[crop][-1].any()
    mask = lung_mask(volume[crop], SPACING)
    assert _dice(mask, lungs[crop]) > 0.95
    assert not (mask & ~body[crop]).any()


def test_airways_open_to_the_outside_air_keep_the_lungs():
    volume, lungs, body, _ = _synthetic_chest(open_airway=True)
    mask = lung_mask(volume, SPACING)
    assert _dice(mask, lungs) > 0.95
    assert not (mask & ~body).any()


def test_axial_axis_follows_the_affine(chest):
    volume = chest[0]
    image = _metatensor(volume, channel=False)
    assert axial_axis_from_affine(image.affine) == 2
    # the same scan stored slice-first: (K, I, J), affine columns permuted alike
    permuted = MetaTensor(image.as_tensor().permute(2, 0, 1).contiguous(), affine=image.affine[:, [2, 0, 1, 3]])
    assert axial_axis_from_affine(permuted.affine) == 0
    mask = LungMaskd("image").mask_of(image)
    mask_permuted = LungMaskd("image").mask_of(permuted)
    np.testing.assert_array_equal(mask_permuted.numpy(), mask.numpy().transpose(2, 0, 1))


def test_lung_volume_litres():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[:10, :10, :10] = True
    assert lung_volume_litres(mask, (1.0, 2.0, 0.5)) == pytest.approx(1000 * 1.0e-6)
    assert lung_volume_litres(torch.as_tensor(mask), (1.0, 1.0, 1.0)) == pytest.approx(1.0e-3)


def test_bounding_box_margin_in_mm_and_clipped():
    mask = np.zeros((40, 30, 20), dtype=bool)
    mask[2:10, 12:20, 15:18] = True
    box = lung_bounding_box(mask, spacing=(0.5, 1.0, 2.0), margin_mm=3.0)  # 6, 3, 2 voxels
    assert box == (slice(0, 16), slice(9, 23), slice(13, 20))
    assert lung_bounding_box(mask, (1.0, 1.0, 1.0), margin_mm=0.0) == (slice(2, 10), slice(12, 20), slice(15, 18))


# --- errors ---------------------------------------------------------------------------------------------------


def test_soft_tissue_only_is_rejected_naming_the_source():
    volume = np.random.default_rng(1).normal(40.0, 15.0, (40, 40, 20)).astype(np.float32)
    with pytest.raises(ValueError, match=r"abdomen_only\.nii\.gz.*Hounsfield"):
        lung_mask(volume, (1.0, 1.0, 1.0), source="abdomen_only.nii.gz")


def test_no_lung_inside_the_body_names_the_source():
    volume = _synthetic_chest(with_lungs=False)[0]  # outside air only: passes the HU check, no lung
    with pytest.raises(ValueError, match=r"no_lungs\.mha: no lung found"):
        lung_mask(volume, SPACING, source="no_lungs.mha")


def test_implausibly_small_lungs_name_the_source():
    volume = _synthetic_chest(lung_semi_mm=(6.0, 6.0, 12.0))[0]  # 2 x 1.8 mL
    with pytest.raises(ValueError, match=r"tiny\.nii: the lung mask holds .* mL, less than the 50 mL"):
        lung_mask(volume, SPACING, source="tiny.nii")


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_normalised_images_are_rejected_naming_the_file(scale):
    image = np.random.default_rng(2).random((30, 30, 10)) * scale
    with pytest.raises(ValueError, match=r"scan_normalised\.nii\.gz: expected CT in Hounsfield units with air near"):
        check_ct_intensities(image, "scan_normalised.nii.gz")


def test_real_ct_values_pass_the_check(chest):
    check_ct_intensities(chest[0], "synthetic")
    padded = chest[0].copy()
    padded[:20] = -3024.0  # padding outside the reconstruction circle
    check_ct_intensities(padded, "synthetic")


def test_lung_maskd_names_the_file():
    image = MetaTensor(torch.rand(1, 30, 30, 10), affine=torch.eye(4), meta={"filename_or_obj": "/data/case7_norm.nii"})
    with pytest.raises(ValueError, match=r"/data/case7_norm\.nii: expected CT in Hounsfield units"):
        LungMaskd("image")({"image": image})


# --- transforms -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", [True, False])
def test_lung_maskd_adds_a_mask_on_the_image_grid(chest, channel):
    volume, lungs, _, _ = chest
    image = _metatensor(volume, channel=channel)
    out = LungMaskd("image")({"image": image})
    mask = out["image_lung_mask"]
    assert out["image"] is image
    assert isinstance(mask, MetaTensor) and mask.shape == image.shape and mask.dtype == torch.uint8
    torch.testing.assert_close(mask.affine, image.affine)
    assert mask.meta["filename_or_obj"] == "synthetic_chest.nii.gz"
    spatial = mask.numpy()[0] if channel else mask.numpy()
    np.testing.assert_array_equal(spatial, lung_mask(volume, SPACING))


@pytest.fixture
def cropped(chest):
    """A LungMaskd + CropToLungd pipeline run on a channel-first synthetic image and a second image (fresh for
    each test: inverting pops the crop from the tensors' applied operations)."""
    image = _metatensor(chest[0])
    data = {"image": image, "label": _metatensor(chest[0] * 0.5)}
    pipeline = Compose([LungMaskd("image"), CropToLungd(["image", "label"], "image_lung_mask", margin_mm=5.0)])
    return data, pipeline, pipeline(data)


def test_crop_to_lungd_crops_to_the_box(cropped):
    data, _, out = cropped
    mask = lung_mask(data["image"].numpy()[0], SPACING)
    box = lung_bounding_box(mask, SPACING, margin_mm=5.0)
    assert box != (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    for key in ("image", "label", "image_lung_mask"):
        assert tuple(out[key].shape[1:]) == tuple(s.stop - s.start for s in box)
    np.testing.assert_array_equal(out["image"].numpy()[0], data["image"].numpy()[0][box])
    np.testing.assert_array_equal(out["image_lung_mask"].numpy()[0], mask[box])
    # the crop's voxel 0 sits where the box corner was; axes unchanged
    corner = data["image"].affine.numpy() @ np.array([box[0].start, box[1].start, box[2].start, 1.0])
    new_affine = out["image"].affine.numpy()
    np.testing.assert_allclose(new_affine @ np.array([0.0, 0.0, 0.0, 1.0]), corner)
    np.testing.assert_allclose(new_affine[:3, :3], data["image"].affine.numpy()[:3, :3])


def test_crop_to_lungd_inverse_round_trip(cropped):
    data, pipeline, out = cropped
    restored = pipeline.inverse(out)
    for key in ("image", "label"):
        assert restored[key].shape == data[key].shape
        torch.testing.assert_close(restored[key].affine, data[key].affine)
        assert not restored[key].applied_operations
    box = lung_bounding_box(lung_mask(data["image"].numpy()[0], SPACING), SPACING, margin_mm=5.0)
    inside = np.zeros(SHAPE, dtype=bool)
    inside[box] = True
    original, back = data["image"].numpy()[0], restored["image"].numpy()[0]
    np.testing.assert_array_equal(back[inside], original[inside])
    assert not back[~inside].any()  # padded back with zeros
    np.testing.assert_array_equal(restored["image_lung_mask"].numpy()[0], lung_mask(original, SPACING))


def test_invertd_brings_a_prediction_back(cropped):
    data, pipeline, out = cropped
    prediction = out["image"].clone()  # a network output on the cropped grid, with the image's history
    inverted = Invertd("pred", transform=pipeline, orig_keys="image", nearest_interp=False)({**out, "pred": prediction})
    assert inverted["pred"].shape == data["image"].shape
    torch.testing.assert_close(inverted["pred"].affine, data["image"].affine)


def test_crop_to_lungd_needs_channel_first_images(chest):
    data = {"image": _metatensor(chest[0], filename="flat.nii", channel=False)}
    data = LungMaskd("image")(data)
    with pytest.raises(ValueError, match=r"flat\.nii: CropToLungd needs a channel-first mask"):
        CropToLungd("image", "image_lung_mask")(data)
    with pytest.raises(KeyError, match="lungs"):
        CropToLungd("image", "lungs")(data)


# --- real scans -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def popi_mask():
    image = read_ct(require_data(POPI))
    spacing = np.asarray(image.meta["spacing"], dtype=np.float64)
    start = time.perf_counter()
    mask = lung_mask(image.numpy(), spacing, source=str(image.meta["filename_or_obj"]))
    seconds = time.perf_counter() - start
    return image, spacing, mask, seconds


def test_popi_lung_volume_is_plausible(popi_mask):
    image, spacing, mask, seconds = popi_mask
    litres = lung_volume_litres(mask, spacing)
    print(f"POPI end-inhale lung mask: {litres:.2f} L in {seconds:.1f} s")  # 5.5 L, about 2 s on one core
    assert 3.0 < litres < 8.0
    values = image.numpy()[mask]
    assert -950.0 < np.median(values) < -700.0  # aerated lung


def test_popi_mask_is_the_two_lungs(popi_mask):
    _, spacing, mask, _ = popi_mask
    labels, count = ndimage.label(mask[lung_bounding_box(mask, spacing, margin_mm=0.0)])
    sizes = np.bincount(labels.ravel())[1:]
    assert 1 <= count <= 2 and sizes.min() > 0.2 * sizes.max()  # left and right lungs, or both joined
    # the lungs are left and right of the mid-sagittal plane (I runs right -> left)
    i_voxels = np.flatnonzero(mask.any(axis=(1, 2)))
    middle = mask.shape[0] // 2
    assert mask[: middle - 30].sum() > 0.3 * mask.sum() and mask[middle + 30 :].sum() > 0.3 * mask.sum()
    assert 0 < i_voxels[0] and i_voxels[-1] < mask.shape[0] - 1
    # no outside air: nothing on the in-plane edges of any slice
    assert not (mask[[0, -1]].any() or mask[:, [0, -1]].any())


def test_popi_bounding_box(popi_mask):
    _, spacing, mask, _ = popi_mask
    box = lung_bounding_box(mask, spacing, margin_mm=10.0)
    inside = np.zeros_like(mask)
    inside[box] = True
    assert not (mask & ~inside).any()
    for axis, (part, n) in enumerate(zip(box, mask.shape, strict=True)):
        assert 0 <= part.start < part.stop <= n
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(np.ceil(10.0 / spacing[axis]))
        assert part.start == max(0, present[0] - margin) and part.stop == min(n, present[-1] + 1 + margin)
    # the lungs span most of the chest: the box is a good part of the in-plane field of view
    assert 150 < box[0].stop - box[0].start < 450 and 150 < box[1].stop - box[1].start < 400


@pytest.mark.parametrize("name", ["a", "b"])
def test_chest_crops_give_plausible_masks(name):
    image = read_ct(require_data(f"ct/chest_crops/chest_crop_{name}.nii.gz"))
    spacing = np.asarray(image.meta["spacing"], dtype=np.float64)
    mask = lung_mask(image.numpy(), spacing, source=f"chest_crop_{name}")
    litres = lung_volume_litres(mask, spacing)
    crop_litres = lung_volume_litres(np.ones(mask.shape, dtype=bool), spacing)
    print(f"chest_crop_{name}: lungs {litres:.2f} L of a {crop_litres:.2f} L crop")  # a: 2.8 / 8.4, b: 1.9 / 4.7
    assert 0.5 < litres < 0.7 * crop_litres
    assert -950.0 < np.median(image.numpy()[mask]) < -700.0
    # the crop's in-plane edges cut through the lungs, and the mask keeps them there
    assert mask[[0, -1]].any()
