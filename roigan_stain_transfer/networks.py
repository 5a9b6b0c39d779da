"""Networks of the region-guided CycleGAN (Boyd et al., MICCAI 2022): generator, PatchGAN and RoI discriminator.

Conventions used throughout this module:

* Tiles are float tensors ``(B, C, H, W)`` with RGB values scaled to ``[-1, 1]`` (``uint8 / 127.5 - 1``).
* Boxes are pixel coordinates of the tile ``(x1, y1, x2, y2)`` with ``x`` = column and ``y`` = row, ``x2``
  and ``y2`` exclusive (a box of the library ``[xmin, ymin, xmax, ymax]`` covers columns ``xmin .. xmax - 1``).
  They come, as for :func:`shared_ops.roi_align`, either as one ``Tensor[K, 5]`` of rows
  ``(batch index, x1, y1, x2, y2)`` or as a list of ``B`` tensors ``Tensor[L_b, 4]``, one per tile. Every box
  must lie inside its tile: ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``.
* Box classes follow the box library: 0 = normal cell, 1 = cancer cell.

Networks and their parameter counts (3-channel tiles, default widths):

=====================================================  ============  ========================
network                                                parameters    output on 256 x 256
=====================================================  ============  ========================
:class:`ResnetGenerator`, 6 residual blocks              7,837,699    (B, 3, 256, 256)
:class:`ResnetGenerator`, 9 residual blocks             11,378,179    (B, 3, 256, 256)
:class:`PatchDiscriminator` (any ``stride_one_layers``)  6,959,553    (B, 1, 8|16|32, 8|16|32)
:class:`RoIDiscriminator`, 5 input channels              2,764,033    (K,)
:class:`RoIDiscriminator`, 3 input channels              2,761,985    (K,)
=====================================================  ============  ========================

The generator count is the same with either upsampling (a 3 x 3 transposed convolution and a 3 x 3 convolution
hold the same number of weights), so the released numbers (7.84 M and 11.38 M, measured with the released
code's resize + convolution upsampling) hold for the paper's transposed convolutions too.

Paper and released code differ in two places, each a constructor argument (defaults follow the paper):

* generator upsampling: ``upsampling="transposed"`` (paper) or ``"resize"`` (released code: nearest
  ``nn.Upsample`` then a 3 x 3 convolution);
* RoI discriminator input: ``in_channels=3`` (paper: RGB) or ``5`` (released code: RGB plus the two-channel class
  map of :func:`paint_class_map`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from shared_ops import RoIAlign
from shared_ops.architecture import RecordsArchitecture

__all__ = [
    "CLASS_MAP_CHANNELS",
    "PATCH_CHANNELS",
    "ROI_CHANNELS",
    "TILE_CHANNELS",
    "UPSAMPLING_MODES",
    "PatchDiscriminator",
    "ResidualBlock",
    "ResnetGenerator",
    "RoIDiscriminator",
    "as_rois",
    "count_parameters",
    "init_weights",
    "paint_class_map",
]

TILE_CHANNELS = 3
#: Channels of the class map: channel 0 holds normal-cell boxes, channel 1 cancer-cell boxes.
CLASS_MAP_CHANNELS = 2
UPSAMPLING_MODES = ("transposed", "resize")
#: Tile height and width must be multiples of this: the generator downsamples twice by 2 and upsamples back.
GENERATOR_MULTIPLE = 4
#: Widths of the five stride-2 convolutions of the PatchGAN discriminator.
PATCH_CHANNELS = (64, 128, 256, 512, 512)
#: Widths of the four stride-2 convolutions of the RoI discriminator.
ROI_CHANNELS = (64, 128, 256, 512)

BoxesLike = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]
ClassesLike = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def init_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialise ``module`` in place as CycleGAN does and return it.

    Convolution (and linear) weights are drawn from ``N(0, std)`` and their biases set to 0; affine
    normalisation layers (BatchNorm, affine InstanceNorm) get weights from ``N(1, std)`` and zero biases.
    Draws use torch's global generator, so ``torch.manual_seed`` makes them repeatable.
    """
    if std <= 0:
        raise ValueError(f"init_weights: std must be positive, got {std}")
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            if layer.weight is not None:
                nn.init.normal_(layer.weight, 1.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.jit.unused
def _check_tiles(images: torch.Tensor, channels: int, multiple: int, name: str) -> None:
    """Raise a clear error unless ``images`` is float ``(B, channels, H, W)`` , ``H, W`` multiples of ``multiple``.

    Python only; in TorchScript (``torch.jit.script`` of a network, e.g. by ``ckpt_export``) the networks check
    the shape with :func:`_check_tile_shape`.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor (B, {channels}, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (B, {channels}, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (tiles scaled to [-1, 1]), got {images.dtype}")
    if images.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(images.shape)}")
    height, width = images.shape[2:]
    if height == 0 or width == 0 or height % multiple or width % multiple:
        raise ValueError(
            f"{name}: tile height and width must be positive multiples of {multiple}, got {height} x {width}"
        )


def _check_tile_shape(images: torch.Tensor, channels: int, multiple: int, name: str) -> None:
    """The shape part of :func:`_check_tiles`, in a form TorchScript compiles (same message)."""
    shape = images.shape
    if len(shape) != 4:
        raise ValueError(name + ": expected a 4-D tensor (B, " + str(channels) + ", H, W), got shape " + str(shape))
    if shape[1] != channels:
        raise ValueError(name + ": expected " + str(channels) + " channels, got shape " + str(shape))
    height, width = shape[2], shape[3]
    if height == 0 or width == 0 or height % multiple != 0 or width % multiple != 0:
        raise ValueError(
            name + ": tile height and width must be positive multiples of " + str(multiple) + ", got "
            + str(height) + " x " + str(width)
        )  # fmt: skip


def _check_channels(channels: Sequence[int], name: str) -> tuple[int, ...]:
    channels = tuple(int(c) for c in channels)
    if not channels or min(channels) <= 0:
        raise ValueError(f"{name}: expected a non-empty sequence of positive widths, got {channels}")
    return channels


# ----------------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``x + F(x)`` with ``F`` = (reflection pad 1, 3 x 3 conv, InstanceNorm, ReLU) twice without the last ReLU.

    ``(B, C, H, W) -> (B, C, H, W)``; InstanceNorm without affine parameters; ``2 * (9 C^2 + C)`` parameters.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(RecordsArchitecture, nn.Module):
    """Johnson-style ResNet generator mapping tiles of one stain to the other.

    Layers (``c`` = ``base_channels``): reflection pad 3 + 7 x 7 conv to ``c``; two 3 x 3 stride-2 convs to
    ``2c`` and ``4c``; ``num_blocks`` :class:`ResidualBlock` of width ``4c``; two upsampling steps back to ``2c``
    and ``c``; reflection pad 3 + 7 x 7 conv to ``out_channels`` and Tanh. Every conv but the last is followed
    by InstanceNorm (no affine parameters) and ReLU; convs carry biases.

    Upsampling: ``"transposed"`` (paper) uses 3 x 3 transposed convolutions of stride 2 (padding 1, output
    padding 1); ``"resize"`` (released code) uses nearest ``nn.Upsample(scale_factor=2)`` then a 3 x 3
    convolution (padding 1). Both hold the same number of parameters.

    Parameters with the defaults (``c`` = 64, 3 -> 3 channels): 6 blocks 7,837,699 (7.84 M); 9 blocks
    11,378,179 (11.38 M), with either upsampling. Weights are initialised from ``N(0, init_std)``
    (:func:`init_weights`) unless ``init_std`` is None.

    Args:
        in_channels: channels of the input tiles.
        out_channels: channels of the output tiles.
        base_channels: width ``c`` of the first convolution.
        num_blocks: number of residual blocks (6 or 9 in the paper).
        upsampling: ``"transposed"`` or ``"resize"``.
        init_std: standard deviation of the initial weights; None keeps PyTorch's default initialisation.

    ``forward(x)``: ``(B, in_channels, H, W)`` in ``[-1, 1]``, ``H`` and ``W`` multiples of 4 ->
    ``(B, out_channels, H, W)`` in ``[-1, 1]``.

    Every argument but ``init_std`` is recorded in the state dict (:mod:`shared_ops.architecture`): weights load
    only into a generator built with the same values, otherwise ``load_state_dict`` raises
    ``ArchitectureMismatchError`` naming each differing argument with both values.
    """

    def __init__(
        self,
        in_channels: int = TILE_CHANNELS,
        out_channels: int = TILE_CHANNELS,
        base_channels: int = 64,
        num_blocks: int = 9,
        upsampling: str = "transposed",
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        for value, label in (
            (in_channels, "in_channels"),
            (out_channels, "out_channels"),
            (base_channels, "base_channels"),
        ):
            if int(value) <= 0:
                raise ValueError(f"ResnetGenerator: {label} must be positive, got {value}")
        if int(num_blocks) < 0:
            raise ValueError(f"ResnetGenerator: num_blocks must be >= 0, got {num_blocks}")
        if upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"ResnetGenerator: unknown upsampling {upsampling!r}, expected one of {UPSAMPLING_MODES}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.num_blocks = int(num_blocks)
        self.upsampling = upsampling
        self.size_multiple = GENERATOR_MULTIPLE
        c = int(base_channels)
        self.record_architecture(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            base_channels=c,
            num_blocks=self.num_blocks,
            upsampling=upsampling,
        )

        def conv_norm_relu(conv: nn.Module, width: int) -> list[nn.Module]:
            return [conv, nn.InstanceNorm2d(width), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(nn.ReflectionPad2d(3), *conv_norm_relu(nn.Conv2d(self.in_channels, c, 7), c))
        self.down = nn.Sequential(
            *conv_norm_relu(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), 2 * c),
            *conv_norm_relu(nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), 4 * c),
        )
        self.blocks = nn.Sequential(*(ResidualBlock(4 * c) for _ in range(self.num_blocks)))
        up: list[nn.Module] = []
        for width_in, width_out in ((4 * c, 2 * c), (2 * c, c)):
            if upsampling == "transposed":
                up += conv_norm_relu(
                    nn.ConvTranspose2d(width_in, width_out, 3, stride=2, padding=1, output_padding=1), width_out
                )
            else:
                up += [nn.Upsample(scale_factor=2, mode="nearest")]
                up += conv_norm_relu(nn.Conv2d(width_in, width_out, 3, padding=1), width_out)
        self.up = nn.Sequential(*up)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c, self.out_channels, 7), nn.Tanh())
        if init_std is not None:
            init_weights(self, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            _check_tile_shape(x, self.in_channels, self.size_multiple, "ResnetGenerator input")
        else:
            _check_tiles(x, self.in_channels, self.size_multiple, "ResnetGenerator input")
        return self.head(self.up(self.blocks(self.down(self.stem(x)))))


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator
# ----------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: one least-squares realness score per patch of the tile.

    Layers: five 4 x 4 convolutions of widths ``channels`` (default 64, 128, 256, 512, 512), each followed by
    LeakyReLU(0.2), with InstanceNorm (no affine parameters) from the second on; then ``ZeroPad2d((1, 0, 1, 0))``
    and a 4 x 4 convolution (padding 1) to one channel. The convolutions have stride 2 and padding 1 except the
    first ``stride_one_layers``, which have stride 1 and "same" padding (1 before, 2 after each axis), so that
    each stride-1 layer doubles the output size:

    ==================  =========================  ==================
    stride_one_layers   output on a 256 x 256 tile  use
    ==================  =========================  ==================
    0                   8 x 8                       proposed model
    1                   16 x 16                     baseline
    2                   32 x 32                     baseline
    ==================  =========================  ==================

    The parameter count does not depend on ``stride_one_layers``: 6,959,553 (6.96 M) with the defaults.

    Args:
        in_channels: channels of the input tiles.
        channels: widths of the five (or any number of) feature convolutions.
        stride_one_layers: how many of the first feature convolutions have stride 1.
        init_std: standard deviation of the initial weights; None keeps PyTorch's default initialisation.

    ``forward(x)``: ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of ``2 ** (number of stride-2
    layers)`` (32 by default) -> ``(B, 1, H / 2**n, W / 2**n)`` raw scores (no sigmoid).
    """

    def __init__(
        self,
        in_channels: int = TILE_CHANNELS,
        channels: Sequence[int] = PATCH_CHANNELS,
        stride_one_layers: int = 0,
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        channels = _check_channels(channels, "PatchDiscriminator channels")
        if int(in_channels) <= 0:
            raise ValueError(f"PatchDiscriminator: in_channels must be positive, got {in_channels}")
        if not 0 <= int(stride_one_layers) <= len(channels):
            raise ValueError(
                f"PatchDiscriminator: stride_one_layers must be in [0, {len(channels)}], got {stride_one_layers}"
            )
        self.in_channels = int(in_channels)
        self.stride_one_layers = int(stride_one_layers)
        self.downsampling = 2 ** (len(channels) - self.stride_one_layers)
        layers: list[nn.Module] = []
        width_in = self.in_channels
        for index, width in enumerate(channels):
            # Explicit padding keeps the parameter names (features.i.1.*) the same in every variant.
            if index < self.stride_one_layers:
                block = [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(width_in, width, 4, stride=1)]
            else:
                block = [nn.ZeroPad2d(1), nn.Conv2d(width_in, width, 4, stride=2)]
            block += ([nn.InstanceNorm2d(width)] if index > 0 else []) + [nn.LeakyReLU(0.2, inplace=True)]
            layers.append(nn.Sequential(*block))
            width_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(width_in, 1, 4, padding=1))
        if init_std is not None:
            init_weights(self, init_std)

    @classmethod
    def for_output_size(cls, output_size: int, tile_size: int = 256, **kwargs) -> PatchDiscriminator:
        """The discriminator whose output is ``output_size`` squared on ``tile_size`` tiles (e.g. 8, 16, 32 on 256)."""
        num_layers = len(tuple(kwargs.get("channels", PATCH_CHANNELS)))
        ratio = tile_size / output_size if output_size > 0 else 0
        stride_two = round(math.log2(ratio)) if ratio >= 1 else -1
        if ratio < 1 or 2**stride_two != ratio or not 0 <= num_layers - stride_two <= num_layers:
            sizes = [tile_size // 2 ** (num_layers - s) for s in range(num_layers + 1)]
            raise ValueError(f"PatchDiscriminator: output size {output_size} on {tile_size} tiles not in {sizes}")
        return cls(stride_one_layers=num_layers - stride_two, **kwargs)

    def output_size(self, height: int, width: int | None = None) -> tuple[int, int]:
        """``(rows, cols)`` of the score map for an ``height x width`` tile (square when ``width`` is None)."""
        width = height if width is None else width
        return height // self.downsampling, width // self.downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tiles(x, self.in_channels, self.downsampling, "PatchDiscriminator input")
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------------
# Boxes and the class map
# ----------------------------------------------------------------------------------------------------------------


def as_rois(boxes: BoxesLike, batch_size: int, height: int, width: int) -> torch.Tensor:
    """Validate ``boxes`` of a batch of ``batch_size`` tiles ``height x width`` and return ``Tensor[K, 5]``.

    ``boxes`` is a ``Tensor[K, 5]`` of ``(batch index, x1, y1, x2, y2)`` or a list of ``batch_size``
    ``Tensor[L_b, 4]``; the result is float rows ``(batch index, x1, y1, x2, y2)`` in input order (list boxes
    tile by tile), on the boxes' device. Raises ValueError for a wrong shape, a non-integer or out-of-range
    batch index, non-finite coordinates, an empty box (``x2 <= x1`` or ``y2 <= y1``) or a box outside its tile.
    """
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != batch_size:
            raise ValueError(f"boxes: got {len(boxes)} per-tile box tensors for a batch of {batch_size} tiles")
        parts = []
        for index, tile_boxes in enumerate(boxes):
            if not isinstance(tile_boxes, torch.Tensor) or tile_boxes.ndim != 2 or tile_boxes.shape[1] != 4:
                shape = tuple(tile_boxes.shape) if isinstance(tile_boxes, torch.Tensor) else type(tile_boxes).__name__
                raise ValueError(f"boxes[{index}]: expected a Tensor[L, 4] of (x1, y1, x2, y2), got {shape}")
            tile_boxes = tile_boxes.to(torch.float32) if not tile_boxes.is_floating_point() else tile_boxes
            parts.append(torch.cat([torch.full_like(tile_boxes[:, :1], index), tile_boxes], dim=1))
        if not parts:
            return torch.zeros(0, 5)
        rois = torch.cat([p.to(parts[0].dtype) for p in parts])
    elif isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes: expected a Tensor[K, 5] of (batch index, x1, y1, x2, y2), got shape {tuple(boxes.shape)}"
            )
        rois = boxes if boxes.is_floating_point() else boxes.to(torch.float32)
    else:
        raise TypeError(f"boxes: expected a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if rois.shape[0] == 0:
        return rois
    if not bool(torch.isfinite(rois).all()):
        raise ValueError("boxes: batch indices and coordinates must be finite")
    index, x1, y1, x2, y2 = rois.unbind(1)
    bad_index = (index != index.round()) | (index < 0) | (index >= batch_size)
    if bool(bad_index.any()):
        first = int(bad_index.nonzero()[0])
        raise ValueError(
            f"boxes: row {first} has batch index {float(index[first])}, expected an integer in [0, {batch_size})"
        )
    empty = (x2 <= x1) | (y2 <= y1)
    outside = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
    for problem, what in ((empty, "needs x2 > x1 and y2 > y1"), (outside, f"lies outside the {width} x {height} tile")):
        if bool(problem.any()):
            first = int(problem.nonzero()[0])
            raise ValueError(f"boxes: box {first} {rois[first, 1:].tolist()} {what}")
    return rois


def _as_classes(classes: ClassesLike, count: int, num_classes: int) -> torch.Tensor:
    """Classes ``(K,)`` long of ``count`` boxes from a ``Tensor[K]`` or a list of per-tile ``Tensor[L_b]``."""
    if isinstance(classes, (list, tuple)):
        for index, part in enumerate(classes):
            if not isinstance(part, torch.Tensor) or part.ndim != 1:
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"classes[{index}]: expected a 1-D tensor of box classes, got {shape}")
        classes = torch.cat(list(classes)) if classes else torch.zeros(0, dtype=torch.long)
    if not isinstance(classes, torch.Tensor) or classes.ndim != 1:
        shape = tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes).__name__
        raise ValueError(f"classes: expected a 1-D tensor (K,) or a list of 1-D tensors, got {shape}")
    if classes.shape[0] != count:
        raise ValueError(f"classes: got {classes.shape[0]} classes for {count} boxes")
    if classes.is_floating_point() and bool((classes != classes.round()).any()):
        raise ValueError("classes: expected integer class labels")
    classes = classes.long()
    if count and bool(((classes < 0) | (classes >= num_classes)).any()):
        raise ValueError(f"classes: expected labels in [0, {num_classes}), got {sorted(set(classes.tolist()))}")
    return classes


def paint_class_map(
    boxes: BoxesLike,
    classes: ClassesLike,
    batch_size: int,
    height: int,
    width: int,
    shrink: float = 5,
    num_classes: int = CLASS_MAP_CHANNELS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Class map ``(B, num_classes, H, W)``: each box, shrunk by ``shrink`` px per side, painted 1 in its class.

    Pixel ``(row, col)`` is painted for a box ``(x1, y1, x2, y2)`` of class ``k`` when
    ``x1 + shrink <= col < x2 - shrink`` and ``y1 + shrink <= row < y2 - shrink``: a 48 x 48 library box
    ``[xmin, ymin, xmax, ymax]`` becomes the 38 x 38 square of rows ``ymin + 5 .. ymax - 6`` and columns
    ``xmin + 5 .. xmax - 6`` in channel ``k`` (0 = normal, 1 = cancer). Overlapping boxes simply paint 1; all
    other pixels are 0. A box narrower than ``2 * shrink`` paints nothing.

    Args:
        boxes: ``Tensor[K, 5]`` ``(batch index, x1, y1, x2, y2)`` or a list of ``B`` ``Tensor[L_b, 4]``,
            validated by :func:`as_rois`.
        classes: ``Tensor[K]`` or a list of ``B`` ``Tensor[L_b]`` of integer labels in ``[0, num_classes)``.
        batch_size, height, width: size ``B, H, W`` of the tile batch.
        shrink: pixels removed from each side of every box.
        num_classes: channels of the map.
        dtype: dtype of the map; its device is the boxes' device.
    """
    if shrink < 0:
        raise ValueError(f"paint_class_map: shrink must be >= 0, got {shrink}")
    rois = as_rois(boxes, batch_size, height, width)
    labels = _as_classes(classes, rois.shape[0], num_classes).to(rois.device)
    canvas = torch.zeros(batch_size * num_classes, height, width, dtype=dtype, device=rois.device)
    if rois.shape[0] == 0:
        return canvas.view(batch_size, num_classes, height, width)
    rows = torch.arange(height, device=rois.device, dtype=rois.dtype)
    cols = torch.arange(width, device=rois.device, dtype=rois.dtype)
    in_rows = (rows >= rois[:, 2:3] + shrink) & (rows < rois[:, 4:5] - shrink)  # (K, H)
    in_cols = (cols >= rois[:, 1:2] + shrink) & (cols < rois[:, 3:4] - shrink)  # (K, W)
    footprints = (in_rows[:, :, None] & in_cols[:, None, :]).to(dtype)  # (K, H, W)
    target = rois[:, 0].long() * num_classes + labels
    canvas.index_add_(0, target, footprints)
    return canvas.clamp_(max=1).view(batch_size, num_classes, height, width)


# ----------------------------------------------------------------------------------------------------------------
# RoI discriminator
# ----------------------------------------------------------------------------------------------------------------


class RoIDiscriminator(nn.Module):
    """Region-of-interest discriminator: one least-squares realness logit per cell box.

    Layers: four 4 x 4 stride-2 convolutions without bias (padding 1) of widths ``channels`` (default 64, 128,
    256, 512), each followed by LeakyReLU(0.2), with BatchNorm from the second on (a 256 x 256 tile gives a
    16 x 16 map); :class:`shared_ops.RoIAlign` of every box to ``pool_size`` x ``pool_size`` (3 x 3) with
    ``spatial_scale`` = 1 / 16, adaptive ``sampling_ratio`` (-1) and ``aligned=False``; a ``pool_size`` x
    ``pool_size`` convolution without padding (with bias) to one logit per box.

    Input: 3 channels (paper: RGB) or 5 (released code: RGB followed by the two-channel class map of
    :func:`paint_class_map`). A 5-channel discriminator accepts either the 5-channel tensor or the RGB tiles
    with ``classes``, in which case it paints the class map itself (boxes shrunk by ``box_shrink`` px).

    Parameters with the default widths: 2,764,033 (2.76 M) with 5 input channels, 2,761,985 (2.76 M) with 3.

    Args:
        in_channels: 3 or 5.
        channels: widths of the feature convolutions (each halves the resolution).
        pool_size: RoIAlign output size, also the kernel of the final convolution.
        sampling_ratio: RoIAlign samples per bin (-1: adaptive).
        aligned: RoIAlign half-pixel alignment.
        box_shrink: pixels removed per box side when painting the class map.
        init_std: standard deviation of the initial weights; None keeps PyTorch's default initialisation.

    ``forward(images, boxes, classes=None)``: ``images`` ``(B, in_channels or 3, H, W)``, ``H`` and ``W``
    multiples of 16; ``boxes`` as in :func:`as_rois`; ``classes`` ``Tensor[K]`` or per-tile list (needed only to
    paint the class map) -> logits ``(K,)``, boxes in input order (list boxes tile by tile).
    """

    def __init__(
        self,
        in_channels: int = TILE_CHANNELS,
        channels: Sequence[int] = ROI_CHANNELS,
        pool_size: int = 3,
        sampling_ratio: int = -1,
        aligned: bool = False,
        box_shrink: float = 5,
        init_std: float | None = 0.02,
    ) -> None:
        super().__init__()
        allowed = (TILE_CHANNELS, TILE_CHANNELS + CLASS_MAP_CHANNELS)
        if in_channels not in allowed:
            raise ValueError(f"RoIDiscriminator: in_channels must be one of {allowed} (RGB, RGB + class map)")
        channels = _check_channels(channels, "RoIDiscriminator channels")
        if int(pool_size) <= 0:
            raise ValueError(f"RoIDiscriminator: pool_size must be positive, got {pool_size}")
        self.in_channels = int(in_channels)
        self.box_shrink = box_shrink
        self.downsampling = 2 ** len(channels)
        layers: list[nn.Module] = []
        width_in = self.in_channels
        for index, width in enumerate(channels):
            block = [nn.Conv2d(width_in, width, 4, stride=2, padding=1, bias=False)]
            block += ([nn.BatchNorm2d(width)] if index > 0 else []) + [nn.LeakyReLU(0.2, inplace=True)]
            layers.append(nn.Sequential(*block))
            width_in = width
        self.features = nn.Sequential(*layers)
        self.roi_align = RoIAlign(pool_size, 1.0 / self.downsampling, sampling_ratio=sampling_ratio, aligned=aligned)
        self.head = nn.Conv2d(width_in, 1, int(pool_size))
        if init_std is not None:
            init_weights(self, init_std)

    @property
    def uses_class_map(self) -> bool:
        """Whether the input carries the two-channel class map after RGB."""
        return self.in_channels == TILE_CHANNELS + CLASS_MAP_CHANNELS

    def forward(self, images: torch.Tensor, boxes: BoxesLike, classes: ClassesLike | None = None) -> torch.Tensor:
        if (
            self.uses_class_map
            and isinstance(images, torch.Tensor)
            and images.ndim == 4
            and images.shape[1] == TILE_CHANNELS
        ):
            if classes is None:
                raise ValueError(
                    "RoIDiscriminator: this discriminator takes RGB + class map (5 channels); got 3-channel tiles "
                    "without box classes to paint the map from"
                )
            batch, _, height, width = images.shape
            class_map = paint_class_map(boxes, classes, batch, height, width, self.box_shrink, dtype=images.dtype)
            images = torch.cat([images, class_map.to(images.device)], dim=1)
        _check_tiles(images, self.in_channels, self.downsampling, "RoIDiscriminator input")
        batch, _, height, width = images.shape
        rois = as_rois(boxes, batch, height, width).to(images.device)
        features = self.features(images)
        pooled = self.roi_align(features, rois)
        return self.head(pooled).flatten()
