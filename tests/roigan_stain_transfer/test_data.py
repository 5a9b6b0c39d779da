"""Tests of the training data: tile sources, balanced box sampling, flips that move boxes, sampler, errors.

The tiny data set of these tests (also used by the engine and bundle tests) is built from scikit-image's real IHC
image: 64 x 64 IHC crops and synthetic H&E crops rendered from its haematoxylin and DAB concentrations, with a
hand-written box library.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.color import hed2rgb, rgb2hed

from roigan_stain_transfer.box_library import BoxLibrary, BoxRecord, write_library_csv
from roigan_stain_transfer.data import (
    PAPER_BOX_SAMPLING,
    RELEASED_BOX_SAMPLING,
    AnnotatedTileDataset,
    BoxSampling,
    TileDataset,
    TileSampler,
    TileSource,
    UnpairedTileDataset,
    collate_tiles,
    flip_boxes,
    resolve_box_sampling,
    sample_boxes,
    to_network,
)
from tests.conftest import require_data

TINY = 64

# Library of the tiny set (the same for both stains): t0 mixed, t1 only normal, t2 only cancer, t3 no boxes.
TINY_LIBRARY = [
    ("t0.png", 0, 0, 48, 48, 0),
    ("t0.png", 16, 16, 64, 64, 1),
    ("t0.png", 8, 4, 56, 52, 1),
    ("t1.png", 8, 8, 56, 56, 0),
    ("t1.png", 2, 10, 50, 58, 0),
    ("t2.png", 10, 0, 58, 48, 1),
]


def tiny_tiles(count: int = 4, size: int = TINY) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``count`` H&E-like and IHC crops ``(size, size, 3)`` uint8 from ``skimage.data.immunohistochemistry()``."""
    ihc = skdata.immunohistochemistry()
    hed = rgb2hed(ihc)
    fake_he = np.stack([hed[..., 0], 0.5 * hed[..., 2] + 0.02, np.zeros_like(hed[..., 0])], axis=-1)
    he = (np.clip(hed2rgb(fake_he), 0, 1) * 255).round().astype(np.uint8)
    offsets = [(40 + 70 * i, 30 + 90 * i) for i in range(count)]
    crop = [(r, c) for r, c in offsets]
    return (
        [np.ascontiguousarray(he[r : r + size, c : c + size]) for r, c in crop],
        [np.ascontiguousarray(ihc[r : r + size, c : c + size]) for r, c in crop],
    )


def write_tiny_set(root: Path, count: int = 4, size: int = TINY, masks: bool = True) -> dict[str, Path]:
    """Write the tiny set under ``root``: ``train/{he,ihc}/t*.png``, ``train/{he,ihc}_boxes.csv`` and
    ``test/{he,ihc,masks}/t*.png`` (masks: DAB-rich half of each tile). Returns the paths by name."""
    he, ihc = tiny_tiles(count, size)
    paths = {
        "he": root / "train" / "he",
        "ihc": root / "train" / "ihc",
        "he_library": root / "train" / "he_boxes.csv",
        "ihc_library": root / "train" / "ihc_boxes.csv",
        "test_he": root / "test" / "he",
        "test_ihc": root / "test" / "ihc",
        "test_masks": root / "test" / "masks",
    }
    for key in ("he", "ihc", "test_he", "test_ihc", "test_masks"):
        paths[key].mkdir(parents=True, exist_ok=True)
    for i in range(count):
        for key, tiles in (("he", he), ("ihc", ihc), ("test_he", he), ("test_ihc", ihc)):
            Image.fromarray(tiles[i]).save(paths[key] / f"t{i}.png")
        if masks:
            mask = np.zeros((size, size), np.uint8)
            mask[:, : size // 2] = 255
            Image.fromarray(mask).save(paths["test_masks"] / f"t{i}.png")
    write_library_csv(paths["he_library"], TINY_LIBRARY)
    write_library_csv(paths["ihc_library"], TINY_LIBRARY)
    return paths


@pytest.fixture
def tiny_set(tmp_path) -> dict[str, Path]:
    return write_tiny_set(tmp_path)


def tiny_dataset(paths: dict[str, Path], **kwargs) -> UnpairedTileDataset:
    kwargs.setdefault("tile_size", TINY)
    return UnpairedTileDataset(paths["he"], paths["ihc"], paths["he_library"], paths["ihc_library"], **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Box sampling
# ------------------------------------------------------------------------------------------------------------


def test_presets():
    assert PAPER_BOX_SAMPLING == BoxSampling(8, 8, (4, 4))
    assert RELEASED_BOX_SAMPLING == BoxSampling(negative_only=6, positive_only=10, mixed=(8, 2))
    assert resolve_box_sampling("paper", 6) == BoxSampling(6, 6, (3, 3))
    assert resolve_box_sampling("released-code") is RELEASED_BOX_SAMPLING
    with pytest.raises(ValueError, match="unknown box sampling"):
        resolve_box_sampling("mine")
    with pytest.raises(ValueError, match="at least one box"):
        BoxSampling(0, 8, (4, 4))


@pytest.mark.parametrize(
    ("classes", "sampling", "expected"),
    [
        ([0, 1, 1], PAPER_BOX_SAMPLING, (4, 4)),
        ([0, 0], PAPER_BOX_SAMPLING, (0, 8)),
        ([1], PAPER_BOX_SAMPLING, (8, 0)),
        ([0, 1, 1], RELEASED_BOX_SAMPLING, (8, 2)),
        ([0, 0], RELEASED_BOX_SAMPLING, (0, 6)),
        ([1, 1, 1], RELEASED_BOX_SAMPLING, (10, 0)),
    ],
)
def test_sample_boxes_counts(classes, sampling, expected):
    boxes = np.array([[i, i, i + 48, i + 48] for i in range(len(classes))])
    drawn, drawn_classes = sample_boxes(boxes, np.array(classes), np.random.default_rng(0), sampling)
    assert drawn.shape == (sum(expected), 4)
    assert (int((drawn_classes == 1).sum()), int((drawn_classes == 0).sum())) == expected
    # each drawn box is a library box of the class it is labelled with
    for box, cls in zip(drawn, drawn_classes, strict=True):
        assert classes[int(box[0])] == cls


def test_sample_boxes_with_replacement_is_uniform_within_class():
    boxes = np.array([[i, 0, i + 48, 48] for i in range(5)])
    classes = np.array([0, 0, 0, 1, 1])
    rng = np.random.default_rng(1)
    counts = np.zeros(5)
    for _ in range(400):
        drawn, _ = sample_boxes(boxes, classes, rng, PAPER_BOX_SAMPLING)
        counts += np.bincount(drawn[:, 0], minlength=5)
    # 4 positives from 2 boxes (800 each expected), 4 negatives from 3 boxes (533 each expected)
    assert np.allclose(counts[3:], 800, rtol=0.1)
    assert np.allclose(counts[:3], 1600 / 3, rtol=0.1)


def test_dataset_balances_classes_per_tile(tiny_set):
    dataset = tiny_dataset(tiny_set, flips=False)
    assert len(dataset) == 3  # t3 has no boxes
    by_name = {}
    for epoch in range(3):
        for index in range(len(dataset)):
            sample = dataset[(index, epoch)]
            by_name.setdefault(sample["he_name"], []).append(sample["he_classes"])
            assert sample["he_boxes"].shape == (8, 4) and sample["he_boxes"].dtype == torch.float32
            assert sample["he"].shape == (3, TINY, TINY) and sample["ihc"].shape == (3, TINY, TINY)
            assert -1 <= float(sample["he"].min()) and float(sample["he"].max()) <= 1
    assert sorted(by_name) == ["t0.png", "t1.png", "t2.png"]
    assert all(int(c.sum()) == 4 for c in by_name["t0.png"])  # mixed: 4 + 4
    assert all(int(c.sum()) == 0 for c in by_name["t1.png"])  # normal only: 8 negatives
    assert all(int(c.sum()) == 8 for c in by_name["t2.png"])  # cancer only: 8 positives


def test_dataset_released_sampling_and_collate(tiny_set):
    dataset = tiny_dataset(tiny_set, box_sampling="released_code", flips=False)
    counts = {dataset[i]["he_name"]: len(dataset[i]["he_boxes"]) for i in range(len(dataset))}
    assert counts == {"t0.png": 10, "t1.png": 6, "t2.png": 10}
    batch = collate_tiles([dataset[0], dataset[1]])
    assert batch["he"].shape == (2, 3, TINY, TINY)
    assert [len(b) for b in batch["he_boxes"]] == [10, 6]
    assert batch["he_name"] == ["t0.png", "t1.png"]


def test_samples_are_a_function_of_their_key(tiny_set):
    dataset = tiny_dataset(tiny_set)
    again = tiny_dataset(tiny_set)
    a, b = dataset[(1, 5)], again[(1, 5)]
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    different = [dataset[(1, e)]["he_boxes"] for e in range(6)]
    assert any(not torch.equal(different[0], d) for d in different[1:])


# ------------------------------------------------------------------------------------------------------------
# Flips
# ------------------------------------------------------------------------------------------------------------


def test_flip_boxes_hand_built():
    boxes = np.array([[2, 1, 5, 3]])  # columns 2..4, rows 1..2 of a 4 x 8 (H x W) tile
    assert flip_boxes(boxes, 4, 8, True, False).tolist() == [[3, 1, 6, 3]]
    assert flip_boxes(boxes, 4, 8, False, True).tolist() == [[2, 1, 5, 3]]  # rows 1..2 -> 1..2 in 4 rows
    assert flip_boxes(boxes, 4, 8, True, True).tolist() == [[3, 1, 6, 3]]
    assert flip_boxes(np.array([[0, 0, 1, 1]]), 4, 8, True, True).tolist() == [[7, 3, 8, 4]]


def test_dataset_flips_move_boxes_with_the_image(tmp_path):
    """A tile that is black except for a white box: after any flip the sampled box still covers the white block."""
    tile = np.zeros((TINY, TINY, 3), np.uint8)
    tile[5:53, 9:57] = 255  # rows 5..52, columns 9..56: library box [9, 5, 57, 53]
    for domain in ("he", "ihc"):
        (tmp_path / domain).mkdir()
        Image.fromarray(tile).save(tmp_path / domain / "a.png")
    write_library_csv(tmp_path / "lib.csv", [("a.png", 9, 5, 57, 53, 1)])
    dataset = UnpairedTileDataset(tmp_path / "he", tmp_path / "ihc", tmp_path / "lib.csv", tmp_path / "lib.csv")
    seen = set()
    for epoch in range(24):
        sample = dataset[(0, epoch)]
        for domain in ("he", "ihc"):
            x1, y1, x2, y2 = sample[f"{domain}_boxes"][0].long().tolist()
            image = sample[domain]
            inside = image[:, y1:y2, x1:x2]
            assert bool((inside == 1).all()), (epoch, domain, (x1, y1, x2, y2))
            assert float(image.sum()) == 3 * 48 * 48 * 1 + (3 * TINY * TINY - 3 * 48 * 48) * -1
            seen.add((x1, y1))
    assert seen == {(9, 5), (7, 5), (9, 11), (7, 11)}  # identity, left-right, up-down, both


# ------------------------------------------------------------------------------------------------------------
# Sampler
# ------------------------------------------------------------------------------------------------------------


def test_sampler_epoch_order_and_start():
    data = list(range(10))
    sampler = TileSampler(data, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(i for i, _ in full) == data and {e for _, e in full} == {2}
    sampler.set_epoch(2)
    sampler.set_start(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # start applies to one pass only
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in full]
    ranks = [TileSampler(data, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(i for r in ranks for i, _ in r) == data


# ------------------------------------------------------------------------------------------------------------
# Sources and errors
# ------------------------------------------------------------------------------------------------------------


def test_hdf5_source_names_and_reading(tmp_path):
    he, _ = tiny_tiles(3)
    with h5py.File(tmp_path / "tiles.h5", "w") as handle:
        handle["x"] = np.stack(he)
    source = TileSource(tmp_path / "tiles.h5", tile_size=TINY)
    assert source.names == ["tiles.h5:0", "tiles.h5:1", "tiles.h5:2"]
    assert source.file_names[1] == "tiles_1.png"
    assert np.array_equal(source.read(2), he[2])
    write_library_csv(tmp_path / "lib.csv", [("tiles.h5:1", 0, 0, 48, 48, 0)])
    dataset = UnpairedTileDataset(source, source, tmp_path / "lib.csv", tmp_path / "lib.csv")
    assert len(dataset) == 1 and dataset[0]["he_name"] == "tiles.h5:1"
    item = TileDataset(tmp_path / "tiles.h5")[0]
    assert item["image"].shape == (3, TINY, TINY) and item["name"] == "tiles_0.png"


def test_to_network_scaling():
    tile = np.array([[[0, 255, 127]]], np.uint8)
    assert torch.allclose(to_network(tile).flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_error_wrong_tile_size(tiny_set):
    with pytest.raises(ValueError, match=r"t0\.png: expected 32 x 32 tiles, got 64 x 64"):
        TileSource(tiny_set["he"], tile_size=32).read(0)


def test_tiles_the_generator_cannot_take_are_refused_naming_the_file(tmp_path):
    (tmp_path / "tiles").mkdir()
    Image.fromarray(np.zeros((66, 70, 3), np.uint8)).save(tmp_path / "tiles" / "odd.png")
    assert TileSource(tmp_path / "tiles").read(0).shape == (66, 70, 3)  # a tile source alone takes any size
    with pytest.raises(ValueError, match=r"odd\.png: tile height and width must be multiples of 4 .* got 66 x 70"):
        TileDataset(tmp_path / "tiles")[0]


def test_error_non_rgb_png(tmp_path):
    (tmp_path / "tiles").mkdir()
    Image.fromarray(np.zeros((TINY, TINY, 4), np.uint8)).save(tmp_path / "tiles" / "rgba.png")
    Image.fromarray(np.zeros((TINY, TINY), np.uint8)).save(tmp_path / "tiles" / "zgrey.png")
    source = TileSource(tmp_path / "tiles")
    with pytest.raises(ValueError, match=r"rgba\.png: expected an RGB image .* mode 'RGBA' with 4 channel"):
        source.read(0)
    with pytest.raises(ValueError, match=r"zgrey\.png: expected an RGB image .* mode 'L' with 1 channel"):
        source.read(1)


def test_error_hdf5_wrong_channels_and_dtype(tmp_path):
    with h5py.File(tmp_path / "four.h5", "w") as handle:
        handle["x"] = np.zeros((2, TINY, TINY, 4), np.uint8)
    with h5py.File(tmp_path / "float.h5", "w") as handle:
        handle["x"] = np.zeros((2, TINY, TINY, 3), np.float32)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["tiles"] = np.zeros((2, TINY, TINY, 3), np.uint8)
    with pytest.raises(ValueError, match=r"four\.h5: dataset 'x' must hold RGB tiles \(N, H, W, 3\)"):
        TileSource(tmp_path / "four.h5")
    with pytest.raises(ValueError, match=r"float\.h5: dataset 'x' must hold uint8 tiles"):
        TileSource(tmp_path / "float.h5")
    with pytest.raises(ValueError, match=r"other\.h5: no dataset 'x'"):
        TileSource(tmp_path / "other.h5")
    with pytest.raises(ValueError, match=r"four\.h5: dataset 'x' must hold RGB tiles"):
        TileSource(tmp_path / "four.h5", tile_size=32)
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        TileSource(tmp_path / "missing")


def test_error_empty_library(tiny_set, tmp_path):
    write_library_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match=r"empty\.csv holds no boxes"):
        UnpairedTileDataset(tiny_set["he"], tiny_set["ihc"], tmp_path / "empty.csv", tiny_set["ihc_library"])
    with pytest.raises(ValueError, match="box library holds no boxes"):
        UnpairedTileDataset(tiny_set["he"], tiny_set["ihc"], BoxLibrary(()), tiny_set["ihc_library"])


def test_error_box_outside_tile(tiny_set, tmp_path):
    write_library_csv(tmp_path / "big.csv", [("t1.png", 20, 0, 68, 48, 1)])
    with pytest.raises(ValueError, match=r"big\.csv: box \[20, 0, 68, 48\] of tile 't1\.png' lies outside the 64 x 64"):
        UnpairedTileDataset(tiny_set["he"], tiny_set["ihc"], tmp_path / "big.csv", tiny_set["ihc_library"])


def test_error_unknown_tile_id(tiny_set, tmp_path):
    library = BoxLibrary((BoxRecord("CAMELYON_HE_patches.h5:0", 0, 0, 48, 48, 1),))
    with pytest.raises(ValueError, match=r"tile 'CAMELYON_HE_patches\.h5:0' is not in tile source .* 't0\.png'"):
        UnpairedTileDataset(tiny_set["he"], tiny_set["ihc"], library, tiny_set["ihc_library"])


def test_annotated_dataset_and_mask_errors(tiny_set, tmp_path):
    dataset = AnnotatedTileDataset(tiny_set["test_he"], tiny_set["test_masks"], tiny_set["test_ihc"], tile_size=TINY)
    item = dataset[0]
    assert item["mask"].dtype == torch.bool and item["mask"].shape == (TINY, TINY)
    assert int(item["mask"].sum()) == TINY * TINY // 2 and item["ihc"].shape == (3, TINY, TINY)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tiny_set["test_masks"] / "t1.png")
    with pytest.raises(ValueError, match=r"t1\.png: mask shape \(32, 32\) does not match its tile 64 x 64"):
        dataset[1]
    (tiny_set["test_masks"] / "t2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask .*t2\.png for tile .*t2\.png not found"):
        dataset[2]


def test_real_camelyon_tiles_with_a_library(tmp_path):
    """The released data layout: HDF5 tiles named '<file>:<index>' in the library CSV."""
    he_file = require_data("tiles/camelyon_gr_samples/CAMELYON_HE_patches.h5")
    ihc_file = require_data("tiles/camelyon_gr_samples/IHC_patches.h5")
    write_library_csv(tmp_path / "he.csv", [("CAMELYON_HE_patches.h5:1", 100, 100, 148, 148, 1)])
    write_library_csv(tmp_path / "ihc.csv", [("IHC_patches.h5:0", 0, 208, 48, 256, 0)])
    dataset = UnpairedTileDataset(he_file, ihc_file, tmp_path / "he.csv", tmp_path / "ihc.csv", tile_size=256)
    sample = dataset[(0, 0)]
    assert sample["he"].shape == (3, 256, 256) and sample["ihc_name"] == "IHC_patches.h5:0"
    assert int(sample["he_classes"].sum()) == 8 and int(sample["ihc_classes"].sum()) == 0
