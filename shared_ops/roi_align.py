"""RoIAlign with the semantics of ``torchvision.ops.roi_align``, in PyTorch plus a C kernel on CPU.

Shapes and conventions:

* ``input`` is a feature map ``(N, C, H, W)``.
* Boxes are in input-image pixel coordinates ``(x1, y1, x2, y2)``, multiplied by ``spatial_scale`` to
  reach feature-map coordinates. They come either as one ``Tensor[K, 5]`` of rows
  ``(batch index, x1, y1, x2, y2)`` or as a list of ``N`` tensors ``Tensor[L_i, 4]``, one per image.
* The output is ``(K, C, PH, PW)``, boxes in input order (list boxes image by image).

Each output bin averages ``grid_h x grid_w`` bilinear samples placed regularly inside the bin
(``sampling_ratio`` per axis, or ``ceil(box size / output size)`` when ``sampling_ratio <= 0``). A sample
outside ``[-1, H] x [-1, W]`` contributes zero; one inside is clamped to the map first. With
``aligned=False`` boxes are shrunk to no less than one pixel, with ``aligned=True`` they are shifted by
half a pixel first, both as torchvision does.

Implementation: bilinear sampling and bin averaging are separable, so each box reduces to two small
interpolation matrices ``A_y (PH, H)`` and ``A_x (PW, W)`` and its output is ``A_y @ X @ A_x^T`` per
channel. Two implementations compute that:

* Native (CPU, float32 and float64): a C kernel (``shared_ops/_native/roi_align.c``, compiled with OpenMP on
  first use, see :mod:`shared_ops._native`) that stores only the non-zero band of each row of ``A_y`` and
  ``A_x`` and applies them box by box, a few channels at a time, writing straight into the output; nothing
  but the output is allocated. Its gradient is the adjoint kernel (``A_y^T @ G @ A_x`` summed into the
  input gradient), wrapped so that gradients of any order are available.
* PyTorch (every other device and dtype, the CPU fallback, and traced models): each axis is one batched
  matrix product over all boxes, or a direct gather of the taps when boxes hold few samples (no Python
  loop over boxes or images); gradients reach ``input`` through ordinary autograd.

The native kernel is used whenever it applies and could be built; ``SHARED_OPS_NATIVE=0`` in the
environment forces the PyTorch implementation, and a missing compiler or a failed build falls back to it
with one warning. Both agree to rounding (about 1e-6 in float32). Boxes never get gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from shared_ops import _native

__all__ = ["RoIAlign", "roi_align"]

BoxesLike = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]

# Size of the intermediate product of one chunk of channels (bytes).
_INTERMEDIATE_BYTES = 32 << 20
# Relative cost of one gathered value against one value of the dense products (tests set it to 0 or inf).
_GATHER_COST = 1.0


def roi_align(
    input: torch.Tensor,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """Pool each box of ``boxes`` from ``input`` into a fixed ``output_size`` grid.

    Args:
        input: feature map ``(N, C, H, W)``.
        boxes: ``Tensor[K, 5]`` of ``(batch index, x1, y1, x2, y2)`` or a list of ``N`` ``Tensor[L_i, 4]``.
        output_size: ``(PH, PW)`` or one int for both.
        spatial_scale: factor from box coordinates to feature-map coordinates (e.g. 1/16).
        sampling_ratio: samples per bin along each axis; ``<= 0`` chooses ``ceil(box size / bins)``.
        aligned: shift boxes by -0.5 pixel so that pixel centres sit on integer coordinates.

    Returns:
        ``(K, C, PH, PW)`` in the dtype of ``input``.
    """
    if not isinstance(input, torch.Tensor) or input.ndim != 4:
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"input: expected a 4-D tensor (N, C, H, W), got {shape}.")
    if not input.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got {input.dtype}.")
    pooled_h, pooled_w = _pair(output_size)
    if pooled_h <= 0 or pooled_w <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}.")
    rois = _as_rois(boxes, input)
    if rois.shape[0] == 0:
        return input.new_zeros(0, input.shape[1], pooled_h, pooled_w)
    geometry = _Geometry((pooled_h, pooled_w), float(spatial_scale), int(sampling_ratio), bool(aligned))
    kernels = _native_kernels(input)
    if kernels is not None:
        return _NativeRoIAlign.apply(input, rois.detach().to(torch.float64).contiguous(), geometry, kernels)
    return _roi_align_torch(input, rois, geometry)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`; ``forward(input, boxes)``."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, boxes: BoxesLike) -> torch.Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


# --------------------------------------------------------------------------------------------------
# Native CPU kernels (shared_ops/_native/roi_align.c) behind an autograd function.


class _Geometry(NamedTuple):
    """Everything but the tensors that fixes the pooling: ``((PH, PW), spatial_scale, sampling_ratio, aligned)``."""

    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool


def _native_kernels(input: torch.Tensor) -> _native.RoIAlignKernels | None:
    """The native kernels if they serve ``input`` (CPU, float32/float64, enabled and built), else None.

    A traced model (TorchScript export) gets None: it must hold plain tensor operations only.
    """
    if input.device.type != "cpu" or input.dtype not in _native.RoIAlignKernels.DTYPES or input.numel() == 0:
        return None
    if torch.jit.is_tracing():
        return None
    return _native.roi_align_kernels()


class _NativeRoIAlign(torch.autograd.Function):
    """RoIAlign on the native kernels; ``forward(input (N, C, H, W), rois (K, 5) float64, geometry, kernels)``.

    Its backward pass is :class:`_NativeRoIAlignAdjoint`, whose own backward pass is this function again
    (RoIAlign is linear in ``input``), so gradients of any order are available, as on the PyTorch path.
    Boxes get no gradient.
    """

    @staticmethod
    def forward(ctx, input, rois, geometry, kernels):
        ctx.save_for_backward(rois)
        ctx.geometry, ctx.kernels, ctx.input_shape, ctx.dtype = geometry, kernels, tuple(input.shape), input.dtype
        return kernels.forward(input.contiguous(), rois, *geometry)

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_out = grad_out.to(ctx.dtype)
            grad_input = _NativeRoIAlignAdjoint.apply(grad_out, rois, ctx.geometry, ctx.kernels, ctx.input_shape)
        return grad_input, None, None, None


class _NativeRoIAlignAdjoint(torch.autograd.Function):
    """Gradient of RoIAlign: ``forward(grad_out (K, C, PH, PW), rois, geometry, kernels, input_shape)``."""

    @staticmethod
    def forward(ctx, grad_out, rois, geometry, kernels, input_shape):
        ctx.save_for_backward(rois)
        ctx.geometry, ctx.kernels = geometry, kernels
        _, spatial_scale, sampling_ratio, aligned = geometry
        return kernels.backward(grad_out.contiguous(), rois, input_shape, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_grad_input):
        (rois,) = ctx.saved_tensors
        grad_grad_out = None
        if ctx.needs_input_grad[0]:
            grad_grad_out = _NativeRoIAlign.apply(grad_grad_input, rois, ctx.geometry, ctx.kernels)
        return grad_grad_out, None, None, None, None


# --------------------------------------------------------------------------------------------------
# PyTorch implementation.


def _roi_align_torch(input: torch.Tensor, rois: torch.Tensor, geometry: _Geometry) -> torch.Tensor:
    """The PyTorch implementation: ``input (N, C, H, W)``, ``rois (K >= 1, 5)``; returns ``(K, C, PH, PW)``.

    Runs on every device and floating dtype; gradients reach ``input`` through ordinary autograd.
    """
    (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned = geometry
    num_images, channels, height, width = input.shape
    with torch.no_grad():
        rois = rois.to(torch.float64)
        offset = 0.5 if aligned else 0.0
        # Box corners, sizes and bin sizes are rounded to the input's dtype, as torchvision's kernel has
        # them: the number of samples per bin is a ceil of that value. Sample positions are then in double.
        starts = (rois[:, 1:3] * spatial_scale - offset).to(input.dtype)  # (K, 2) as (x, y)
        sizes = (rois[:, 3:5] * spatial_scale - offset).to(input.dtype) - starts
        if not aligned:
            sizes = sizes.clamp(min=1.0)
        if (pooled_w, width) == (pooled_h, height):  # square case: both axes in one call
            index, weight, grid = _axis_taps(starts.T.flatten(), sizes.T.flatten(), pooled_w, sampling_ratio, width)
            (x_index, y_index), (x_weight, y_weight), (grid_x, grid_y) = index.chunk(2), weight.chunk(2), grid.chunk(2)
        else:
            x_index, x_weight, grid_x = _axis_taps(starts[:, 0], sizes[:, 0], pooled_w, sampling_ratio, width)
            y_index, y_weight, grid_y = _axis_taps(starts[:, 1], sizes[:, 1], pooled_h, sampling_ratio, height)
        count = (grid_y * grid_x).clamp(min=1.0)  # samples averaged in each bin
        batch_index = rois[:, 0].long()

        # Two ways to the same numbers: read every tap (cheap when boxes hold few samples), or two dense
        # interpolation products (cheap when they hold many). Pick the one that touches fewer values.
        taps = rois.shape[0] * pooled_h * pooled_w * y_index[0, 0].numel() * x_index[0, 0].numel() * channels
        slots = num_images * int(torch.bincount(batch_index, minlength=num_images).max())
        dense = slots * pooled_h * channels * width + input.numel()
        use_gather = taps * _GATHER_COST <= dense
        if not use_gather:
            a_y = (_interpolation_matrix(y_index, y_weight, height) / count[:, None, None]).to(input.dtype)
            a_x = _interpolation_matrix(x_index, x_weight, width).to(input.dtype)
    if use_gather:
        return _pool_by_gather(input, batch_index, (y_index, y_weight), (x_index, x_weight), count)
    return _pool_by_products(input, batch_index, a_y, a_x)


def _axis_taps(
    start: torch.Tensor, size: torch.Tensor, bins: int, sampling_ratio: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps of every sample of each bin along one axis.

    Args:
        start, size: ``(K,)`` box start and extent along the axis, feature-map coordinates, in the input's
            dtype (the sample count per bin is computed in it).
        bins: number of output bins along the axis.
        sampling_ratio: samples per bin, or ``<= 0`` for ``ceil(size / bins)``.
        length: feature-map size along the axis.

    Returns:
        ``index`` (K, bins, G, 2) long and ``weight`` (K, bins, G, 2): the lower and upper neighbour of each
        of the G sample slots (G = the largest grid among the boxes; slots beyond a box's own grid and
        samples outside ``[-1, length]`` weigh zero), and ``(K,)`` samples per bin (0 for an empty box).
    """
    bin_size = size / bins
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(bin_size).long().clamp(min=0)
    start, size, bin_size = start.double(), size.double(), bin_size.double()
    max_grid = max(int(grid.max()), 1)
    sample = torch.arange(max_grid, device=size.device, dtype=size.dtype)
    b = torch.arange(bins, device=size.device, dtype=size.dtype)
    grid_f = grid.clamp(min=1).to(size.dtype)
    pos = (  # (K, bins, max_grid)
        start[:, None, None]
        + b[None, :, None] * bin_size[:, None, None]
        + (sample[None, None, :] + 0.5) * (bin_size / grid_f)[:, None, None]
    )
    used = sample[None, None, :] < grid[:, None, None]
    inside = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_end = low >= length - 1
    low = low.clamp(max=length - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low.to(pos.dtype))
    keep = (used & inside).to(pos.dtype)
    index = torch.stack([low, high], dim=-1)
    weight = torch.stack([(1 - frac) * keep, frac * keep], dim=-1)
    return index, weight, grid.clamp(min=0).to(size.dtype)


def _interpolation_matrix(index: torch.Tensor, weight: torch.Tensor, length: int) -> torch.Tensor:
    """Taps (K, bins, G, 2) of one axis summed into a (K, bins, length) matrix."""
    matrix = weight.new_zeros(*index.shape[:2], length)
    return matrix.scatter_add_(2, index.flatten(2), weight.flatten(2))


def _pool_by_products(
    input: torch.Tensor, batch_index: torch.Tensor, a_y: torch.Tensor, a_x: torch.Tensor
) -> torch.Tensor:
    """``out[k] = A_y[k] @ input[b_k] @ A_x[k]^T`` per channel; A_y (K, PH, H), A_x (K, PW, W)."""
    num_images, channels, height, width = input.shape
    pooled_h, pooled_w = a_y.shape[1], a_x.shape[1]
    # Boxes are grouped by image into slots (N, S), S = most boxes on one image, so that each axis is
    # one batched product per chunk of channels.
    counts = torch.bincount(batch_index, minlength=num_images)
    slots_per_image = int(counts.max())
    order = torch.argsort(batch_index, stable=True)
    first_of_image = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=order.device) - first_of_image[batch_index[order]]
    slot = torch.empty_like(order)
    slot[order] = batch_index[order] * slots_per_image + rank  # slot of box k

    a_y_slots = a_y.new_zeros(num_images * slots_per_image, pooled_h, height).index_copy_(0, slot, a_y)
    a_x_slots = a_x.new_zeros(num_images * slots_per_image, pooled_w, width).index_copy_(0, slot, a_x)
    a_y_slots = a_y_slots.view(num_images, slots_per_image * pooled_h, height)
    # Channels go in chunks whose intermediate (N * S * PH, chunk * W) product stays near cache size:
    # this bounds peak memory and is about twice as fast as one product over all channels on large maps.
    per_channel = num_images * slots_per_image * pooled_h * width * input.element_size()
    chunk = max(1, _INTERMEDIATE_BYTES // max(per_channel, 1))
    pooled = []
    for c0 in range(0, channels, chunk):
        c1 = min(channels, c0 + chunk)
        feature = input[:, c0:c1].transpose(1, 2).reshape(num_images, height, (c1 - c0) * width)  # (N, H, c * W)
        rows = torch.bmm(a_y_slots, feature).view(-1, pooled_h * (c1 - c0), width)  # (N * S, PH * c, W)
        # A_x @ rows^T keeps the long PH * c axis as the output columns of the product.
        pooled.append(torch.bmm(a_x_slots, rows.transpose(1, 2)).view(-1, pooled_w, pooled_h, c1 - c0))
    pooled = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=3)
    return pooled[slot].permute(0, 3, 2, 1).contiguous()  # (K, C, PH, PW)


def _pool_by_gather(
    input: torch.Tensor,
    batch_index: torch.Tensor,
    y_taps: tuple[torch.Tensor, torch.Tensor],
    x_taps: tuple[torch.Tensor, torch.Tensor],
    count: torch.Tensor,
) -> torch.Tensor:
    """Read every bilinear tap of every sample directly and average them per bin."""
    num_images, channels, height, width = input.shape
    (y_index, y_weight), (x_index, x_weight) = y_taps, x_taps
    k, pooled_h, pooled_w = y_index.shape[0], y_index.shape[1], x_index.shape[1]
    y_index, y_weight = y_index.view(k, pooled_h, -1, 1, 1), y_weight.view(k, pooled_h, -1, 1, 1)
    x_index, x_weight = x_index.view(k, 1, 1, pooled_w, -1), x_weight.view(k, 1, 1, pooled_w, -1)
    pixel = (batch_index.view(k, 1, 1, 1, 1) * height + y_index) * width + x_index  # (K, PH, Ty, PW, Tx)
    weight = (y_weight * x_weight / count.view(k, 1, 1, 1, 1)).to(input.dtype)
    pixel = pixel.transpose(2, 3).reshape(k, pooled_h, pooled_w, -1)  # (K, PH, PW, T)
    weight = weight.transpose(2, 3).reshape(k, pooled_h, pooled_w, -1, 1)  # (K, PH, PW, T, 1)
    pixels = input.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, channels)
    values = pixels.index_select(0, pixel.flatten()).view(k, pooled_h, pooled_w, -1, channels)  # (K, PH, PW, T, C)
    return (values * weight).sum(dim=3).permute(0, 3, 1, 2).contiguous()


def _as_rois(boxes: BoxesLike, input: torch.Tensor) -> torch.Tensor:
    """Validate ``boxes`` and return them as ``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)``."""
    num_images = input.shape[0]
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"boxes[{i}]: expected a Tensor[L, 4] of (x1, y1, x2, y2), got {shape}.")
        if len(boxes) > num_images:
            raise ValueError(f"boxes: got {len(boxes)} per-image box tensors for a batch of {num_images} images.")
        if len(boxes) == 0:
            return input.new_zeros(0, 5)
        rois = torch.cat(
            [
                torch.cat([torch.full_like(b[:, :1], i, dtype=torch.float64), b.double()], dim=1)
                for i, b in enumerate(boxes)
            ]
        )
    elif isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes: expected a Tensor[K, 5] of (batch index, x1, y1, x2, y2), got shape {tuple(boxes.shape)}."
            )
        rois = boxes
    else:
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}.")
    if rois.device != input.device:
        raise ValueError(f"boxes are on {rois.device} but input is on {input.device}.")
    if rois.shape[0] == 0:
        return rois
    if not rois.is_floating_point():
        rois = rois.double()
    index = rois[:, 0]
    finite = torch.isfinite(rois).all(dim=1)
    bad_index = (index != index.round()) | (index < 0) | (index >= num_images)
    if bool((~finite | bad_index).any()):  # one check on the fast path; the details only on failure
        if not bool(finite.all()):
            raise ValueError("boxes: coordinates and batch indices must be finite.")
        raise ValueError(
            f"boxes: the batch index (column 0) must be an integer in [0, {num_images}), "
            f"got values in [{float(index.min())}, {float(index.max())}]."
        )
    return rois
