"""rrn_lung_registration.losses on hand-built cases."""

from __future__ import annotations

import pytest
import torch

from rrn_lung_registration.losses import LOSS_PRESETS, RegistrationLoss, diffusion_l2, total_variation_l1


def _linear_field(shape=(6, 7, 8), slope=0.5):
    """u_0 = slope * z (varies along D only), u_1 = u_2 = 0."""
    ddf = torch.zeros(1, 3, *shape)
    ddf[0, 0] = slope * torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1)
    return ddf


def test_smoothness_of_constant_and_linear_fields():
    assert total_variation_l1(torch.full((1, 3, 5, 5, 5), 2.0)) == 0
    assert diffusion_l2(torch.full((1, 3, 5, 5, 5), 2.0)) == 0
    ddf = _linear_field(slope=0.5)
    # Along D: channel 0 changes by 0.5, channels 1-2 by 0 -> mean |diff| = 0.5 / 3; other axes 0; mean over axes / 3.
    torch.testing.assert_close(total_variation_l1(ddf), torch.tensor(0.5 / 3 / 3))
    torch.testing.assert_close(diffusion_l2(ddf), torch.tensor(0.25 / 3 / 3))


def test_lncc_identical_anticorrelated_and_flat():
    loss = RegistrationLoss(window=3, penalty="l1", weight=0.0)
    image = torch.rand(1, 1, 10, 10, 10)
    zero = torch.zeros(1, 3, 10, 10, 10)
    torch.testing.assert_close(loss(image, image, zero), torch.tensor(-1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(loss(image, -image, zero), torch.tensor(-1.0), atol=1e-4, rtol=0)  # squared form
    unrelated = loss(image, torch.rand(1, 1, 10, 10, 10), zero)
    assert -0.5 < unrelated < 0


def test_total_is_similarity_plus_weighted_smoothness():
    image, other = torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)
    ddf = _linear_field((8, 8, 8), slope=1.0)
    for preset in LOSS_PRESETS:
        loss = RegistrationLoss.from_preset(preset)
        terms = loss.terms(image, other, ddf)
        torch.testing.assert_close(
            terms["loss"], terms["similarity"] + LOSS_PRESETS[preset]["weight"] * terms["smoothness"]
        )
    paper = RegistrationLoss.from_preset("paper")
    assert (paper.window, paper.penalty, paper.weight) == (5, "l1", 0.01)
    released = RegistrationLoss.from_preset("released_code")
    assert (released.window, released.penalty, released.weight) == (5, "l2", 1.25)


def test_bad_arguments():
    with pytest.raises(ValueError, match="penalty"):
        RegistrationLoss(penalty="l3")
    with pytest.raises(ValueError, match="odd"):
        RegistrationLoss(window=4)
    with pytest.raises(ValueError, match="preset"):
        RegistrationLoss.from_preset("voxelmorph")
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        total_variation_l1(torch.zeros(3, 4, 4, 4))
