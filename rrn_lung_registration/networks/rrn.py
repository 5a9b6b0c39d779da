"""The Recursive Refinement Network (He et al., 2021).

``RRN(moving, fixed)`` returns the displacement field ``ddf`` (B, 3, D, H, W) in voxels of the input grid
that registers ``moving`` to ``fixed`` (``warp(moving, ddf) ~= fixed``; axis convention in
:mod:`rrn_lung_registration.warp`). Inputs are (B, 1, D, H, W) of any size: they are padded at the far
end of each axis (edge values) to a multiple of ``size_multiple`` and the field is cropped back.
``RRN(pair)`` with one (B, 2, D, H, W) tensor (moving channel first, fixed last) is the same call, for
MONAI tooling that feeds a network one input.

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

from shared_ops import LocalCostCorrelation3d, _native
from shared_ops.architecture import RecordsArchitecture

__all__ = [
    "RRN",
    "FeaturePyramid",
    "DenseFlowEstimator",
    "DilatedRefiner",
    "conv3d_pieces",
    "split_pair",
    "upsample_field",
]

# Activations run channels-last ((B, D, H, W, C) in memory) through the network: oneDNN's CPU kernels then
# read and write them in place, where channels-first tensors are reordered to a blocked layout and back
# around every convolution.
CHANNELS_LAST = torch.channels_last_3d


def _conv(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation)


def upsample_field(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """Trilinear upsampling of a field in voxels by an integer factor; values are scaled with the grid."""
    return factor * F.interpolate(ddf, scale_factor=factor, mode="trilinear", align_corners=True)


def split_pair(pair: torch.Tensor, in_channels: int, name: str = "RRN") -> tuple[torch.Tensor, torch.Tensor]:
    """``(moving, fixed)`` from a (B, 2 C, D, H, W) pair, ``C = in_channels``: moving first, fixed last."""
    if pair.ndim != 5 or pair.shape[1] != 2 * in_channels:
        raise ValueError(
            f"{name} called with one tensor expects the pair (B, {2 * in_channels}, D, H, W) (moving channels "
            f"first, then fixed), got {tuple(pair.shape)}; or pass moving and fixed separately."
        )
    return pair[:, :in_channels], pair[:, in_channels:]


def _needs_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _fast_inference(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module`` may run its CPU inference path on ``x``: float32, no autograd, no autocast, and not
    while ``torch.jit.trace`` records the network (the trace keeps the portable direct path)."""
    return (
        x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not _needs_autograd(x, module)
    )


def _onednn_float32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
    )


def _cpu_conv3d(x, weight, bias, stride, padding, dilation):
    """``F.conv3d`` through oneDNN whatever the size: PyTorch sends small batch-1 inputs (fewer than 20480
    values in their first four dimensions) to a slower im2col loop, e.g. dense-block outputs at 8^3."""
    padding = [padding] * 3 if isinstance(padding, int) else list(padding)
    return torch.mkldnn_convolution(x, weight, bias, padding, list(stride), list(dilation), 1)


def _conv_sum(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    slope: float | None,
) -> torch.Tensor:
    """``leaky_relu(conv3d(torch.cat(inputs, dim=1), weight, bias, ...), slope)``, one convolution per input."""
    weights = torch.split(weight, [x.shape[1] for x in inputs], dim=1) if len(inputs) > 1 else (weight,)
    conv = _cpu_conv3d if _onednn_float32(inputs[0], weight) else F.conv3d
    out = None
    for x, w in zip(inputs, weights, strict=True):
        part = conv(x, w, bias if out is None else None, stride, padding, dilation)
        out = part if out is None else out.add_(part)
    if slope is None:
        return out
    # in place where autograd allows it: LeakyReLU differentiates from its output for positive slopes
    return F.leaky_relu_(out, slope) if slope > 0 or not torch.is_grad_enabled() else F.leaky_relu(out, slope)


def conv3d_pieces(inputs: Sequence[torch.Tensor], conv: nn.Conv3d, slope: float | None = None) -> torch.Tensor:
    """``leaky_relu(conv(torch.cat(inputs, dim=1)), slope)`` without building the concatenation.

    A convolution of channel-concatenated inputs is the sum of the convolutions of each input with its
    slice of the weight's input channels, so dense blocks keep every output as its own tensor: nothing is
    copied as the block grows, and autograd stores each output once instead of in every concatenation.
    The sum is accumulated in place, and the activation runs in place on it, also under autograd
    (LeakyReLU with a positive slope differentiates from its output).

    Args:
        inputs: tensors (B, C_i, D, H, W) with ``sum(C_i) == conv.in_channels``, best channels-last.
        conv: a 3-D convolution with ``groups == 1`` and zero padding.
        slope: LeakyReLU negative slope, ``None`` for no activation.

    Returns:
        (B, conv.out_channels, D', H', W'), channels-last for channels-last inputs.
    """
    _check_pieces(inputs, conv)
    return _conv_sum(inputs, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, slope)


def _check_pieces(inputs: Sequence[torch.Tensor], conv: nn.Conv3d) -> None:
    sizes = [x.shape[1] for x in inputs]
    if sum(sizes) != conv.in_channels or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(
            f"inputs with {sizes} channels do not match {conv} (needs groups 1, zero padding, "
            f"{conv.in_channels} input channels)."
        )


def _cat_channels_last(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)`` in channels-last memory format, whatever the inputs' formats."""
    if len(tensors) == 1:
        return tensors[0].contiguous(memory_format=CHANNELS_LAST)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return torch.cat([t.contiguous(memory_format=CHANNELS_LAST) for t in tensors], dim=1)
    return _cat_padded(tensors, 0)


# --------------------------------------------------------------------------------------------------
# CPU inference path: activations live in channels-last buffers with a zero border ("padded buffers"),
# so that convolutions read them with no padding of their own and no copy, and the 3x3x3 convolutions
# of the dense blocks and the refiner run as Winograd convolutions.


def _padded_empty(like: torch.Tensor, channels: int, size: Sequence[int], pad: int) -> torch.Tensor:
    """A channels-last buffer (B, channels, *(size + 2 pad)) whose border of width ``pad`` is zero."""
    shape = (like.shape[0], channels, *(s + 2 * pad for s in size))
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=CHANNELS_LAST)
    if pad:
        for dim in (2, 3, 4):
            out.narrow(dim, 0, pad).zero_()
            out.narrow(dim, out.shape[dim] - pad, pad).zero_()
    return out


def _interior(buffer: torch.Tensor, pad: int) -> torch.Tensor:
    """The view of a padded buffer without its border."""
    if not pad:
        return buffer
    return buffer[:, :, pad:-pad, pad:-pad, pad:-pad]


def _cat_padded(tensors: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)`` into a padded buffer with a zero border of width ``pad`` (no autograd)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    out = _padded_empty(tensors[0].to(dtype), sum(t.shape[1] for t in tensors), tensors[0].shape[2:], pad)
    inner, start = _interior(out, pad), 0
    for t in tensors:
        inner[:, start : start + t.shape[1]].copy_(t)
        start += t.shape[1]
    return out


# Winograd F(4x4x4, 3x3x3) at the points (0, 1, -1, 2, -1/2, inf): each 4^3 output tile of a 3x3x3
# convolution is A^T [(G w G^T) * (B^T x B)] A over the 6^3 input tile x, so the convolution becomes 216
# independent matrix products (tiles x input channels) @ (input channels x output channels) with 8x
# fewer multiplications than the direct convolution, plus the transforms. These points keep the
# float32 error within a few times that of the direct convolution (about 5e-6 of the output's range,
# against 4e-5 for the usual points 0, +-1, +-2). The transforms below are B^T and A^T along the first
# dimension of their arguments, written out; G is applied to the weights by a matrix product.
_WINOGRAD_G = (
    (1.0, 0.0, 0.0),
    (-1 / 3, -1 / 3, -1 / 3),
    (1 / 3, -1 / 3, 1 / 3),
    (1 / 15, 2 / 15, 4 / 15),
    (-16 / 15, 8 / 15, -4 / 15),
    (0.0, 0.0, 1.0),
)
# the transformed element at point (1, 1, 1) reaches every output of a tile with weight 1: where the
# transforms are tensor operations, the bias goes there
_WINOGRAD_ONES = 43
# bytes of scratch per block of the tensor-operation transforms, which work on blocks of tile rows that stay
# in cache
_WINOGRAD_BLOCK_BYTES = 16 << 20
# tiles per batched matrix product: enough rows for the products to run near full speed
_WINOGRAD_SLAB_TILES = 256
# input channels per transform and product: bounds the transformed tiles to 216 x 256 x 128 floats (28 MB)
_WINOGRAD_CHUNK = 128
# convolutions of one input with at most this many input and output channels run tile by tile in C
_WINOGRAD_FUSED_CHANNELS = 32


def _winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> the transformed weights (216, C_in, C_out)."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
    kron = torch.kron(torch.kron(g, g), g).to(weight)  # (216, 27)
    c_out, c_in = weight.shape[:2]
    return (kron @ weight.reshape(c_out * c_in, 27).T).view(216, c_out, c_in).transpose(1, 2).contiguous()


def _input_transform(x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = sum_m B^T[i, m] x[m]`` along the first dimension (size 6) of the views ``x`` and ``out``."""
    x0, x1, x2, x3, x4, x5 = x.unbind(0)
    p, q = torch.sub(x1, x3), torch.sub(x4, x2)
    torch.add(q, p, alpha=-0.5, out=out[3])
    torch.add(q, p, alpha=2, out=out[4])
    t = torch.sub(x0, x2)
    torch.add(t, q, out=out[0]).add_(p, alpha=1.5)
    torch.add(x5, p, out=out[5]).sub_(x3).add_(q, alpha=-1.5)
    torch.add(x2, x3, out=t)
    torch.sub(q, p, out=out[1]).add_(t, alpha=-1.5)
    torch.sub(x3, x2, out=t)
    torch.add(q, p, out=out[2]).add_(t, alpha=-1.5)


def _output_transform(m: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j] = sum_a A^T[j, a] m[a]`` along the first dimension (6 -> 4) of the views ``m`` and ``out``."""
    m0, m1, m2, m3, m4, m5 = m.unbind(0)
    s, d = torch.add(m1, m2), torch.sub(m1, m2)
    torch.add(m0, s, out=out[0]).add_(m3).add_(m4)
    torch.add(d, m3, alpha=2, out=out[1]).add_(m4, alpha=-0.5)
    torch.add(s, m3, alpha=4, out=out[2]).add_(m4, alpha=0.25)
    torch.add(d, m3, alpha=8, out=out[3]).add_(m4, alpha=-0.125).add_(m5)


def _winograd_applicable(size: Sequence[int], conv: nn.Conv3d) -> bool:
    """Whether a 'same' 3x3x3 convolution on a volume of ``size`` runs as Winograd convolution here."""
    d = conv.dilation[0]
    return (
        conv.kernel_size == (3, 3, 3)
        and conv.stride == (1, 1, 1)
        and conv.dilation == (d, d, d)
        and conv.padding == (d, d, d)
        and all(s % (4 * d) == 0 for s in size)
        and min(conv.in_channels, conv.out_channels) >= 16
        and size[0] * size[1] * size[2] >= 16**3
    )


def _winograd_conv3d(
    inputs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int,
    slope: float | None,
    out_pad: int,
) -> torch.Tensor:
    """Winograd 'same' 3x3x3 convolution of padded buffers, then LeakyReLU; no autograd.

    Args:
        inputs: padded buffers (B, C_i, S + 2 dilation) whose border is zero, S divisible by 4 dilation;
            their channel concatenation is the convolution's input.
        weight, bias: (C_out, sum C_i, 3, 3, 3) and (C_out,) or None.
        dilation: of the convolution (its padding is the same).
        slope: LeakyReLU slope, or None.
        out_pad: border width of the returned buffer.

    Returns:
        The padded buffer (B, C_out, S + 2 out_pad).

    With dilation ``d`` an output tile is 4 voxels spaced by ``d`` along each axis: output index
    ``o = q 4d + j d + r`` (tile ``q``, position ``j`` in the tile, residue ``r < d``). The work goes in
    slabs of about ``_WINOGRAD_SLAB_TILES`` tiles (tile rows along D and H, 4 planes or rows of one residue
    each): the input transform writes the slab's transformed tiles ``V`` (216, tiles, C_in), one batched
    matrix product gives ``M = V @ U`` (216, tiles, C_out), and the output transform (bias and LeakyReLU
    included) writes the output voxels. The transforms run in C (:class:`shared_ops._native.Conv3dKernels`)
    where the native kernels are available, else as tensor operations (:func:`_torch_input_slab`,
    :func:`_torch_output_slab`). With the native kernels, a convolution of one input and at most
    ``_WINOGRAD_FUSED_CHANNELS`` channels runs whole in C, tile by tile.
    """
    first = inputs[0]
    d = dilation
    size = [s - 2 * d for s in first.shape[2:]]
    q_d, q_h, q_w = (s // (4 * d) for s in size)
    c_out = weight.shape[0]
    u = _winograd_weight(weight)
    out = _padded_empty(first, c_out, size, out_pad)
    kernels = _native.conv3d_kernels()
    if kernels is not None and len(inputs) == 1 and max(weight.shape[:2]) <= _WINOGRAD_FUSED_CHANNELS:
        # few channels: the whole convolution tile by tile in C, products included
        u = F.pad(u, (0, -c_out % 16)).contiguous()
        for b in range(first.shape[0]):
            src, dst = first[b].permute(1, 2, 3, 0), _interior(out, out_pad)[b].permute(1, 2, 3, 0)
            for r_d in range(d):
                kernels.convolution(src[r_d:], u, dst[r_d:], q_d, q_h, q_w, d, bias, slope)
        return out
    # a slab: rows_d tile rows along D of rows_h tile rows along H (every residue of each)
    per_h = d * q_w * d  # tiles in one tile row along H
    rows_h = min(q_h, max(1, _WINOGRAD_SLAB_TILES // per_h))
    rows_d = 1 if rows_h < q_h else min(q_d, max(1, _WINOGRAD_SLAB_TILES // (q_h * per_h)))
    per_row = rows_h * per_h  # tiles in one tile row along D of a slab
    # the input channels go through the transform and the products in chunks (split pieces)
    chunks, start = [], 0
    for x in inputs:
        for c0 in range(0, x.shape[1], _WINOGRAD_CHUNK):
            c = min(_WINOGRAD_CHUNK, x.shape[1] - c0)
            chunks.append((x, c0, c, start))
            start += c
    v_all = first.new_empty(216 * rows_d * per_row * max(c for _, _, c, _ in chunks))
    m_all = first.new_empty(216 * rows_d * per_row * c_out)
    for b in range(first.shape[0]):
        dst = _interior(out, out_pad)[b].permute(1, 2, 3, 0)  # (D, H, W, C_out) view
        slabs = [
            (t_d * 4 * d + r_d, min(rows_d, q_d - t_d), h0 * 4 * d, min(rows_h, q_h - h0))
            for r_d in range(d)
            for t_d in range(0, q_d, rows_d)
            for h0 in range(0, q_h, rows_h)
        ]
        for z0, r, y0, n in slabs:  # first plane and row, tile rows along D and H
            tiles = r * n * per_h
            mr = m_all[: 216 * tiles * c_out].view(216, tiles, c_out)
            for x, c0, c, start in chunks:
                xv = x[b, c0 : c0 + c].permute(1, 2, 3, 0)[z0:, y0:]  # (D, H, W, c) from the slab's origin
                v = v_all[: 216 * tiles * c].view(216, tiles, c)
                if kernels is not None:
                    kernels.input_transform(xv, v, n, q_w, d)
                else:
                    _torch_input_slab(xv, v, r, n, q_w, d)
                if start == 0:
                    torch.bmm(v, u[:, start : start + c], out=mr)
                else:
                    mr.baddbmm_(v, u[:, start : start + c])
            if kernels is not None:
                kernels.output_transform(mr, dst[z0:, y0:], n, q_w, d, bias, slope)
            else:
                _torch_output_slab(mr, dst[z0:, y0:], r, n, q_w, d, bias, slope)
    return out


def _torch_input_slab(xv: torch.Tensor, v: torch.Tensor, r: int, q_h: int, q_w: int, d: int) -> None:
    """The input transform of one slab as tensor operations (see :func:`_winograd_conv3d`).

    ``xv`` (D, H, W, c) starts at the slab's first input voxel; ``v`` (216, r * q_h * d * q_w * d, c)
    receives the transformed tiles, ordered (row, q_h, r_h, q_w, r_w). Blocks of tile rows along H keep the scratch of
    the three one-dimensional stages in cache.
    """
    c, width, sx = xv.shape[3], xv.shape[2], xv.stride()
    v = v.view(6, 6, 6, r, q_h, d, q_w, d, c)
    row_bytes = 36 * r * width * c * xv.element_size()
    rows_h = max(1, min(q_h, _WINOGRAD_BLOCK_BYTES // row_bytes))
    for r_h in range(d):
        for h0 in range(0, q_h, rows_h):
            n = min(rows_h, q_h - h0)
            # stage D: (6, r tile rows, 4n + 2 rows of H spaced by d, W + 2d, c)
            src = xv[0, h0 * 4 * d + r_h].as_strided(
                (6, r, 4 * n + 2, width, c), (d * sx[0], 4 * d * sx[0], d * sx[1], sx[2], sx[3])
            )
            s1 = xv.new_empty(src.shape)
            _input_transform(src, s1)
            # stage H: tiles of 6 rows, step 4 -> (6_h, 6_d, r, n, W + 2d, c)
            t1 = s1.stride()
            src = s1.as_strided((6, 6, r, n, width, c), (t1[2], t1[0], t1[1], 4 * t1[2], t1[3], t1[4]))
            s2 = xv.new_empty(src.shape)
            _input_transform(src, s2)
            # stage W: tiles of 6 columns spaced by d, step 4d, into v[a_d, a_h, a_w, r, q_h, r_h, q_w, r_w, c]
            t2 = s2.stride()
            src = s2.as_strided(
                (6, 6, 6, r, n, q_w, d, c), (d * t2[4], t2[1], t2[0], t2[2], t2[3], 4 * d * t2[4], t2[4], t2[5])
            )
            _input_transform(src, v[:, :, :, :, h0 : h0 + n, r_h].permute(2, 0, 1, 3, 4, 5, 6, 7))


def _torch_output_slab(
    m: torch.Tensor,
    dst: torch.Tensor,
    r: int,
    q_h: int,
    q_w: int,
    d: int,
    bias: torch.Tensor | None,
    slope: float | None,
) -> None:
    """The output transform of one slab as tensor operations, then bias and LeakyReLU.

    ``m`` (216, tiles, C_out) holds the products; ``dst`` (D, H, W, C_out) starts at the slab's first
    output voxel.
    """
    c_out, so = m.shape[2], dst.stride()
    if bias is not None:
        m[_WINOGRAD_ONES].add_(bias)
    mv = m.view(6, 6, 6, r, q_h, d, q_w, d, c_out)
    rows_h = max(1, min(q_h, _WINOGRAD_BLOCK_BYTES // (36 * r * q_w * d * c_out * m.element_size())))
    for r_h in range(d):
        for h0 in range(0, q_h, rows_h):
            n = min(rows_h, q_h - h0)
            y1 = m.new_empty(4, 6, 6, r, n, q_w, d, c_out)  # (j_w, a_d, a_h, ...)
            _output_transform(mv[:, :, :, :, h0 : h0 + n, r_h].permute(2, 0, 1, 3, 4, 5, 6, 7), y1)
            y2 = m.new_empty(4, 4, 6, r, n, q_w, d, c_out)  # (j_h, j_w, a_d, ...)
            _output_transform(y1.permute(2, 0, 1, 3, 4, 5, 6, 7), y2)
            # (j_d, j_h, j_w, r, q_h, q_w, r_w, C) of the output planes (4 t + j_d) d
            target = dst[0, h0 * 4 * d + r_h].as_strided(
                (4, 4, 4, r, n, q_w, d, c_out),
                (d * so[0], d * so[1], d * so[2], 4 * d * so[0], 4 * d * so[1], 4 * d * so[2], so[2], so[3]),
            )
            _output_transform(y2.permute(2, 0, 1, 3, 4, 5, 6, 7), target)
            if slope is not None:
                F.leaky_relu_(target, slope)


def _conv_padded(inputs: Sequence[torch.Tensor], conv: nn.Conv3d, slope: float | None, out_pad: int) -> torch.Tensor:
    """``leaky_relu(conv(cat(inputs)), slope)`` of padded buffers whose border is ``conv.padding``.

    Returns a padded buffer with a zero border of width ``out_pad``: Winograd where it applies, a C kernel
    for one input channel (the pyramid's first convolution), else one oneDNN convolution per input (with
    no padding of its own: the border is the padding).
    """
    _check_pieces(inputs, conv)
    pad = conv.padding[0]
    size = [s - 2 * pad for s in inputs[0].shape[2:]]
    if _winograd_applicable(size, conv):
        return _winograd_conv3d(inputs, conv.weight, conv.bias, conv.dilation[0], slope, out_pad)
    kernels = _native.conv3d_kernels()
    if kernels is not None and _single_channel_applicable(conv):
        return _single_channel_conv3d(inputs[0], conv, slope, out_pad, kernels)
    out = _conv_sum(inputs, conv.weight, conv.bias, conv.stride, 0, conv.dilation, slope)
    if not out_pad:
        return out
    padded = _padded_empty(out, out.shape[1], out.shape[2:], out_pad)
    _interior(padded, out_pad).copy_(out)
    return padded


def _single_channel_applicable(conv: nn.Conv3d) -> bool:
    """Whether ``conv`` is a 3x3x3 convolution of one input channel with padding 1 and one stride."""
    return (
        conv.in_channels == 1
        and conv.kernel_size == (3, 3, 3)
        and conv.dilation == (1, 1, 1)
        and conv.padding == (1, 1, 1)
        and len(set(conv.stride)) == 1
    )


def _single_channel_conv3d(
    x: torch.Tensor, conv: nn.Conv3d, slope: float | None, out_pad: int, kernels: _native.Conv3dKernels
) -> torch.Tensor:
    """``leaky_relu(conv(x), slope)`` of a one-channel padded buffer (border 1) by a direct C kernel: the
    first convolution of the pyramid, written straight into its padded output buffer (oneDNN's result would
    have to be copied into one)."""
    stride = conv.stride[0]
    size = [(s - 3) // stride + 1 for s in x.shape[2:]]
    c_out = conv.out_channels
    out = _padded_empty(x, c_out, size, out_pad)
    w = F.pad(conv.weight.reshape(c_out, 27).T, (0, -c_out % 8)).contiguous()  # (27, C_out rounded up to 8)
    bias = None if conv.bias is None else conv.bias.contiguous()
    for b in range(x.shape[0]):
        dst = _interior(out, out_pad)[b].permute(1, 2, 3, 0)
        kernels.single_channel(x[b].permute(1, 2, 3, 0), w, dst, stride, bias, slope)
    return out


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


def _traced_grid_only(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, but a traced graph (``torch.jit.trace``, e.g. ``ckpt_export --use_trace``) records its grid.

    A traced RRN holds its grid's sizes as constants (MONAI ``Warp``'s reference grid, padding, buffers) and would
    return a wrong field on any other grid. ``expand`` with the sizes seen while tracing makes it fail there
    instead ("The expanded size of the tensor (traced) must match the existing size (given)"); batch size and
    channels stay free.
    """
    return x.expand(-1, -1, *[int(size) for size in x.shape[2:]])


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
        fast = _fast_inference(x, self)  # padded buffers (border 1) and Winograd convolutions
        x = _cat_padded([x], 1) if fast else x.contiguous(memory_format=CHANNELS_LAST)
        for index, level in enumerate(self.levels[: depth if depth is not None else len(self.levels)]):
            for conv, activation in zip(level[0::2], level[1::2], strict=True):
                if fast:
                    x = _conv_padded([x], conv, activation.negative_slope, 1)
                else:
                    x = conv3d_pieces([x], conv, activation.negative_slope)
            if keep is None or index in keep:
                features.append(_interior(x, 1) if fast else x)
            else:
                features.append(None)
        return features


class DenseFlowEstimator(nn.Module):
    """Densely connected 3x3x3 convs (each reads the input and every earlier output), then a 3-channel conv.

    ``forward(x)`` returns ``(field, context)``: the field (B, 3, ...) and the last hidden output. ``x`` is
    the input (B, C, ...) or a list of tensors whose channel concatenation it is; such a list is emptied
    once concatenated, so that the caller's list does not keep its tensors alive through the block. No
    concatenation of the block's outputs is built: every layer sums the convolutions of the input and of
    each earlier output with the matching slices of its weight (:func:`conv3d_pieces`). On CPU without
    autograd the block runs on padded buffers and Winograd convolutions (:func:`_winograd_conv3d`).
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
        inputs = [x] if isinstance(x, torch.Tensor) else list(x)
        if isinstance(x, list):
            x.clear()
        del x
        if _fast_inference(inputs[0], self):
            return self._forward_padded(inputs)
        pieces = [_cat_channels_last(inputs)]  # one tensor: the first layer reads it at full width
        del inputs
        out = pieces[0]
        for i, (conv, activation) in enumerate(self.layers):
            out = conv3d_pieces(pieces, conv, activation.negative_slope)
            if i < len(self.layers) - 1:
                pieces.append(out)
        del pieces  # the block's outputs are freed before the field conv, all but the context
        return conv3d_pieces([out], self.to_field), out

    def _forward_padded(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU inference: the input and every output in padded buffers (border 1), read by Winograd convs."""
        pad = self.layers[0][0].padding[0]
        pieces = [_cat_padded(inputs, pad)]
        inputs.clear()
        out = pieces[0]
        for i, (conv, activation) in enumerate(self.layers):
            out = _conv_padded(pieces, conv, activation.negative_slope, pad)
            if i < len(self.layers) - 1:
                pieces.append(out)
        del pieces
        return _conv_padded([out], self.to_field, None, 0), _interior(out, pad)


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
        modules = list(self.net)
        layers = [
            (conv, modules[i + 1].negative_slope if i + 1 < len(modules) else None)
            for i, conv in enumerate(modules)
            if isinstance(conv, nn.Conv3d)
        ]
        if _fast_inference(context, self):
            # CPU inference: each conv reads a buffer padded by its own dilation and writes one padded by
            # the next conv's
            pads = [conv.padding[0] for conv, _ in layers] + [0]
            x = _cat_padded([context, field], pads[0])
            for (conv, slope), pad in zip(layers, pads[1:], strict=True):
                x = _conv_padded([x], conv, slope, pad)
            return field + x
        x = _cat_channels_last([context, field])
        for conv, slope in layers:
            x = conv3d_pieces([x], conv, slope)
        return field + x


class RRN(RecordsArchitecture, nn.Module):
    """Recursive Refinement Network: ``forward(moving, fixed) -> ddf`` (B, 3, D, H, W) in voxels.

    ``forward(pair)`` with one (B, 2 in_channels, D, H, W) tensor, moving channels first and fixed last,
    is the same as ``forward(pair[:, :in_channels], pair[:, in_channels:])``.

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

    Every argument but ``field_init_std`` is recorded in the state dict (:mod:`shared_ops.architecture`):
    weights load only into an RRN built with the same values, otherwise ``load_state_dict`` raises
    ``ArchitectureMismatchError`` naming each differing argument with both values.
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
        self.record_architecture(
            in_channels=in_channels,
            pyramid_channels=pyramid_channels,
            flow_levels=flow_levels,
            radius=radius,
            normalize=normalize,
            use_cost_volume=use_cost_volume,
            estimator_channels=estimator_channels,
            refiner_channels=refiner_channels,
            refiner_dilations=refiner_dilations,
            pyramid_slope=pyramid_slope,
            estimator_slope=estimator_slope,
            cost_slope=cost_slope,
        )
        flow_levels = tuple(int(level) for level in flow_levels)
        if not flow_levels or list(flow_levels) != sorted(set(flow_levels), reverse=True):
            raise ValueError(f"flow_levels must be distinct pyramid levels from coarse to fine, got {flow_levels}.")
        if flow_levels[0] >= len(pyramid_channels) or flow_levels[-1] < 0:
            raise ValueError(f"flow_levels {flow_levels} must lie in [0, {len(pyramid_channels) - 1}].")
        if any(a - b != 1 for a, b in zip(flow_levels[:-1], flow_levels[1:], strict=True)):
            raise ValueError(f"flow_levels must be consecutive (each finer level doubles the grid), got {flow_levels}.")
        self.in_channels = in_channels
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
        self, moving: torch.Tensor, fixed: torch.Tensor | None = None, return_levels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Field registering ``moving`` to ``fixed``; with ``return_levels`` also the per-level fields.

        Args:
            moving, fixed: (B, C, D, H, W), same shape, ``C = in_channels``. With ``fixed=None``, ``moving``
                is the pair as one (B, 2 C, D, H, W) tensor, moving image first (channels ``:C``), fixed image
                last (channels ``C:``): the single 2-channel ``image`` input that the bundle metadata
                declares for MONAI tooling (``verify_net_in_out``, ``ckpt_export``, MONAI Deploy).
            return_levels: also return the fields of every flow level, coarse to fine, each in voxels of
                its own level's grid (B, 3, S' / 2^(l+1)) where S' is the padded input size.
        """
        if fixed is None:
            moving, fixed = split_pair(moving, self.in_channels, type(self).__name__)
        self._check_inputs(moving, fixed)
        if torch.jit.is_tracing():
            moving, fixed = _traced_grid_only(moving), _traced_grid_only(fixed)
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
                inputs = [self._matching(f, self.feature_warp(m, field)), f, field]
                inputs.append(self.context_upsamplers[str(level)](context))
            # the estimator empties the list: the inputs, the coarser context and the level's features are
            # freed as soon as they are concatenated
            del f, m
            context = None
            increment, context = self.estimators[str(level)](inputs)
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
        cost = self.correlation(fixed, moving)
        if _needs_autograd(cost, self):
            return self.cost_activation(cost)
        return F.leaky_relu_(cost, self.cost_activation.negative_slope)

    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        if moving.ndim != 5 or fixed.ndim != 5:
            raise ValueError(
                f"RRN expects moving and fixed as (B, C, D, H, W), got {tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have the same shape.")
        if torch.jit.is_tracing():  # a traced check would be a constant of the example input
            return
        if not torch.isfinite(moving).all() or not torch.isfinite(fixed).all():
            raise ValueError("RRN inputs contain NaN or infinite values.")
