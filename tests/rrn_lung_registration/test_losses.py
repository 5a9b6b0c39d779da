"""rrn_lung_registration.losses: hand-built cases, agreement with MONAI and autograd, memory kept for backward."""

from __future__ import annotations

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from rrn_lung_registration.losses import LOSS_PRESETS, LocalNCCLoss, RegistrationLoss, diffusion_l2, total_variation_l1
from rrn_lung_registration.warp import warp


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


def _images(dtype, shape=(2, 2, 9, 8, 7)):
    """Random pair with flat slabs, where the local variances sit on MONAI's floor ``smooth_dr``."""
    pred, target = torch.rand(shape, dtype=dtype), torch.rand(shape, dtype=dtype)
    pred[:, :, :3], target[:, :, :2] = 0.5, 0.25
    return pred, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lncc_matches_monai_value_and_gradients(reduction, dtype):
    torch.manual_seed(0)
    pred, target = _images(dtype)
    ours, monai = LocalNCCLoss(5, reduction), LocalNormalizedCrossCorrelationLoss(3, 5, "rectangular", reduction)
    assert torch.equal(ours(pred, target), monai(pred, target))  # same sums in the same order
    grads = []
    for loss in (ours, monai):
        p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
        value = loss(p, t)
        (value * torch.linspace(-1, 2, value.numel(), dtype=dtype).view(value.shape)).sum().backward()
        grads.append((p.grad, t.grad))
    tolerance = {"atol": 1e-12, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-4}
    for ours_grad, monai_grad in zip(*grads, strict=True):
        assert ours_grad.abs().max() > 0
        torch.testing.assert_close(ours_grad, monai_grad, **tolerance)


def test_loss_gradients_match_finite_differences():
    torch.manual_seed(1)
    pred, target = (torch.rand(1, 1, 6, 5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda p, t: LocalNCCLoss(3)(p, t), (pred, target))
    assert torch.autograd.gradgradcheck(lambda p, t: LocalNCCLoss(3)(p, t), (pred, target))  # backward differentiates
    ddf = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total_variation_l1, (ddf,))
    assert torch.autograd.gradcheck(diffusion_l2, (ddf,))
    assert torch.autograd.gradgradcheck(diffusion_l2, (ddf,))


def test_loss_and_warp_keep_only_their_inputs_for_backward():
    """What training at 256^3 on a GPU relies on: the loss and the warp add no volume of their own to the
    tensors autograd keeps between forward and backward (through autograd they kept about 57)."""
    torch.manual_seed(2)
    fixed, moving = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    ddf = torch.randn(1, 3, 12, 12, 12, requires_grad=True)
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    for preset in LOSS_PRESETS:
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            warped = warp(moving, ddf)
            loss = RegistrationLoss.from_preset(preset)(fixed, warped, ddf)
        inputs = [fixed, moving, warped, ddf]
        assert sum(kept.values()) <= sum(x.untyped_storage().nbytes() for x in inputs)
        loss.backward()
        assert torch.isfinite(ddf.grad).all() and ddf.grad.abs().max() > 0


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
    with pytest.raises(ValueError, match="reduction"):
        LocalNCCLoss(reduction="max")
    with pytest.raises(ValueError, match="one shape"):
        LocalNCCLoss()(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 5))


def test_lncc_runs_in_float32_under_autocast():
    """Local variances are differences of window sums: in half precision they would be lost."""
    torch.manual_seed(3)
    pred, target = _images(torch.float32)
    expected = LocalNCCLoss(5)(pred, target)
    p = pred.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = LocalNCCLoss(5)(p, target)
    value.backward()
    assert value.dtype == torch.float32 and p.grad.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
