"""RoIAlign in pure PyTorch with the semantics of ``torchvision.ops.roi_align``.

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
channel. Each axis is one batched matrix product over all boxes (no Python loop over boxes or images),
and gradients reach ``input`` through ordinary autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["RoIAlign", "roi_align"]

BoxesLike = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]

# Upper bound on the intermediate product of one group of images (bytes); bounds peak memory for large maps.
_INTERMEDIATE_BYTES = 64 << 20


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
    num_images, channels, height, width = input.shape
    if rois.shape[0] == 0:
        return input.new_zeros(0, channels, pooled_h, pooled_w)

    with torch.no_grad():
        rois = rois.to(torch.float64)  # box geometry in double: sample positions match the C++ kernel
        offset = 0.5 if aligned else 0.0
        starts = rois[:, 1:3] * spatial_scale - offset  # (K, 2) as (x, y)
        sizes = rois[:, 3:5] * spatial_scale - offset - starts
        if not aligned:
            sizes = sizes.clamp(min=1.0)
        a_x, count_x = _interpolation_matrix(starts[:, 0], sizes[:, 0], pooled_w, sampling_ratio, width)
        a_y, count_y = _interpolation_matrix(starts[:, 1], sizes[:, 1], pooled_h, sampling_ratio, height)
        a_y = a_y / (count_y * count_x).clamp(min=1.0)[:, None, None]  # average over the bin's samples
        a_x, a_y = a_x.to(input.dtype), a_y.to(input.dtype)
        batch_index = rois[:, 0].long()

    # out[k] = A_y[k] @ input[b_k] @ A_x[k]^T for every channel. Boxes are grouped by image into
    # slots (N, S) with S = most boxes on one image, so that each axis is one batched product per group of images.
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
    a_x_slots = a_x_slots.view(num_images, slots_per_image, pooled_w, width)
    # Images go in groups whose intermediate (slots * PH, C * W) products stay within _INTERMEDIATE_BYTES.
    per_image = slots_per_image * pooled_h * channels * width * input.element_size()
    group = max(1, _INTERMEDIATE_BYTES // max(per_image, 1))
    pooled = []
    for n0 in range(0, num_images, group):
        n1 = min(num_images, n0 + group)
        feature = input[n0:n1].transpose(1, 2).reshape(n1 - n0, height, channels * width)  # (n, H, C * W)
        rows = torch.bmm(a_y_slots[n0:n1], feature).view(-1, pooled_h * channels, width)
        pooled.append(torch.bmm(rows, a_x_slots[n0:n1].flatten(0, 1).transpose(1, 2)))  # (n * S, PH * C, PW)
    pooled = torch.cat(pooled)[slot]  # (K, PH * C, PW)
    return pooled.view(-1, pooled_h, channels, pooled_w).transpose(1, 2)


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


def _interpolation_matrix(
    start: torch.Tensor, size: torch.Tensor, bins: int, sampling_ratio: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-box matrix summing the bilinear weights of every sample of each bin along one axis.

    Args:
        start, size: ``(K,)`` box start and extent along the axis, feature-map coordinates.
        bins: number of output bins along the axis.
        sampling_ratio: samples per bin, or ``<= 0`` for ``ceil(size / bins)``.
        length: feature-map size along the axis.

    Returns:
        ``(K, bins, length)`` summed weights and ``(K,)`` samples per bin (0 for an empty box).
    """
    bin_size = size / bins
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:
        grid = torch.ceil(bin_size).long().clamp(min=0)
    max_grid = max(int(grid.max()), 1)
    sample = torch.arange(max_grid, device=size.device, dtype=size.dtype)
    b = torch.arange(bins, device=size.device, dtype=size.dtype)
    grid_f = grid.clamp(min=1).to(size.dtype)
    # Sample positions (K, bins, max_grid); samples beyond a box's own grid are masked out.
    pos = (
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

    weights = pos.new_zeros(start.shape[0], bins, length)
    weights.scatter_add_(2, low, (1 - frac) * keep)
    weights.scatter_add_(2, high, frac * keep)
    return weights, grid.clamp(min=0).to(size.dtype)


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
    if not torch.isfinite(rois).all():
        raise ValueError("boxes: coordinates and batch indices must be finite.")
    index = rois[:, 0]
    if (index != index.round()).any() or (index < 0).any() or (index >= num_images).any():
        raise ValueError(
            f"boxes: the batch index (column 0) must be an integer in [0, {num_images}), "
            f"got values in [{float(index.min())}, {float(index.max())}]."
        )
    return rois
