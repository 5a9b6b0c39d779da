"""Slide annotations: CAMELYON16/ASAP XML and QuPath GeoJSON in, masks at any level, GeoJSON polygons out.

Coordinates follow the conventions of :mod:`roigan_stain_transfer.wsi`: a :class:`Polygon` holds continuous
``(x, y)`` level-0 pixel coordinates (``x`` = column, ``y`` = row; pixel ``(col, row)`` covers
``[col, col + 1) x [row, row + 1)`` and has its centre at ``+0.5``), which is what ASAP and QuPath store.

Formats read:

* **ASAP XML** (CAMELYON16/17): ``<ASAP_Annotations><Annotations><Annotation Name=".." Type=".."
  PartOfGroup="..">`` with ``<Coordinates><Coordinate Order="0" X=".." Y=".."/>...``. Vertices are sorted by
  ``Order``; numbers may use exponents (``6.5e+04``) or a decimal comma (``123,5``). Types ``Polygon``,
  ``Spline`` (its control points taken as the polygon), ``Rectangle`` (4 corners, or 2 opposite ones) and a
  missing ``Type`` become polygons; ``Dot`` and ``PointSet`` are skipped silently, other types with a warning.
  The label is ``PartOfGroup`` (ASAP writes ``"None"`` for no group; read as ``""``). In CAMELYON16, groups
  ``_0`` and ``_1`` are tumour and ``_2`` marks non-tumour regions inside tumour (see
  :data:`CAMELYON_EXCLUDE_LABELS`).
* **GeoJSON** (QuPath): a ``FeatureCollection``, a bare list of Features (older QuPath exports), a single
  Feature or a bare geometry. ``Polygon`` and ``MultiPolygon`` geometries (each part its own polygon, interior
  rings kept as holes) and the polygonal members of a ``GeometryCollection`` are read; other geometry types are
  skipped with one warning per file naming them. The label is ``properties.classification.name``, else
  ``properties.name``, else ``""``. A file without any polygon is not an error (a slide may carry no
  annotation): the reader returns ``[]`` and warns.

Errors: a missing file raises ``FileNotFoundError`` naming it; content that is not the expected format, or
non-finite coordinates, raise ``ValueError`` naming the file and what was expected. Polygons with fewer than
three distinct vertices are skipped with an :class:`AnnotationWarning`.

Rasterisation (:func:`rasterize`) uses the pixel-centre rule: a pixel is inside a polygon when its centre is
inside the exterior ring and not inside any hole. A centre exactly on an edge belongs to the polygon whose
interior lies to its right (+x) or below it (+y), as in the insideness rule of Java AWT, so polygons that share
edges (a partition) cover every pixel exactly once. Each polygon is scan-converted (even-odd crossings of the
rows of pixel centres, vectorised) on the part of the raster its bounding box covers; polygons outside the
raster cost one bounding-box test.

Vectorisation (:func:`mask_to_polygons`) treats foreground as 8-connected and background as 4-connected: a
component's pixels that touch only diagonally stay one polygon, and each 4-connected background region it
encloses becomes one hole. Boundaries are traced between pixel centres (marching squares at level 0.5, the
saddle cells joining the foreground corners), vectorised over the whole mask: segments are linked into rings
through their shared end points, rings are given to components by ``scipy.ndimage.label`` and told apart as
outer boundary or hole by the sign of their area. Vertices on straight runs are dropped (exact), so rasterising
the unsimplified polygons gives back the mask exactly; Douglas-Peucker simplification then moves boundaries by
at most ``simplify`` mask pixels. Simplification is not topology-preserving; with the default 0.5 px it rarely
matters.

GeoJSON written by :func:`to_geojson` has closed rings, exterior rings with a positive shoelace signed area and
holes with a negative one. That is counter-clockwise / clockwise as RFC 7946 asks when the axes are drawn
y-up; in the y-down pixel frame of a slide viewer the exterior therefore appears clockwise on screen.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from shared_ops.atomic import atomic_write_text

__all__ = [
    "CAMELYON_EXCLUDE_LABELS",
    "AnnotationWarning",
    "Polygon",
    "mask_to_polygons",
    "polygon_area",
    "rasterize",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "to_geojson",
    "write_geojson",
]

#: Labels whose polygons are subtracted by default: CAMELYON16 group ``_2`` marks non-tumour regions inside
#: tumour; ``Exclusion`` is the name other ASAP/QuPath projects use.
CAMELYON_EXCLUDE_LABELS = ("_2", "Exclusion", "exclusion")

_ASAP_POLYGON_TYPES = {"polygon", "spline", "rectangle"}
_ASAP_POINT_TYPES = {"dot", "pointset"}
_GEOJSON_GEOMETRY_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
}
_GEOJSON_EXPECTED = "a GeoJSON FeatureCollection, list of Features, Feature or geometry"


class AnnotationWarning(UserWarning):
    """An annotation file had content that was skipped (degenerate polygons, non-polygon geometries)."""


# ----------------------------------------------------------------------------------------------------------------
# Polygon
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Polygon:
    """A polygon with holes in level-0 pixel coordinates.

    Attributes:
        exterior: ``(N, 2)`` float64 ``(x, y)`` vertices, ``N >= 3``, the ring not closed (first != last; a
            closing repeat given to the constructor is dropped). Read-only.
        holes: interior rings, each ``(M, 2)`` float64 like ``exterior``.
        label: ASAP ``PartOfGroup`` or QuPath classification name.
        name: ASAP annotation ``Name`` or QuPath ``properties.name``.
        bounds: ``(xmin, ymin, xmax, ymax)`` of the exterior, computed on construction.

    Equality is identity (``eq=False``): the fields hold arrays, which have no single truth value.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()
    label: str = ""
    name: str = ""
    bounds: tuple[float, float, float, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        exterior = _as_ring(self.exterior, "exterior")
        holes = tuple(_as_ring(hole, f"hole {i}") for i, hole in enumerate(self.holes))
        lo, hi = exterior.min(axis=0), exterior.max(axis=0)
        object.__setattr__(self, "exterior", exterior)
        object.__setattr__(self, "holes", holes)
        object.__setattr__(self, "label", str(self.label))
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "bounds", (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])))

    def __repr__(self) -> str:
        xmin, ymin, xmax, ymax = self.bounds
        return (
            f"Polygon(label={self.label!r}, name={self.name!r}, vertices={len(self.exterior)}, "
            f"holes={len(self.holes)}, bounds=({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}))"
        )


def _as_ring(ring: Any, what: str) -> np.ndarray:
    """Return ``ring`` as a read-only ``(N, 2)`` float64 array without a closing repeat; checks N >= 3, finite."""
    ring = np.array(ring, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] != 2:
        raise ValueError(f"Polygon {what}: expected an (N, 2) array of (x, y) vertices, got shape {ring.shape}")
    while len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise ValueError(f"Polygon {what}: expected at least 3 vertices, got {len(ring)}")
    if not np.isfinite(ring).all():
        raise ValueError(f"Polygon {what}: expected finite coordinates, got NaN or infinity")
    ring.setflags(write=False)
    return ring


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace signed area of an unclosed ``(N, 2)`` ``(x, y)`` ring (positive = counter-clockwise, y up)."""
    x, y = ring[:, 0], ring[:, 1]
    # Centred coordinates keep the products small for rings far from the origin (slide coordinates ~1e5).
    x = x - x.mean()
    y = y - y.mean()
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def polygon_area(polygon: Polygon) -> float:
    """Area in level-0 px^2: shoelace area of the exterior minus those of the holes (orientation ignored)."""
    return abs(_signed_area(polygon.exterior)) - sum(abs(_signed_area(hole)) for hole in polygon.holes)


def _oriented(ring: np.ndarray, positive: bool) -> np.ndarray:
    """``ring`` reversed if needed so that its shoelace signed area is positive (or negative)."""
    return ring if (_signed_area(ring) > 0) == positive else ring[::-1].copy()


def _distinct_points(ring: np.ndarray) -> int:
    """Number of distinct vertices of an ``(N, 2)`` ring."""
    return len(np.unique(ring, axis=0)) if len(ring) else 0


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def _existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; ``FileNotFoundError`` naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "annotation file not found", str(path))
    return path


def _require_finite(ring: np.ndarray, path: Path, where: str) -> None:
    """``ValueError`` naming the file and the annotation when ``ring`` has NaN or infinite coordinates."""
    if not np.isfinite(ring).all():
        raise ValueError(f"{path}: {where}: expected finite coordinates, got NaN or infinity")


def _parse_number(text: str | None, path: Path, where: str) -> float:
    """A coordinate of an ASAP file: ``.`` or ``,`` decimal separator, exponents allowed."""
    if text is None:
        raise ValueError(f"{path}: {where}: expected X and Y attributes on every <Coordinate>")
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text.count(",") == 1 and "." not in text:
        try:
            return float(text.replace(",", "."))
        except ValueError:
            pass
    raise ValueError(f"{path}: {where}: expected a number, got {text!r}")


def _asap_vertices(annotation: ET.Element, path: Path, where: str) -> np.ndarray:
    """``(N, 2)`` vertices of one ``<Annotation>``, sorted by their ``Order`` attribute (document order if absent)."""
    keyed = []
    for index, coordinate in enumerate(annotation.iter("Coordinate")):
        order = coordinate.get("Order")
        key = _parse_number(order, path, where) if order is not None else float(index)
        x = _parse_number(coordinate.get("X"), path, where)
        y = _parse_number(coordinate.get("Y"), path, where)
        keyed.append((key, index, x, y))
    keyed.sort()
    return np.array([(x, y) for _, _, x, y in keyed], dtype=np.float64).reshape(-1, 2)


def _rectangle_corners(vertices: np.ndarray) -> np.ndarray:
    """The 4 corners of a rectangle given by 2 opposite corners; other vertex lists unchanged."""
    if len(vertices) != 2:
        return vertices
    (x0, y0), (x1, y1) = vertices
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _asap_root(path: Path) -> ET.Element:
    """Parsed root ``<ASAP_Annotations>`` element; ``ValueError`` naming the file otherwise."""
    expected = "expected an ASAP XML file (<ASAP_Annotations>)"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: {expected}, got malformed XML ({error})") from error
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: {expected}, got <{root.tag}>")
    return root


def read_asap_xml(path: str | os.PathLike) -> list[Polygon]:
    """Polygons of an ASAP/CAMELYON XML file, in file order (see the module docstring for the format)."""
    path = _existing_file(path)
    root = _asap_root(path)
    polygons = []
    for index, annotation in enumerate(root.iter("Annotation")):
        name = annotation.get("Name", "")
        where = f"annotation {name!r}" if name else f"annotation #{index}"
        kind = annotation.get("Type", "Polygon").strip().lower()
        if kind in _ASAP_POINT_TYPES:
            continue
        if kind not in _ASAP_POLYGON_TYPES:
            warnings.warn(f"{path}: {where}: skipped annotation of unknown Type {kind!r}", AnnotationWarning, 2)
            continue
        vertices = _asap_vertices(annotation, path, where)
        _require_finite(vertices, path, where)
        if kind == "rectangle":
            vertices = _rectangle_corners(vertices)
        if _distinct_points(vertices) < 3:
            warnings.warn(f"{path}: {where}: skipped polygon with fewer than 3 distinct points", AnnotationWarning, 2)
            continue
        group = annotation.get("PartOfGroup", "")
        polygons.append(Polygon(vertices, label="" if group == "None" else group, name=name))
    return polygons


def _geojson_document(path: Path) -> Any:
    """Parsed JSON of ``path``; ``ValueError`` naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: expected {_GEOJSON_EXPECTED}, got invalid JSON ({error})") from error


def _is_geometry(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("type") in _GEOJSON_GEOMETRY_TYPES


def _geojson_features(document: Any, path: Path) -> list[tuple[Any, Mapping]]:
    """``(geometry, properties)`` of every Feature of a GeoJSON document in one of the accepted forms."""
    if isinstance(document, Mapping) and document.get("type") == "FeatureCollection":
        items = document.get("features")
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list under 'features' of the FeatureCollection")
    elif isinstance(document, list):
        items = document
    elif isinstance(document, Mapping) and (document.get("type") == "Feature" or _is_geometry(document)):
        items = [document]
    else:
        got = f"type {document.get('type')!r}" if isinstance(document, Mapping) else type(document).__name__
        raise ValueError(f"{path}: expected {_GEOJSON_EXPECTED}, got {got}")
    features = []
    for index, item in enumerate(items):
        if _is_geometry(item):
            features.append((item, {}))
        elif isinstance(item, Mapping) and item.get("type") == "Feature":
            features.append((item.get("geometry"), item.get("properties") or {}))
        else:
            raise ValueError(f"{path}: feature {index}: expected a GeoJSON Feature or geometry")
    return features


def _geojson_label(properties: Mapping) -> tuple[str, str]:
    """``(label, name)`` of a Feature: classification name (else name, else ``""``) and ``properties.name``."""
    name = properties.get("name")
    name = "" if name is None else str(name)
    classification = properties.get("classification")
    if isinstance(classification, Mapping):
        classification = classification.get("name")
    label = str(classification) if classification else name
    return label, name


def _geojson_ring(ring: Any, path: Path, where: str) -> np.ndarray:
    """One GeoJSON linear ring as ``(N, 2)`` float64 (extra ``z`` dropped); ``ValueError`` when malformed."""
    try:
        array = np.array(ring, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {where}: expected a ring of [x, y] positions ({error})") from error
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"{path}: {where}: expected a ring of [x, y] positions, got shape {array.shape}")
    array = array[:, :2]
    _require_finite(array, path, where)
    return array


def _geojson_polygon(rings: Any, label: str, name: str, path: Path, where: str, skipped: Counter) -> list[Polygon]:
    """The polygon of one GeoJSON ``Polygon`` coordinate list (``[exterior, *holes]``), or ``[]`` if degenerate."""
    if not isinstance(rings, list) or not rings:
        skipped["empty Polygon"] += 1
        return []
    exterior = _geojson_ring(rings[0], path, where)
    holes = [_geojson_ring(ring, path, f"{where}, hole {i}") for i, ring in enumerate(rings[1:], start=1)]
    if _distinct_points(exterior) < 3:
        skipped["Polygon with fewer than 3 distinct points"] += 1
        return []
    kept = [hole for hole in holes if _distinct_points(hole) >= 3]
    if len(kept) < len(holes):
        skipped["hole with fewer than 3 distinct points"] += len(holes) - len(kept)
    return [Polygon(exterior, tuple(kept), label=label, name=name)]


def _geojson_geometry(geometry: Any, label: str, name: str, path: Path, where: str, skipped: Counter) -> list:
    """Polygons of one geometry; types other than (Multi)Polygon and GeometryCollection counted in ``skipped``."""
    if not isinstance(geometry, Mapping):
        skipped["null geometry"] += 1
        return []
    kind = geometry.get("type")
    if kind == "Polygon":
        return _geojson_polygon(geometry.get("coordinates"), label, name, path, where, skipped)
    if kind == "MultiPolygon":
        parts = geometry.get("coordinates") or []
        return [
            polygon
            for i, rings in enumerate(parts)
            for polygon in _geojson_polygon(rings, label, name, path, f"{where}, part {i}", skipped)
        ]
    if kind == "GeometryCollection":
        members = geometry.get("geometries") or []
        return [
            polygon
            for i, member in enumerate(members)
            for polygon in _geojson_geometry(member, label, name, path, f"{where}, geometry {i}", skipped)
        ]
    skipped[str(kind)] += 1
    return []


def read_geojson(path: str | os.PathLike) -> list[Polygon]:
    """Polygons of a (QuPath) GeoJSON file, in file order (see the module docstring for the accepted forms).

    Returns ``[]`` with an :class:`AnnotationWarning` when the file holds no polygon.
    """
    path = _existing_file(path)
    document = _geojson_document(path)
    skipped: Counter = Counter()
    polygons = []
    for index, (geometry, properties) in enumerate(_geojson_features(document, path)):
        if not isinstance(properties, Mapping):
            raise ValueError(f"{path}: feature {index}: expected an object or null as 'properties'")
        label, name = _geojson_label(properties)
        polygons.extend(_geojson_geometry(geometry, label, name, path, f"feature {index}", skipped))
    details = ", ".join(f"{kind} x{count}" for kind, count in sorted(skipped.items()))
    if not polygons:
        warnings.warn(f"{path}: no Polygon or MultiPolygon found (skipped: {details or 'none'})", AnnotationWarning, 2)
    elif skipped:
        warnings.warn(f"{path}: skipped {details}", AnnotationWarning, 2)
    return polygons


def read_annotations(path: str | os.PathLike) -> list[Polygon]:
    """Polygons of an annotation file: ``.xml`` read as ASAP XML, ``.geojson`` / ``.json`` as GeoJSON."""
    path = _existing_file(path)
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return read_asap_xml(path)
    if suffix in (".geojson", ".json"):
        return read_geojson(path)
    raise ValueError(f"{path}: expected an annotation file ending in .xml, .geojson or .json, got {suffix!r}")


# ----------------------------------------------------------------------------------------------------------------
# Rasterising
# ----------------------------------------------------------------------------------------------------------------


def _validate_grid(shape: Sequence[int], downsample: float, origin: Sequence[float]) -> tuple[int, int]:
    """``(H, W)`` of a raster after checking shape, downsample and origin."""
    if len(shape) != 2 or any(int(n) != n or n < 0 for n in shape):
        raise ValueError(f"expected a raster shape (H, W) of non-negative integers, got {tuple(shape)}")
    if not (math.isfinite(downsample) and downsample > 0):
        raise ValueError(f"expected a finite downsample > 0, got {downsample}")
    if len(origin) != 2 or not all(math.isfinite(v) for v in origin):
        raise ValueError(f"expected a finite origin (x0, y0) in level-0 px, got {tuple(origin)}")
    return int(shape[0]), int(shape[1])


def _label_set(labels: str | Iterable[str] | None) -> frozenset[str] | None:
    if labels is None:
        return None
    return frozenset([labels] if isinstance(labels, str) else labels)


def _to_grid(values: np.ndarray | float, offset: float, downsample: float) -> np.ndarray | float:
    """Level-0 coordinates to raster coordinates in which pixel ``i`` has its centre at ``i``."""
    return (values - offset) / downsample - 0.5


def _first_index(values: np.ndarray | float, lo: int, hi: int) -> np.ndarray | int:
    """Smallest integer ``>= values`` (the first pixel whose centre is at or after it), clipped to ``[lo, hi]``."""
    return np.clip(np.ceil(values), lo, hi).astype(np.intp)


def _ring_inside(ring_uv: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Even-odd inside test of pixel centres of the window ``rows x cols`` of a raster, ``(h, w)`` bool.

    ``ring_uv`` is ``(N, 2)`` in raster coordinates (pixel ``(r, c)`` has its centre at ``u = c, v = r``). An
    edge crosses row ``r`` when ``min(v) <= r < max(v)``; a crossing at ``u`` toggles every centre ``>= u``.
    """
    (r0, r1), (c0, c1) = rows, cols
    h, w = r1 - r0, c1 - c0
    u0, v0 = ring_uv[:, 0], ring_uv[:, 1]
    u1, v1 = np.roll(u0, -1), np.roll(v0, -1)
    # Orient every edge downwards so a shared edge gives bit-identical crossings in both of its polygons.
    down = v0 <= v1
    ua, va, ub, vb = np.where(down, u0, u1), np.where(down, v0, v1), np.where(down, u1, u0), np.where(down, v1, v0)
    first = _first_index(va, r0, r1) - r0
    count = _first_index(vb, r0, r1) - r0 - first
    keep = count > 0
    ua, va, ub, vb, first, count = ua[keep], va[keep], ub[keep], vb[keep], first[keep], count[keep]
    inside = np.zeros((h, w + 1), dtype=np.uint8)
    if count.size == 0:
        return inside[:, :w].astype(bool)
    edge = np.repeat(np.arange(count.size), count)
    row = first[edge] + np.arange(edge.size) - (np.cumsum(count) - count)[edge]
    t = (row + r0 - va[edge]) / (vb[edge] - va[edge])
    u = ua[edge] + t * (ub[edge] - ua[edge])
    col = _first_index(u, c0, c1) - c0
    cells, hits = np.unique(row * (w + 1) + col, return_counts=True)
    inside.ravel()[cells[hits % 2 == 1]] = 1
    np.bitwise_xor.accumulate(inside, axis=1, out=inside)
    return inside[:, :w].astype(bool)


def _polygon_window(
    bounds: tuple[float, float, float, float], shape: tuple[int, int], downsample: float, origin: Sequence[float]
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Rows and columns ``((r0, r1), (c0, c1))`` of the raster whose centres may lie in ``bounds``, or None."""
    xmin, ymin, xmax, ymax = bounds
    rows = (
        int(_first_index(_to_grid(ymin, origin[1], downsample), 0, shape[0])),
        int(_first_index(_to_grid(ymax, origin[1], downsample), 0, shape[0])),
    )
    cols = (
        int(_first_index(_to_grid(xmin, origin[0], downsample), 0, shape[1])),
        int(_first_index(_to_grid(xmax, origin[0], downsample), 0, shape[1])),
    )
    if rows[0] >= rows[1] or cols[0] >= cols[1]:
        return None
    return rows, cols


def _paint(target: np.ndarray, polygon: Polygon, downsample: float, origin: Sequence[float]) -> None:
    """OR the pixels of ``target`` ``(H, W)`` whose centres are inside ``polygon`` (exterior minus holes)."""
    window = _polygon_window(polygon.bounds, target.shape, downsample, origin)
    if window is None:
        return
    rows, cols = window
    scale = np.array([downsample, downsample])
    shift = np.array(origin, dtype=np.float64)
    inside = _ring_inside((polygon.exterior - shift) / scale - 0.5, rows, cols)
    for hole in polygon.holes:
        inside &= ~_ring_inside((hole - shift) / scale - 0.5, rows, cols)
    target[rows[0] : rows[1], cols[0] : cols[1]] |= inside


def rasterize(
    polygons: Iterable[Polygon],
    shape: Sequence[int],
    downsample: float = 1.0,
    origin: Sequence[float] = (0.0, 0.0),
    labels: str | Iterable[str] | None = None,
    exclude_labels: str | Iterable[str] | None = CAMELYON_EXCLUDE_LABELS,
) -> np.ndarray:
    """Boolean mask ``(H, W)`` of ``polygons`` on a raster of ``shape`` at ``downsample`` from level 0.

    Pixel ``(r, c)`` of the raster has its centre at the level-0 point
    ``(origin[0] + (c + 0.5) * downsample, origin[1] + (r + 0.5) * downsample)``; ``origin`` is ``(x0, y0)``
    in level-0 px (the level-0 position of the raster's top-left corner). A pixel is inside a polygon when its
    centre is inside the exterior and not inside any hole (edge rule in the module docstring).

    The mask is the union of the polygons whose label is in ``labels`` (``None``: every label) minus the union
    of the polygons whose label is in ``exclude_labels`` (``None`` or ``()``: nothing subtracted).
    """
    height, width = _validate_grid(shape, float(downsample), origin)
    selected, excluded = _label_set(labels), _label_set(exclude_labels) or frozenset()
    include = np.zeros((height, width), dtype=bool)
    exclude = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        if polygon.label in excluded:
            _paint(exclude, polygon, float(downsample), origin)
        elif selected is None or polygon.label in selected:
            _paint(include, polygon, float(downsample), origin)
    return include & ~exclude


# ----------------------------------------------------------------------------------------------------------------
# Vectorising
# ----------------------------------------------------------------------------------------------------------------


# Marching squares on the padded mask. Cell (i, j) has corners TL = P[i, j], TR = P[i, j + 1], BL = P[i + 1, j]
# and BR = P[i + 1, j + 1] (bits 1, 2, 4, 8 of its case) and edge midpoints T, R, B, L (codes 0..3). Segments are
# directed so that foreground lies on their right as seen on screen (y down): outer rings then have a positive
# shoelace signed area in (x, y) and holes a negative one. Saddles (cases 6, 9) join the two foreground corners
# (foreground 8-connected, background 4-connected).
_T, _R, _B, _L = 0, 1, 2, 3
_CASE_SEGMENTS = {
    1: [(_T, _L)],
    2: [(_R, _T)],
    3: [(_R, _L)],
    4: [(_L, _B)],
    5: [(_T, _B)],
    6: [(_L, _T), (_R, _B)],
    7: [(_R, _B)],
    8: [(_B, _R)],
    9: [(_T, _R), (_B, _L)],
    10: [(_B, _T)],
    11: [(_B, _L)],
    12: [(_L, _R)],
    13: [(_T, _R)],
    14: [(_L, _T)],
}


def _segment_table() -> tuple[np.ndarray, np.ndarray]:
    """``(16, 2)`` start and end edge codes of the (up to two) segments of each case, ``-1`` where none."""
    start = np.full((16, 2), -1, dtype=np.intp)
    end = np.full((16, 2), -1, dtype=np.intp)
    for case, segments in _CASE_SEGMENTS.items():
        for k, (a, b) in enumerate(segments):
            start[case, k], end[case, k] = a, b
    return start, end


_SEGMENT_START, _SEGMENT_END = _segment_table()
# A foreground corner (row, col offset) of each case, to find the component a segment belongs to.
_FOREGROUND_CORNER = np.array(
    [(0, 0)] + [(0, 0) if c & 1 else (0, 1) if c & 2 else (1, 0) if c & 4 else (1, 1) for c in range(1, 16)],
    dtype=np.intp,
)


def _marching_segments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed boundary segments of ``mask`` ``(H, W)`` between pixel centres.

    Returns ``(start, end, pixel)``: ``(n,)`` int64 ids of the segments' end points (see :func:`_edge_id`) and
    the flat index into ``mask`` of a foreground pixel at a corner of each segment's cell.
    """
    width = mask.shape[1]
    padded = np.pad(mask, 1).view(np.uint8)
    case = padded[:-1, :-1] | (padded[:-1, 1:] << 1) | (padded[1:, :-1] << 2) | (padded[1:, 1:] << 3)
    cells = np.flatnonzero((case - np.uint8(1)).ravel() < 14)  # cases 1..14 (uint8 wraps 0 to 255)
    case = case.ravel()[cells].astype(np.intp)
    saddle = (case == 6) | (case == 9)
    # Saddle cells appear twice, once per segment (``second`` selects the segment of the case).
    cells = np.concatenate([cells, cells[saddle]])
    case = np.concatenate([case, case[saddle]])
    second = np.repeat([0, 1], [saddle.size, int(saddle.sum())])
    row, col = np.divmod(cells, width + 1)
    corner = _FOREGROUND_CORNER[case]
    pixel = (row + corner[:, 0] - 1) * width + (col + corner[:, 1] - 1)
    start = _edge_id(row, col, _SEGMENT_START[case, second], width)
    end = _edge_id(row, col, _SEGMENT_END[case, second], width)
    return start, end, pixel


def _edge_id(row: np.ndarray, col: np.ndarray, edge: np.ndarray, width: int) -> np.ndarray:
    """Id of edge midpoint ``edge`` (T, R, B, L) of cells ``(row, col)``: ``2 * flat padded index + vertical``.

    ``vertical`` is 0 for the midpoint between a pixel and its right neighbour, 1 for the one below it.
    """
    padded_width = width + 2
    d_row = np.array([0, 0, 1, 0])[edge]
    d_col = np.array([0, 1, 0, 0])[edge]
    vertical = np.array([0, 1, 0, 1])[edge]
    return 2 * ((row + d_row) * padded_width + (col + d_col)).astype(np.int64) + vertical


def _point_xy(ids: np.ndarray, width: int) -> np.ndarray:
    """``(n, 2)`` ``(x, y)`` of edge midpoints in mask coordinates (pixel ``(r, c)`` centred at ``(c, r)``)."""
    row, col = np.divmod(ids >> 1, width + 2)
    vertical = (ids & 1).astype(bool)
    return np.stack([col - 1 + 0.5 * ~vertical, row - 1 + 0.5 * vertical], axis=1).astype(np.float64)


def _link_rings(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order segments into closed rings: ``(order, offsets)`` with ring ``k`` = ``order[offsets[k]:offsets[k+1]]``.

    Every end point starts exactly one segment, so "next segment" is a permutation; its cycles are the rings.
    Cycles are found with connected components and ordered by pointer jumping (``log2`` of the longest ring
    rounds), all vectorised.
    """
    n = start.size
    by_start = np.argsort(start)
    successor = by_start[np.searchsorted(start, end, sorter=by_start)]
    graph = csr_matrix((np.ones(n, dtype=np.int8), (np.arange(n), successor)), shape=(n, n))
    count, ring = connected_components(graph, directed=True, connection="weak")
    head = np.full(count, n, dtype=np.intp)
    np.minimum.at(head, ring, np.arange(n))
    lengths = np.bincount(ring, minlength=count)
    # List ranking: cut each cycle before its head and count the steps to the cut.
    tail = successor == head[ring]
    pointer = np.where(tail, np.arange(n), successor)
    steps = (~tail).astype(np.intp)
    while True:
        jumped = pointer[pointer]
        if np.array_equal(jumped, pointer):
            break
        steps += steps[pointer]
        pointer = jumped
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = np.empty(n, dtype=np.intp)
    order[offsets[ring] + lengths[ring] - 1 - steps] = np.arange(n)
    return order, offsets


def _ring_index(offsets: np.ndarray) -> np.ndarray:
    """Ring number of every vertex of rings stored contiguously with ``offsets``."""
    return np.repeat(np.arange(offsets.size - 1), np.diff(offsets))


def _neighbours(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the previous and next vertex of every vertex within its (closed) ring."""
    ring = _ring_index(offsets)
    index = np.arange(offsets[-1])
    first, last = offsets[:-1][ring], offsets[1:][ring] - 1
    return np.where(index == first, last, index - 1), np.where(index == last, first, index + 1)


def _corners(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: vertices not on the straight line through their two ring neighbours (an exact test)."""
    before, after = _neighbours(offsets)
    incoming, outgoing = xy - xy[before], xy[after] - xy
    return incoming[:, 0] * outgoing[:, 1] - incoming[:, 1] * outgoing[:, 0] != 0


def _line_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of ``points`` ``(n, 2)`` to the lines through ``a`` and ``b`` (to ``a`` where ``a == b``)."""
    chord, offset = b - a, points - a
    length = np.hypot(chord[:, 0], chord[:, 1])
    cross = np.abs(chord[:, 0] * offset[:, 1] - chord[:, 1] * offset[:, 0])
    return np.where(length > 0, cross / np.where(length > 0, length, 1.0), np.hypot(offset[:, 0], offset[:, 1]))


def _group_argmax(values: np.ndarray, starts: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum and index of its first occurrence within each contiguous group of ``values``."""
    best = np.maximum.reduceat(values, starts)
    hits = np.flatnonzero(values == best[group])
    _, first = np.unique(group[hits], return_index=True)
    return best, hits[first]


def _douglas_peucker(xy: np.ndarray, offsets: np.ndarray, tolerance: float) -> np.ndarray:
    """Vertices kept ``(n,)`` bool by Douglas-Peucker of every closed ring at once (a vertex is kept when it
    lies farther than ``tolerance`` from the chord of its current interval).

    Each ring ``v0 .. v(L-1)`` is split at ``v0`` and its farthest vertex from ``v0``; all intervals of all
    rings are then refined together, one recursion level per round.
    """
    rings = offsets.size - 1
    lengths = np.diff(offsets)
    ring = _ring_index(offsets)
    # Extended index space: each ring followed by a copy of its first vertex, so intervals never wrap.
    ext_offsets = offsets + np.arange(rings + 1)
    ext_ring = np.repeat(np.arange(rings), lengths + 1)
    position = np.arange(ext_offsets[-1]) - ext_offsets[:-1][ext_ring]
    source = offsets[:-1][ext_ring] + np.where(position == lengths[ext_ring], 0, position)
    ext = xy[source]
    keep = np.zeros(ext.shape[0], dtype=bool)
    distance = np.hypot(*(xy - xy[offsets[:-1][ring]]).T)
    _, farthest = _group_argmax(distance, offsets[:-1], ring)
    split = ext_offsets[:-1] + (farthest - offsets[:-1])
    keep[ext_offsets[:-1]] = keep[split] = keep[ext_offsets[1:] - 1] = True
    a = np.concatenate([ext_offsets[:-1], split])
    b = np.concatenate([split, ext_offsets[1:] - 1])
    while a.size:
        inner = b - a - 1
        a, b, inner = a[inner > 0], b[inner > 0], inner[inner > 0]
        if not a.size:
            break
        starts = np.cumsum(inner) - inner
        group = np.repeat(np.arange(a.size), inner)
        index = a[group] + 1 + np.arange(group.size) - starts[group]
        best, where = _group_argmax(_line_distance(ext[index], ext[a[group]], ext[b[group]]), starts, group)
        far = best > tolerance
        middle = index[where[far]]
        keep[middle] = True
        a, b = np.concatenate([a[far], middle]), np.concatenate([middle, b[far]])
    return keep[position < lengths[ext_ring]]


def _ring_areas(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Shoelace signed area of every ring stored contiguously in ``xy`` ``(n, 2)`` with ``offsets``."""
    if offsets.size < 2:
        return np.zeros(0)
    _, after = _neighbours(offsets)
    cross = xy[:, 0] * xy[after, 1] - xy[after, 0] * xy[:, 1]
    sums = np.add.reduceat(cross, offsets[:-1]) if cross.size else np.zeros(offsets.size - 1)
    return 0.5 * np.where(np.diff(offsets) > 0, sums, 0.0)


def _offsets(keep: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Offsets of the rings of ``offsets`` after keeping the vertices where ``keep`` ``(n,)`` is True."""
    counts = np.add.reduceat(keep.astype(np.intp), offsets[:-1]) if keep.size else np.zeros(offsets.size - 1, int)
    return np.concatenate([[0], np.cumsum(counts)])


def _mask_rings(mask: np.ndarray, simplify: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boundary rings of ``mask`` ``(H, W)``: ``(xy, offsets, pixel, outer)``.

    Ring ``k`` is ``xy[offsets[k]:offsets[k + 1]]`` in mask coordinates (pixel ``(r, c)`` centred at
    ``(x, y) = (c, r)``), ``pixel[k]`` the flat index of a foreground pixel next to it and ``outer[k]`` True for
    an outer boundary (positive shoelace signed area), False for a hole (negative). A ring that simplification
    would collapse or turn inside out keeps its unsimplified vertices.
    """
    start, end, pixel = _marching_segments(mask)
    order, offsets = _link_rings(start, end)
    pixel = pixel[order[offsets[:-1]]]
    xy = _point_xy(start[order], mask.shape[1])
    keep = _corners(xy, offsets)
    xy, offsets = xy[keep], _offsets(keep, offsets)
    outer = _ring_areas(xy, offsets) > 0
    if simplify > 0:
        keep = _douglas_peucker(xy, offsets, simplify)
        kept = _offsets(keep, offsets)
        areas = _ring_areas(xy[keep], kept)
        collapsed = (np.diff(kept) < 3) | (areas == 0) | ((areas > 0) != outer)
        keep |= collapsed[_ring_index(offsets)]
        xy, offsets = xy[keep], _offsets(keep, offsets)
    return xy, offsets, pixel, outer


def _validate_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons: expected a 2-D (H, W) mask, got shape {mask.shape}")
    return np.ascontiguousarray(mask, dtype=bool)


def mask_to_polygons(
    mask: np.ndarray,
    downsample: float = 1.0,
    origin: Sequence[float] = (0.0, 0.0),
    label: str = "",
    simplify: float = 0.5,
    min_area: float = 0.0,
) -> list[Polygon]:
    """Polygons (level-0 px) of the 8-connected components of ``mask`` ``(H, W)``, in raster order.

    Each component gives one :class:`Polygon` with its outer boundary and one hole per 4-connected background
    region it encloses (a component inside a hole is a polygon of its own). Boundaries run between pixel
    centres (marching squares at 0.5, vertices at midpoints between a foreground and a background centre) and
    are mapped to level 0 as in :func:`rasterize`: mask pixel ``(r, c)`` has its centre at
    ``(origin[0] + (c + 0.5) * downsample, origin[1] + (r + 0.5) * downsample)``. Vertices on straight runs are
    always dropped (exact); ``simplify`` > 0 is then the Douglas-Peucker tolerance in mask pixels (a ring that
    would collapse keeps its vertices). With ``simplify=0``, ``rasterize`` gives back ``mask`` exactly.
    Components of fewer than ``min_area`` mask pixels are dropped. Exteriors have a positive shoelace signed
    area, holes a negative one; every polygon gets label ``label``.
    """
    mask = _validate_mask(mask)
    _validate_grid(mask.shape, float(downsample), origin)
    components, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    xy, offsets, pixel, is_outer = _mask_rings(mask, float(simplify))
    owner = components.ravel()[pixel]
    xy = np.asarray(origin, dtype=np.float64) + (xy + 0.5) * float(downsample)
    outer: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for k in np.argsort(owner, kind="stable"):
        ring = xy[offsets[k] : offsets[k + 1]]
        if is_outer[k]:
            outer[int(owner[k])] = ring
        else:
            holes.setdefault(int(owner[k]), []).append(ring)
    return [
        Polygon(outer[index], tuple(holes.get(index, ())), label=label)
        for index in sorted(outer)
        if sizes[index] >= min_area
    ]


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def _closed(ring: np.ndarray) -> list[list[float]]:
    """``ring`` ``(N, 2)`` as a GeoJSON position list with the first position repeated last."""
    return np.concatenate([ring, ring[:1]]).tolist()


def _validate_color(color: Sequence[int]) -> list[int]:
    values = [int(v) for v in color]
    if len(values) != 3 or any(v < 0 or v > 255 for v in values):
        raise ValueError(f"to_geojson: expected color (r, g, b) with values in 0..255, got {tuple(color)}")
    return values


def to_geojson(
    polygons: Iterable[Polygon],
    classification: str | None = "DAB positive",
    color: Sequence[int] = (150, 75, 0),
    properties: Sequence[Mapping[str, Any]] | None = None,
) -> dict:
    """A GeoJSON FeatureCollection of ``polygons`` that QuPath imports as annotations.

    Each Feature has a uuid4 ``id``, a ``Polygon`` geometry (rings closed; exterior with positive shoelace signed
    area, holes negative: counter-clockwise / clockwise with y up as RFC 7946 asks, so clockwise / counter-
    clockwise on screen in the y-down pixel frame) and ``properties`` ``{"objectType": "annotation",
    "classification": {"name": ..., "color": [r, g, b]}}``, plus ``"name"`` when the polygon has one.
    ``classification=None`` uses each polygon's own label as the name (no classification when it is empty).
    ``properties``, one mapping per polygon, is merged into each Feature's properties (e.g. ``area_mm2``).
    """
    polygons = list(polygons)
    if properties is not None and len(properties) != len(polygons):
        raise ValueError(
            f"to_geojson: expected one properties mapping per polygon ({len(polygons)}), got {len(properties)}"
        )
    rgb = _validate_color(color)
    features = []
    for index, polygon in enumerate(polygons):
        name = polygon.label if classification is None else classification
        props: dict[str, Any] = {"objectType": "annotation"}
        if name:
            props["classification"] = {"name": name, "color": list(rgb)}
        if polygon.name:
            props["name"] = polygon.name
        if properties is not None:
            props.update(properties[index])
        rings = [_closed(_oriented(polygon.exterior, positive=True))]
        rings += [_closed(_oriented(hole, positive=False)) for hole in polygon.holes]
        geometry = {"type": "Polygon", "coordinates": rings}
        features.append({"type": "Feature", "id": str(uuid.uuid4()), "geometry": geometry, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def _json_default(value: Any) -> Any:
    """JSON form of numpy scalars and arrays found in user-supplied properties."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def write_geojson(path: str | os.PathLike, feature_collection: Mapping[str, Any]) -> Path:
    """Write ``feature_collection`` (e.g. from :func:`to_geojson`) to ``path`` atomically; returns ``path``.

    NaN or infinite numbers raise ``ValueError`` (they are not JSON).
    """
    if not isinstance(feature_collection, Mapping) or feature_collection.get("type") != "FeatureCollection":
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection mapping to write")
    text = json.dumps(feature_collection, allow_nan=False, default=_json_default)
    return atomic_write_text(path, text + "\n")
