"""Reading slides by microns per pixel, the tile grid, the tissue mask and the streaming stitcher."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import downscale_local_mean

from roigan_stain_transfer.wsi import tissue as tissue_module
from roigan_stain_transfer.wsi.slide import SlideError, open_slide
from roigan_stain_transfer.wsi.stitching import BandBlender, RowReducer, seam_step
from roigan_stain_transfer.wsi.tiling import TileGrid, axis_origins, blend_window, tile_dataset, tissue_fractions
from roigan_stain_transfer.wsi.tissue import overview_factor, read_overview, tissue_mask
from tests.roigan_stain_transfer.wsi.conftest import write_slide


def _textured(shape, seed=0):
    """Smooth, tissue-like RGB content (no JPEG-hostile noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 230, (shape[0] // 16 + 2, shape[1] // 16 + 2, 3))
    big = np.kron(coarse, np.ones((16, 16, 1)))[: shape[0], : shape[1]]
    return np.clip(big, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Opening slides, resolution
# ----------------------------------------------------------------------------------------------------------------


def test_cmu_grid_at_20x_is_level_0(cmu_slide):
    slide = open_slide(cmu_slide, mpp=0.5)
    grid = slide.grid
    assert (grid.level, grid.shape, grid.mpp) == (0, (2967, 2220), 0.499)
    assert not grid.resampled and grid.downsample == 1.0
    tiles = TileGrid.over(grid.shape, 256, 32)
    assert tiles.grid_shape == (14, 10)
    assert tiles.rows[-1] + 256 == 2967 and tiles.cols[-1] + 256 == 2220
    slide.close()


def test_cmu_at_10x_resamples_level_0(cmu_slide, cmu_region):
    slide = open_slide(cmu_slide, mpp=1.0)
    grid = slide.grid
    assert grid.level == 0 and grid.resampled and grid.mpp == 1.0
    assert grid.shape == (round(2967 * 0.499), round(2220 * 0.499))
    tiles = TileGrid.over(grid.shape, 64, 0)
    dataset = tile_dataset(slide, tiles, [5])
    tile = dataset[0]["image"].permute(1, 2, 0).numpy().astype(float)
    row, col = tiles.origins([5])[0]
    top, left = round(row * grid.downsample), round(col * grid.downsample)
    size = round(64 * grid.scale)
    region = cmu_region[top : top + size, left : left + size].astype(float)
    expected = downscale_local_mean(region[:128, :128], (2, 2, 1))  # scale 2.004: area mean of ~2x2 px
    assert np.abs(tile - expected).mean() < 6.0


def test_finer_than_the_scan_is_an_error(cmu_slide):
    with pytest.raises(SlideError, match="finer than the scan"):
        open_slide(cmu_slide, mpp=0.25)


def test_level_chosen_by_mpp(tmp_path):
    base = _textured((1024, 768))
    half = downscale_local_mean(base.astype(float), (2, 2, 1)).round().astype(np.uint8)
    path = write_slide(tmp_path / "two.tif", [base, half], mpp=0.25, compression="zlib")
    slide = open_slide(path, mpp=0.5)
    assert (slide.grid.level, slide.grid.shape, slide.grid.resampled) == (1, (512, 384), False)
    assert slide.grid.mpp == pytest.approx(0.5)
    tiles = TileGrid.over(slide.grid.shape, 128, 16)
    item = tile_dataset(slide, tiles, [len(tiles) - 1])[0]
    row, col = tiles.origins([len(tiles) - 1])[0]
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), half[row : row + 128, col : col + 128])


def test_slide_without_resolution_needs_slide_mpp(tmp_path):
    path = write_slide(tmp_path / "nompp.tif", [_textured((512, 512))], mpp=None)
    with pytest.raises(SlideError, match="slide_mpp"):
        open_slide(path)
    slide = open_slide(path, mpp=0.5, slide_mpp=0.5)
    assert slide.grid.shape == (512, 512) and slide.grid.mpp == 0.5


def test_missing_and_corrupt_slides(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        open_slide(tmp_path / "missing.svs")
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(SlideError, match="corrupt.svs"):
        open_slide(corrupt)


# ----------------------------------------------------------------------------------------------------------------
# Grid, window, tissue
# ----------------------------------------------------------------------------------------------------------------


def test_axis_origins_and_window():
    assert axis_origins(256, 256, 32).tolist() == [0]
    assert axis_origins(700, 256, 32).tolist() == [0, 224, 444]
    with pytest.raises(ValueError, match="smaller than one tile"):
        axis_origins(200, 256, 32)
    w = blend_window(256, 32)
    assert w.min() > 0 and w.max() == 1.0 and np.allclose(w, w[::-1])
    grid = TileGrid.over((700, 530), 256, 32)
    rows, cols = grid.weight_sums()
    assert rows.shape == (700,) and cols.shape == (530,) and rows.min() > 0 and cols.min() > 0


def test_tissue_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((60, 45)) < 0.3
    grid = TileGrid.over((240, 180), 32, 8)
    fractions = tissue_fractions(grid, mask, factor=4)
    for index, (row, col) in enumerate(grid.origins()):
        expected = mask[row // 4 : -(-(row + 32) // 4), col // 4 : -(-(col + 32) // 4)].mean()
        assert fractions[index] == pytest.approx(expected)


def test_cmu_tissue_mask(cmu_slide, cmu_region):
    slide = open_slide(cmu_slide)
    factor = overview_factor(slide.grid.shape)
    overview = read_overview(slide, factor)
    assert factor == 4 and overview.shape == (742, 555, 3)
    expected = downscale_local_mean(cmu_region[:2964, :2220].astype(float), (4, 4, 1))
    assert np.abs(overview[:741].astype(float) - expected).max() <= 1.0
    mask = tissue_mask(overview)
    assert 0.2 < mask.mean() < 0.6  # the section covers about a third of the region
    grey = overview.mean(axis=2)
    assert not mask[grey > 235].any() or mask[grey > 235].mean() < 0.02  # white glass is not tissue
    assert mask[450:700, :80].sum() == 0  # the lower left is glass


def test_overview_in_strips_equals_one_read(cmu_slide, monkeypatch):
    slide = open_slide(cmu_slide, mpp=1.0)
    whole = read_overview(slide, 4)
    monkeypatch.setattr(tissue_module, "_STRIP_PIXELS", 40_000)
    assert np.array_equal(read_overview(slide, 4), whole)


def test_all_glass_and_all_tissue():
    glass = np.full((64, 64, 3), 242, np.uint8) + np.random.default_rng(0).integers(0, 4, (64, 64, 3)).astype(np.uint8)
    assert tissue_mask(glass).sum() == 0
    pink = np.zeros((64, 64, 3), np.uint8) + np.array([220, 140, 200], np.uint8)
    pink[:32] = (150, 60, 150)
    assert tissue_mask(pink).all()


# ----------------------------------------------------------------------------------------------------------------
# Stitching
# ----------------------------------------------------------------------------------------------------------------


def _stitch(image, grid, keep):
    out = np.zeros_like(image)
    blender = BandBlender(grid, lambda top, rows: out.__setitem__(slice(top, top + len(rows)), rows))
    for index, (row, col) in enumerate(grid.origins()):
        if keep(index):
            blender.add(index, image[row : row + grid.tile_size, col : col + grid.tile_size])
    blender.close()
    return out


def test_blending_identity_tiles_is_exact():
    image = np.random.default_rng(0).integers(0, 256, (700, 530, 3)).astype(np.uint8)
    grid = TileGrid.over(image.shape[:2], 128, 24)
    assert np.array_equal(_stitch(image, grid, lambda i: True), image)


def test_skipped_tiles_are_white_and_rows_arrive_once():
    image = np.random.default_rng(0).integers(0, 250, (700, 530, 3)).astype(np.uint8)
    grid = TileGrid.over(image.shape[:2], 128, 24)
    tops = []
    out = np.zeros_like(image)

    def emit(top, rows):
        tops.append((top, len(rows)))
        out[top : top + len(rows)] = rows

    blender = BandBlender(grid, emit)
    skipped_row = 2
    for index, (row, col) in enumerate(grid.origins()):
        if index // len(grid.cols) != skipped_row:
            blender.add(index, image[row : row + 128, col : col + 128])
    blender.close()
    assert sum(n for _, n in tops) == 700 and [t for t, _ in tops] == sorted(t for t, _ in tops)
    only_skipped = slice(grid.rows[skipped_row - 1] + 128, grid.rows[skipped_row + 1])
    assert (out[only_skipped] == 255).all()
    with pytest.raises(ValueError, match="out of order"):
        blender2 = BandBlender(grid, lambda *a: None)
        blender2.add(3, image[:128, :128])
        blender2.add(1, image[:128, :128])


def test_row_reducer_is_an_area_mean():
    image = np.random.default_rng(0).integers(0, 256, (103, 77, 3)).astype(np.uint8)
    reducer = RowReducer(103, 77, 3, 4)
    for start in range(0, 103, 13):
        reducer.add(image[start : start + 13])
    result = reducer.result()
    assert result.shape == (26, 20, 3)
    assert np.allclose(result[:25, :19], downscale_local_mean(image[:100, :76].astype(float), (4, 4, 1)), atol=1e-3)
    assert np.allclose(result[25, 19], image[100:, 76:].reshape(-1, 3).mean(axis=0), atol=1e-3)


def test_seam_step_sees_tiles_in_different_tones():
    rng = np.random.default_rng(0)
    image = rng.normal(150, 10, (1000, 1000, 3)).clip(0, 255).astype(np.uint8)
    grid = TileGrid.over(image.shape[:2], 256, 0)
    plain = seam_step(image, grid)
    assert 0.8 < plain["ratio"] < 1.25  # no tile grid in the image: borders look like any other line
    toned = image.astype(int)
    for index, (row, col) in enumerate(grid.origins()):
        toned[row : row + 256, col : col + 256] += (index % 3) * 8
    shifted = seam_step(np.clip(toned, 0, 255).astype(np.uint8), grid)
    assert shifted["ratio"] > 5 and shifted["within"] == pytest.approx(plain["within"])
    white = np.full_like(image, 255)
    assert seam_step(white, grid)["segments"] == 0  # background is left out
