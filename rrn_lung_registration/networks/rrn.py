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

import contextlib
import functools
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from torch import nn

from shared_ops import LocalCostCorrelation3d

__all__ = ["RRN", "FeaturePyramid", "DenseFlowEstimator", "DilatedRefiner", "conv3d_pieces", "upsample_field"]

# Activations run channels-last ((B, D, H, W, C) in memory) through the network: oneDNN's CPU kernels then
# read and write them in place, where channels-first tensors are reordered to a blocked layout and back
# around every convolution.
CHANNELS_LAST = torch.channels_last_3d


def _conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation)


def upsample_field(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear upsampling of a field in voxels by an integer factor; values are scaled with the grid."""
    return factor * F.interpolate(ddf, scale_factor=factor, mode="trilinear", align_corners=True)


@functools.cache
def _onednn_fused_ops() -> bool:
    """Whether this torch build has oneDNN's fused convolution ops (convolution + activation or + sum)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Call oneDNN's fused ops for a convolution of ``x``: float32 on CPU, no autograd, no autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and _onednn_fused_ops()
    )


def conv3d_pieces(inputs: Sequence[torch.Tensor], conv: nn.Conv3d, slope: float | None = None) -> torch.Tensor:
    """``leaky_relu(conv(torch.cat(inputs, dim=1)), slope)`` without building the concatenation.

    A convolution of channel-concatenated inputs is the sum of the convolutions of each input with its
    slice of the weight's input channels, so dense blocks keep every output as its own tensor: nothing is
    copied as the block grows, and autograd stores each output once instead of in every concatenation.
    Under ``torch.no_grad`` on CPU in float32 the sum is accumulated in place by oneDNN (convolution with
    a fused sum) and a single input gets the activation fused too. The activation runs in place on the
    sum, also under autograd (LeakyReLU with a positive slope differentiates from its output).

    Args:
        inputs: tensors (B, C_i, D, H, W) with ``sum(C_i) == conv.in_channels``, best channels-last.
        conv: a 3-D convolution with ``groups == 1`` and zero padding.
        slope: LeakyReLU negative slope, ``None`` for no activation.

    Returns:
        (B, conv.out_channels, D', H', W'), in the memory format oneDNN / cuDNN chose (channels-last for
        channels-last inputs).
    """
    weight, bias = conv.weight, conv.bias
    sizes = [x.shape[1] for x in inputs]
    if sum(sizes) != weight.shape[1] or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(
            f"inputs with {sizes} channels do not match {conv} (needs groups 1, zero padding, "
            f"{weight.shape[1]} input channels)."
        )
    weights = torch.split(weight, sizes, dim=1) if len(inputs) > 1 else (weight,)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), 1)
    if _use_onednn(inputs[0], weight):
        fused = len(inputs) == 1 and slope is not None
        attr, scalars = ("leaky_relu", [slope]) if fused else ("none", [])
        out = torch.ops.mkldnn._convolution_pointwise(inputs[0], weights[0], bias, *geometry, attr, scalars, "")
        for x, w in zip(inputs[1:], weights[1:], strict=True):
            torch.ops.mkldnn._convolution_pointwise_.binary(out, x, w, None, *geometry, "add", 1.0, None, [], None)
        if slope is not None and not fused:
            F.leaky_relu_(out, slope)
        return out
    out = None
    for x, w in zip(inputs, weights, strict=True):
        part = F.conv3d(x, w, bias if out is None else None, conv.stride, conv.padding, conv.dilation)
        out = part if out is None else out.add_(part)
    if slope is None:
        return out
    # in place where autograd allows it: LeakyReLU differentiates from its output for positive slopes
    return F.leaky_relu_(out, slope) if slope > 0 or not torch.is_grad_enabled() else F.leaky_relu(out, slope)


def _cat_channels_last(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)`` in channels-last memory format, whatever the inputs' formats."""
    tensors = list(tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat([t.contiguous(memory_format=CHANNELS_LAST) for t in tensors], dim=1)
    first = tensors[0]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    shape = (first.shape[0], sum(t.shape[1] for t in tensors), *first.shape[2:])
    out = torch.empty(shape, dtype=dtype, device=first.device, memory_format=CHANNELS_LAST)
    return torch.cat(tensors, dim=1, out=out)


def _native_low_precision(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native CPU convolutions in ``dtype`` here (AVX512-BF16 / AVX512-FP16 / AMX)."""
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    return check is not None and bool(getattr(torch.ops.mkldnn, check)())


def _cpu_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Float32 where CPU autocast asks for a low precision the CPU has no native convolutions for.

    Without them PyTorch runs low-precision 3-D convolutions through a reference loop, hundreds of times
    slower than float32 (a 256^3 registration would take hours), so autocast is switched off inside the
    network and a warning says so once.
    """
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    dtype = torch.get_autocast_dtype("cpu")
    if _native_low_precision(dtype):
        return contextlib.nullcontext()
    warnings.warn(
        f"RRN: this CPU has no native {dtype} convolutions (oneDNN needs AVX512-BF16/FP16 or AMX); the "
        "network runs in float32 under CPU autocast.",
        RuntimeWarning,
        stacklevel=3,
    )
    return torch.autocast("cpu", enabled=False)


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

    def forward(
        self, x: torch.Tensor, depth: int | None = None, keep: Sequence[int] | None = None
    ) -> list[torch.Tensor | None]:
        """Outputs of the first ``depth`` levels (all by default), finest first, channels-last.

        ``keep``: indices of the levels to return; the others are ``None`` in the list (freed as soon as
        the next level is computed). All by default.
        """
        features = []
        x = x.contiguous(memory_format=CHANNELS_LAST)
        for index, level in enumerate(self.levels[: depth if depth is not None else len(self.levels)]):
            for conv, activation in zip(level[0::2], level[1::2], strict=True):
                x = conv3d_pieces([x], conv, activation.negative_slope)
            features.append(x if keep is None or index in keep else None)
        return features


class DenseFlowEstimator(nn.Module):
    """Densely connected 3x3x3 convs (each reads the input and every earlier output), then a 3-channel conv.

    ``forward(x)`` returns ``(field, context)``: the field (B, 3, ...) and the last hidden output. ``x`` is
    the input (B, C, ...) or the list of tensors whose channel concatenation it is. No concatenation is
    built inside: every layer sums the convolutions of the input and of each earlier output with the
    matching slices of its weight (:func:`conv3d_pieces`).
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

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = [x] if isinstance(x, torch.Tensor) else list(x)
        out = pieces[0]
        for i, (conv, activation) in enumerate(self.layers):
            out = conv3d_pieces(pieces, conv, activation.negative_slope)
            if i < len(self.layers) - 1:
                pieces.append(out)
        del pieces  # the block's outputs are freed before the field conv, all but the context
        return conv3d_pieces([out], self.to_field), out


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
        x = _cat_channels_last([context, field])
        modules = list(self.net)
        for i, conv in enumerate(modules):
            if isinstance(conv, nn.Conv3d):
                activation = modules[i + 1] if i + 1 < len(modules) else None
                x = conv3d_pieces([x], conv, activation.negative_slope if activation is not None else None)
        return field + x


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
        with _cpu_precision(fixed):
            ddf, levels = self._fields(moving, fixed)
        return (ddf, levels) if return_levels else ddf

    def _fields(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        shape = fixed.shape[2:]
        pad = [(-size) % self.size_multiple for size in shape]
        if any(pad):
            padding = [0, pad[2], 0, pad[1], 0, pad[0]]
            moving, fixed = F.pad(moving, padding, mode="replicate"), F.pad(fixed, padding, mode="replicate")
        depth = self.flow_levels[0] + 1
        fixed_features = self.pyramid(fixed, depth, keep=self.flow_levels)
        moving_features = self.pyramid(moving, depth, keep=self.flow_levels)

        field = context = None
        levels = []
        for level in self.flow_levels:
            f, m = fixed_features[level].float(), moving_features[level].float()
            fixed_features[level] = moving_features[level] = None  # each level's features are read once
            if field is None:
                inputs = [self._matching(f, m), f]
            else:
                field = upsample_field(field, 2)
                context = self.context_upsamplers[str(level)](context)
                inputs = [self._matching(f, self.feature_warp(m, field)), f, field, context]
            del f, m
            inputs = _cat_channels_last(inputs)  # one tensor: the first dense layer reads it at full width
            increment, context = self.estimators[str(level)](inputs)
            del inputs
            increment = increment.float().contiguous()
            field = increment if field is None else field + increment
            if level == self.flow_levels[-1]:
                field = self.refiner(context, field).float().contiguous()
            levels.append(field)

        ddf = upsample_field(field, 2 ** (self.flow_levels[-1] + 1))[..., : shape[0], : shape[1], : shape[2]]
        return ddf, levels

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
