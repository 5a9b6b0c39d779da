"""shared_ops.correlation against a plainly written loop, by gradcheck, and on bad input.

The exactness tests run once per implementation: the native CPU kernels (skipped where they cannot be
built) and the PyTorch implementation, the latter with the default slab size and with one D-plane per
slab.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from shared_ops import _native
from shared_ops import correlation as corr_module
from shared_ops.correlation import (
    LocalCostCorrelation3d,
    correlation_displacements,
    local_cost_correlation_3d,
    normalize_features,
)
from shared_ops.reference import local_cost_correlation_3d_loop

SHAPES = [  # (B, C, D, H, W), radius
    ((1, 16, 5, 6, 7), 1),
    ((2, 16, 7, 5, 9), 2),
    ((2, 32, 6, 8, 5), 3),
    ((1, 32, 9, 9, 9), 2),
    ((2, 16, 3, 4, 2), 2),  # radius larger than the volume along two axes
    ((2, 7, 3, 5, 19), 2),  # W neither a whole number of SIMD vectors nor less than one
    ((1, 5, 4, 6, 21), 5),  # 11 shifts along x: more than the native kernel holds in registers at once
]

IMPLEMENTATIONS = ["native", "torch", "torch, one plane per slab"]


def _native_unavailable_reason() -> str | None:
    """Why the native kernels cannot run here, or None when they can."""
    if not _native.enabled():
        return f"native kernels disabled by {_native.ENV_ENABLE}={os.environ[_native.ENV_ENABLE]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reason is reported in the skip message instead
        kernels = _native.correlation_kernels()
    if kernels is None:
        return f"native kernels not available: {_native.load_error('correlation')}"
    return None


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, monkeypatch):
    """Run a test on the native kernels, and on the PyTorch path with its slab size and with 1-plane slabs."""
    if request.param == "native":
        reason = _native_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    else:
        monkeypatch.setenv(_native.ENV_ENABLE, "0")
        if request.param == "torch, one plane per slab":
            monkeypatch.setitem(corr_module._SLAB_BYTES, "cpu", 1)
    for dtype in (torch.float32, torch.float64):  # the implementation asked for is the one that runs
        uses_native = corr_module._native_kernels(torch.empty(1, dtype=dtype)) is not None
        assert uses_native == (request.param == "native")
    return request.param


def _plain_normalize(x: torch.Tensor, other: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """The normalisation modes written out with explicit loops over the batch."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        if mode == "channel":
            mean = x[b].mean(dim=0)
            var = ((x[b] - mean) ** 2).mean(dim=0)
            out[b] = (x[b] - mean) / torch.sqrt(var + eps)
        elif mode == "global":
            mean = (x[b].mean() + other[b].mean()) / 2
            std = (x[b].std() + other[b].std()) / 2
            out[b] = (x[b] - mean) / (std + eps)
        else:
            out[b] = x[b]
    return out


@pytest.mark.parametrize("shape,radius", SHAPES)
def test_matches_loop_reference_float32(shape, radius, impl):
    fixed, moving = torch.randn(shape), torch.randn(shape)
    out = local_cost_correlation_3d(fixed, moving, radius, normalize="none")
    expected = local_cost_correlation_3d_loop(fixed, moving, radius)
    assert out.shape == (shape[0], (2 * radius + 1) ** 3, *shape[2:])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["channel", "global", "none"])
def test_normalisation_modes(mode, impl):
    shape = (2, 16, 6, 7, 5)
    fixed, moving = 3 * torch.randn(shape) + 1, torch.rand(shape)
    out = local_cost_correlation_3d(fixed, moving, 2, normalize=mode, eps=1e-5)
    f_norm = _plain_normalize(fixed, moving, mode, 1e-5)
    m_norm = _plain_normalize(moving, fixed, mode, 1e-5)
    torch.testing.assert_close(out, local_cost_correlation_3d_loop(f_norm, m_norm, 2), atol=1e-5, rtol=1e-5)


def test_default_is_channel_normalisation_giving_pearson_coefficients():
    features = torch.randn(1, 32, 5, 5, 5)
    out = local_cost_correlation_3d(features, features, radius=1)
    centre = (3**3) // 2  # displacement (0, 0, 0)
    torch.testing.assert_close(out[:, centre], torch.ones(1, 5, 5, 5), atol=1e-4, rtol=0)
    assert out.abs().max() <= 1.0 + 1e-5


def test_global_normalisation_shares_statistics_between_images():
    fixed, moving = torch.randn(1, 8, 4, 4, 4), 5 + 2 * torch.randn(1, 8, 4, 4, 4)
    f_norm, m_norm = normalize_features(fixed, moving, "global", eps=0.0)
    # Both images go through the same affine map, so their difference is only rescaled.
    scale = (fixed.std() + moving.std()) / 2
    torch.testing.assert_close(m_norm - f_norm, (moving - fixed) / scale)


@pytest.mark.parametrize("radius", [1, 2])
def test_channel_order_finds_a_known_shift(radius, impl):
    """A moving volume that is the fixed one shifted by d peaks in the channel of d."""
    fixed = torch.randn(1, 16, 12, 12, 12)
    for shift in [(1, 0, -1), (0, -radius, radius), (-1, 1, 0)]:
        moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))  # moving[x + d] = fixed[x]
        out = local_cost_correlation_3d(fixed, moving, radius)
        interior = out[0, :, 3:-3, 3:-3, 3:-3]
        winner = interior.argmax(dim=0).unique()
        table = correlation_displacements(radius)
        assert winner.numel() == 1
        assert tuple(table[winner.item()].tolist()) == shift


def test_displacement_table_order():
    table = correlation_displacements(1)
    assert table.shape == (27, 3)
    assert table[0].tolist() == [-1, -1, -1]
    assert table[1].tolist() == [-1, -1, 0]  # dx varies fastest
    assert table[3].tolist() == [-1, 0, -1]
    assert table[9].tolist() == [0, -1, -1]  # dz varies slowest
    assert table[13].tolist() == [0, 0, 0]


def test_zero_where_the_displacement_leaves_the_volume(impl):
    fixed, moving = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 4, 4, 4, 4)
    out = local_cost_correlation_3d(fixed, moving, 1, normalize="none")
    table = correlation_displacements(1)
    corner = out[0, :, 0, 0, 0]
    leaves = (table < 0).any(dim=1)
    assert torch.all(corner[leaves] == 0)
    assert torch.all(corner[~leaves] != 0)


@pytest.mark.parametrize("mode", ["channel", "global", "none"])
@pytest.mark.parametrize("radius", [1, 2])
def test_gradcheck_float64(mode, radius, impl):
    fixed = torch.randn(1, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    moving = torch.randn(1, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    # fast_mode compares random projections u^T J v of the analytic and numerical Jacobians; the full
    # Jacobian would need one backward pass per output element.
    assert torch.autograd.gradcheck(
        lambda f, m: local_cost_correlation_3d(f, m, radius, normalize=mode), (fixed, moving), fast_mode=True
    )


def test_full_jacobian_gradcheck_tiny(impl):
    fixed = torch.randn(1, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    moving = torch.randn(1, 2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, m: local_cost_correlation_3d(f, m, 1, normalize="none"), (fixed, moving))


def test_gradients_match_autograd_through_the_loop(impl):
    shape = (2, 8, 6, 5, 7)
    f1, m1 = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    f2, m2 = f1.detach().clone().requires_grad_(), m1.detach().clone().requires_grad_()
    weight = torch.randn(2, 125, 6, 5, 7)
    (local_cost_correlation_3d(f1, m1, 2, normalize="none") * weight).sum().backward()
    (local_cost_correlation_3d_loop(f2, m2, 2) * weight).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m1.grad, m2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_gradient_to_one_input_only(which, impl):
    inputs = {name: torch.randn(1, 4, 5, 5, 5) for name in ("fixed", "moving")}
    inputs[which].requires_grad_()
    weight = torch.randn(1, 27, 5, 5, 5)
    (local_cost_correlation_3d(inputs["fixed"], inputs["moving"], 1, normalize="none") * weight).sum().backward()
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    (local_cost_correlation_3d_loop(leaves["fixed"], leaves["moving"], 1) * weight).sum().backward()
    other = "moving" if which == "fixed" else "fixed"
    assert inputs[other].grad is None
    torch.testing.assert_close(inputs[which].grad, leaves[which].grad, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs(impl):
    fixed = torch.randn(2, 6, 7, 5, 8).transpose(2, 4)  # (2, 6, 8, 5, 7), not contiguous
    moving = torch.randn(6, 2, 8, 5, 7).transpose(0, 1)
    assert not fixed.is_contiguous() and not moving.is_contiguous()
    out = local_cost_correlation_3d(fixed, moving, 2, normalize="none")
    expected = local_cost_correlation_3d_loop(fixed.contiguous(), moving.contiguous(), 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_empty_volume(impl):
    fixed = torch.randn(1, 4, 0, 5, 5, requires_grad=True)
    out = local_cost_correlation_3d(fixed, torch.randn(1, 4, 0, 5, 5), 1, normalize="none")
    assert out.shape == (1, 27, 0, 5, 5)
    out.sum().backward()
    assert fixed.grad.shape == fixed.shape


# --------------------------------------------------------------------------------------------------
# Native kernels: which path runs, thread counts, and the fallback to PyTorch.


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """Forget any library loaded in this process and build into an empty cache directory."""
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setenv(_native.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(_native.ENV_ENABLE, raising=False)
    return tmp_path / "cache"


def _count_torch_forward_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    torch_forward = corr_module._correlation_forward

    def spy(*args):
        calls.append(1)
        return torch_forward(*args)

    monkeypatch.setattr(corr_module, "_correlation_forward", spy)
    return calls


def test_native_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv(_native.ENV_ENABLE, raising=False)
    reason = _native_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    calls = _count_torch_forward_calls(monkeypatch)
    fixed, moving = torch.randn(1, 8, 5, 6, 7), torch.randn(1, 8, 5, 6, 7)
    for x, y in ((fixed, moving), (fixed.double(), moving.double())):
        local_cost_correlation_3d(x, y, 1)
    assert calls == []
    local_cost_correlation_3d(fixed.bfloat16(), moving.bfloat16(), 1)  # no native bfloat16 kernel
    assert calls == [1]


def test_environment_variable_disables_native(monkeypatch):
    monkeypatch.setenv(_native.ENV_ENABLE, "0")
    assert _native.correlation_kernels() is None
    calls = _count_torch_forward_calls(monkeypatch)
    fixed, moving = torch.randn(1, 8, 5, 6, 7), torch.randn(1, 8, 5, 6, 7)
    out = local_cost_correlation_3d(fixed, moving, 1, normalize="none")
    assert calls == [1]
    torch.testing.assert_close(out, local_cost_correlation_3d_loop(fixed, moving, 1), atol=1e-5, rtol=1e-5)


def _failing_compiler(directory) -> str:
    script = directory / "broken-cc"
    script.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("compiler", ["fails", "missing"])
def test_fallback_when_the_build_fails(compiler, fresh_native, monkeypatch, tmp_path):
    if compiler == "fails":
        monkeypatch.setenv("CC", _failing_compiler(tmp_path))
        message = "failed to compile"
    else:
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        message = "no C compiler"
    calls = _count_torch_forward_calls(monkeypatch)
    fixed = torch.randn(1, 8, 5, 6, 7, requires_grad=True)
    moving = torch.randn(1, 8, 5, 6, 7)
    with pytest.warns(RuntimeWarning, match=f"native CPU kernels unavailable.*{message}"):
        out = local_cost_correlation_3d(fixed, moving, 1, normalize="none")
    torch.testing.assert_close(out, local_cost_correlation_3d_loop(fixed, moving, 1), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning, no second build
        local_cost_correlation_3d(fixed, moving, 1)
    assert calls == [1, 1]
    assert not fresh_native.exists() or not any(fresh_native.iterdir())  # no half-built files left


def test_build_goes_to_the_cache_and_is_reused(fresh_native):
    try:
        path = _native.build_library("correlation")
    except _native.NativeBuildError as error:
        pytest.skip(f"no working C compiler: {error}")
    assert path.parent == fresh_native and path.suffix == ".so"
    assert sorted(p.name for p in fresh_native.iterdir()) == [path.name]  # no temporary files left
    mtime = path.stat().st_mtime_ns
    assert _native.build_library("correlation") == path and path.stat().st_mtime_ns == mtime
    assert _native.correlation_kernels() is not None


def test_native_result_does_not_depend_on_the_thread_count():
    reason = _native_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    fixed = torch.randn(2, 16, 12, 11, 13, requires_grad=True)
    moving = torch.randn(2, 16, 12, 11, 13, requires_grad=True)
    weight = torch.randn(2, 125, 12, 11, 13)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fixed.grad = moving.grad = None
            out = local_cost_correlation_3d(fixed, moving, 2, normalize="none")
            (out * weight).sum().backward()
            results.append((out.detach(), fixed.grad, moving.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:  # each output row is computed by one thread in a fixed order
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_dtype_promotion_and_bfloat16():
    fixed, moving = torch.randn(1, 8, 5, 5, 5), torch.randn(1, 8, 5, 5, 5, dtype=torch.float64)
    assert local_cost_correlation_3d(fixed, moving, 1).dtype == torch.float64
    full = local_cost_correlation_3d(fixed, moving.float(), 1)
    low = local_cost_correlation_3d(fixed.bfloat16(), moving.bfloat16(), 1)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, atol=3e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    fixed = torch.randn(2, 16, 9, 10, 11, requires_grad=True)
    moving = torch.randn(2, 16, 9, 10, 11, requires_grad=True)
    expected = local_cost_correlation_3d(fixed, moving, 2)
    expected.sum().backward()
    fc = fixed.detach().cuda().to(dtype).requires_grad_()
    mc = moving.detach().cuda().to(dtype).requires_grad_()
    out = local_cost_correlation_3d(fc, mc, 2)
    out.sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float().cpu(), expected.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(fc.grad.float().cpu(), fixed.grad, atol=tol * 10, rtol=tol * 10)


def test_module_matches_function():
    layer = LocalCostCorrelation3d(radius=2, normalize="global")
    fixed, moving = torch.randn(1, 8, 6, 6, 6), torch.randn(1, 8, 6, 6, 6)
    assert layer.out_channels == 125
    assert "radius=2" in repr(layer)
    torch.testing.assert_close(layer(fixed, moving), local_cost_correlation_3d(fixed, moving, 2, "global"))


@pytest.mark.parametrize(
    "fixed_shape,moving_shape,message",
    [
        ((1, 4, 5, 5, 5), (1, 4, 5, 5, 6), "same shape"),
        ((1, 4, 5, 5, 5), (1, 8, 5, 5, 5), "same shape"),
        ((4, 5, 5, 5), (4, 5, 5, 5), "5-D"),
        ((1, 1, 4, 5, 5, 5), (1, 1, 4, 5, 5, 5), "5-D"),
    ],
)
def test_bad_shapes(fixed_shape, moving_shape, message):
    with pytest.raises(ValueError, match=message):
        local_cost_correlation_3d(torch.randn(fixed_shape), torch.randn(moving_shape), 1)


@pytest.mark.parametrize("radius", [-1, 1.5, True, "2"])
def test_bad_radius(radius):
    x = torch.randn(1, 4, 5, 5, 5)
    with pytest.raises(ValueError, match="radius"):
        local_cost_correlation_3d(x, x, radius)
    with pytest.raises(ValueError, match="radius"):
        LocalCostCorrelation3d(radius)


def test_bad_normalisation_and_dtype():
    x = torch.randn(1, 4, 5, 5, 5)
    with pytest.raises(ValueError, match="normalize"):
        local_cost_correlation_3d(x, x, 1, normalize="batch")
    with pytest.raises(ValueError, match="normalize"):
        LocalCostCorrelation3d(1, normalize="batch")
    with pytest.raises(TypeError, match="floating-point"):
        local_cost_correlation_3d(x.long(), x.long(), 1)


def test_traced_layer_exports_and_follows_its_inputs(tmp_path):
    """A traced model (TorchScript export for MONAI Deploy) must save, load and compute without Python."""
    layer = LocalCostCorrelation3d(radius=1)
    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(1, 4, 5, 6, 7, generator=gen), torch.randn(1, 4, 5, 6, 7, generator=gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, example)
    torch.jit.save(traced, tmp_path / "layer.ts")
    loaded = torch.jit.load(tmp_path / "layer.ts")
    other = (torch.randn(1, 4, 5, 6, 7, generator=gen), torch.randn(1, 4, 5, 6, 7, generator=gen))
    torch.testing.assert_close(loaded(*other), layer(*other), rtol=1e-5, atol=1e-6)
