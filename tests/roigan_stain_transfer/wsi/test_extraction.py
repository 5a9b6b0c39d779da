"""From a slide and its annotation to the bundle's training layout: balanced tiles, exact masks, box library."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from roigan_stain_transfer.data import MaskSource, TileSource
from roigan_stain_transfer.wsi.extraction import extract_training_tiles

# a tumour rectangle over the lower part of the CMU section, with a rectangular exclusion (hole) inside
OUTER = [(900, 1700), (1800, 1700), (1800, 2700), (900, 2700)]
HOLE = [(1200, 2000), (1500, 2000), (1500, 2300), (1200, 2300)]


def _expected_mask(x0: float, y0: float, size: int = 256) -> np.ndarray:
    """Pixel centres strictly inside the rectangle and not inside the hole (axis-aligned: no edge cases)."""
    xs, ys = x0 + np.arange(size) + 0.5, y0 + np.arange(size) + 0.5

    def box(corners):
        (left, top), (right, bottom) = corners[0], corners[2]
        return ((ys > top) & (ys < bottom))[:, None] & ((xs > left) & (xs < right))[None, :]

    return box(OUTER) & ~box(HOLE)


@pytest.fixture(scope="module")
def geojson(tmp_path_factory):
    path = tmp_path_factory.mktemp("annotations") / "CMU-1-Small-Region.geojson"
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [OUTER + OUTER[:1], HOLE + HOLE[:1]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    return path


def test_he_tiles_masks_and_library_in_the_bundle_layout(cmu_slide, geojson, tmp_path):
    result = extract_training_tiles(
        cmu_slide, tmp_path, stain="he", annotations=geojson.parent, tiles_per_class=2, progress=False
    )
    counts = result["per_slide"][str(cmu_slide)]
    assert counts == {"tumour": 2, "normal": 2, "tiles": 4}
    tiles = sorted((tmp_path / "train" / "he").glob("*.png"))
    assert [p.name for p in tiles] == sorted(p.name for p in (tmp_path / "train" / "he_masks").glob("*.png"))
    rows = {r["tile"]: r for r in csv.DictReader((tmp_path / "train" / "he_tiles.csv").open())}
    for path in tiles:
        row = rows[path.name]
        mask = np.asarray(Image.open(tmp_path / "train" / "he_masks" / path.name)) > 0
        expected = _expected_mask(float(row["x"]), float(row["y"]))
        np.testing.assert_array_equal(mask, expected)
        assert (float(row["tumour_fraction"]) >= 0.25) == (expected.mean() > 0)
    source = TileSource(tmp_path / "train" / "he", tile_size=256)  # what train.json / evaluate.json read
    assert len(source) == 4 and MaskSource(tmp_path / "train" / "he_masks").read(source, 0).shape == (256, 256)
    library = list(csv.DictReader((tmp_path / "train" / "he_boxes.csv").open()))
    assert result["library"]["tiles"] == 4 and len(library) == result["library"]["normal"] + result["library"]["cancer"]
    assert {r["tile"] for r in library} <= {p.name for p in tiles}

    with pytest.raises(FileExistsError, match="--overwrite"):
        extract_training_tiles(cmu_slide, tmp_path, annotations=geojson, tiles_per_class=2, progress=False)
    again = extract_training_tiles(
        cmu_slide, tmp_path, annotations=geojson, tiles_per_class=1, overwrite=True, build_library=False, progress=False
    )
    assert again["tiles"] == 2 and len(list((tmp_path / "train" / "he").glob("*.png"))) == 2


def test_ihc_tiles_to_hdf5(cmu_slide, tmp_path):
    result = extract_training_tiles(
        cmu_slide, tmp_path, stain="ihc", format="hdf5", tiles_per_class=3, seed=1, progress=False
    )
    with h5py.File(tmp_path / "train" / "ihc.h5") as handle:
        assert handle["x"].shape == (3, 256, 256, 3) and handle["x"].dtype == np.uint8
        assert "y" not in handle and handle["coords"].shape == (3, 2)
    assert result["library"]["output"].endswith("ihc_boxes.csv")
    assert [p.name for p in (tmp_path / "train").iterdir() if p.name.startswith(".")] == []


def test_extraction_errors(cmu_slide, geojson, tmp_path):
    with pytest.raises(ValueError, match="need tumour annotations"):
        extract_training_tiles(cmu_slide, tmp_path, stain="he", progress=False)
    with pytest.raises(FileNotFoundError, match="no annotation CMU-1-Small-Region"):
        extract_training_tiles(cmu_slide, tmp_path, annotations=tmp_path, progress=False)
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train").iterdir())
