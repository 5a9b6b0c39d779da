"""rrn_lung_registration.warp: exact identity, agreement with grid_sample (MONAI Warp), bad input."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Warp

from rrn_lung_registration.warp import Warp3d, identity_grid, warp


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_zero_field_is_the_exact_identity(mode, padding_mode):
    image = torch.randn(2, 3, 7, 9, 5)
    assert torch.equal(warp(image, torch.zeros(2, 3, 7, 9, 5), mode, padding_mode), image)


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_matches_monai_warp(padding_mode):
    image = torch.randn(2, 2, 9, 11, 8)
    ddf = 3 * torch.randn(2, 3, 9, 11, 8)
    expected = Warp("bilinear", padding_mode)(image, ddf)
    torch.testing.assert_close(warp(image, ddf, "bilinear", padding_mode), expected, atol=1e-5, rtol=1e-5)


def test_integer_shift_moves_voxels_along_the_named_axis():
    image = torch.randn(1, 1, 6, 7, 8)
    for axis in range(3):
        ddf = torch.zeros(1, 3, 6, 7, 8)
        ddf[:, axis] = 1.0  # warped[x] = image[x + e_axis]
        out = warp(image, ddf, padding_mode="zeros")
        expected = torch.zeros_like(image)
        src = [slice(None)] * 2 + [slice(None)] * 3
        dst = [slice(None)] * 2 + [slice(None)] * 3
        src[2 + axis], dst[2 + axis] = slice(1, None), slice(0, -1)
        expected[tuple(dst)] = image[tuple(src)]
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_gradients_match_monai_warp_and_finite_differences(padding_mode):
    """The hand-written backward against autograd through grid_sample (MONAI Warp), points outside the
    volume included, and against finite differences."""
    torch.manual_seed(0)
    image = torch.randn(2, 2, 9, 11, 8, dtype=torch.float64)
    ddf = 3 * torch.randn(2, 3, 9, 11, 8, dtype=torch.float64)
    weights = torch.randn_like(image)
    grads = []
    for fn in (warp, Warp("bilinear", padding_mode)):
        i, d = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        args = (i, d, "bilinear", padding_mode) if fn is warp else (i, d)
        (fn(*args) * weights).sum().backward()
        grads.append((i.grad, d.grad))
    for ours, monai in zip(*grads, strict=True):
        torch.testing.assert_close(ours, monai, atol=1e-12, rtol=1e-10)
    image = torch.randn(1, 2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    ddf = (0.7 * torch.randn(1, 3, 5, 6, 7, dtype=torch.float64)).requires_grad_()

    def warped(i, d):
        return warp(i, d, padding_mode=padding_mode)

    assert torch.autograd.gradcheck(warped, (image, ddf), fast_mode=True)
    assert torch.autograd.gradgradcheck(warped, (image, ddf), fast_mode=True)  # the backward differentiates too


def test_identity_grid_and_module():
    grid = identity_grid((2, 3, 4))
    assert grid.shape == (3, 2, 3, 4)
    assert grid[0, 1, 0, 0] == 1 and grid[1, 0, 2, 0] == 2 and grid[2, 0, 0, 3] == 3
    assert "nearest" in repr(Warp3d("nearest"))


def test_bad_input():
    with pytest.raises(ValueError, match="ddf"):
        warp(torch.randn(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial shape"):
        warp(torch.randn(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))
    with pytest.raises(ValueError, match="mode"):
        warp(torch.randn(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), mode="bicubic")
