"""Tests of the streaming pyramidal BigTIFF writer: read back with OpenSlide (generic-tiff) and tifffile."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from roigan_stain_transfer.wsi import pyramid
from roigan_stain_transfer.wsi.pyramid import PyramidalTiffWriter, halve_rows, pyramid_levels, write_pyramidal_tiff

IRREGULAR_BANDS = (1, 37, 256, 300, 5, 401)  # 1000 rows
MPP = 0.2527


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def _noise_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _smooth_image(height: int, width: int) -> np.ndarray:
    """Smooth RGB ``(height, width, 3)`` content: gradients and slow waves, as JPEG likes them."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 80 * np.sin(rows / 37.0) * np.cos(cols / 53.0)
    green = 60 + 120 * cols / width
    blue = 200 - 100 * rows / height + 20 * np.sin((rows + cols) / 29.0)
    return np.rint(np.stack([red, green, blue], axis=-1)).clip(0, 255).astype(np.uint8)


def _write_bands(writer: PyramidalTiffWriter, image: np.ndarray, heights: tuple[int, ...]) -> None:
    start = 0
    for height in heights:
        writer.write_rows(image[start : start + height])
        start += height
    assert start == image.shape[0]


def _mean_halve(image: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean ``(ceil(H/2), ceil(W/2), C)`` float of the pixels present (NaN padding)."""
    height, width, channels = image.shape
    padded = np.full((height + height % 2, width + width % 2, channels), np.nan)
    padded[:height, :width] = image
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, channels)
    return np.nanmean(blocks, axis=(1, 3))


def _level(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    width, height = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (width, height)))[..., :3]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------------------
# Geometry and downsampling
# ------------------------------------------------------------------------------------------------------------


def test_pyramid_levels() -> None:
    assert pyramid_levels(1000, 1500) == [(1000, 1500), (500, 750), (250, 375)]
    assert pyramid_levels(20000, 20000) == [(20000 // 2**k,) * 2 for k in range(6)] + [(313, 313)]
    assert pyramid_levels(1025, 3, 512) == [(1025, 3), (513, 2), (257, 1)]
    assert pyramid_levels(100, 80) == [(100, 80)]
    assert pyramid_levels(512, 512, 512) == [(512, 512)]


@pytest.mark.parametrize("shape", [(4, 6, 3), (5, 7, 3), (1, 1, 1), (3, 8, 1)])
def test_halve_rows_is_rounded_mean_of_present_pixels(shape: tuple[int, int, int]) -> None:
    image = _noise_image(*shape, seed=sum(shape))
    expected = np.floor(_mean_halve(image) + 0.5).astype(np.uint8)  # round half up
    np.testing.assert_array_equal(halve_rows(image), expected)


@pytest.mark.parametrize(("height", "width", "seed"), [(517, 1031, 1), (333, 64, 2), (1, 300, 3), (200, 1, 4)])
def test_streamed_levels_equal_halving_the_whole_image(tmp_path: Path, height: int, width: int, seed: int) -> None:
    image = _noise_image(height, width, seed=seed)
    bands = np.diff(np.unique(np.r_[0, np.random.default_rng(seed).integers(1, height + 1, 12), height]))
    path = tmp_path / "odd.tif"
    with PyramidalTiffWriter(path, height, width, 1.0, compression="deflate", tile_size=32, min_level_size=8) as w:
        _write_bands(w, image, tuple(int(b) for b in bands))
    with tifffile.TiffFile(path) as tif:
        assert [page.shape[:2] for page in tif.pages] == w.levels
        expected = image
        for page in tif.pages:
            np.testing.assert_array_equal(page.asarray(), expected)
            expected = halve_rows(expected)


# ------------------------------------------------------------------------------------------------------------
# Round trips through OpenSlide
# ------------------------------------------------------------------------------------------------------------


def test_deflate_irregular_bands_round_trip(tmp_path: Path) -> None:
    image = _noise_image(1000, 1500)
    path = tmp_path / "slide.tif"
    with PyramidalTiffWriter(path, 1000, 1500, MPP, compression="deflate", description='{"k": 1}') as writer:
        assert writer.levels == [(1000, 1500), (500, 750), (250, 375)]
        _write_bands(writer, image, IRREGULAR_BANDS)
    assert _leftovers(tmp_path) == ["slide.tif"]

    slide = openslide.OpenSlide(path)
    assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert slide.level_dimensions == tuple((w, h) for h, w in writer.levels)
    assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, rel=1e-6)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, rel=1e-6)
    assert slide.properties[openslide.PROPERTY_NAME_COMMENT] == '{"k": 1}'
    np.testing.assert_array_equal(_level(slide, 0), image)
    previous = image
    for level in (1, 2):
        current = _level(slide, level)
        assert np.abs(current - _mean_halve(previous)).max() <= 1.0
        previous = current
    slide.close()

    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and len(tif.pages) == 3
        assert tif.pages[0].description == '{"k": 1}'
        for level, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.subfiletype == (1 if level else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            numerator, denominator = page.tags["XResolution"].value
            assert numerator / denominator == pytest.approx(1e4 / (MPP * 2**level), rel=1e-6)


def test_jpeg_smooth_content(tmp_path: Path) -> None:
    image = _smooth_image(1000, 1500)
    path = tmp_path / "slide.tiff"
    with PyramidalTiffWriter(path, 1000, 1500, 0.5, compression="jpeg", quality=90) as writer:
        _write_bands(writer, image, IRREGULAR_BANDS)
    with tifffile.TiffFile(path) as tif:
        assert all(page.photometric == tifffile.PHOTOMETRIC.YCBCR for page in tif.pages)
    slide = openslide.OpenSlide(path)
    assert slide.level_count == 3
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    assert np.abs(_level(slide, 0).astype(float) - image).mean() < 2.0
    assert np.abs(_level(slide, 1).astype(float) - _mean_halve(image)).mean() < 2.0
    slide.close()


def test_grayscale_deflate(tmp_path: Path) -> None:
    image = _noise_image(700, 600, channels=1)
    path = tmp_path / "grey.tif"
    with PyramidalTiffWriter(path, 700, 600, 1.0, channels=1, compression="deflate", tile_size=128) as writer:
        writer.write_rows(image[:300, :, 0])  # (h, W) is accepted for grey
        writer.write_rows(image[300:])
    with tifffile.TiffFile(path) as tif:
        assert [page.shape for page in tif.pages] == [(700, 600), (350, 300)]
        np.testing.assert_array_equal(tif.pages[0].asarray(), image[..., 0])
        assert np.abs(tif.pages[1].asarray() - _mean_halve(image)[..., 0]).max() <= 0.5
    slide = openslide.OpenSlide(path)
    assert slide.level_dimensions == ((600, 700), (300, 350))
    np.testing.assert_array_equal(_level(slide, 0), np.repeat(image, 3, axis=2))
    slide.close()


def test_write_pyramidal_tiff_in_memory(tmp_path: Path) -> None:
    heat = _smooth_image(300, 200)
    path = write_pyramidal_tiff(tmp_path / "heat.tif", heat, 8.0, compression="none", background=0)
    assert path == tmp_path / "heat.tif"
    slide = openslide.OpenSlide(path)
    assert slide.level_count == 1 and slide.dimensions == (200, 300)
    np.testing.assert_array_equal(_level(slide, 0), heat)
    slide.close()


# ------------------------------------------------------------------------------------------------------------
# A 20000 x 20000 slide streamed in bands: bounded memory
# ------------------------------------------------------------------------------------------------------------

BIG = 20000
BLOBS = ((3000, 4000, 700), (10500, 12000, 900), (16500, 5500, 600))  # (row, col, radius) of tissue-like blobs
TISSUE_RGB = np.array([190.0, 110.0, 170.0], dtype=np.float32)


def _tissue(row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
    """Pixels ``(row1 - row0, col1 - col0, 3)`` uint8 of the synthetic slide in that window: white background and
    textured blobs with soft edges."""
    rows = np.arange(row0, row1, dtype=np.float32)[:, None]
    cols = np.arange(col0, col1, dtype=np.float32)[None, :]
    wave = (25 * np.sin(rows / 6) * np.cos(cols / 8))[..., None]
    texture = TISSUE_RGB + wave * np.array([1.0, 0.6, -0.4], dtype=np.float32)
    pixels = np.full((row1 - row0, col1 - col0, 3), 255.0, dtype=np.float32)
    for row, col, radius in BLOBS:
        alpha = np.clip((radius - np.hypot(rows - row, cols - col)) / 16.0, 0.0, 1.0)[..., None]
        pixels = pixels * (1 - alpha) + texture * alpha
    return np.rint(pixels).astype(np.uint8)


def _slide_bands(band: int) -> Iterator[np.ndarray]:
    """The synthetic ``BIG x BIG`` slide as bands ``(band, BIG, 3)``, generated band by band."""
    for row0 in range(0, BIG, band):
        row1 = min(row0 + band, BIG)
        rows = np.full((row1 - row0, BIG, 3), 255, dtype=np.uint8)
        for row, col, radius in BLOBS:
            if row - radius < row1 and row + radius > row0:
                col0, col1 = max(col - radius - 1, 0), min(col + radius + 1, BIG)
                rows[:, col0:col1] = _tissue(row0, row1, col0, col1)
        yield rows


def test_large_slide_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with PyramidalTiffWriter(path, BIG, BIG, 0.5, compression="jpeg", quality=90) as writer:
            for rows in _slide_bands(256):
                writer.write_rows(rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    raw = BIG * BIG * 3
    print(f"\n20000^2 slide: peak traced memory {peak / 2**20:.0f} MiB (raw {raw / 2**20:.0f} MiB), {elapsed:.1f} s")
    assert peak < 200 * 2**20 and peak < raw / 8
    assert _leftovers(tmp_path) == ["big.tif"]

    slide = openslide.OpenSlide(path)
    assert slide.dimensions == (BIG, BIG)
    assert slide.level_dimensions == tuple((w, h) for h, w in writer.levels)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    row, col, _ = BLOBS[1]
    x, y = col - 300, row - 200  # a 600 x 400 window inside the blob, across tile borders
    region = np.asarray(slide.read_region((x, y), 0, (600, 400)))[..., :3]
    assert np.abs(region.astype(float) - _tissue(y, y + 400, x, x + 600)).mean() < 2.0
    blank = np.asarray(slide.read_region((BIG - 300, 100), 0, (300, 300)))[..., :3]
    assert np.abs(blank.astype(int) - 255).max() <= 1
    overview = _level(slide, slide.level_count - 1)
    assert overview.shape == (313, 313, 3) and overview.min() < 200 and np.median(overview) >= 254
    slide.close()


# ------------------------------------------------------------------------------------------------------------
# Validation, failure and atomicity
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": -1.0}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"mpp": float("inf")}, "mpp"),
        ({"height": 0}, "height"),
        ({"width": -5}, "width"),
        ({"width": 10.5}, "width"),
        ({"tile_size": 100}, "multiple of 16"),
        ({"tile_size": 0}, "tile_size"),
        ({"compression": "lzw"}, "compression"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
        ({"channels": 4}, "channels"),
        ({"channels": 1}, "jpeg"),
        ({"background": 256}, "background"),
        ({"min_level_size": 0}, "min_level_size"),
        ({"description": b"bytes"}, "description"),
        ({"description": "5 \u00b5m"}, "ASCII"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"path": tmp_path / "x.tif", "height": 100, "width": 100, "mpp": 0.5} | kwargs
    with pytest.raises(ValueError, match=message):
        PyramidalTiffWriter(**args)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "rows",
    [
        np.zeros((10, 99, 3), np.uint8),
        np.zeros((10, 100, 1), np.uint8),
        np.zeros((10, 100), np.uint8),
        np.zeros((0, 100, 3), np.uint8),
        np.zeros((10, 100, 3), np.float32),
    ],
)
def test_bad_rows_raise(tmp_path: Path, rows: np.ndarray) -> None:
    with PyramidalTiffWriter(tmp_path / "x.tif", 100, 100, 0.5) as writer:
        with pytest.raises(ValueError, match=r"\(h, 100, 3\) uint8"):
            writer.write_rows(rows)
        writer.write_rows(np.zeros((100, 100, 3), np.uint8))  # the writer is still usable
    assert _leftovers(tmp_path) == ["x.tif"]


def test_too_many_rows_raise(tmp_path: Path) -> None:
    with PyramidalTiffWriter(tmp_path / "x.tif", 100, 100, 0.5) as writer:
        writer.write_rows(np.zeros((60, 100, 3), np.uint8))
        with pytest.raises(ValueError, match="only 40 of the 100 rows remain"):
            writer.write_rows(np.zeros((41, 100, 3), np.uint8))
        writer.write_rows(np.zeros((40, 100, 3), np.uint8))
        with pytest.raises(ValueError, match="only 0"):
            writer.write_rows(np.zeros((1, 100, 3), np.uint8))


def test_close_with_missing_rows_leaves_nothing(tmp_path: Path) -> None:
    writer = PyramidalTiffWriter(tmp_path / "x.tif", 1000, 1200, 0.5)
    writer.write_rows(_noise_image(700, 1200))
    with pytest.raises(ValueError, match="300 of the 1000 rows are missing"):
        writer.close()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="aborted"):
        writer.write_rows(_noise_image(300, 1200))


def test_exception_in_with_block_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="inference failed"):
        with PyramidalTiffWriter(tmp_path / "x.tif", 1000, 1200, 0.5, compression="deflate") as writer:
            writer.write_rows(_noise_image(600, 1200))
            assert len(_leftovers(tmp_path)) == 2  # the partial TIFF and the spool
            raise RuntimeError("inference failed")
    assert _leftovers(tmp_path) == []


def test_abort_and_repeated_close(tmp_path: Path) -> None:
    writer = PyramidalTiffWriter(tmp_path / "a.tif", 300, 300, 0.5)
    writer.write_rows(np.zeros((10, 300, 3), np.uint8))
    writer.abort()
    writer.abort()
    assert _leftovers(tmp_path) == []

    writer = PyramidalTiffWriter(tmp_path / "b.tif", 300, 300, 0.5)
    writer.write_rows(np.zeros((300, 300, 3), np.uint8))
    assert writer.close() == writer.close() == tmp_path / "b.tif"
    writer.abort()  # no-op once closed
    assert _leftovers(tmp_path) == ["b.tif"]


def test_existing_file_replaced_only_at_close(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous slide")
    image = _noise_image(600, 700)
    writer = PyramidalTiffWriter(path, 600, 700, 0.5, compression="deflate")
    _write_bands(writer, image, (250, 350))
    assert path.read_bytes() == b"previous slide"
    writer.close()
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(tif.pages[0].asarray(), image)
    assert _leftovers(tmp_path) == ["slide.tif"]


def test_background_error_is_reraised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_write(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pyramid.tifffile.TiffWriter, "write", failing_write)
    writer = PyramidalTiffWriter(tmp_path / "x.tif", 2000, 2000, 0.5)
    with pytest.raises(OSError, match="disk full"):
        for rows in np.array_split(np.zeros((2000, 2000, 3), np.uint8), 8):
            writer.write_rows(rows)
        writer.close()
    assert _leftovers(tmp_path) == []
