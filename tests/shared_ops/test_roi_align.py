"""shared_ops.roi_align against a per-box loop (and torchvision where it imports), gradcheck, bad input.

The exactness tests run once per implementation: the native CPU kernel (skipped where it cannot be built)
and the PyTorch path with its automatic choice and with each of its two pooling methods forced.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

from shared_ops import _native
from shared_ops.reference import roi_align_loop
from shared_ops.roi_align import RoIAlign, roi_align
from tests.conftest import require_data

module = importlib.import_module("shared_ops.roi_align")  # the package re-exports a function of that name


def _native_unavailable_reason() -> str | None:
    """Why the native kernel cannot run here, or None when it can."""
    if not _native.enabled():
        return f"native kernels disabled by {_native.ENV_ENABLE}={os.environ[_native.ENV_ENABLE]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernels = _native.roi_align_kernels()
    if kernels is None:
        return f"native kernels not available: {_native.load_error('roi_align')}"
    return None


def _require_native() -> None:
    reason = _native_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["native", "auto", "gather", "products"])
def pooling_path(request, monkeypatch):
    """Run a test on the native kernel, and on the PyTorch path with its automatic choice and each method forced."""
    if request.param == "native":
        _require_native()
    else:
        monkeypatch.setenv(_native.ENV_ENABLE, "0")
        cost = {"auto": module._GATHER_COST, "gather": 0.0, "products": float("inf")}[request.param]
        monkeypatch.setattr(module, "_GATHER_COST", cost)
    uses_native = module._native_kernels(torch.empty(1, 1, 1, 1)) is not None
    assert uses_native == (request.param == "native")
    return request.param


def _torch_path(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the native kernels switched off (forward and backward)."""
    before = os.environ.get(_native.ENV_ENABLE)
    os.environ[_native.ENV_ENABLE] = "0"
    try:
        return fn(*args, **kwargs)
    finally:
        if before is None:
            del os.environ[_native.ENV_ENABLE]
        else:
            os.environ[_native.ENV_ENABLE] = before


def _random_rois(num: int, images: int, extent: float, max_size: float, dtype=torch.float32) -> torch.Tensor:
    """Boxes scattered over [-extent/4, extent], some partly or wholly outside the image."""
    index = torch.randint(0, images, (num, 1)).to(dtype)
    corner = torch.rand(num, 2, dtype=dtype) * extent * 1.25 - extent / 4
    size = torch.rand(num, 2, dtype=dtype) * max_size
    return torch.cat([index, corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("spatial_scale,output_size", [(1.0, (3, 3)), (0.25, (2, 4)), (1 / 16, 3)])
@pytest.mark.parametrize("map_size", [(13, 17), (16, 16)])  # a square map with a square output shares one matrix
def test_matches_per_box_loop(aligned, sampling_ratio, spatial_scale, output_size, map_size, pooling_path):
    feature = torch.randn(3, 5, *map_size)
    extent = map_size[1] / spatial_scale
    rois = _random_rois(40, 3, extent, extent / 2)
    out = roi_align(feature, rois, output_size, spatial_scale, sampling_ratio, aligned)
    expected = roi_align_loop(
        feature, rois, torch.nn.modules.utils._pair(output_size), spatial_scale, sampling_ratio, aligned
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_box_on_pixel_grid_returns_the_pixels(pooling_path):
    """aligned=True, one sample per bin and one bin per pixel: RoIAlign crops exactly."""
    feature = torch.randn(2, 3, 10, 12)
    rois = torch.tensor([[1, 2, 3, 7, 9], [0, 0, 0, 12, 10], [1, 5, 1, 6, 2]], dtype=torch.float32)
    for box in rois:
        b, x1, y1, x2, y2 = box.long().tolist()
        out = roi_align(feature, box[None], (y2 - y1, x2 - x1), sampling_ratio=1, aligned=True)
        torch.testing.assert_close(out[0], feature[b, :, y1:y2, x1:x2])


def test_real_tile_crops(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = require_data("tiles/camelyon_gr_samples/CAMELYON_HE_patches.h5")
    with h5py.File(path, "r") as f:
        tiles = torch.from_numpy(f["x"][:]).permute(0, 3, 1, 2).float() / 255.0  # (2, 3, 256, 256)
    boxes = [torch.tensor([[10.0, 20.0, 58.0, 68.0], [200.0, 200.0, 248.0, 248.0]]), torch.tensor([[0.0, 0, 48, 48]])]
    out = roi_align(tiles, boxes, 48, sampling_ratio=1, aligned=True)
    assert out.shape == (3, 3, 48, 48)
    torch.testing.assert_close(out[1], tiles[0, :, 200:248, 200:248])
    torch.testing.assert_close(out[2], tiles[1, :, 0:48, 0:48])


def test_list_of_boxes_equals_indexed_rows():
    feature = torch.randn(3, 4, 16, 16)
    per_image = [torch.rand(4, 2) * 8 for _ in range(3)]
    per_image = [torch.cat([c, c + 5], dim=1) for c in per_image]
    rows = torch.cat([torch.cat([torch.full((4, 1), float(i)), b], dim=1) for i, b in enumerate(per_image)])
    torch.testing.assert_close(roi_align(feature, per_image, 3), roi_align(feature, rows, 3))
    torch.testing.assert_close(roi_align(feature, tuple(per_image), 3), roi_align(feature, rows, 3))


def test_output_follows_input_box_order_across_images(pooling_path):
    feature = torch.randn(3, 2, 8, 8)
    rois = torch.tensor([[2, 0, 0, 4, 4], [0, 1, 1, 5, 5], [2, 2, 2, 6, 6], [1, 0, 0, 8, 8]], dtype=torch.float32)
    out = roi_align(feature, rois, 2)
    for k in range(4):
        torch.testing.assert_close(out[k : k + 1], roi_align(feature, rois[k : k + 1], 2))


def test_boxes_outside_the_feature_map(pooling_path):
    feature = torch.randn(1, 3, 8, 8) + 10
    far = torch.tensor([[0, 30.0, 30.0, 40.0, 40.0], [0, -20.0, -20.0, -10.0, -10.0]])
    assert torch.all(roi_align(feature, far, 2) == 0)
    partly = torch.tensor([[0, -6.0, 2.0, 4.0, 6.0], [0, 5.0, 5.0, 12.0, 12.0]])
    for aligned in (False, True):
        out = roi_align(feature, partly, 2, aligned=aligned)
        expected = roi_align_loop(feature, partly, (2, 2), aligned=aligned)
        torch.testing.assert_close(out, expected)
        assert torch.all(out.abs().sum(dim=(1, 2, 3)) > 0)  # the in-map part of each box contributes
        assert torch.any(out == 0)  # bins wholly outside the map do not


def test_empty_boxes(pooling_path):
    feature = torch.randn(2, 6, 8, 8, requires_grad=True)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)], []):
        out = roi_align(feature, boxes, (3, 2))
        assert out.shape == (0, 6, 3, 2)
    # A batch whose images have no boxes still trains: the empty pooled tensor adds nothing to the loss.
    loss = roi_align(feature, torch.zeros(0, 5), 3).sum() + feature.sum()
    loss.backward()
    torch.testing.assert_close(feature.grad, torch.ones_like(feature))


def test_gradcheck_float64(pooling_path):
    feature = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(6, 2, 9.0, 6.0, dtype=torch.float64)
    for aligned in (False, True):
        assert torch.autograd.gradcheck(lambda x, a=aligned: roi_align(x, rois, (2, 3), 0.9, -1, a), (feature,))


def test_gradient_matches_per_box_loop(pooling_path):
    feature = torch.randn(2, 4, 12, 12, requires_grad=True)
    reference = feature.detach().clone().requires_grad_()
    rois = _random_rois(20, 2, 12.0, 8.0)
    weight = torch.randn(20, 4, 3, 3)
    (roi_align(feature, rois, 3, sampling_ratio=2) * weight).sum().backward()
    (roi_align_loop(reference, rois, (3, 3), sampling_ratio=2) * weight).sum().backward()
    torch.testing.assert_close(feature.grad, reference.grad, atol=1e-5, rtol=1e-5)


def test_module_matches_function():
    layer = RoIAlign(3, spatial_scale=1 / 16, sampling_ratio=-1, aligned=False)
    feature = torch.randn(2, 8, 16, 16)
    rois = _random_rois(10, 2, 256.0, 64.0)
    assert "spatial_scale=0.0625" in repr(layer)
    torch.testing.assert_close(layer(feature, rois), roi_align(feature, rois, 3, 1 / 16, -1, False))


@pytest.mark.parametrize(
    "boxes,error,message",
    [
        (torch.zeros(3, 4), ValueError, r"Tensor\[K, 5\]"),
        (torch.zeros(3, 6), ValueError, r"Tensor\[K, 5\]"),
        (torch.zeros(5), ValueError, r"Tensor\[K, 5\]"),
        ([torch.zeros(2, 5)], ValueError, r"boxes\[0\]"),
        ([torch.zeros(2, 4), "box"], ValueError, r"boxes\[1\]"),
        ([torch.zeros(1, 4)] * 3, ValueError, "2 images"),
        (torch.tensor([[2.0, 0, 0, 1, 1]]), ValueError, "batch index"),
        (torch.tensor([[-1.0, 0, 0, 1, 1]]), ValueError, "batch index"),
        (torch.tensor([[0.5, 0, 0, 1, 1]]), ValueError, "batch index"),
        (torch.tensor([[0.0, float("nan"), 0, 1, 1]]), ValueError, "finite"),
        ({"boxes": 1}, TypeError, "list of Tensor"),
    ],
)
def test_malformed_boxes(boxes, error, message):
    with pytest.raises(error, match=message):
        roi_align(torch.randn(2, 3, 8, 8), boxes, 2)


def test_bad_input_and_output_size():
    rois = torch.tensor([[0.0, 0, 0, 4, 4]])
    with pytest.raises(ValueError, match="4-D"):
        roi_align(torch.randn(3, 8, 8), rois, 2)
    with pytest.raises(TypeError, match="floating-point"):
        roi_align(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), rois, 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(torch.randn(1, 3, 8, 8), rois, (0, 2))


def test_matches_torchvision_where_available():
    tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not importable with this torch build")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feature = torch.randn(4, 16, 20, 24, device=device)
    rois = _random_rois(64, 4, 24 * 8.0, 96.0).to(device)
    for aligned in (False, True):
        for sampling_ratio in (-1, 2):
            out = roi_align(feature, rois, (3, 3), 1 / 8, sampling_ratio, aligned)
            expected = tv_ops.roi_align(feature, rois, (3, 3), 1 / 8, sampling_ratio, aligned)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_channel_chunks_give_the_same_result(monkeypatch):
    """Large maps are processed a few channels at a time; the chunking must not change the result."""
    monkeypatch.setenv(_native.ENV_ENABLE, "0")  # the chunks are the PyTorch path's
    feature = torch.randn(4, 3, 12, 12, requires_grad=True)
    rois = _random_rois(30, 4, 12.0, 8.0)
    whole = roi_align(feature, rois, 3)
    monkeypatch.setattr(module, "_INTERMEDIATE_BYTES", 1)  # one channel per chunk
    torch.testing.assert_close(roi_align(feature, rois, 3), whole)
    torch.testing.assert_close(roi_align(feature, rois, 3), roi_align_loop(feature, rois, (3, 3)))


# --------------------------------------------------------------------------------------------------
# Native kernel: agreement with the PyTorch path and the loop, gradients, which path runs, fallback.

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _awkward_rois(num: int, images: int, extent: float, dtype: torch.dtype) -> torch.Tensor:
    """Random boxes (some partly outside) plus boxes wholly outside, degenerate and inverted ones."""
    special = torch.tensor(
        [
            [0, -3.0 * extent, -3.0 * extent, -2.0 * extent, -2.0 * extent],  # far outside, top left
            [images - 1, 2.0 * extent, 2.0 * extent, 3.0 * extent, 3.0 * extent],  # far outside, bottom right
            [0, -0.5 * extent, 0.25 * extent, 0.4 * extent, 1.5 * extent],  # across two borders
            [images - 1, 0.3 * extent, 0.3 * extent, 0.3 * extent, 0.3 * extent],  # a point
            [0, 0.6 * extent, 0.7 * extent, 0.2 * extent, 0.1 * extent],  # inverted
        ],
        dtype=dtype,
    )
    return torch.cat([_random_rois(num, images, extent, extent / 2, dtype), special])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("spatial_scale,output_size,map_size", [(1.0, (3, 3), (13, 17)), (0.25, (2, 5), (16, 16))])
def test_native_matches_torch_path_and_loop(dtype, aligned, sampling_ratio, spatial_scale, output_size, map_size):
    _require_native()
    feature = torch.randn(3, 6, *map_size, dtype=dtype)  # 6 channels: one block of 4 and two single ones
    rois = _awkward_rois(40, 3, map_size[1] / spatial_scale, dtype)
    args = (output_size, spatial_scale, sampling_ratio, aligned)
    out = roi_align(feature, rois, *args)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, _torch_path(roi_align, feature, rois, *args), atol=tol, rtol=tol)
    torch.testing.assert_close(out, roi_align_loop(feature, rois, *args), atol=tol, rtol=tol)
    assert torch.all(out[-5:-3] == 0)  # the boxes wholly outside the map


def test_native_list_of_boxes_and_empty_boxes():
    _require_native()
    feature = torch.randn(3, 5, 16, 16, dtype=torch.float64)
    per_image = [torch.rand(n, 2, dtype=torch.float64) * 12 for n in (3, 0, 5)]
    per_image = [torch.cat([c, c + 4], dim=1) for c in per_image]
    out = roi_align(feature, per_image, (2, 3), 1.0, 2, True)
    torch.testing.assert_close(
        out, _torch_path(roi_align, feature, per_image, (2, 3), 1.0, 2, True), atol=1e-12, rtol=1e-12
    )
    assert out.shape == (8, 5, 2, 3)
    for boxes in ([], [torch.zeros(0, 4)] * 3, torch.zeros(0, 5)):
        assert roi_align(feature, boxes, (2, 3)).shape == (0, 5, 2, 3)


def test_native_non_contiguous_input():
    _require_native()
    base = torch.randn(2, 7, 12, 10)
    rois = _random_rois(15, 2, 10.0, 6.0)
    for feature in (base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3), base[:, ::2]):
        assert not feature.is_contiguous()
        expected = roi_align_loop(feature, rois, (3, 2), 1.0, -1, False)
        torch.testing.assert_close(roi_align(feature, rois, (3, 2)), expected, atol=1e-5, rtol=1e-5)


def test_native_boxes_in_groups_on_a_large_map():
    """Many boxes on one large map: the kernel holds the weights of a few boxes at a time."""
    _require_native()
    feature = torch.randn(2, 5, 300, 700, dtype=torch.float64)
    rois = _random_rois(40, 2, 700.0, 400.0, dtype=torch.float64)
    out = roi_align(feature, rois, 7, 1.0, 2, True)
    expected = _torch_path(roi_align, feature, rois, 7, 1.0, 2, True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_native_gradcheck_and_gradgradcheck(aligned):
    _require_native()
    feature = torch.randn(2, 5, 7, 9, dtype=torch.float64, requires_grad=True)
    rois = _awkward_rois(6, 2, 9.0, torch.float64)

    def layer(x):
        return roi_align(x, rois, (2, 3), 0.9, -1, aligned)

    assert torch.autograd.gradcheck(layer, (feature,))
    assert torch.autograd.gradgradcheck(layer, (feature,))


def _input_gradient(fn, feature, rois, weight):
    """Gradient of ``sum(weight * fn(feature, rois, ...))`` with respect to ``feature``."""
    x = feature.detach().clone().requires_grad_()
    (fn(x, rois, (3, 3), 1.0, 2, False) * weight).sum().backward()
    return x.grad


def test_native_gradient_matches_torch_path_and_loop():
    _require_native()
    feature = torch.randn(3, 6, 12, 12, dtype=torch.float64)
    rois = _awkward_rois(20, 3, 12.0, torch.float64)
    weight = torch.randn(25, 6, 3, 3, dtype=torch.float64)
    native = _input_gradient(roi_align, feature, rois, weight)
    torch.testing.assert_close(
        native, _torch_path(_input_gradient, roi_align, feature, rois, weight), atol=1e-12, rtol=1e-12
    )
    torch.testing.assert_close(native, _input_gradient(roi_align_loop, feature, rois, weight), atol=1e-12, rtol=1e-12)


def test_native_result_does_not_depend_on_the_thread_count():
    _require_native()
    feature = torch.randn(4, 9, 20, 20, requires_grad=True)
    rois = _random_rois(50, 4, 20.0, 12.0)
    grad_out = torch.randn(50, 9, 3, 3)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out = roi_align(feature, rois, 3)
            (grad,) = torch.autograd.grad(out, feature, grad_out)
            results.append((out, grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_native_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv(_native.ENV_ENABLE, raising=False)
    _require_native()
    calls = []
    monkeypatch.setattr(module, "_roi_align_torch", lambda *a: calls.append(1) or torch.zeros(1))
    feature, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 5, 5]])
    roi_align(feature, rois, 2)
    roi_align(feature.double(), rois, 2)
    assert calls == []
    roi_align(feature.bfloat16(), rois, 2)  # no native bfloat16 kernel
    assert calls == [1]


def test_environment_variable_disables_native(monkeypatch):
    monkeypatch.setenv(_native.ENV_ENABLE, "0")
    assert _native.roi_align_kernels() is None
    assert module._native_kernels(torch.randn(1, 1, 2, 2)) is None
    feature, rois = torch.randn(2, 3, 8, 8), _random_rois(10, 2, 8.0, 6.0)
    torch.testing.assert_close(roi_align(feature, rois, 2), roi_align_loop(feature, rois, (2, 2)), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.trace.* is deprecated")
def test_tracing_records_plain_tensor_operations():
    _require_native()
    feature, rois = torch.randn(2, 3, 8, 8), _random_rois(5, 2, 8.0, 6.0)
    traced = torch.jit.trace(lambda x: roi_align(x, rois, 2), (feature,), check_trace=False)
    assert "PythonOp" not in str(traced.graph)
    torch.testing.assert_close(traced(feature), roi_align(feature, rois, 2), atol=1e-5, rtol=1e-5)


def test_fallback_when_the_build_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_loaded", {})
    monkeypatch.setenv(_native.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(_native.ENV_ENABLE, raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    feature, rois = torch.randn(2, 3, 8, 8, requires_grad=True), _random_rois(10, 2, 8.0, 6.0)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*no C compiler"):
        out = roi_align(feature, rois, 2)
    torch.testing.assert_close(out, roi_align_loop(feature, rois, (2, 2)), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second warning, no second build
        roi_align(feature, rois, 2)


def test_native_kernels_reject_unsupported_operands():
    _require_native()
    kernels = _native.roi_align_kernels()
    rois = torch.tensor([[0.0, 1, 1, 5, 5]], dtype=torch.float64)
    feature = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        kernels.forward(feature.transpose(2, 3), rois, (2, 2), 1.0, -1, False)
    with pytest.raises(ValueError, match="float64 CPU Tensor"):
        kernels.forward(feature, rois.float(), (2, 2), 1.0, -1, False)
    with pytest.raises(ValueError, match="batch index"):
        kernels.forward(feature, rois + torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), (2, 2), 1.0, -1, False)
    with pytest.raises(ValueError, match="grad_out"):
        kernels.backward(torch.randn(2, 2, 2, 2), rois, (1, 2, 8, 8), 1.0, -1, False)
