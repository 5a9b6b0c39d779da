"""Slide annotations: ASAP XML / QuPath GeoJSON reading, rasterising at any level, masks back to GeoJSON."""

from __future__ import annotations

import json
import uuid
import warnings

import numpy as np
import pytest
from scipy import ndimage

from roigan_stain_transfer.wsi.annotations import (
    CAMELYON_EXCLUDE_LABELS,
    AnnotationWarning,
    Polygon,
    mask_to_polygons,
    polygon_area,
    rasterize,
    read_annotations,
    read_asap_xml,
    read_geojson,
    to_geojson,
    write_geojson,
)

# ----------------------------------------------------------------------------------------------------------------
# Helpers independent of the module under test
# ----------------------------------------------------------------------------------------------------------------


def ray_cast_inside(ring: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd test of points ``(x, y)`` against a closed ``(N, 2)`` ring by horizontal ray casting."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(ring, np.roll(ring, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        straddles = (y0 > y) != (y1 > y)
        crossing_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= straddles & (x < crossing_x)
    return inside


def centre_grid(shape, downsample, origin):
    """Level-0 ``(x, y)`` of the pixel centres of a raster, each ``(H, W)``."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return origin[0] + (cols + 0.5) * downsample, origin[1] + (rows + 0.5) * downsample


def near_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (8-neighbourhood) of a foreground/background transition of ``mask``."""
    square = np.ones((3, 3), dtype=bool)
    return ndimage.binary_dilation(mask, square) & ~ndimage.binary_erosion(mask, square, border_value=1)


def signed_area(ring) -> float:
    ring = np.asarray(ring, dtype=float)
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def blob_mask(shape=(150, 190), seed=3) -> np.ndarray:
    """Thresholded smoothed noise (components with holes), a ring, single pixels and a diagonal pair."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.standard_normal(shape), 4) > 0.03
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    radius = np.hypot(rows - 40, cols - 150)
    mask[(radius >= 12) & (radius < 20)] = True
    mask[(radius < 12)] = False
    mask[38:43, 148:153] = True  # an island inside the ring's hole
    mask[5, 5] = mask[5, 9] = mask[8, 10] = mask[9, 11] = True
    mask[0, :] = True  # touching the border
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Polygon and areas
# ----------------------------------------------------------------------------------------------------------------


def test_polygon_normalises_rings_and_is_read_only():
    polygon = Polygon([(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)], holes=[[(1, 1), (1, 2), (2, 2)]], label="x")
    assert polygon.exterior.shape == (4, 2) and polygon.exterior.dtype == np.float64
    assert isinstance(polygon.holes, tuple) and polygon.holes[0].shape == (3, 2)
    assert polygon.bounds == (0.0, 0.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        polygon.exterior[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        Polygon(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 3"):
        Polygon([(0, 0), (1, 1), (0, 0)])
    with pytest.raises(ValueError, match="finite"):
        Polygon([(0, 0), (1, np.nan), (0, 1)])


def test_polygon_area_of_square_with_square_hole():
    square = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], holes=[[(3, 3), (3, 7), (7, 7), (7, 3)]])
    assert polygon_area(square) == pytest.approx(100 - 16)
    far = Polygon(square.exterior + 1e5, holes=[square.holes[0][::-1] + 1e5])  # orientation and offset ignored
    assert polygon_area(far) == pytest.approx(84)


# ----------------------------------------------------------------------------------------------------------------
# Rasterising
# ----------------------------------------------------------------------------------------------------------------


def test_rasterize_square_by_pixel_centres():
    square = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    expected = np.zeros((6, 6), dtype=bool)
    expected[:4, :4] = True
    np.testing.assert_array_equal(rasterize([square], (6, 6)), expected)
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(rasterize([square], (4, 4), downsample=2), expected)
    # Origin shifts the raster: its pixel (0, 0) has its centre at level-0 (2.5, 1.5).
    shifted = rasterize([square], (4, 4), origin=(2.0, 1.0))
    expected = np.zeros((4, 4), dtype=bool)
    expected[:3, :2] = True
    np.testing.assert_array_equal(shifted, expected)


def test_rasterize_edges_through_centres_partition_the_pixels():
    """Centres on a shared edge belong to exactly one polygon: the one to their right / below (as in AWT)."""
    left = Polygon([(0, 0), (2.5, 0), (2.5, 3.5), (0, 3.5)])
    right = Polygon([(2.5, 0), (6, 0), (6, 3.5), (2.5, 3.5)])
    below = Polygon([(0, 3.5), (6, 3.5), (6, 6), (0, 6)])
    masks = [rasterize([p], (6, 6)) for p in (left, right, below)]
    np.testing.assert_array_equal(sum(m.astype(int) for m in masks), np.ones((6, 6), dtype=int))
    assert masks[1][:3, 2].all() and not masks[0][:, 2].any()
    assert masks[2][3, :].all()


def test_rasterize_labels_and_exclusions():
    outer = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], label="_0")
    other = Polygon([(20, 0), (30, 0), (30, 10), (20, 10)], label="_1")
    hole = Polygon([(2, 2), (5, 2), (5, 5), (2, 5)], label="_2")
    everything = rasterize([outer, other, hole], (10, 30))
    assert everything.sum() == 100 - 9 + 100
    assert not everything[2:5, 2:5].any()
    only_0 = rasterize([outer, other, hole], (10, 30), labels="_0")
    assert only_0.sum() == 91 and not only_0[:, 20:].any()
    assert rasterize([outer, other, hole], (10, 30), exclude_labels=None).sum() == 200
    np.testing.assert_array_equal(rasterize([outer, hole], (10, 10), labels=["_2"], exclude_labels=()), hole_mask(10))
    assert "_2" in CAMELYON_EXCLUDE_LABELS


def hole_mask(size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[2:5, 2:5] = True
    return mask


def test_rasterize_window_among_many_polygons():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 100_000, size=(5000, 2))
    square = np.array([(0, 0), (40, 0), (40, 40), (0, 40)], dtype=float)
    polygons = [Polygon(square + corner) for corner in corners]
    polygons.append(Polygon(square + (50_010.0, 50_010.0)))
    mask = rasterize(polygons, (256, 256), origin=(50_000.0, 50_000.0))
    assert mask[10:50, 10:50].all()
    centres = 50_000.0 + np.arange(256) + 0.5
    expected = np.zeros((256, 256), dtype=bool)
    for x0, y0 in [*corners, (50_010.0, 50_010.0)]:  # axis-aligned squares: centre strictly inside
        expected |= ((centres > y0) & (centres < y0 + 40))[:, None] & ((centres > x0) & (centres < x0 + 40))[None, :]
    np.testing.assert_array_equal(mask, expected)


# ----------------------------------------------------------------------------------------------------------------
# ASAP XML
# ----------------------------------------------------------------------------------------------------------------

TUMOUR = np.array([(13.3, 9.7), (81.1, 17.9), (97.6, 64.2), (58.8, 99.3), (21.7, 84.4), (6.2, 47.1)])
EXCLUSION = np.array([(38.9, 38.3), (62.4, 43.7), (55.2, 66.9), (35.1, 58.6)])


def coordinate_xml(vertices, order) -> str:
    """``<Coordinate>`` elements written in the order ``order`` (their ``Order`` attribute says the true one)."""
    return "\n".join(
        f'        <Coordinate Order="{i}" X="{float(vertices[i][0])!r}" Y="{float(vertices[i][1])!r}" />' for i in order
    )


def camelyon_xml(path, tumour=TUMOUR, exclusion=EXCLUSION):
    shuffled = [3, 0, 5, 1, 4, 2]
    text = f"""<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
{coordinate_xml(tumour, shuffled)}
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
{coordinate_xml(exclusion, range(len(exclusion)))}
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot 0" Type="Dot" PartOfGroup="None" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00FF00"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""
    path.write_text(text)
    return path


def test_read_asap_xml_camelyon(tmp_path):
    polygons = read_asap_xml(camelyon_xml(tmp_path / "tumor_001.xml"))
    assert [(p.label, p.name) for p in polygons] == [("_0", "Annotation 0"), ("_2", "Annotation 1")]
    np.testing.assert_array_equal(polygons[0].exterior, TUMOUR)  # sorted by Order
    np.testing.assert_array_equal(polygons[1].exterior, EXCLUSION)


@pytest.mark.parametrize(
    ("downsample", "origin", "shape"), [(1.0, (0.0, 0.0), (110, 105)), (4.0, (-3.0, 2.0), (28, 27))]
)
def test_rasterize_camelyon_matches_ray_casting(tmp_path, downsample, origin, shape):
    polygons = read_annotations(camelyon_xml(tmp_path / "tumor_001.xml"))
    x, y = centre_grid(shape, downsample, origin)
    expected = ray_cast_inside(TUMOUR, x, y) & ~ray_cast_inside(EXCLUSION, x, y)
    mask = rasterize(polygons, shape, downsample=downsample, origin=origin)
    np.testing.assert_array_equal(mask, expected)
    assert expected.sum() > (400 if downsample == 1 else 20) and (ray_cast_inside(EXCLUSION, x, y) & ~mask).any()
    tumour_only = rasterize(polygons, shape, downsample, origin, exclude_labels=())
    np.testing.assert_array_equal(tumour_only, ray_cast_inside(TUMOUR, x, y))


def test_read_asap_xml_number_forms_types_and_degenerate_polygons(tmp_path):
    path = tmp_path / "forms.xml"
    path.write_text(
        """<ASAP_Annotations><Annotations>
        <Annotation Name="sci" Type="Spline" PartOfGroup="None"><Coordinates>
          <Coordinate Order="0" X="1.0e+01" Y="1E1" /><Coordinate Order="1" X="20,5" Y="10" />
          <Coordinate Order="2" X="20" Y="2.0e+01" /></Coordinates></Annotation>
        <Annotation Name="box" Type="Rectangle" PartOfGroup="Tumor"><Coordinates>
          <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="4" Y="2" /></Coordinates></Annotation>
        <Annotation Name="line" Type="Polygon" PartOfGroup="_0"><Coordinates>
          <Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="4" Y="2" />
          <Coordinate Order="2" X="0" Y="0" /></Coordinates></Annotation>
        <Annotation Name="points" Type="PointSet" PartOfGroup="_0"><Coordinates>
          <Coordinate Order="0" X="0" Y="0" /></Coordinates></Annotation>
        </Annotations></ASAP_Annotations>"""
    )
    with pytest.warns(AnnotationWarning, match=r"forms\.xml.*'line'.*3 distinct"):
        polygons = read_asap_xml(path)
    assert [(p.name, p.label) for p in polygons] == [("sci", ""), ("box", "Tumor")]
    np.testing.assert_array_equal(polygons[0].exterior, [(10, 10), (20.5, 10), (20, 20)])
    np.testing.assert_array_equal(polygons[1].exterior, [(0, 0), (4, 0), (4, 2), (0, 2)])


# ----------------------------------------------------------------------------------------------------------------
# GeoJSON
# ----------------------------------------------------------------------------------------------------------------


def qupath_features():
    """QuPath-style Features: a Polygon with a hole, a MultiPolygon of two squares, a Point."""
    return [
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[0, 0], [20, 0], [20, 20], [0, 20], [0, 0]],
                    [[5, 5], [5, 15], [15, 15], [15, 5], [5, 5]],
                ],
            },
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[30, 0], [40, 0], [40, 10], [30, 10], [30, 0]]],
                    [[[30, 20], [40, 20], [40, 30], [30, 30], [30, 20]]],
                ],
            },
            "properties": {"objectType": "annotation", "name": "two squares"},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [1, 1]},
            "properties": {"objectType": "annotation"},
        },
    ]


@pytest.mark.parametrize("form", ["collection", "list"])
def test_read_geojson_qupath_export(tmp_path, form):
    features = qupath_features()
    document = {"type": "FeatureCollection", "features": features} if form == "collection" else features
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(document))
    with pytest.warns(AnnotationWarning, match=r"slide\.geojson.*Point x1") as record:
        polygons = read_geojson(path)
    assert len(record) == 1
    squares = ("two squares", "two squares")  # no classification: the label falls back to the name
    assert [(p.label, p.name) for p in polygons] == [("Tumor", ""), squares, squares]
    assert len(polygons[0].holes) == 1 and not polygons[1].holes
    mask = rasterize(polygons, (32, 42))
    expected = np.zeros((32, 42), dtype=bool)
    expected[0:20, 0:20] = True
    expected[5:15, 5:15] = False
    expected[0:10, 30:40] = True
    expected[20:30, 30:40] = True
    np.testing.assert_array_equal(mask, expected)


def test_read_geojson_single_feature_geometry_and_collection(tmp_path):
    feature = qupath_features()[0]
    (tmp_path / "feature.json").write_text(json.dumps(feature))
    (tmp_path / "geometry.json").write_text(json.dumps(feature["geometry"]))
    collection = {
        "type": "GeometryCollection",
        "geometries": [feature["geometry"], {"type": "Point", "coordinates": [0, 0]}],
    }
    (tmp_path / "collection.geojson").write_text(json.dumps(collection))
    assert read_annotations(tmp_path / "feature.json")[0].label == "Tumor"
    assert read_annotations(tmp_path / "geometry.json")[0].label == ""
    with pytest.warns(AnnotationWarning, match="Point"):
        assert len(read_annotations(tmp_path / "collection.geojson")) == 1


@pytest.mark.parametrize(
    "document",
    [
        {"type": "FeatureCollection", "features": []},
        {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None, "properties": None}]},
        [{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}, "properties": {}}],
    ],
)
def test_read_geojson_without_polygons_returns_empty_with_a_warning(tmp_path, document):
    path = tmp_path / "empty.geojson"
    path.write_text(json.dumps(document))
    with pytest.warns(AnnotationWarning, match=r"empty\.geojson: no Polygon or MultiPolygon"):
        assert read_geojson(path) == []


# ----------------------------------------------------------------------------------------------------------------
# Masks to polygons and GeoJSON, and back
# ----------------------------------------------------------------------------------------------------------------


def test_mask_to_polygons_connectivity_and_holes():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:10, 1:10] = True
    mask[3:8, 3:8] = False
    mask[5, 5] = True  # island in the hole: its own polygon
    mask[10, 10] = True  # touches the square diagonally only: same component (8-connected)
    polygons = mask_to_polygons(mask, simplify=0)
    assert len(polygons) == 2
    assert len(polygons[0].holes) == 1 and not polygons[1].holes
    np.testing.assert_array_equal(rasterize(polygons, mask.shape), mask)
    # Background is 4-connected: two diagonal background pixels are two holes.
    block = np.ones((6, 6), dtype=bool)
    block[2, 2] = block[3, 3] = False
    (polygon,) = mask_to_polygons(block, simplify=0)
    assert len(polygon.holes) == 2
    np.testing.assert_array_equal(rasterize([polygon], block.shape), block)
    assert mask_to_polygons(np.zeros((5, 5), dtype=bool)) == []


def test_mask_to_polygons_level0_coordinates_and_orientation():
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:7] = True
    (polygon,) = mask_to_polygons(mask, downsample=4.0, origin=(100.0, 200.0), label="DAB", simplify=0)
    # Boundary between pixel centres: columns 2..6 have centres at 100 + (c + 0.5) * 4, edges half a pixel out.
    assert polygon.bounds == (100 + 2 * 4, 200 + 1 * 4, 100 + 7 * 4, 200 + 4 * 4)
    assert polygon.label == "DAB"
    assert signed_area(polygon.exterior) > 0


def test_mask_to_polygons_areas_close_to_pixel_counts_and_min_area():
    mask = blob_mask()
    components, count = ndimage.label(mask, np.ones((3, 3)))
    polygons = mask_to_polygons(mask, downsample=2.0, simplify=0)
    assert len(polygons) == count
    sizes = np.bincount(components.ravel())[1:]
    areas = np.array([polygon_area(p) / 4.0 for p in polygons])
    # Components in raster order as scipy labels them; boundaries cut half a pixel only at corners.
    big = sizes >= 50
    np.testing.assert_allclose(areas[big], sizes[big], rtol=0.05)
    assert np.all(np.abs(areas - sizes) <= 0.25 * sizes + 1)
    assert len(mask_to_polygons(mask, min_area=50)) == big.sum()


@pytest.mark.parametrize(("downsample", "origin"), [(1.0, (0.0, 0.0)), (4.0, (1234.0, 567.5))])
def test_round_trip_mask_geojson_file_mask(tmp_path, downsample, origin):
    mask = blob_mask()
    polygons = mask_to_polygons(mask, downsample=downsample, origin=origin)
    collection = json.loads(json.dumps(to_geojson(polygons)))
    path = write_geojson(tmp_path / "out" / "dab.geojson", collection)
    back = read_geojson(path)
    assert len(back) == len(polygons) and {p.label for p in back} == {"DAB positive"}
    again = rasterize(back, mask.shape, downsample=downsample, origin=origin)
    differing = again ^ mask
    assert not (differing & ~near_boundary(mask)).any(), "a pixel away from the boundary changed"
    assert differing.sum() <= 0.05 * near_boundary(mask).sum()
    exact = mask_to_polygons(mask, downsample=downsample, origin=origin, simplify=0)
    np.testing.assert_array_equal(rasterize(exact, mask.shape, downsample, origin), mask)
    vertices = [sum(len(p.exterior) + sum(map(len, p.holes)) for p in ps) for ps in (polygons, exact)]
    assert vertices[0] < 0.8 * vertices[1], f"simplification kept {vertices[0]} of {vertices[1]} vertices"


def test_mask_to_polygons_exact_on_noise_with_saddles():
    mask = np.random.default_rng(7).random((60, 70)) > 0.55
    polygons = mask_to_polygons(mask, simplify=0)
    np.testing.assert_array_equal(rasterize(polygons, mask.shape), mask)


def test_mask_to_polygons_on_a_large_mask_with_many_components():
    rows, cols = np.mgrid[0:2000, 0:2000]
    mask = (np.sin(rows / 7.0) * np.sin(cols / 9.0) > 0.5) | ((rows // 3 + cols // 5) % 97 == 0)
    polygons = mask_to_polygons(mask)
    assert len(polygons) > 1000
    back = rasterize(polygons, mask.shape)
    assert (back != mask).mean() < 0.02


def test_to_geojson_feature_structure_and_orientation():
    square = Polygon([(0, 0), (0, 10), (10, 10), (10, 0)], holes=[[(3, 3), (6, 3), (6, 6), (3, 6)]], name="a")
    collection = to_geojson(
        [square, square], color=(1, 2, 3), properties=[{"area_mm2": np.float32(0.5)}, {"area_mm2": 1.0}]
    )
    assert collection["type"] == "FeatureCollection"
    first, second = collection["features"]
    assert first["type"] == "Feature" and first["id"] != second["id"]
    uuid.UUID(first["id"])
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "DAB positive", "color": [1, 2, 3]}
    assert first["properties"]["name"] == "a" and second["properties"]["area_mm2"] == 1.0
    exterior, hole = first["geometry"]["coordinates"]
    assert first["geometry"]["type"] == "Polygon"
    assert exterior[0] == exterior[-1] and hole[0] == hole[-1] and len(exterior) == 5
    assert signed_area(exterior[:-1]) > 0 > signed_area(hole[:-1])
    assert "classification" not in to_geojson([square], classification=None)["features"][0]["properties"]
    labelled = Polygon(square.exterior, label="Tumor")
    assert to_geojson([labelled], classification=None)["features"][0]["properties"]["classification"]["name"] == "Tumor"
    with pytest.raises(ValueError, match="one properties mapping per polygon"):
        to_geojson([square], properties=[{}, {}])
    with pytest.raises(ValueError, match="color"):
        to_geojson([square], color=(0, 0, 300))


def test_write_geojson_is_atomic_and_rejects_nan(tmp_path):
    path = tmp_path / "a.geojson"
    collection = to_geojson([Polygon([(0, 0), (1, 0), (0, 1)])], properties=[{"n": np.int64(3)}])
    assert write_geojson(path, collection) == path
    assert json.loads(path.read_text())["features"][0]["properties"]["n"] == 3
    bad = to_geojson([Polygon([(0, 0), (1, 0), (0, 1)])], properties=[{"score": float("nan")}])
    with pytest.raises(ValueError):
        write_geojson(path, bad)
    assert json.loads(path.read_text())["features"][0]["properties"]["n"] == 3  # previous file intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.geojson"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [read_asap_xml, read_geojson, read_annotations])
def test_missing_file(tmp_path, reader):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        reader(tmp_path / "nowhere.xml")


def test_malformed_and_foreign_xml(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(ValueError, match=r"broken\.xml: expected an ASAP XML file.*malformed"):
        read_asap_xml(broken)
    foreign = tmp_path / "slide.xml"
    foreign.write_text("<foo><bar/></foo>")
    with pytest.raises(ValueError, match=r"slide\.xml: expected an ASAP XML file \(<ASAP_Annotations>\), got <foo>"):
        read_annotations(foreign)
    bad_number = tmp_path / "number.xml"
    bad_number.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon"><Coordinates>'
        '<Coordinate Order="0" X="1.2.3" Y="0"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
    )
    with pytest.raises(ValueError, match=r"number\.xml: annotation 'a': expected a number, got '1.2.3'"):
        read_asap_xml(bad_number)


def test_malformed_geojson(tmp_path):
    (tmp_path / "broken.geojson").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.geojson: expected a GeoJSON .*invalid JSON"):
        read_geojson(tmp_path / "broken.geojson")
    (tmp_path / "other.json").write_text('{"type": "Topology"}')
    with pytest.raises(ValueError, match=r"other\.json: expected a GeoJSON .*got type 'Topology'"):
        read_annotations(tmp_path / "other.json")
    (tmp_path / "ragged.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 1]]]}))
    with pytest.raises(ValueError, match=r"ragged\.geojson: feature 0"):
        read_geojson(tmp_path / "ragged.geojson")
    (tmp_path / "slide.tif").write_text("")
    with pytest.raises(ValueError, match=r"slide\.tif: expected .*\.xml, \.geojson or \.json"):
        read_annotations(tmp_path / "slide.tif")


def test_non_finite_coordinates(tmp_path):
    xml = tmp_path / "nan.xml"
    xml.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="nan" Y="0"/><Coordinate Order="2" X="1" Y="1"/>'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    with pytest.raises(ValueError, match=r"nan\.xml: annotation 'a': expected finite coordinates"):
        read_asap_xml(xml)
    for name, value in [("nan.geojson", "NaN"), ("null.geojson", "null"), ("inf.geojson", "Infinity")]:
        (tmp_path / name).write_text(
            '{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", '
            f'"coordinates": [[[0, 0], [1, {value}], [1, 1], [0, 0]]]}}}}'
        )
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: feature 0: expected finite coordinates"):
            read_geojson(tmp_path / name)


def test_no_stray_warnings_on_clean_files(tmp_path):
    path = write_geojson(tmp_path / "clean.geojson", to_geojson([Polygon([(0, 0), (1, 0), (0, 1)])]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_geojson(path)) == 1
        assert len(read_asap_xml(camelyon_xml(tmp_path / "t.xml"))) == 2
