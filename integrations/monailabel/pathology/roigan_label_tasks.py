"""MONAI Label infer task of the pathology app: virtual-DAB-positive regions of a slide region as polygons.

``virtual_dab`` (:class:`VirtualDabRegions`) translates a region of an H&E slide into virtual IHC with the
RoI-CycleGAN generator (``g_xy`` of a bundle checkpoint, :func:`roigan_stain_transfer.wsi.inference.load_generator`)
and returns its DAB-positive regions in the annotation format of MONAI Label's pathology apps, which the QuPath
extension draws:

1. the region (level-0 ``location`` ``(x, y)`` and ``size`` ``(w, h)`` at ``level``, as MONAI Label and QuPath send
   them) is read through MONAI's ``WSIReader`` on the raster at the model's resolution (``mpp``, microns per
   pixel, :func:`roigan_stain_transfer.wsi.slide.open_slide`: a slide level, or a finer level area-averaged);
2. the generator runs over it in ``tile_size`` px windows overlapping by ``overlap`` px (MONAI's
   ``SlidingWindowInferer``, Gaussian blending);
3. the DAB grey of the virtual IHC (:func:`roigan_stain_transfer.box_library.dab_grey`), the tissue of the H&E
   region (:func:`roigan_stain_transfer.wsi.tissue.tissue_mask`) and the DAB rule of whole-slide inference
   (:func:`roigan_stain_transfer.wsi.dab.dab_regions`: Otsu over tissue, emptied when the mean grey over tissue is
   above 0.85, closing) give the positive mask;
4. :func:`roigan_stain_transfer.wsi.annotations.mask_to_polygons` turns it into polygons in level-0 pixel
   coordinates (regions under ``min_region_um2`` and under the request's ``min_poly_area``, level-0 px^2, dropped).

The result params hold ``annotation``: ``{"location", "size", "elements": [{"label": "DAB positive",
"contours": [[[x, y], ...], ...]}], "labels": {"DAB positive": [r, g, b]}}`` (one contour per region: its outer
boundary; holes are not part of this format), plus DAB statistics and ``latencies``. Through ``/infer/wsi/<model>``
MONAI Label tiles the requested region, calls the task once per tile and writes the ASAP XML (``output=asap``, what
QuPath asks for) or DSA JSON itself. Called through ``/infer/<model>``, the task writes the file: ASAP XML in the
same layout (default) or QuPath GeoJSON (request ``output`` ``geojson``), atomically (:mod:`shared_ops.atomic`).

Plain images (PNG, JPEG: what QuPath uploads for a slide the server does not hold) are taken as being at the
model's resolution; their polygons are in the image's pixels.

Requests that cannot be answered raise :class:`RequestError` (``ValueError``) naming the study.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image
from torch import nn

from roigan_stain_transfer.box_library import dab_grey
from roigan_stain_transfer.wsi.annotations import Polygon, mask_to_polygons, polygon_area, to_geojson, write_geojson
from roigan_stain_transfer.wsi.dab import dab_regions
from roigan_stain_transfer.wsi.inference import load_generator
from roigan_stain_transfer.wsi.slide import Slide, open_slide
from roigan_stain_transfer.wsi.tiling import to_network
from roigan_stain_transfer.wsi.tissue import tissue_mask
from shared_ops.atomic import atomic_write_text

__all__ = [
    "COLOR",
    "LABEL",
    "Region",
    "RegionSettings",
    "RequestError",
    "StudyNotFoundError",
    "VirtualDabRegions",
    "asap_xml",
    "read_region",
    "region_settings",
]

logger = logging.getLogger(__name__)

LABEL = "DAB positive"
#: Colour of the label (the GeoJSON colour of whole-slide inference).
COLOR = (150, 75, 0)
#: Images read whole with PIL instead of as slides.
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class RequestError(ValueError):
    """A request the task cannot answer; the message names the study and what was expected."""


class StudyNotFoundError(RequestError):
    """The study of the request is not in the datastore, or its file is missing."""


@dataclass(frozen=True)
class RegionSettings:
    """How regions are read and translated.

    Attributes:
        mpp: resolution the generator was trained at, um/px (0.5 = 20x); regions are read at it.
        slide_mpp: level-0 resolution of slides without resolution metadata (None: read it from the slide).
        tile_size: generator window, px (a multiple of 4).
        overlap: px shared by neighbouring windows.
        batch_size: windows per generator call.
        min_region_um2: smaller DAB-positive regions are not reported (as in whole-slide inference).
        max_region_px: largest region one call translates, in pixels at ``mpp`` (larger requests are refused;
            ``/infer/wsi`` splits a region into tiles of the request's ``tile_size``).
        backend: MONAI ``WSIReader`` backend.
    """

    mpp: float = 0.5
    slide_mpp: float | None = None
    tile_size: int = 256
    overlap: int = 32
    batch_size: int = 2
    min_region_um2: float = 500.0
    max_region_px: int = 4096 * 4096
    backend: str = "openslide"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp must be a positive number of um/px, got {self.mpp!r}")
        if self.tile_size < 4 or self.tile_size % 4:
            raise ValueError(f"tile_size must be a positive multiple of 4, got {self.tile_size!r}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must lie in [0, tile_size), got {self.overlap!r}")
        if self.batch_size < 1 or self.max_region_px < 1 or self.min_region_um2 < 0:
            raise ValueError("batch_size and max_region_px must be >= 1 and min_region_um2 >= 0")


def region_settings(conf: Mapping[str, Any]) -> RegionSettings:
    """:class:`RegionSettings` from the app's ``--conf`` values (``mpp``, ``slide_mpp``, ``tile_size``, ``overlap``,
    ``batch_size``, ``min_region_um2``, ``max_region_px``, ``backend``); raises ``ValueError`` naming the key."""
    types = {
        "mpp": float,
        "slide_mpp": float,
        "tile_size": int,
        "overlap": int,
        "batch_size": int,
        "min_region_um2": float,
        "max_region_px": int,
        "backend": str,
    }
    options = {}
    for key, kind in types.items():
        if conf.get(key) not in (None, ""):
            try:
                options[key] = kind(conf[key])
            except ValueError:
                raise ValueError(f"--conf {key} {conf[key]!r}: expected a {kind.__name__}") from None
    return RegionSettings(**options)


@dataclass(frozen=True)
class Region:
    """A region read at the model's resolution.

    Attributes:
        pixels: ``(h, w, 3)`` uint8 RGB.
        origin: level-0 ``(x, y)`` of the top-left corner of ``pixels[0, 0]``.
        downsample: level-0 pixels per region pixel.
        location, size: the requested region, level-0 ``(x, y)`` and ``(w, h)``, clipped to the image.
        base_mpp: um per level-0 pixel.
    """

    pixels: np.ndarray
    origin: tuple[float, float]
    downsample: float
    location: tuple[int, int]
    size: tuple[int, int]
    base_mpp: float


def _pair(value: Any, name: str, study: str) -> tuple[int, int]:
    try:
        a, b = (int(round(float(v))) for v in value)
    except (TypeError, ValueError):
        raise RequestError(f"study {study!r}: {name} must be two numbers, got {value!r}") from None
    return a, b


def _clip_box(study: str, location, size, level_ds: float, shape_hw: tuple[int, int]):
    """Level-0 box ``(x0, y0, x1, y1)`` of the request, clipped to an image of ``shape_hw`` (whole image if no size)."""
    height, width = shape_hw
    x0, y0 = _pair(location or (0, 0), "location", study)
    w, h = _pair(size or (0, 0), "size", study)
    if w <= 0 or h <= 0:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x1, y1 = x0 + int(round(w * level_ds)), y0 + int(round(h * level_ds))
    box = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if box[2] <= box[0] or box[3] <= box[1]:
        raise RequestError(
            f"study {study!r}: the region at {(x0, y0)} of size {(w, h)} lies outside the image ({width} x {height} px)"
        )
    return box


def _check_size(study: str, shape: tuple[int, int], settings: RegionSettings) -> None:
    if shape[0] * shape[1] > settings.max_region_px:
        raise RequestError(
            f"study {study!r}: the region is {shape[1]} x {shape[0]} px at {settings.mpp:g} um/px, more than "
            f"{settings.max_region_px} px; ask for a smaller region (QuPath: draw a smaller rectangle, or let "
            "/infer/wsi split it into tiles)"
        )


def _slide_region(slide: Slide, study: str, request: Mapping[str, Any], settings: RegionSettings) -> Region:
    grid = slide.grid
    level = int(request.get("level") or 0)
    count = slide.reader.get_level_count(slide.wsi)
    if not 0 <= level < count:
        raise RequestError(f"study {study!r}: level {level} does not exist; the slide has levels 0 to {count - 1}")
    level_ds = float(slide.reader.get_downsample_ratio(slide.wsi, level))
    x0, y0, x1, y1 = _clip_box(study, request.get("location"), request.get("size"), level_ds, grid.slide_shape)
    d = grid.downsample
    c0, r0 = int(math.floor(x0 / d)), int(math.floor(y0 / d))
    c1, r1 = min(grid.shape[1], int(math.ceil(x1 / d))), min(grid.shape[0], int(math.ceil(y1 / d)))
    height, width = r1 - r0, c1 - c0
    _check_size(study, (height, width), settings)
    location, read_size = grid.read_window(r0, c0, max(height, width))
    patch = slide.read(location, read_size, grid.level)
    if grid.resampled:
        target = (max(1, round(patch.shape[1] / grid.scale)), max(1, round(patch.shape[0] / grid.scale)))
        patch = np.asarray(Image.fromarray(patch).resize(target, Image.Resampling.BOX), dtype=np.uint8)
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)  # white beyond the slide's last pixels
    h, w = min(height, patch.shape[0]), min(width, patch.shape[1])
    pixels[:h, :w] = patch[:h, :w, :3]
    return Region(pixels, (c0 * d, r0 * d), d, (x0, y0), (x1 - x0, y1 - y0), grid.base_mpp)


def _plain_region(path: Path, study: str, request: Mapping[str, Any], settings: RegionSettings) -> Region:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x0, y0, x1, y1 = _clip_box(study, request.get("location"), request.get("size"), 1.0, rgb.shape[:2])
    _check_size(study, (y1 - y0, x1 - x0), settings)
    pixels = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    return Region(pixels, (float(x0), float(y0)), 1.0, (x0, y0), (x1 - x0, y1 - y0), settings.mpp)


def read_region(path: str | os.PathLike, study: str, request: Mapping[str, Any], settings: RegionSettings) -> Region:
    """The region a request asks for (``location``, ``size``, ``level``; the whole image without ``size``)."""
    path = Path(path)
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return _plain_region(path, study, request, settings)
    slide = open_slide(path, settings.mpp, request.get("slide_mpp") or settings.slide_mpp, settings.backend)
    try:
        return _slide_region(slide, study, request, settings)
    finally:
        slide.close()


def translate(pixels: np.ndarray, generator: nn.Module, device: torch.device, settings: RegionSettings) -> np.ndarray:
    """Virtual IHC ``(h, w, 3)`` uint8 of an H&E region ``(h, w, 3)`` uint8 (windows of ``tile_size``, blended)."""
    tiles = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
    inferer = SlidingWindowInferer(
        roi_size=(settings.tile_size, settings.tile_size),
        sw_batch_size=settings.batch_size,
        overlap=settings.overlap / settings.tile_size,
        mode="gaussian",
        padding_mode="constant",
        cval=1.0,  # white in the generator's [-1, 1]
    )
    with torch.inference_mode():
        out = inferer(to_network(tiles).to(device), generator)
    virtual = ((out[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return virtual.permute(1, 2, 0).cpu().numpy()


def _number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _coordinate(value: float) -> str:
    return repr(round(float(value), 3))


def asap_xml(
    polygons: Sequence[Polygon],
    model: str,
    description: str,
    location: Sequence[int],
    size: Sequence[int],
) -> str:
    """ASAP XML of ``polygons`` (outer boundaries) in the layout MONAI Label writes for QuPath (``output=asap``)."""
    color = "#{:02x}{:02x}{:02x}".format(*COLOR)
    root = ET.Element("ASAP_Annotations")
    group = ET.SubElement(
        root,
        "Annotations",
        Name=f"MONAILabel Annotations - {model} for {[*location, *size]}",
        Description=description,
        Model=model,
        X=str(location[0]),
        Y=str(location[1]),
        W=str(size[0]),
        H=str(size[1]),
    )
    for polygon in polygons:
        annotation = ET.SubElement(group, "Annotation", Name=LABEL, Type="Polygon", PartOfGroup=LABEL, Color=color)
        coordinates = ET.SubElement(annotation, "Coordinates")
        for order, (x, y) in enumerate(polygon.exterior):
            ET.SubElement(coordinates, "Coordinate", Order=str(order), X=_coordinate(x), Y=_coordinate(y))
    groups = ET.SubElement(root, "AnnotationGroups")
    ET.SubElement(ET.SubElement(groups, "Group", Name=LABEL, PartOfGroup="None", Color=color), "Attributes")
    ET.indent(root, space="  ")
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _device(request: Mapping[str, Any]) -> torch.device:
    name = request.get("device")
    name = name[0] if isinstance(name, (list, tuple)) and name else name
    name = str(name) if name else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        name = "cpu"
    return torch.device(name)


class VirtualDabRegions(InferTask):
    """``virtual_dab``: virtual-DAB-positive regions of a slide region (see the module notes).

    Args:
        weights: generator checkpoint (bundle checkpoint with ``g_xy``, or its state dict).
        generator: a generator module to use instead of ``weights`` (``(B, 3, H, W)`` in [-1, 1] -> same).
        network: ``num_blocks``, ``base_channels``, ``upsampling`` of the generator (default: what the weights record).
        settings: :class:`RegionSettings`.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        generator: nn.Module | None = None,
        network: Mapping[str, Any] | None = None,
        settings: RegionSettings | None = None,
        description: str = "Virtual IHC (RoI-CycleGAN) of an H and E region: DAB-positive regions as polygons",
    ) -> None:
        if any(c in description for c in '&<>"'):  # MONAI Label writes it unescaped into the ASAP XML QuPath parses
            raise ValueError(f"description must not contain any of & < > \" (MONAI Label's XML), got {description!r}")
        self.weights = Path(weights) if weights else None
        self.network = dict(network or {})
        self.settings = settings or RegionSettings()
        self._generator = generator.eval() if generator is not None else None
        self._on_device: dict[str, nn.Module] = {}
        self._lock = threading.Lock()
        # on a machine without CUDA, MONAI Label's /infer/wsi needs multi_gpu off (it would pick from no GPUs)
        config = {"multi_gpu": torch.cuda.is_available()}
        super().__init__(
            type=InferType.SEGMENTATION, labels={LABEL: 1}, dimension=2, description=description, config=config
        )

    def is_valid(self) -> bool:
        return self._generator is not None or (self.weights is not None and self.weights.is_file())

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["pathology"] = True
        return info

    def generator(self, device: torch.device) -> nn.Module:
        """The generator on ``device`` (loaded from ``weights`` on first use)."""
        with self._lock:
            if self._generator is None:
                if self.weights is None:
                    raise RequestError("no generator: start the app with --conf generator CHECKPOINT")
                self._generator = load_generator(self.weights, **self.network)
            key = str(device)
            if key not in self._on_device:
                self._on_device[key] = copy.deepcopy(self._generator).to(device).eval()
            return self._on_device[key]

    def __call__(self, request: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        image = request.get("image")
        study = str(request.get("study") or (Path(image).stem if isinstance(image, str) else "uploaded image"))
        if not isinstance(image, str) or not image or not Path(image).is_file():
            raise StudyNotFoundError(f"study {study!r}: no image file for it ({image!r}); is it in the datastore?")
        region = read_region(image, study, request, self.settings)
        pre_s = time.perf_counter() - start
        device = _device(request)
        virtual = translate(region.pixels, self.generator(device), device, self.settings)
        infer_s = time.perf_counter() - start - pre_s
        tissue = tissue_mask(region.pixels)
        found = dab_regions(dab_grey(virtual).astype(np.float32), tissue, 1)
        d = region.downsample
        min_poly_area = float(request.get("min_poly_area") or 0.0)  # level-0 px^2 (MONAI Label, QuPath)
        min_area = max(min_poly_area / d**2, self.settings.min_region_um2 / (region.base_mpp * d) ** 2)
        polygons = mask_to_polygons(found.mask, downsample=d, origin=region.origin, label=LABEL, min_area=min_area)
        post_s = time.perf_counter() - start - pre_s - infer_s
        contours = [[[round(float(x), 3), round(float(y), 3)] for x, y in p.exterior] for p in polygons]
        params: dict[str, Any] = {
            "annotation": {
                "location": list(region.location),
                "size": list(region.size),
                "elements": [{"label": LABEL, "contours": contours}] if contours else [],
                "labels": {LABEL: list(COLOR)},
            },
            "label_names": {LABEL: 1},
            "dab": {
                "threshold": _number(found.threshold),
                "mean_grey_in_tissue": _number(found.mean_grey),
                "emptied": bool(found.emptied),
                "regions": len(polygons),
                "positive_area_um2": round(sum(polygon_area(p) for p in polygons) * region.base_mpp**2, 3),
                "tissue_fraction": round(float(tissue.mean()), 6),
            },
            "mpp": self.settings.mpp,
            "downsample": d,
        }
        output = None
        if request.get("result_write_to_file", True):  # False when MONAI Label's /infer/wsi collects the tiles
            output = self._write(polygons, request, region)
        params["latencies"] = {
            "pre": round(pre_s, 3),
            "infer": round(infer_s, 3),
            "post": round(post_s, 3),
            "write": round(time.perf_counter() - start - pre_s - infer_s - post_s, 3),
            "total": round(time.perf_counter() - start, 3),
        }
        return output, params

    def _write(self, polygons: Sequence[Polygon], request: Mapping[str, Any], region: Region) -> str | None:
        kind = str(request.get("output") or "asap")
        if kind == "json":
            return None
        name = Path(tempfile.gettempdir()) / f"virtual-dab-{uuid.uuid4().hex}"
        if kind == "geojson":
            path = name.with_suffix(".geojson")
            write_geojson(path, to_geojson(polygons))
            return str(path)
        model = str(request.get("model") or "virtual_dab")
        text = asap_xml(polygons, model, self.description, region.location, region.size)
        return str(atomic_write_text(name.with_suffix(".xml"), text))
