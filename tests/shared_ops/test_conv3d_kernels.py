"""The native 3x3x3 convolution kernels (shared_ops/_native/conv3d.c) called directly.

The convolutions they make up are checked against ``F.conv3d`` through the RRN inference path in
tests/rrn_lung_registration/test_rrn.py; here: the transforms against their definition, and the checks that
keep a call from reading or writing outside its tensors.
"""

from __future__ import annotations

import pytest
import torch

from shared_ops import _native


def _kernels() -> _native.Conv3dKernels:
    kernels = _native.conv3d_kernels()
    if kernels is None:
        pytest.skip(f"native kernels unavailable: {_native.load_error('conv3d')}")
    return kernels


def _matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """B^T and A^T of the C source, from the transforms' formulas applied to unit vectors."""
    eye = torch.eye(6, dtype=torch.float64)
    x0, x1, x2, x3, x4, x5 = eye.unbind(0)
    p, q = x1 - x3, x4 - x2
    b_t = torch.stack(
        [
            x0 - x2 + q + 1.5 * p,
            q - p - 1.5 * (x2 + x3),
            q + p - 1.5 * (x3 - x2),
            q - 0.5 * p,
            q + 2 * p,
            x5 + p - x3 - 1.5 * q,
        ]
    )
    s, e = x1 + x2, x1 - x2
    a_t = torch.stack([x0 + s + x3 + x4, e + 2 * x3 - 0.5 * x4, s + 4 * x3 + 0.25 * x4, e + 8 * x3 - 0.125 * x4 + x5])
    return b_t, a_t


def test_transform_matrices_are_a_winograd_pair():
    """A^T [(G w) * (B^T x)] equals the 1-D valid correlation of x (6) with w (3) for the G of rrn.py."""
    from rrn_lung_registration.networks.rrn import _WINOGRAD_G

    b_t, a_t = _matrices()
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    expected = torch.stack([x[i : i + 3] @ w for i in range(4)])
    torch.testing.assert_close(a_t @ ((g @ w) * (b_t @ x)), expected)


@pytest.mark.parametrize(("dilation", "channels"), [(1, 16), (2, 13), (1, 3)])
def test_input_transform_matches_its_definition(dilation, channels):
    kernels = _kernels()
    b_t, _ = _matrices()
    d, rows, tiles_h, tiles_w = dilation, 2, 2, 3
    gen = torch.Generator().manual_seed(dilation)
    x = torch.randn(4 * d * rows + 2 * d, 4 * d * tiles_h + 2 * d, 4 * d * tiles_w + 2 * d, channels, generator=gen)
    tiles = rows * tiles_h * d * tiles_w * d
    v = torch.empty(216, tiles, channels)
    kernels.input_transform(x, v, tiles_h, tiles_w, d)
    kron = torch.kron(torch.kron(b_t, b_t), b_t).float()  # (216, 216) over (a_d, a_h, a_w)
    t = 0
    for i in range(rows):
        for qh in range(tiles_h):
            for rh in range(d):
                for qw in range(tiles_w):
                    for rw in range(d):
                        z, y, w = i * 4 * d, qh * 4 * d + rh, qw * 4 * d + rw
                        taps = x[z : z + 5 * d + 1 : d, y : y + 5 * d + 1 : d, w : w + 5 * d + 1 : d]
                        torch.testing.assert_close(v[:, t], kron @ taps.reshape(216, channels), atol=1e-4, rtol=1e-5)
                        t += 1


def test_output_transform_adds_bias_and_activates():
    kernels = _kernels()
    _, a_t = _matrices()
    gen = torch.Generator().manual_seed(1)
    channels, tiles_h, tiles_w = 11, 2, 2
    m = torch.randn(216, tiles_h * tiles_w, channels, generator=gen)
    bias = torch.randn(channels, generator=gen)
    y = torch.zeros(4, 4 * tiles_h, 4 * tiles_w, channels)
    kernels.output_transform(m, y, tiles_h, tiles_w, 1, bias, 0.1)
    kron = torch.kron(torch.kron(a_t, a_t), a_t).float()  # (64, 216)
    for qh in range(tiles_h):
        for qw in range(tiles_w):
            expected = torch.nn.functional.leaky_relu(kron @ m[:, qh * tiles_w + qw] + bias, 0.1)
            got = y[:, 4 * qh : 4 * qh + 4, 4 * qw : 4 * qw + 4].reshape(64, channels)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_calls_that_would_reach_outside_their_tensors_are_refused():
    kernels = _kernels()
    x = torch.randn(10, 10, 10, 8)
    with pytest.raises(ValueError, match=r"activations \(10, 10, 10\) < slab \[6, 10, 14\]"):
        kernels.input_transform(x, torch.empty(216, 6, 8), 2, 3, 1)  # 3 tiles along W need 14 columns
    with pytest.raises(ValueError, match="contiguous channels"):
        kernels.input_transform(x.transpose(2, 3), torch.empty(216, 4, 8), 2, 2, 1)
    with pytest.raises(ValueError, match="multiple of 4 tiles"):
        kernels.input_transform(x, torch.empty(216, 6, 8), 2, 2, 1)
    with pytest.raises(ValueError, match="strides"):
        kernels.output_transform(torch.empty(216, 1, 4).expand(216, 4, 4), torch.empty(4, 8, 8, 4), 2, 2, 1)
    with pytest.raises(ValueError, match="float32"):
        kernels.output_transform(torch.empty(216, 4, 4), torch.empty(4, 8, 8, 4, dtype=torch.float64), 2, 2, 1)
    with pytest.raises(ValueError, match="bias"):
        kernels.output_transform(torch.empty(216, 4, 4), torch.empty(4, 8, 8, 4), 2, 2, 1, torch.zeros(5))
    with pytest.raises(ValueError, match=r"weights: expected contiguous float32 \(27, 16\)"):
        kernels.single_channel(torch.empty(9, 9, 9, 1), torch.empty(27, 8), torch.empty(4, 4, 4, 13), 2)


def test_environment_variable_disables_native(monkeypatch):
    monkeypatch.setenv(_native.ENV_ENABLE, "0")
    assert _native.conv3d_kernels() is None
