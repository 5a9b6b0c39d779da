"""Tests of slide-consistent instance normalisation: tile mode as trained, smoothed statistics, seams, autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from roigan_stain_transfer.networks import ResnetGenerator
from roigan_stain_transfer.wsi.normalization import NORMALIZATION_MODES, SlideInstanceNorm2d, SlideNormalization

# ResnetGenerator(base_channels=8, num_blocks=2): IN widths 8 (stem), 16, 32 (down), 4 x 32 (blocks), 16, 8 (up)
SMALL_IN_CHANNELS = 8 + 16 + 32 + 4 * 32 + 16 + 8


def _small_generator(**kwargs) -> ResnetGenerator:
    return ResnetGenerator(base_channels=8, num_blocks=2, **kwargs).eval()


def _cut(slide: torch.Tensor, origins: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Tiles ``(B, C, T, T)`` of ``slide`` ``(C, H, W)`` at ``origins`` ``(B, 2)`` (row, col)."""
    return torch.stack([slide[:, r : r + tile_size, c : c + tile_size] for r, c in origins.tolist()])


def _grid_origins(height: int, width: int, tile_size: int, stride: int) -> torch.Tensor:
    """Top-left ``(row, col)`` of every tile of a regular grid covering a ``height x width`` slide."""
    rows = range(0, height - tile_size + 1, stride)
    cols = range(0, width - tile_size + 1, stride)
    return torch.tensor([(r, c) for r in rows for c in cols])


def _single_norm(channels: int = 2) -> nn.Module:
    """A network that is one InstanceNorm2d inside a container: its statistics are those of the input."""
    return nn.Sequential(nn.InstanceNorm2d(channels))


def _stat_tile(means: list[float], stds: list[float], size: int) -> torch.Tensor:
    """Tile ``(C, size, size)`` with per-channel mean ``means`` and biased std ``stds`` (a +-1 checkerboard)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).to(torch.float32)
    return torch.stack([m + s * checker for m, s in zip(means, stds, strict=True)])


def _collect(norm: SlideNormalization, network: nn.Module, tiles: torch.Tensor, origins, tile_size: int) -> None:
    with torch.no_grad(), norm.collecting(), norm.tiles(torch.as_tensor(origins), tile_size):
        network(tiles)


def _run(norm: SlideNormalization, network: nn.Module, tiles: torch.Tensor, origins, tile_size: int, mode: str):
    norm.mode = mode
    with torch.no_grad(), norm.tiles(torch.as_tensor(origins), tile_size):
        return network(tiles)


# ------------------------------------------------------------------------------------------------------------
# Tile mode is the network as trained
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", ["transposed", "resize"])
def test_tile_mode_bit_identical_and_state_dict_unchanged(upsampling):
    generator = _small_generator(upsampling=upsampling)
    reference = copy.deepcopy(generator)
    before = {key: value.clone() for key, value in generator.state_dict().items()}
    norm = SlideNormalization(generator, "tile", grid_spacing=32, grid_origin=(32, 32), grid_shape=(2, 2))
    assert len(norm.layers) == 9
    assert all(isinstance(layer, SlideInstanceNorm2d) for layer in norm.layers.values())
    assert not any(type(m) is nn.InstanceNorm2d for m in generator.modules())
    after = generator.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    tiles = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = reference(tiles)
        assert torch.equal(generator(tiles), expected)  # no tiles() needed in tile mode
        with norm.tiles(torch.tensor([[0, 0], [0, 32], [32, 0]]), 64):
            assert torch.equal(generator(tiles), expected)
    generator.load_state_dict(reference.state_dict())  # loads back into the converted network


def test_collecting_outputs_as_tile_mode_and_stores_sparse_cpu_float32():
    generator = _small_generator()
    reference = copy.deepcopy(generator)
    norm = SlideNormalization(generator, "dense", grid_spacing=32, grid_origin=(32, 32), grid_shape=(4, 5))
    tiles = torch.rand(3, 3, 64, 64) * 2 - 1
    origins = torch.tensor([[0, 0], [0, 32], [64, 96]])
    with torch.no_grad(), norm.collecting(), norm.tiles(origins, 64):
        out = generator(tiles)
    assert torch.equal(out, reference(tiles))
    assert norm.visited_nodes().tolist() == [[0, 0], [0, 1], [2, 3]]
    for accumulator in norm._collected.values():
        assert accumulator.mean_sum.dtype == torch.float32 and accumulator.mean_sum.device.type == "cpu"
        assert accumulator.mean_sum.shape[0] == 3  # only the visited nodes


# ------------------------------------------------------------------------------------------------------------
# Slide statistics
# ------------------------------------------------------------------------------------------------------------


def test_single_node_kernel_and_dense_equal_tile_mode():
    generator = _small_generator()
    norm = SlideNormalization(generator, "tile", grid_spacing=64, grid_origin=(32, 32), grid_shape=(1, 1))
    tile = torch.rand(1, 3, 64, 64) * 2 - 1
    origin = [[0, 0]]
    expected = _run(norm, generator, tile, origin, 64, "tile")
    _collect(norm, generator, tile, origin, 64)
    norm.finalize()
    for mode in ("kernel", "dense"):
        torch.testing.assert_close(_run(norm, generator, tile, origin, 64, mode), expected, atol=1e-5, rtol=0)


def test_overlapping_tiles_agree_better_with_kernel_and_dense():
    """Two overlapping tiles across a bright band: the outputs on their overlap disagree least with dense."""
    tile_size, stride, margin = 128, 64, 8
    height, width = 2 * tile_size, 4 * tile_size
    rows, cols = torch.meshgrid(torch.arange(height * 1.0), torch.arange(width * 1.0), indexing="ij")
    texture = torch.stack([torch.sin(cols / 5 + c) * torch.cos(rows / 7 - c) for c in range(3)])
    brightness = 2 * torch.exp(-(((cols - width / 2) / (tile_size / 2)) ** 2)) - 1  # dark, bright band, dark
    slide = (0.3 * texture + 0.6 * brightness).clamp(-1, 1)
    origins = _grid_origins(height, width, tile_size, stride)
    generator = _small_generator()
    grid_shape = ((height - tile_size) // stride + 1, (width - tile_size) // stride + 1)
    centre = tile_size / 2
    norm = SlideNormalization(generator, grid_spacing=stride, grid_origin=(centre, centre), grid_shape=grid_shape)
    _collect(norm, generator, _cut(slide, origins, tile_size), origins, tile_size)
    norm.finalize()

    pair = torch.tensor([[stride, 2 * stride], [stride, 3 * stride]])  # the rising flank and the band's centre
    pair_tiles = _cut(slide, pair, tile_size)
    assert (pair_tiles[1].mean() - pair_tiles[0].mean()).abs() > 0.3  # brightness differs strongly
    disagreement = {}
    for mode in NORMALIZATION_MODES:
        out = _run(norm, generator, pair_tiles, pair, tile_size, mode)
        left = out[0, :, margin:-margin, stride + margin : -margin]
        right = out[1, :, margin:-margin, margin : tile_size - stride - margin]
        disagreement[mode] = float((left - right).abs().mean())
    # measured: tile 0.197, kernel 0.147, dense 0.030
    assert disagreement["dense"] < disagreement["tile"] / 4, disagreement
    assert disagreement["kernel"] < 0.85 * disagreement["tile"], disagreement


def test_mixed_batch_equals_tile_by_tile():
    generator = _small_generator()
    slide = torch.rand(3, 192, 192) * 2 - 1
    origins = _grid_origins(192, 192, 64, 32)
    norm = SlideNormalization(generator, grid_spacing=32, grid_origin=(32, 32), grid_shape=(5, 5))
    _collect(norm, generator, _cut(slide, origins, 64), origins, 64)
    norm.finalize()
    mixed = torch.tensor([[128, 0], [0, 128], [50, 70]])  # far apart, one off the tile grid
    tiles = _cut(slide, mixed, 64)
    for mode in ("kernel", "dense"):
        batch = _run(norm, generator, tiles, mixed, 64, mode)
        alone = torch.cat([_run(norm, generator, tiles[k : k + 1], mixed[k : k + 1], 64, mode) for k in range(3)])
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


def test_finalize_smooths_visited_nodes_and_averages_tiles_per_node():
    network = _single_norm()
    norm = SlideNormalization(network, "kernel", grid_spacing=10, grid_origin=(5, 5), grid_shape=(1, 3), sigma=1.0)
    # tiles at cols 0 and 3 both go to node (0, 0) (centres 5 and 8), the tile at col 20 to node (0, 2)
    tiles = torch.stack(
        [_stat_tile([1.0, -2.0], [1.0, 2.0], 10), _stat_tile([3.0, 0.0], [3.0, 2.0], 10)]
        + [_stat_tile([10.0, 4.0], [5.0, 0.5], 10)]
    )
    _collect(norm, network, tiles, [[0, 0], [0, 3], [0, 20]], 10)
    assert norm.visited_nodes().tolist() == [[0, 0], [0, 2]]
    norm.finalize()
    mean, std = norm.smoothed_statistics("0")
    assert mean.shape == std.shape == (1, 3, 2)
    node0 = torch.tensor([[2.0, -1.0], [2.0, 2.0]])  # (mean, std) rows, averaged over the two tiles
    node2 = torch.tensor([[10.0, 4.0], [5.0, 0.5]])
    far = math.exp(-2.0)  # Gaussian weight two nodes away with sigma = 1
    expected = torch.stack([(node0 + far * node2) / (1 + far), (node0 + node2) / 2, (node2 + far * node0) / (1 + far)])
    torch.testing.assert_close(mean[0], expected[:, 0])
    torch.testing.assert_close(std[0], expected[:, 1])


def test_finalize_fills_unvisited_nodes_without_nan():
    network = _single_norm()
    norm = SlideNormalization(network, grid_spacing=10, grid_origin=(5, 5), grid_shape=(3, 8), sigma=0.5)
    tiles = torch.stack([_stat_tile([0.0, 1.0], [1.0, 1.0], 10), _stat_tile([2.0, 1.0], [3.0, 1.0], 10)])
    tiles = torch.cat([tiles, _stat_tile([7.0, 1.0], [2.0, 1.0], 10)[None]])
    _collect(norm, network, tiles, [[0, 0], [0, 0], [0, 70]], 10)  # nodes (0, 0) twice and (0, 7)
    norm.finalize()
    mean, std = norm.smoothed_statistics("0")
    assert mean.shape == (3, 8, 2) and bool(torch.isfinite(mean).all() and torch.isfinite(std).all())
    # sigma 0.5 reaches ceil(1.5) = 2 nodes: columns 0-2 see only node (0, 0), 5-7 only node (0, 7)
    assert torch.allclose(mean[:, :3, 0], torch.tensor(1.0)) and torch.allclose(std[:, :3, 0], torch.tensor(2.0))
    assert torch.allclose(mean[:, 5:, 0], torch.tensor(7.0)) and torch.allclose(std[:, 5:, 0], torch.tensor(2.0))
    # columns 3-4 and rows out of reach take the mean over all collected tiles
    assert torch.allclose(mean[:, 3:5, 0], torch.tensor(3.0)) and torch.allclose(std[:, 3:5, 0], torch.tensor(2.0))


def test_kernel_mode_interpolates_at_the_tile_centre_and_clamps():
    network = _single_norm(1)
    norm = SlideNormalization(network, grid_spacing=10, grid_origin=(5, 5), grid_shape=(1, 3), sigma=0.0)
    tiles = torch.stack([_stat_tile([m], [1.0], 10) for m in (0.0, 4.0, 8.0)])
    _collect(norm, network, tiles, [[0, 0], [0, 10], [0, 20]], 10)
    norm.finalize()
    zeros = torch.zeros(3, 1, 10, 10)
    out = _run(norm, network, zeros, [[0, 5], [0, 12.5], [0, 40]], 10, "kernel")  # centres at nodes 0.5, 1.25, 3.5
    expected_means = torch.tensor([2.0, 5.0, 8.0])
    torch.testing.assert_close(out[:, 0], (-expected_means / math.sqrt(1 + 1e-5))[:, None, None].expand(3, 10, 10))


def test_dense_mode_interpolates_at_every_pixel_centre():
    network = _single_norm(1)
    norm = SlideNormalization(network, grid_spacing=10, grid_origin=(5, 5), grid_shape=(2, 2), sigma=0.0)
    means = {(0, 0): 0.0, (0, 10): 10.0, (10, 0): 20.0, (10, 10): 30.0}
    tiles = torch.stack([_stat_tile([m], [1.0], 10) for m in means.values()])
    _collect(norm, network, tiles, list(means), 10)
    norm.finalize()
    out = _run(norm, network, torch.zeros(1, 1, 10, 10), [[3, 0]], 10, "dense")
    rows = (torch.arange(10.0) + 3.5 - 5).clamp(0, 10) / 10  # node coordinates of the pixel centres, clamped
    cols = (torch.arange(10.0) + 0.5 - 5).clamp(0, 10) / 10
    expected_mean = 20 * rows[:, None] + 10 * cols[None, :]  # bilinear in the four node means
    torch.testing.assert_close(out[0, 0], -expected_mean / math.sqrt(1 + 1e-5))


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_finalize_raises_before_collection_and_slide_modes_need_statistics():
    generator = _small_generator()
    norm = SlideNormalization(generator, "dense", grid_spacing=32, grid_origin=(32, 32), grid_shape=(2, 2))
    with pytest.raises(RuntimeError, match="no statistics collected"):
        norm.finalize()
    tiles = torch.rand(2, 3, 64, 64)
    with pytest.raises(RuntimeError, match="finalize"), torch.no_grad(), norm.tiles([[0, 0], [0, 32]], 64):
        generator(tiles)
    _collect(norm, generator, tiles, [[0, 0], [0, 32]], 64)
    norm.finalize()
    with pytest.raises(RuntimeError, match="norm.tiles"), torch.no_grad():
        generator(tiles)
    with pytest.raises(ValueError, match="batch of 2"), torch.no_grad(), norm.tiles([[0, 0]], 64):
        generator(tiles)
    norm.reset()
    assert not norm.is_finalized and norm.collected_bytes() == 0
    with pytest.raises(RuntimeError, match="no statistics collected"):
        norm.finalize()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.InstanceNorm2d(4, affine=True), "affine"),
        (nn.InstanceNorm2d(4, track_running_stats=True), "running statistics"),
    ],
)
def test_refuses_affine_or_tracking_instance_norm(layer, message):
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(layer))
    with pytest.raises(ValueError, match=message) as info:
        SlideNormalization(network, grid_spacing=8, grid_origin=(4, 4), grid_shape=(2, 2))
    assert "'1.0'" in str(info.value)  # the layer's name
    assert isinstance(network[1][0], nn.InstanceNorm2d) and not isinstance(network[1][0], SlideInstanceNorm2d)


def test_refuses_unusable_networks_and_arguments():
    grid = {"grid_spacing": 8, "grid_origin": (4, 4), "grid_shape": (2, 2)}
    with pytest.raises(ValueError, match="no nn.InstanceNorm2d"):
        SlideNormalization(nn.Sequential(nn.Conv2d(3, 3, 1)), **grid)
    shared = nn.InstanceNorm2d(3)
    with pytest.raises(ValueError, match="several places"):
        SlideNormalization(nn.Sequential(shared, nn.ReLU(), shared), **grid)
    with pytest.raises(TypeError, match="itself"):
        SlideNormalization(nn.InstanceNorm2d(3), **grid)
    generator = _small_generator()
    norm = SlideNormalization(generator, **grid)
    with pytest.raises(ValueError, match="already"):
        SlideNormalization(generator, **grid)
    with pytest.raises(ValueError, match="unknown mode"):
        norm.mode = "global"
    for bad in ({"grid_spacing": 0}, {"sigma": -1}, {"grid_shape": (0, 2)}, {"grid_origin": (1.0, math.nan)}):
        with pytest.raises(ValueError):
            SlideNormalization(_single_norm(), **{**grid, **bad})
    with pytest.raises(ValueError, match="origins"), norm.tiles(torch.zeros(2, 3), 64):
        pass


# ------------------------------------------------------------------------------------------------------------
# Precision, gradients, memory
# ------------------------------------------------------------------------------------------------------------


def test_autocast_bf16_on_cpu_keeps_each_layers_input_dtype():
    generator = _small_generator()
    norm = SlideNormalization(generator, grid_spacing=32, grid_origin=(32, 32), grid_shape=(2, 2))
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    for layer in norm.layers.values():
        layer.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    tiles, origins = torch.rand(2, 3, 64, 64) * 2 - 1, [[0, 0], [32, 32]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _collect(norm, generator, tiles, origins, 64)
        norm.finalize()
        for mode in NORMALIZATION_MODES:
            seen.clear()
            out = _run(norm, generator, tiles, origins, 64, mode)
            assert torch.isfinite(out.float()).all()
            assert seen and all(dtype_in == dtype_out for dtype_in, dtype_out in seen)
            assert any(dtype_in == torch.bfloat16 for dtype_in, _ in seen)
    assert all(accumulator.mean_sum.dtype == torch.float32 for accumulator in norm._collected.values())
    assert norm.smoothed_statistics("stem.2")[0].dtype == torch.float32
    # float32 input outside autocast stays float32
    assert _run(norm, generator, tiles, origins, 64, "dense").dtype == torch.float32


def test_gradients_flow_in_dense_mode():
    generator = _small_generator()
    norm = SlideNormalization(generator, grid_spacing=32, grid_origin=(32, 32), grid_shape=(2, 2))
    tiles, origins = torch.rand(2, 3, 64, 64) * 2 - 1, [[0, 0], [32, 32]]
    _collect(norm, generator, tiles, origins, 64)
    norm.finalize()
    tiles.requires_grad_(True)
    with norm.tiles(origins, 64):
        generator(tiles).square().mean().backward()
    assert tiles.grad is not None and torch.isfinite(tiles.grad).all() and tiles.grad.abs().sum() > 0
    assert all(p.grad is not None for p in generator.parameters())


def test_statistics_memory_accounting():
    generator = _small_generator()
    norm = SlideNormalization(generator, grid_spacing=32, grid_origin=(32, 32), grid_shape=(3, 4))
    assert norm.bytes_per_node == SMALL_IN_CHANNELS * 2 * 4 == 1664
    assert norm.statistics_bytes() == 3 * 4 * 1664
    tiles = torch.rand(3, 3, 64, 64) * 2 - 1
    _collect(norm, generator, tiles, [[0, 0], [0, 0], [64, 96]], 64)  # two visited nodes
    # per visited node and layer: mean and std sums (8 bytes per channel), node index and count (16 bytes)
    assert norm.collected_bytes() == 2 * (1664 + 16 * len(norm.layers))
    norm.finalize()
    stored = sum(grid.numel() * grid.element_size() for grid in norm._grids.values())
    assert stored == norm.statistics_bytes()
