"""The RRN network: shapes for odd sizes, gradients, configuration, ablation and bad input."""

from __future__ import annotations

import pytest
import torch

from rrn_lung_registration.networks import RRN

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
