"""The RRN network: shapes for odd sizes, gradients, configuration, ablation, bad input, the two-channel pair
input, and the CPU inference path (padded buffers, Winograd convolutions) against the direct one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rrn_lung_registration.networks import RRN, VoxelMorphBaseline, rrn
from shared_ops import _native

SMALL = dict(
    pyramid_channels=(4, 8, 8, 12),
    estimator_channels=(16, 16, 12, 8, 8),
    refiner_channels=(16, 16, 12, 8, 3),
    refiner_dilations=(1, 2, 4, 1, 1),
)


def test_default_configuration_matches_the_paper_sizes():
    net = RRN()
    assert sum(p.numel() for p in net.parameters()) == 16_652_076  # released code: about 16.7 M used
    assert [level[0].out_channels for level in net.pyramid.levels] == [16, 32, 64, 96]
    assert [layer[0].out_channels for layer in net.estimators["1"].layers] == [128, 128, 96, 64, 32]
    assert net.correlation.out_channels == 125
    dilations = [m.dilation[0] for m in net.refiner.net if isinstance(m, torch.nn.Conv3d)]
    assert dilations == [1, 2, 4, 8, 16, 1, 1]


@pytest.mark.parametrize("shape", [(33, 40, 37), (16, 16, 16), (17, 20, 48)])
def test_output_shapes_for_any_size(shape):
    net = RRN(**SMALL)
    moving, fixed = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    ddf, levels = net(moving, fixed, return_levels=True)
    assert ddf.shape == (2, 3, *shape)
    padded = [-(-s // 16) * 16 for s in shape]
    assert [tuple(level.shape[2:]) for level in levels] == [
        tuple(p // 2 ** (lv + 1) for p in padded) for lv in (3, 2, 1)
    ]


@pytest.mark.parametrize("use_cost_volume", [True, False])
def test_gradients_reach_every_parameter(use_cost_volume):
    net = RRN(use_cost_volume=use_cost_volume, **SMALL)
    moving, fixed = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    net(moving, fixed).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_flow_levels_and_normalisation_are_configurable():
    net = RRN(flow_levels=(2, 1, 0), normalize="global", radius=1, **SMALL)
    assert net.correlation.out_channels == 27 and net.correlation.normalize == "global"
    ddf, levels = net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16), return_levels=True)
    assert ddf.shape == (1, 3, 16, 16, 16)
    assert [lv.shape[-1] for lv in levels] == [2, 4, 8]


def test_ablation_without_cost_volume_concatenates_features():
    net = RRN(use_cost_volume=False, **SMALL)
    assert net.correlation is None
    first = net.estimators["3"].layers[0][0]
    assert first.in_channels == 2 * 12 + 12  # fixed + warped moving features, then fixed features again


def test_bad_input_and_configuration():
    net = RRN(**SMALL)
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 17))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        net(torch.rand(1, 16, 16, 16), torch.rand(1, 16, 16, 16))
    bad = torch.rand(1, 1, 16, 16, 16)
    bad[0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net(bad, torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="flow_levels"):
        RRN(flow_levels=(1, 2), **SMALL)
    with pytest.raises(ValueError, match="flow_levels"):
        RRN(flow_levels=(3, 1), **SMALL)
    with pytest.raises(ValueError, match="flow_levels"):
        RRN(flow_levels=(4, 3), **SMALL)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, relative: float = 1e-5) -> None:
    """Equal within ``relative`` times the largest magnitude of ``expected``."""
    assert got.shape == expected.shape
    error, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert error <= relative * scale, f"max error {error:.3g} against scale {scale:.3g}"


def test_one_two_channel_pair_is_moving_then_fixed():
    net = RRN(**SMALL).eval()
    moving, fixed = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected, expected_levels = net(moving, fixed, return_levels=True)
        got, levels = net(torch.cat([moving, fixed], dim=1), return_levels=True)
    for a, b in zip([got, *levels], [expected, *expected_levels], strict=True):
        _assert_close(a, b)  # the same up to rounding: the slices of the pair are not contiguous
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.rand(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.rand(2, 16, 16, 16))
    two = RRN(in_channels=2, **SMALL).eval()
    with torch.no_grad():
        pair = torch.rand(1, 4, 16, 16, 16)
        _assert_close(two(pair), two(pair[:, :2], pair[:, 2:]))


def test_voxelmorph_accepts_the_two_channel_pair():
    net = VoxelMorphBaseline(integration_steps=0).eval()
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        _assert_close(net(torch.cat([moving, fixed], dim=1)), net(moving, fixed))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.rand(1, 1, 16, 16, 16))


# ------------------------------------------------------------------------------------------------------------
# CPU inference path: padded buffers and Winograd convolutions against F.conv3d and the autograd path
# ------------------------------------------------------------------------------------------------------------


def _use_native(native: bool, monkeypatch) -> None:
    """Switch the native convolution kernels on or off for one test (skipped where they cannot be built)."""
    monkeypatch.setenv(_native.ENV_ENABLE, "1" if native else "0")
    kernels = _native.conv3d_kernels()
    if native and kernels is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error('conv3d')}")
    assert native or kernels is None


def _reference(pieces, conv, slope):
    out = F.conv3d(torch.cat(pieces, dim=1), conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)
    return out if slope is None else F.leaky_relu(out, slope)


@pytest.mark.parametrize(
    ("dilation", "size", "split", "winograd", "bias", "slope", "out_pad"),
    [
        # three pieces, one of more than a chunk (128) of channels
        (1, (16, 20, 24), (16, 8, 140), True, True, 0.05, 1),
        (1, (16, 20, 24), (16, 8, 140), True, False, None, 0),
        (2, (16, 24, 32), (24,), True, False, 0.05, 2),  # one input of few channels: one C kernel (native)
        (1, (16, 16, 20), (30,), True, True, 0.1, 1),
        (4, (16, 32, 48), (8, 16), True, True, None, 0),
        (8, (32, 32, 64), (16,), True, True, 0.05, 8),
        (16, (64, 64, 64), (16,), True, False, 0.05, 0),
        (1, (18, 16, 16), (16, 8), False, True, 0.05, 1),  # not a multiple of 4: direct convolution
        (2, (8, 8, 8), (16,), False, False, None, 0),  # too small for Winograd
    ],
)
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_padded_convolution_matches_conv3d(dilation, size, split, winograd, bias, slope, out_pad, native, monkeypatch):
    """Both implementations of the Winograd transforms (C kernels and tensor operations) against F.conv3d."""
    _use_native(native, monkeypatch)
    gen = torch.Generator().manual_seed(dilation)
    batch = 2 if dilation < 4 else 1
    conv = nn.Conv3d(sum(split), 20, 3, padding=dilation, dilation=dilation, bias=bias)
    pieces = [torch.randn(batch, c, *size, generator=gen) for c in split]
    assert rrn._winograd_applicable(size, conv) is winograd
    expected = _reference(pieces, conv, slope)
    with torch.no_grad():
        padded = rrn._conv_padded([rrn._cat_padded([p], dilation) for p in pieces], conv, slope, out_pad)
    assert padded.shape == (batch, 20, *(s + 2 * out_pad for s in size))
    assert padded.is_contiguous(memory_format=torch.channels_last_3d)
    _assert_close(rrn._interior(padded, out_pad), expected)
    rrn._interior(padded, out_pad).zero_()
    assert not padded.any()  # the border is zero


@pytest.mark.parametrize(("stride", "size", "out_pad"), [(2, (16, 17, 22), 1), (1, (9, 8, 11), 0), (2, (7, 6, 5), 2)])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_single_channel_convolution_matches_conv3d(stride, size, out_pad, native, monkeypatch):
    """The first pyramid convolution (one input channel, any stride) from a padded buffer."""
    _use_native(native, monkeypatch)
    gen = torch.Generator().manual_seed(stride)
    conv = nn.Conv3d(1, 13, 3, stride=stride, padding=1)  # 13 outputs: a vector of 8 and a partial one
    x = torch.randn(2, 1, *size, generator=gen)
    assert rrn._single_channel_applicable(conv)
    expected = _reference([x], conv, 0.1) if stride == 1 else F.leaky_relu(conv(x), 0.1)
    with torch.no_grad():
        padded = rrn._conv_padded([rrn._cat_padded([x], 1)], conv, 0.1, out_pad)
    assert padded.shape == (2, 13, *(s + 2 * out_pad for s in expected.shape[2:]))
    _assert_close(rrn._interior(padded, out_pad), expected.detach())
    rrn._interior(padded, out_pad).zero_()
    assert not padded.any()  # the border is zero


def _winograd_calls(monkeypatch) -> list[int]:
    """Record the dilation of every Winograd convolution that runs."""
    calls: list[int] = []
    original = rrn._winograd_conv3d

    def counted(inputs, weight, bias, dilation, slope, out_pad):
        calls.append(dilation)
        return original(inputs, weight, bias, dilation, slope, out_pad)

    monkeypatch.setattr(rrn, "_winograd_conv3d", counted)
    return calls


def test_inference_path_matches_the_autograd_path(monkeypatch):
    """Level 1 is 16^3: the finest estimator and the refiner's 16-channel convs with dilations 1, 2, 4 run as
    Winograd convolutions (8 and 16 do not divide the tiles); the input is padded from 61 to 64."""
    torch.manual_seed(0)
    net = RRN(
        pyramid_channels=(4, 8, 8, 16),
        estimator_channels=(16, 16, 16, 16, 16),
        refiner_channels=(16, 16, 16, 16, 16, 16, 3),
        field_init_std=0.02,  # fields of a fraction of a voxel and more, so that the warps move the features
    ).eval()
    moving, fixed = torch.rand(1, 1, 61, 64, 64), torch.rand(1, 1, 61, 64, 64)
    calls = _winograd_calls(monkeypatch)
    with torch.no_grad():
        fast, fast_levels = net(moving, fixed, return_levels=True)
    assert sorted(calls) == [1] * 5 + [1, 1, 2, 4]  # the estimator's 5 layers; the refiner's 4
    with torch.enable_grad():
        direct, direct_levels = net(moving.requires_grad_(True), fixed, return_levels=True)
    assert len(calls) == 9  # the autograd path runs no Winograd convolution
    assert direct.requires_grad and not fast.requires_grad
    assert direct.abs().max() > 0.1
    for got, expected in zip([fast, *fast_levels], [direct, *direct_levels], strict=True):
        _assert_close(got, expected.detach())
