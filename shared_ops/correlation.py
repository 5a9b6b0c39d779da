"""Normalised local cost correlation between two 3-D feature volumes.

Shapes and conventions (stated once, used everywhere in this module):

* Inputs ``fixed`` and ``moving`` are ``(B, C, D, H, W)``.
* The output is ``(B, K, D, H, W)`` with ``K = (2r + 1) ** 3``. Channel ``k`` holds, at voxel ``x``,
  ``mean_c fixed[c, x] * moving[c, x + d_k]``, and zero where ``x + d_k`` falls outside the volume.
* Displacements ``d = (dz, dy, dx)`` are along ``(D, H, W)``, each in ``[-r, r]``, and channels are
  ordered with ``dz`` slowest and ``dx`` fastest::

      k = ((dz + r) * (2r + 1) + (dy + r)) * (2r + 1) + (dx + r)

  :func:`correlation_displacements` returns the ``(K, 3)`` table of ``(dz, dy, dx)`` in that order.

Implementation. Two implementations of the raw correlation and of its hand-written backward pass sit
behind one autograd function, which saves only the two inputs for the backward pass:

* Native (CPU, float32 and float64): a fused C kernel (``shared_ops/_native/correlation.c``, compiled with
  OpenMP on first use, see :mod:`shared_ops._native`). Each thread owns rows of ``W`` output voxels and
  computes all ``K`` displacements of a row at once, vectorised along ``W``, reading each input row from a
  small per-thread copy; nothing volume-sized is allocated besides the output (or the input gradients).
  It runs on ``torch.get_num_threads()`` threads (fewer on volumes too small to share out).
* PyTorch (every other device and dtype, and the CPU fallback): the volume is processed in slabs along
  ``D`` that fit in cache; for each slab the ``(2r + 1) ** 3`` shifts are visited one at a time on the
  overlapping windows of the two inputs (views, no padding), with one slab-sized product buffer, so peak
  memory is the output plus that buffer and no shifted copy of ``moving`` is ever made.

The native kernels are used whenever they apply and could be built; ``SHARED_OPS_NATIVE=0`` in the
environment forces the PyTorch implementation, and a missing compiler or a failed build falls back to it
with one warning.
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import nn

from shared_ops import _native

__all__ = [
    "LocalCostCorrelation3d",
    "NORMALIZE_MODES",
    "correlation_displacements",
    "local_cost_correlation_3d",
    "normalize_features",
]

NormalizeMode = Literal["channel", "global", "none"]
NORMALIZE_MODES: tuple[str, ...] = ("channel", "global", "none")

# Bytes of one slab of ``fixed`` (all batches and channels) on each device type. On CPU the slab and
# its temporaries should stay in the L2/L3 caches; on GPUs larger slabs mean fewer, fuller kernels.
_SLAB_BYTES = {"cpu": 2 << 20}
_SLAB_BYTES_DEFAULT = 512 << 20


def correlation_displacements(radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer displacements ``(dz, dy, dx)`` of each output channel, shape ``(K, 3)``, channel order."""
    _check_radius(radius)
    span = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(span, span, span)), dtype=torch.long, device=device)


def normalize_features(
    fixed: torch.Tensor, moving: torch.Tensor, mode: NormalizeMode = "channel", eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise two feature volumes ``(B, C, D, H, W)`` before correlation.

    Modes:
        ``"channel"`` (paper): each voxel's feature vector is centred and divided by its standard
            deviation over channels, ``(f - mean_c f) / sqrt(var_c f + eps)`` with the population
            variance, separately for each image. The correlation of a feature vector with itself is then
            ``var / (var + eps)``, just below 1, so the cost volume holds Pearson coefficients.
        ``"global"`` (released code): one scalar mean and one scalar (unbiased) standard deviation per
            sample over ``C, D, H, W`` for each image, both averaged between the two images; the two
            images are centred by the shared mean and divided by ``shared std + eps``.
        ``"none"``: inputs returned unchanged.
    """
    if mode == "none":
        return fixed, moving
    if mode == "channel":
        return tuple(  # type: ignore[return-value]
            (x - x.mean(dim=1, keepdim=True)) * torch.rsqrt(x.var(dim=1, unbiased=False, keepdim=True) + eps)
            for x in (fixed, moving)
        )
    if mode == "global":
        dims = (1, 2, 3, 4)
        mean = 0.5 * (fixed.mean(dim=dims, keepdim=True) + moving.mean(dim=dims, keepdim=True))
        std = 0.5 * (fixed.std(dim=dims, keepdim=True) + moving.std(dim=dims, keepdim=True))
        return (fixed - mean) / (std + eps), (moving - mean) / (std + eps)
    raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}.")


def local_cost_correlation_3d(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    radius: int = 2,
    normalize: NormalizeMode = "channel",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Local cost correlation volume of ``fixed`` against ``moving`` within ``radius`` voxels.

    Args:
        fixed: features of the fixed image, ``(B, C, D, H, W)``.
        moving: features of the (warped) moving image, same shape as ``fixed``.
        radius: search radius ``r`` in voxels along each axis (``0`` gives the plain voxelwise product).
        normalize: feature normalisation applied first, see :func:`normalize_features`.
        eps: stabiliser of the normalisation.

    Returns:
        ``(B, (2r + 1) ** 3, D, H, W)``; channel order as in the module docstring.

    Inputs of different floating dtypes are promoted to a common dtype.
    """
    _check_inputs(fixed, moving)
    _check_radius(radius)
    dtype = torch.promote_types(fixed.dtype, moving.dtype)
    fixed, moving = normalize_features(fixed.to(dtype), moving.to(dtype), normalize, eps)
    if torch.jit.is_tracing():
        # plain tensor operations, so that a traced model (TorchScript export) holds no Python call
        return _correlation_forward(fixed, moving, radius)
    return _LocalCorrelation.apply(fixed, moving, radius)


class LocalCostCorrelation3d(nn.Module):
    """Module form of :func:`local_cost_correlation_3d`; ``forward(fixed, moving)``."""

    def __init__(self, radius: int = 2, normalize: NormalizeMode = "channel", eps: float = 1e-5) -> None:
        super().__init__()
        _check_radius(radius)
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}.")
        self.radius = radius
        self.normalize = normalize
        self.eps = eps

    @property
    def out_channels(self) -> int:
        return (2 * self.radius + 1) ** 3

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return local_cost_correlation_3d(fixed, moving, self.radius, self.normalize, self.eps)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, normalize={self.normalize!r}"


# --------------------------------------------------------------------------------------------------
# Core: raw (un-normalised) correlation with a hand-written backward pass; the PyTorch implementation
# below, the native one in shared_ops._native.


def _native_kernels(x: torch.Tensor) -> _native.CorrelationKernels | None:
    """The native kernels if they serve ``x`` (CPU, float32/float64, enabled and built), else None."""
    if x.device.type != "cpu" or x.dtype not in _native.CorrelationKernels.DTYPES:
        return None
    return _native.correlation_kernels()


class _LocalCorrelation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fixed: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
        fixed, moving = fixed.contiguous(), moving.contiguous()
        ctx.save_for_backward(fixed, moving)
        ctx.radius = radius
        kernels = _native_kernels(fixed)
        if kernels is not None:
            return kernels.forward(fixed, moving, radius)
        return _correlation_forward(fixed, moving, radius)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        fixed, moving = ctx.saved_tensors
        need_fixed, need_moving = ctx.needs_input_grad[:2]
        grad_out = grad_out.to(fixed.dtype).contiguous()
        kernels = _native_kernels(fixed)
        backward = kernels.backward if kernels is not None else _correlation_backward
        grad_fixed, grad_moving = backward(grad_out, fixed, moving, ctx.radius, need_fixed, need_moving)
        return grad_fixed, grad_moving, None


def _slabs(x: torch.Tensor):
    """Yield ``(z0, z1)`` ranges along D whose slab of ``x`` stays within the device's slab budget."""
    batch, channels, depth, height, width = x.shape
    budget = _SLAB_BYTES.get(x.device.type, _SLAB_BYTES_DEFAULT)
    plane_bytes = batch * channels * height * width * x.element_size()
    step = max(1, budget // max(plane_bytes, 1))
    for z0 in range(0, depth, step):
        yield z0, min(depth, z0 + step)


def _overlap(start: int, stop: int, shift: int, size: int) -> tuple[slice, slice] | None:
    """Index ranges ``x`` in [start, stop) with ``x + shift`` in [0, size): (fixed slice, moving slice)."""
    lo, hi = max(start, -shift), min(stop, size - shift)
    if lo >= hi:
        return None
    return slice(lo, hi), slice(lo + shift, hi + shift)


def _shift_windows(shape: tuple[int, int, int], z0: int, z1: int, r: int):
    """For each displacement, in channel order: ``(k, fixed window, moving window)`` inside slab [z0, z1).

    Windows are tuples of slices over (D, H, W); displacements whose window is empty are skipped (their
    output stays zero).
    """
    depth, height, width = shape
    span = range(-r, r + 1)
    for k, (dz, dy, dx) in enumerate(itertools.product(span, span, span)):
        ranges = (_overlap(z0, z1, dz, depth), _overlap(0, height, dy, height), _overlap(0, width, dx, width))
        if None not in ranges:
            yield k, tuple(f for f, _ in ranges), tuple(m for _, m in ranges)


def _correlation_forward(fixed: torch.Tensor, moving: torch.Tensor, r: int) -> torch.Tensor:
    batch, channels, depth, height, width = fixed.shape
    out = fixed.new_zeros(batch, (2 * r + 1) ** 3, depth, height, width)
    for z0, z1 in _slabs(fixed):
        buffer = fixed.new_empty(batch * channels * (z1 - z0) * height * width)
        for k, fw, mw in _shift_windows((depth, height, width), z0, z1, r):
            f, m = fixed[(..., *fw)], moving[(..., *mw)]
            prod = torch.mul(f, m, out=buffer[: f.numel()].view(f.shape))
            torch.sum(prod, dim=1, out=out[(slice(None), k, *fw)])
    return out.div_(channels)


def _correlation_backward(
    grad_out: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    r: int,
    need_fixed: bool,
    need_moving: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    channels = fixed.shape[1]
    shape = tuple(fixed.shape[2:])
    grad_fixed = torch.zeros_like(fixed) if need_fixed else None
    grad_moving = torch.zeros_like(moving) if need_moving else None
    for z0, z1 in _slabs(fixed):
        g = grad_out[:, :, z0:z1] / channels  # d out_k / d (f * m) = 1 / C
        for k, fw, mw in _shift_windows(shape, z0, z1, r):
            gk = g[(slice(None), slice(k, k + 1), slice(fw[0].start - z0, fw[0].stop - z0), *fw[1:])]
            if grad_fixed is not None:  # grad_fixed[x] += g_k[x] * moving[x + d_k]
                grad_fixed[(..., *fw)].addcmul_(moving[(..., *mw)], gk)
            if grad_moving is not None:  # grad_moving[x + d_k] += g_k[x] * fixed[x]
                grad_moving[(..., *mw)].addcmul_(fixed[(..., *fw)], gk)
    return grad_fixed, grad_moving


# --------------------------------------------------------------------------------------------------
# Validation.


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}.")


def _check_inputs(fixed: torch.Tensor, moving: torch.Tensor) -> None:
    for name, x in (("fixed", fixed), ("moving", moving)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim != 5:
            raise ValueError(f"{name}: expected a 5-D tensor (B, C, D, H, W), got shape {tuple(x.shape)}.")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}.")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: expected at least one channel, got shape {tuple(x.shape)}.")
    if fixed.shape != moving.shape:
        raise ValueError(
            f"fixed and moving must have the same shape (B, C, D, H, W), got {tuple(fixed.shape)} "
            f"and {tuple(moving.shape)}."
        )
    if fixed.device != moving.device:
        raise ValueError(f"fixed and moving are on different devices: {fixed.device} and {moving.device}.")
