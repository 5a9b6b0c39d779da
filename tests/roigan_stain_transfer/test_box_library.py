"""Tests of the automatic cell box library (region-guided CycleGAN, Boyd et al. 2022).

Golden values come from the released-code preset on the CAMELYON sample tiles of the shared data
(``tiles/camelyon_gr_samples``); those tests skip when the data is absent. Synthetic tiles cover the
pipeline without it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk as draw_disk

from roigan_stain_transfer import box_library as bl
from tests.conftest import require_data

SAMPLES = "tiles/camelyon_gr_samples"
HAEMATOXYLIN_RGB = (70, 50, 150)
DAB_RGB = (150, 100, 50)

# (normal, cancer) box counts of the released-code preset.
HE_GOLDEN = {0: (54, 8), 1: (30, 14)}
IHC_GOLDEN = {0: (59, 23), 1: (161, 0)}
HE0_LISTED_NORMAL = [[203, 6, 251, 54], [201, 50, 249, 98], [187, 33, 235, 81], [61, 196, 109, 244], [38, 109, 86, 157]]
IHC0_FIRST_NORMAL = [[149, 36, 197, 84], [113, 25, 161, 73], [144, 18, 192, 66], [33, 17, 81, 65], [91, 17, 139, 65]]


# ------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------------------


def _h5(name: str, dataset: str) -> np.ndarray:
    with h5py.File(require_data(f"{SAMPLES}/{name}"), "r") as handle:
        return handle[dataset][:]


@pytest.fixture(scope="module")
def he_tiles() -> np.ndarray:
    return _h5("CAMELYON_HE_patches.h5", "x")


@pytest.fixture(scope="module")
def he_masks() -> np.ndarray:
    return _h5("CAMELYON_HE_masks.h5", "y")


@pytest.fixture(scope="module")
def ihc_tiles() -> np.ndarray:
    return _h5("IHC_patches.h5", "x")


def _synthetic_tile(
    dots: list[tuple[int, int]] = (),
    soft: list[tuple[int, int, float, tuple[int, int, int]]] = (),
    left_half_rgb: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """256x256 light tile with hard dots (radius 3, haematoxylin colour) and soft Gaussian blobs."""
    tile = np.full((256, 256, 3), 240.0)
    if left_half_rgb is not None:
        tile[:, :128] = left_half_rgb
    rows, cols = np.mgrid[:256, :256]
    for row, col, sigma, rgb in soft:
        weight = np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2))[..., None]
        tile = tile * (1 - weight) + np.asarray(rgb, dtype=float) * weight
    for row, col in dots:
        rr, cc = draw_disk((row, col), 3, shape=(256, 256))
        tile[rr, cc] = HAEMATOXYLIN_RGB
    return np.rint(tile).astype(np.uint8)


def _box(row: int, col: int) -> list[int]:
    return [col - 24, row - 24, col + 24, row + 24]


def _assert_valid_boxes(boxes: np.ndarray, shape: tuple[int, ...]) -> None:
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and boxes.dtype == np.int64
    assert np.all(boxes[:, :2] >= 0)
    assert np.all(boxes[:, 2] <= shape[1]) and np.all(boxes[:, 3] <= shape[0])
    assert np.all(boxes[:, 2] - boxes[:, 0] == 48) and np.all(boxes[:, 3] - boxes[:, 1] == 48)


# ------------------------------------------------------------------------------------------------------------
# Golden values on the sample tiles
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_he_golden_counts(he_tiles, he_masks, index):
    boxes = bl.he_tile_boxes(he_tiles[index], he_masks[index], bl.RELEASED_CODE)
    assert (len(boxes.normal), len(boxes.cancer)) == HE_GOLDEN[index]
    _assert_valid_boxes(boxes.normal, he_tiles[index].shape)
    _assert_valid_boxes(boxes.cancer, he_tiles[index].shape)


def test_he_tile0_listed_normal_boxes(he_tiles, he_masks):
    normal = bl.he_tile_boxes(he_tiles[0], he_masks[0]).normal.tolist()
    for box in HE0_LISTED_NORMAL:
        assert box in normal


@pytest.mark.parametrize("index", [0, 1])
def test_ihc_golden_counts(ihc_tiles, index):
    boxes = bl.ihc_tile_boxes(ihc_tiles[index], bl.RELEASED_CODE)
    assert (len(boxes.normal), len(boxes.cancer)) == IHC_GOLDEN[index]
    _assert_valid_boxes(boxes.normal, ihc_tiles[index].shape)
    _assert_valid_boxes(boxes.cancer, ihc_tiles[index].shape)


def test_ihc_tile0_first_normal_boxes_in_blob_order(ihc_tiles):
    assert bl.ihc_tile_boxes(ihc_tiles[0]).normal[:5].tolist() == IHC0_FIRST_NORMAL


def test_dab_mask_ihc0(ihc_tiles):
    mask, info = bl.dab_mask(ihc_tiles[0])
    assert mask.shape == (256, 256) and mask.dtype == bool
    assert info.threshold == pytest.approx(0.645, abs=5e-4)
    assert info.mean_grey == pytest.approx(0.686, abs=5e-4)
    assert info.coverage == pytest.approx(0.485, abs=1e-3)
    assert mask.mean() == pytest.approx(info.coverage)
    assert not info.emptied


def test_dab_mask_ihc1_is_emptied(ihc_tiles):
    mask, info = bl.dab_mask(ihc_tiles[1])
    assert info.mean_grey == pytest.approx(0.898, abs=5e-4)
    assert info.emptied and info.coverage == 0.0
    assert not mask.any()


def test_boundary_pixels_of_hulls_matter(he_tiles, he_masks, monkeypatch):
    """A hull rasteriser without boundary pixels lets one more cancer box through on H&E tile 1."""
    from skimage.draw import polygon

    def interior_only(centres, labels, shape, min_cluster_size):
        image = np.zeros(tuple(shape[:2]), dtype=bool)
        for label in np.unique(labels):
            members = centres[labels == label]
            if len(members) >= min_cluster_size:
                hull = bl.convex_hull(members)
                rr, cc = polygon(hull[:, 0], hull[:, 1], shape=image.shape)
                image[rr, cc] = True
            else:
                image[members[:, 0], members[:, 1]] = True
        return image

    monkeypatch.setattr(bl, "normal_cluster_image", interior_only)
    assert len(bl.he_tile_boxes(he_tiles[1], he_masks[1]).cancer) == 15


def test_paper_preset_differs_only_by_cluster_distance(he_tiles, he_masks):
    assert bl.PAPER.cluster_distance == 25 and bl.RELEASED_CODE.cluster_distance == 35
    assert dataclasses.replace(bl.PAPER, cluster_distance=35.0) == bl.RELEASED_CODE
    assert bl.resolve_preset("paper") is bl.PAPER and bl.resolve_preset("released_code") is bl.RELEASED_CODE
    for tile, mask in zip(he_tiles, he_masks, strict=True):
        boxes = bl.he_tile_boxes(tile, mask, bl.PAPER)
        _assert_valid_boxes(boxes.normal, tile.shape)
        _assert_valid_boxes(boxes.cancer, tile.shape)


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        bl.RELEASED_CODE.cluster_distance = 10.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown preset"):
        bl.resolve_preset("nope")


# ------------------------------------------------------------------------------------------------------------
# Synthetic tiles (no shared data needed)
# ------------------------------------------------------------------------------------------------------------


def test_synthetic_ihc_without_dab_gives_normal_boxes_at_dots():
    dots = [(60, 60), (60, 190), (190, 60), (190, 190), (128, 128)]
    tile = _synthetic_tile(dots=dots)
    mask, info = bl.dab_mask(tile)
    assert info.emptied and not mask.any()
    boxes = bl.ihc_tile_boxes(tile)
    assert sorted(boxes.normal.tolist()) == sorted(_box(r, c) for r, c in dots)
    assert boxes.cancer.shape == (0, 4)


def test_synthetic_ihc_cancer_nucleus_inside_dab_region():
    tile = _synthetic_tile(dots=[(60, 190), (190, 190)], soft=[(128, 64, 5.0, HAEMATOXYLIN_RGB)], left_half_rgb=DAB_RGB)
    mask, info = bl.dab_mask(tile)
    assert not info.emptied and mask[:, :120].all() and not mask[:, 136:].any()
    boxes = bl.ihc_tile_boxes(tile)
    assert boxes.cancer.tolist() == [_box(128, 64)]
    assert sorted(boxes.normal.tolist()) == sorted([_box(60, 190), _box(190, 190)])


def test_synthetic_he_clusters_and_exclusion():
    cluster = [(60, 60), (60, 80), (78, 70)]
    lonely = (200, 40)
    tile = _synthetic_tile(dots=[*cluster, lonely], soft=[(170, 170, 10.0, HAEMATOXYLIN_RGB)])
    full = np.ones((256, 256), dtype=bool)
    boxes = bl.he_tile_boxes(tile, full)
    # Only clustered cells give normal boxes; the lonely cell and the cluster also respond at the cancer
    # scale but lie in the excluded (dilated) region, leaving the big soft nucleus as the only cancer cell.
    assert sorted(boxes.normal.tolist()) == sorted(_box(r, c) for r, c in cluster)
    assert boxes.cancer.tolist() == [_box(170, 170)]
    assert bl.he_tile_boxes(tile, ~full).cancer.shape == (0, 4)


def test_boxes_around_keeps_boxes_touching_the_border():
    centres = np.array([[24, 24], [232, 232], [23, 100], [100, 233]])
    boxes = bl.boxes_around(centres, (256, 256), 48)
    assert boxes.tolist() == [[0, 0, 48, 48], [208, 208, 256, 256]]
    assert bl.boxes_around(np.zeros((0, 2)), (256, 256), 48).shape == (0, 4)


def test_cluster_labels_single_linkage_inclusive():
    centres = np.array([[0, 0], [0, 35], [0, 70], [0, 106]])
    labels = bl.cluster_labels(centres, 35)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert bl.cluster_labels(np.zeros((0, 2)), 35).shape == (0,)


def test_convex_hull_drops_interior_and_collinear_points():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4], [2, 2], [2, 0]])
    assert sorted(map(tuple, bl.convex_hull(square).tolist())) == [(0, 0), (0, 4), (4, 0), (4, 4)]
    line = np.array([[0, 0], [1, 1], [3, 3]])
    assert sorted(map(tuple, bl.convex_hull(line).tolist())) == [(0, 0), (3, 3)]


def test_normal_cluster_image_includes_hull_boundary():
    centres = np.array([[2, 2], [2, 12], [12, 2], [30, 30]])  # (row, col): a triangle and a lonely cell
    labels = np.array([0, 0, 0, 1])
    image = bl.normal_cluster_image(centres, labels, (40, 40), min_cluster_size=3)
    for row, col in [(2, 2), (2, 12), (12, 2), (2, 7), (7, 2), (7, 7), (4, 4)]:  # vertices, edges, inside
        assert image[row, col]
    assert image[30, 30] and image[28:33, 28:33].sum() == 1
    assert not image[8, 8] and image.sum() == 1 + sum(11 - i for i in range(11))


# ------------------------------------------------------------------------------------------------------------
# CSV storage
# ------------------------------------------------------------------------------------------------------------


def _records() -> list[bl.BoxRecord]:
    return [
        bl.BoxRecord("a.h5:0", 0, 0, 48, 48, 0),
        bl.BoxRecord("a.h5:0", 10, 20, 58, 68, 1),
        bl.BoxRecord("b, with comma.png", 5, 6, 53, 54, 1),
    ]


def test_csv_round_trip(tmp_path):
    path = bl.write_library_csv(tmp_path / "sub" / "lib.csv", _records())
    assert path.read_text().splitlines()[0] == "tile,xmin,ymin,xmax,ymax,class"
    library = bl.read_library_csv(path)
    assert list(library) == _records() and len(library) == 3
    assert library.tiles() == ["a.h5:0", "b, with comma.png"]
    boxes, classes = library.boxes_for_tile("a.h5:0")
    assert boxes.tolist() == [[0, 0, 48, 48], [10, 20, 58, 68]] and classes.tolist() == [0, 1]
    empty_boxes, empty_classes = library.boxes_for_tile("missing")
    assert empty_boxes.shape == (0, 4) and empty_classes.shape == (0,)
    assert set(library.by_tile()) == {"a.h5:0", "b, with comma.png"}
    assert [p.name for p in path.parent.iterdir()] == ["lib.csv"]  # no temp file left behind


def test_records_for_tile_orders_normal_then_cancer():
    boxes = bl.TileBoxes(normal=np.array([[0, 0, 48, 48]]), cancer=np.array([[1, 2, 49, 50]]))
    assert bl.records_for_tile("t", boxes) == [bl.BoxRecord("t", 0, 0, 48, 48, 0), bl.BoxRecord("t", 1, 2, 49, 50, 1)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tile,xmin,ymin,xmax,class\nt,0,0,48,0\n", r"missing columns \['ymax'\]"),
        ("tile,xmin,ymin,xmax,ymax,class\nt,48,0,48,48,0\n", "xmax > xmin"),
        ("tile,xmin,ymin,xmax,ymax,class\nt,0,0,48,48,0\nt,0,1.5,48,48,0\n", r"line 3: column 'ymin' expected an int"),
        ("tile,xmin,ymin,xmax,ymax,class\nt,0,0,48,48,2\n", "class 2 is not 0"),
        ("tile,xmin,ymin,xmax,ymax,class\n,0,0,48,48,1\n", "empty tile id"),
        ("tile,xmin,ymin,xmax,ymax,class\nt,0,0,48\n", "column 'ymax' expected an integer"),
    ],
)
def test_csv_validation_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        bl.read_library_csv(path)
    assert str(path) in str(error.value)


def test_csv_write_rejects_bad_records_and_keeps_old_file(tmp_path):
    path = bl.write_library_csv(tmp_path / "lib.csv", _records())
    before = path.read_text()
    with pytest.raises(ValueError, match="record 0 .*class 5"):
        bl.write_library_csv(path, [("t", 0, 0, 48, 48, 5)])
    assert path.read_text() == before
    with pytest.raises(FileNotFoundError, match="not found"):
        bl.read_library_csv(tmp_path / "none.csv")


# ------------------------------------------------------------------------------------------------------------
# build_library and the command line
# ------------------------------------------------------------------------------------------------------------


def _write_pngs(folder: Path, arrays: np.ndarray, stem: str = "tile") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{stem}_{index}.png")


def test_build_library_he_png_folder(tmp_path, he_tiles, he_masks):
    _write_pngs(tmp_path / "tiles", he_tiles)
    _write_pngs(tmp_path / "masks", (he_masks * 255).astype(np.uint8))
    summary = bl.build_library(tmp_path / "tiles", tmp_path / "he.csv", "he", tmp_path / "masks", progress=False)
    assert summary["tiles"] == 2 and summary["normal"] == 54 + 30 and summary["cancer"] == 8 + 14
    library = bl.read_library_csv(tmp_path / "he.csv")
    boxes, classes = library.boxes_for_tile("tile_1.png")
    assert (int((classes == 0).sum()), int((classes == 1).sum())) == HE_GOLDEN[1]


def test_build_library_ihc_png_folder(tmp_path, ihc_tiles):
    _write_pngs(tmp_path / "tiles", ihc_tiles)
    summary = bl.build_library(tmp_path / "tiles", tmp_path / "ihc.csv", stain="ihc", progress=False)
    assert (summary["normal"], summary["cancer"]) == (59 + 161, 23)
    boxes, classes = bl.read_library_csv(tmp_path / "ihc.csv").boxes_for_tile("tile_0.png")
    assert boxes[:5].tolist() == IHC0_FIRST_NORMAL and classes[:5].tolist() == [0] * 5


def test_build_library_he_hdf5(tmp_path):
    tiles = require_data(f"{SAMPLES}/CAMELYON_HE_patches.h5")
    masks = require_data(f"{SAMPLES}/CAMELYON_HE_masks.h5")
    summary = bl.build_library(tiles, tmp_path / "he.csv", stain="he", masks=masks, preset="paper", progress=False)
    library = bl.read_library_csv(tmp_path / "he.csv")
    assert summary["tiles"] == 2 and len(library) == summary["normal"] + summary["cancer"]
    assert set(library.tiles()) <= {"CAMELYON_HE_patches.h5:0", "CAMELYON_HE_patches.h5:1"}


def test_cli_builds_ihc_library_from_hdf5(tmp_path, monkeypatch, capsys):
    source = require_data(f"{SAMPLES}/IHC_patches.h5")
    output = tmp_path / "ihc.csv"
    argv = ["box_library", "build", "--source", str(source), "--output", str(output), "--stain", "ihc"]
    monkeypatch.setattr(sys, "argv", [*argv, "--progress", "False"])
    bl.main()
    library = bl.read_library_csv(output)
    _, classes = library.boxes_for_tile("IHC_patches.h5:0")
    assert (int((classes == 0).sum()), int((classes == 1).sum())) == IHC_GOLDEN[0]
    _, classes = library.boxes_for_tile("IHC_patches.h5:1")
    assert (int((classes == 0).sum()), int((classes == 1).sum())) == IHC_GOLDEN[1]
    assert "ihc.csv" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------


def test_validate_tile_message():
    with pytest.raises(ValueError, match=r"tile 3 of x.h5: expected an RGB tile \(H, W, 3\) uint8, got \(256, 256\)"):
        bl.validate_tile(np.zeros((256, 256), np.uint8), "tile 3 of x.h5")
    with pytest.raises(ValueError, match="float64"):
        bl.ihc_tile_boxes(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"got \(8, 8, 4\)"):
        bl.dab_mask(np.zeros((8, 8, 4), np.uint8))


def test_he_mask_errors():
    tile = _synthetic_tile()
    with pytest.raises(ValueError, match=r"mask of tile: expected a mask of shape \(256, 256\).*got \(128, 256\)"):
        bl.he_tile_boxes(tile, np.ones((128, 256), bool))
    with pytest.raises(ValueError, match="need an expert tumour mask"):
        bl.he_tile_boxes(tile, None)


def test_build_library_bad_hdf5_tile_names_tile_and_file(tmp_path):
    source = tmp_path / "x.h5"
    with h5py.File(source, "w") as handle:
        handle["x"] = np.zeros((4, 256, 256), np.uint8)
    with pytest.raises(ValueError, match=r"tile 0 of x.h5: expected an RGB tile \(H, W, 3\) uint8, got \(256, 256\)"):
        bl.build_library(source, tmp_path / "out.csv", stain="ihc", progress=False)
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(ValueError, match=r"x.h5 has no dataset 'y' \(datasets: \['x'\]\)"):
        bl.build_library(source, tmp_path / "out.csv", stain="he", masks=source, progress=False)


def test_build_library_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no PNG tiles"):
        bl.build_library(tmp_path / "empty", tmp_path / "out.csv", stain="ihc", progress=False)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        bl.build_library(tmp_path / "missing", tmp_path / "out.csv", stain="ihc", progress=False)
    not_h5 = tmp_path / "tiles.txt"
    not_h5.write_text("hello")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        bl.build_library(not_h5, tmp_path / "out.csv", stain="ihc", progress=False)
    with pytest.raises(ValueError, match="unknown stain"):
        bl.build_library(tmp_path / "empty", tmp_path / "out.csv", stain="pas", progress=False)


def test_build_library_png_mask_errors(tmp_path):
    _write_pngs(tmp_path / "tiles", np.stack([_synthetic_tile()]))
    with pytest.raises(ValueError, match="need tumour masks"):
        bl.build_library(tmp_path / "tiles", tmp_path / "out.csv", stain="he", progress=False)
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="tile_0.png"):
        bl.build_library(tmp_path / "tiles", tmp_path / "out.csv", stain="he", masks=tmp_path / "masks", progress=False)
    _write_pngs(tmp_path / "masks", np.zeros((1, 100, 100), np.uint8))
    with pytest.raises(ValueError, match=r"mask of tile tile_0.png of .*got \(100, 100\)"):
        bl.build_library(tmp_path / "tiles", tmp_path / "out.csv", stain="he", masks=tmp_path / "masks", progress=False)
