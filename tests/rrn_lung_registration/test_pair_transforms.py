"""The pair transforms of the bundle configs (``rrn_lung_registration.training.data``): the lung-box field of view,
the 2-channel ``image``, the outputs from ``pred`` and their names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd, ResampleToMatchd, Resized

from rrn_lung_registration.masking.lung_mask import lung_bounding_box, lung_mask
from rrn_lung_registration.synthetic.phantom import make_dataset
from rrn_lung_registration.training.data import (
    CropToLungBoxd,
    LoadVolumed,
    PairOutputsd,
    PairToImaged,
    load_datalist,
    name_pairs,
    pair_name_formatter,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    datalist = make_dataset(tmp_path_factory.mktemp("pairs"), n_pairs=1, shape=(32, 32, 32), seed=4)
    item = load_datalist(datalist, "training")[0]
    loaded = LoadVolumed(["fixed", "moving"])(item)
    return EnsureChannelFirstd(["fixed", "moving"], channel_dim="no_channel")(loaded)


def test_the_crop_is_the_fixed_lung_box_plus_margin_and_inverts(pair):
    fixed = pair["fixed"]
    spacing = [abs(float(s)) for s in np.diag(fixed.affine.numpy())[:3]]
    box = lung_bounding_box(lung_mask(fixed[0].numpy(), spacing), spacing, 10.0)
    crop = CropToLungBoxd(["fixed", "moving"], source_key="fixed", margin_mm=10.0)
    cropped = crop(pair)
    assert tuple(cropped["fixed"].shape[1:]) == tuple(s.stop - s.start for s in box)
    assert cropped["moving"].shape == cropped["fixed"].shape
    corner = fixed.affine.numpy() @ np.array([box[0].start, box[1].start, box[2].start, 1.0])
    assert np.allclose(cropped["fixed"].affine.numpy()[:, 3], corner)  # voxel 0 is the box corner, in place
    restored = crop.inverse(cropped)
    assert restored["fixed"].shape == fixed.shape


def test_the_pair_image_carries_the_fixed_geometry_and_the_pair_name(pair):
    data = ResampleToMatchd("moving", key_dst="fixed")(dict(pair))
    image = PairToImaged()({**data, "name": "case7"})["image"]
    assert image.shape == (2, 32, 32, 32)
    assert torch.equal(image[1], pair["fixed"][0].as_tensor().float())  # channel 1 fixed, 0 moving
    assert np.allclose(image.affine.numpy(), pair["fixed"].affine.numpy())
    assert image.meta["pair_name"] == "case7" and image.meta["moving_filename_or_obj"].endswith("moving.nii.gz")
    assert pair_name_formatter(image.meta, None) == {"subject": "case7", "idx": None}


def test_warped_outputs_invert_onto_the_fixed_grid(pair):
    preprocessing = Compose(
        [
            Orientationd("image", axcodes="RAS", labels=None),
            CropToLungBoxd("image", channel=1),
            Resized("image", spatial_size=(16, 16, 16), mode="trilinear", align_corners=True),
        ]
    )
    data = PairToImaged()(ResampleToMatchd("moving", key_dst="fixed")(dict(pair)))
    data = preprocessing(data)
    data["pred"] = torch.zeros(3, 16, 16, 16)
    out = PairOutputsd()(data)
    assert isinstance(out["pred"], MetaTensor) and np.allclose(out["pred"].affine, data["image"].affine)
    assert torch.equal(out["warped"].as_tensor(), data["image"][:1].as_tensor())  # zero field: the moving channel
    inverted = Invertd("warped", transform=preprocessing, orig_keys="image", nearest_interp=False)(out)["warped"]
    assert inverted.shape == pair["fixed"].shape
    assert np.allclose(inverted.affine.numpy(), pair["fixed"].affine.numpy(), atol=1e-5)


def test_pair_names_are_unique_and_independent_of_where_the_inputs_are():
    pairs = [
        {"fixed": "/data/a/case1/inhale.nii.gz", "moving": "/data/a/case1/exhale.nii.gz"},
        {"fixed": "/data/a/case2/inhale.nii.gz", "moving": "/data/a/case2/exhale.nii.gz"},
        {"fixed": "/data/a/case2/inhale.nii.gz", "moving": "/data/a/case2/exhale.nii.gz"},
        {"fixed": "/elsewhere/f.mha", "moving": "/elsewhere/m.mha", "name": "my pair"},
    ]
    names = [pair["name"] for pair in name_pairs(pairs)]
    assert names == ["case1_exhale", "case2_exhale", "case2_exhale_2", "my_pair"]
    assert [p["name"] for p in name_pairs(pairs[:1])] == ["exhale"]
