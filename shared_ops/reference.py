"""Plainly written reference implementations of the shared layers.

They are slow and memory-hungry on purpose: every step is spelled out so that they can be checked by
reading, and the fast layers in :mod:`shared_ops.correlation` and :mod:`shared_ops.roi_align` are tested
and benchmarked against them. Do not use them in models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["local_cost_correlation_3d_loop", "roi_align_loop"]


def local_cost_correlation_3d_loop(fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Raw correlation (no normalisation) with one shifted copy of ``moving`` per displacement.

    This is how the released RRN code computes its cost volume: zero-pad ``moving`` by ``radius``, take
    the channel mean of ``fixed * shifted moving`` for each of the ``(2r + 1) ** 3`` shifts (``dz``
    slowest, ``dx`` fastest) and concatenate the results.
    """
    _, _, depth, height, width = fixed.shape
    r = radius
    padded = F.pad(moving, [r, r, r, r, r, r])
    costs = []
    for dz in range(2 * r + 1):
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                shifted = padded[:, :, dz : dz + depth, dy : dy + height, dx : dx + width]
                costs.append(torch.mean(fixed * shifted, dim=1, keepdim=True))
    return torch.cat(costs, dim=1)


def _axis_samples(start: float, bin_size: float, bins: int, grid: int, size: int):
    """Sample positions along one axis of a box and their bilinear taps, torchvision's border rules.

    Returns (valid, low, high, w_low, w_high), each of length ``bins * grid``, bin-major.
    """
    pos = [start + b * bin_size + (i + 0.5) * bin_size / grid for b in range(bins) for i in range(grid)]
    valid, low, high, w_low, w_high = [], [], [], [], []
    for p in pos:
        valid.append(-1.0 <= p <= size)
        p = max(p, 0.0)
        lo = int(p)
        if lo >= size - 1:
            lo = hi = size - 1
            p = float(lo)
        else:
            hi = lo + 1
        low.append(lo)
        high.append(hi)
        w_high.append(p - lo)
        w_low.append(1.0 - (p - lo))
    return valid, low, high, w_low, w_high


def roi_align_loop(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign one box at a time (torchvision's kernel, written out).

    For each box the sample points of every bin are listed along y and x, each sample is read by
    bilinear interpolation from its four neighbours (zero outside [-1, size]), and the samples of each
    bin are averaged. ``input`` is (N, C, H, W), ``rois`` is (K, 5) rows of (batch index, x1, y1, x2,
    y2); returns (K, C, PH, PW).
    """
    pooled_h, pooled_w = output_size
    height, width = input.shape[-2:]
    offset = 0.5 if aligned else 0.0
    outputs = []

    def rounded(value: float) -> float:  # torchvision keeps box geometry in the input's dtype
        return float(torch.tensor(value, dtype=input.dtype))

    for b, x1, y1, x2, y2 in rois.double().tolist():
        feature = input[int(b)]
        start_w, start_h = rounded(x1 * spatial_scale - offset), rounded(y1 * spatial_scale - offset)
        roi_w = rounded(rounded(x2 * spatial_scale - offset) - start_w)
        roi_h = rounded(rounded(y2 * spatial_scale - offset) - start_h)
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(rounded(roi_h / pooled_h))
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(rounded(roi_w / pooled_w))
        if grid_h <= 0 or grid_w <= 0:
            outputs.append(input.new_zeros(input.shape[1], pooled_h, pooled_w))
            continue
        vy, y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_h, roi_h / pooled_h, pooled_h, grid_h, height)
        vx, x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_w, roi_w / pooled_w, pooled_w, grid_w, width)
        to_tensor = lambda v: torch.tensor(v, dtype=input.dtype, device=input.device)  # noqa: E731
        mask = to_tensor(vy)[:, None] * to_tensor(vx)[None, :]
        samples = 0
        for ys, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
            for xs, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
                taps = feature[:, ys][:, :, xs]  # (C, PH * grid_h, PW * grid_w)
                samples = samples + taps * (to_tensor(wy)[:, None] * to_tensor(wx)[None, :] * mask)
        bins = samples.reshape(-1, pooled_h, grid_h, pooled_w, grid_w)
        outputs.append(bins.sum(dim=(2, 4)) / (grid_h * grid_w))
    if not outputs:
        return input.new_zeros(0, input.shape[1], pooled_h, pooled_w)
    return torch.stack(outputs)
