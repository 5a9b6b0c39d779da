"""The Recursive Refinement Network (He et al., 2021).

``RRN(moving, fixed)`` returns the displacement field ``ddf`` (B, 3, D, H, W) in voxels of the input grid
that registers ``moving`` to ``fixed`` (``warp(moving, ddf) ~= fixed``; axis convention in
:mod:`rrn_lung_registration.warp`). Inputs are (B, 1, D, H, W) of any size: they are padded at the far
end of each axis (edge values) to a multiple of ``size_multiple`` and the field is cropped back.

Data flow, coarse to fine over the levels that estimate a field (``flow_levels``, level ``l`` has
resolution ``1 / 2 ** (l + 1)`` of the input):

1. A siamese feature pyramid (shared weights) encodes both images.
2. At the coarsest flow level the fields start at zero. At every finer level the coarser field is
   upsampled x2 (and doubled, being in voxels), the moving features are warped by it, and the coarser
   context features are upsampled by a transposed convolution.
3. A local cost correlation volume (:mod:`shared_ops.correlation`) compares fixed and warped moving
   features within ``radius`` voxels; LeakyReLU follows.
4. A dense-block estimator reads [cost, fixed features, upsampled field, upsampled context] and predicts a
   field increment; its last hidden output is the context passed to the next level.
5. At the finest flow level a dilated-convolution refiner reads [context, field] and adds a residual.
6. The finest field is upsampled to the input grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from torch import nn

from shared_ops import LocalCostCorrelation3d

__all__ = ["RRN", "FeaturePyramid", "DenseFlowEstimator", "DilatedRefiner", "upsample_field"]


def _conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation)


def upsample_field(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear upsampling of a field in voxels by an integer factor; values are scaled with the grid."""
    return factor * F.interpolate(ddf, scale_factor=factor, mode="trilinear", align_corners=True)


class FeaturePyramid(nn.Module):
    """Per level: 3x3x3 conv stride 2, then two 3x3x3 convs stride 1, each followed by LeakyReLU.

    ``forward(x)`` returns the list of level outputs, finest first: level ``l`` is (B, C_l, S / 2^(l+1)).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 96), slope: float = 0.1):
        super().__init__()
        levels, previous = [], in_channels
        for width in channels:
            levels.append(
                nn.Sequential(
                    _conv(previous, width, stride=2),
                    nn.LeakyReLU(slope),
                    _conv(width, width),
                    nn.LeakyReLU(slope),
                    _conv(width, width),
                    nn.LeakyReLU(slope),
                )
            )
            previous = width
        self.levels = nn.ModuleList(levels)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first ``depth`` levels (all by default), finest first."""
        features = []
        for level in self.levels[: depth if depth is not None else len(self.levels)]:
            x = level(x)
            features.append(x)
        return features


class DenseFlowEstimator(nn.Module):
    """Densely connected 3x3x3 convs (each reads the input and every earlier output), then a 3-channel conv.

    ``forward(x)`` returns ``(field, context)``: the field (B, 3, ...) and the last hidden output.
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (128, 128, 96, 64, 32), slope: float = 0.05):
        super().__init__()
        layers, width = [], in_channels
        for out in channels:
            layers.append(nn.Sequential(_conv(width, out), nn.LeakyReLU(slope)))
            width += out
        self.layers = nn.ModuleList(layers)
        self.to_field = _conv(channels[-1], 3)

    @property
    def context_channels(self) -> int:
        return self.to_field.in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = x
        for i, layer in enumerate(self.layers):
            out = layer(x)
            if i < len(self.layers) - 1:
                x = torch.cat([x, out], dim=1)
        return self.to_field(out), out


class DilatedRefiner(nn.Module):
    """Dilated 3x3x3 convs reading [context, field] and predicting a residual field (last conv, 3 channels)."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (128, 128, 128, 96, 64, 32, 3),
        dilations: Sequence[int] = (1, 2, 4, 8, 16, 1, 1),
        slope: float = 0.05,
    ):
        super().__init__()
        if len(channels) != len(dilations) or channels[-1] != 3:
            raise ValueError(
                f"refiner channels {tuple(channels)} and dilations {tuple(dilations)} must have the same length "
                "and end with 3 output channels."
            )
        layers, width = [], in_channels
        for i, (out, dilation) in enumerate(zip(channels, dilations, strict=True)):
            layers.append(_conv(width, out, dilation=dilation))
            if i < len(channels) - 1:
                layers.append(nn.LeakyReLU(slope))
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, context: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        return field + self.net(torch.cat([context, field], dim=1))


class RRN(nn.Module):
    """Recursive Refinement Network: ``forward(moving, fixed) -> ddf`` (B, 3, D, H, W) in voxels.

    Args:
        in_channels: channels of each input image.
        pyramid_channels: feature widths of the pyramid levels, finest first.
        flow_levels: pyramid levels that estimate a field, coarse to fine (0 = finest, half resolution).
        radius: search radius of the cost correlation, in voxels of each level.
        normalize: feature normalisation of the correlation (``"channel"``: paper, ``"global"``: released code).
        use_cost_volume: ``False`` gives the paper's ablation, concatenated fixed and warped moving
            features instead of the correlation volume.
        estimator_channels: widths of the dense-block estimator layers; the last is the context width.
        refiner_channels, refiner_dilations: the dilated refinement network at the finest flow level.
        pyramid_slope, estimator_slope, cost_slope: LeakyReLU slopes (released code: 0.1, 0.05, 0.05).
        field_init_std: standard deviation of the initial weights of every convolution that outputs a
            field (biases start at zero), so that training starts near the identity transform, as
            VoxelMorph does; PyTorch's default initialisation gives fields of many voxels that make early
            training diverge.
    """

    def __init__(
        self,
        in_channels: int = 1,
        pyramid_channels: Sequence[int] = (16, 32, 64, 96),
        flow_levels: Sequence[int] = (3, 2, 1),
        radius: int = 2,
        normalize: str = "channel",
        use_cost_volume: bool = True,
        estimator_channels: Sequence[int] = (128, 128, 96, 64, 32),
        refiner_channels: Sequence[int] = (128, 128, 128, 96, 64, 32, 3),
        refiner_dilations: Sequence[int] = (1, 2, 4, 8, 16, 1, 1),
        pyramid_slope: float = 0.1,
        estimator_slope: float = 0.05,
        cost_slope: float = 0.05,
        field_init_std: float = 1e-5,
    ) -> None:
        super().__init__()
        flow_levels = tuple(int(level) for level in flow_levels)
        if not flow_levels or list(flow_levels) != sorted(set(flow_levels), reverse=True):
            raise ValueError(f"flow_levels must be distinct pyramid levels from coarse to fine, got {flow_levels}.")
        if flow_levels[0] >= len(pyramid_channels) or flow_levels[-1] < 0:
            raise ValueError(f"flow_levels {flow_levels} must lie in [0, {len(pyramid_channels) - 1}].")
        if any(a - b != 1 for a, b in zip(flow_levels[:-1], flow_levels[1:], strict=True)):
            raise ValueError(f"flow_levels must be consecutive (each finer level doubles the grid), got {flow_levels}.")
        self.flow_levels = flow_levels
        self.pyramid = FeaturePyramid(in_channels, pyramid_channels, pyramid_slope)
        self.correlation = LocalCostCorrelation3d(radius, normalize) if use_cost_volume else None
        self.cost_activation = nn.LeakyReLU(cost_slope)
        self.feature_warp = Warp(mode="bilinear", padding_mode="zeros")
        context = estimator_channels[-1]

        estimators, context_upsamplers = {}, {}
        for i, level in enumerate(flow_levels):
            features = pyramid_channels[level]
            matching = self.correlation.out_channels if use_cost_volume else 2 * features
            coarser = 0 if i == 0 else 3 + context  # upsampled field and context of the coarser level
            estimators[str(level)] = DenseFlowEstimator(
                matching + features + coarser, estimator_channels, estimator_slope
            )
            if i > 0:
                context_upsamplers[str(level)] = nn.ConvTranspose3d(context, context, 4, stride=2, padding=1)
        self.estimators = nn.ModuleDict(estimators)
        self.context_upsamplers = nn.ModuleDict(context_upsamplers)
        self.refiner = DilatedRefiner(context + 3, refiner_channels, refiner_dilations, estimator_slope)
        self.size_multiple = 2 ** len(pyramid_channels[: flow_levels[0] + 1])
        for conv in [*(estimator.to_field for estimator in self.estimators.values()), self.refiner.net[-1]]:
            nn.init.normal_(conv.weight, std=field_init_std)
            nn.init.zeros_(conv.bias)

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, return_levels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Field registering ``moving`` to ``fixed``; with ``return_levels`` also the per-level fields.

        Args:
            moving, fixed: (B, C, D, H, W), same shape.
            return_levels: also return the fields of every flow level, coarse to fine, each in voxels of
                its own level's grid (B, 3, S' / 2^(l+1)) where S' is the padded input size.
        """
        self._check_inputs(moving, fixed)
        shape = fixed.shape[2:]
        pad = [(-size) % self.size_multiple for size in shape]
        if any(pad):
            padding = [0, pad[2], 0, pad[1], 0, pad[0]]
            moving, fixed = F.pad(moving, padding, mode="replicate"), F.pad(fixed, padding, mode="replicate")
        depth = self.flow_levels[0] + 1
        fixed_features = self.pyramid(fixed, depth)
        moving_features = self.pyramid(moving, depth)

        field = context = None
        levels = []
        for level in self.flow_levels:
            f, m = fixed_features[level], moving_features[level]
            if field is None:
                inputs = [self._matching(f, m), f]
            else:
                field = upsample_field(field, 2)
                context = self.context_upsamplers[str(level)](context)
                inputs = [self._matching(f, self.feature_warp(m, field)), f, field, context]
            increment, context = self.estimators[str(level)](torch.cat(inputs, dim=1))
            field = increment if field is None else field + increment
            if level == self.flow_levels[-1]:
                field = self.refiner(context, field)
            levels.append(field)

        ddf = upsample_field(field, 2 ** (self.flow_levels[-1] + 1))[..., : shape[0], : shape[1], : shape[2]]
        return (ddf, levels) if return_levels else ddf

    def _matching(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if self.correlation is None:
            return torch.cat([fixed, moving], dim=1)
        return self.cost_activation(self.correlation(fixed, moving))

    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        if moving.ndim != 5 or fixed.ndim != 5:
            raise ValueError(
                f"RRN expects moving and fixed as (B, C, D, H, W), got {tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape.")
        if not torch.isfinite(moving).all() or not torch.isfinite(fixed).all():
            raise ValueError("RRN inputs contain NaN or infinite values.")
