"""Datalists of image pairs and the MONAI transforms that check and prepare them.

A datalist is a JSON file holding either a list of pairs or sections of lists (``{"training": [...],
"validation": [...], "test": [...]}``). Each pair is a dict with ``fixed`` and ``moving`` image paths and,
optionally, ``fixed_landmarks`` and ``moving_landmarks`` paths (CSV in world LPS mm, DIR-Lab text or elastix
point files, see :mod:`rrn_lung_registration.io.landmarks`) and any other keys. Relative paths are resolved against the
datalist's folder (or ``base_dir``).

Every check names the file: a datalist that lists no pairs, a file it names that does not exist
(:func:`load_datalist`), an image that cannot be read, e.g. a truncated ``.nii.gz`` (:class:`LoadVolumed`), an
image that is not a single 3-D volume of finite values or, with ``hounsfield=True``, not CT in Hounsfield units
(:class:`CheckVolumed`), a pair of different sizes (:class:`CheckSameShaped`).

The field of view: :class:`CropToLungBoxd` crops a pair to the fixed image's lung box plus a margin, the
region the registration pipeline (``python -m rrn_lung_registration register``) gives the network, before
it is resampled to the network grid.

The pair as one image (the bundle's ``inference.json`` and MONAI Deploy): :class:`PairToImaged` stacks a
pair resampled onto the fixed grid into ``image`` ``(2, I, J, K)`` (channel 0 moving, channel 1 fixed, the
fixed image's geometry), the input the bundle metadata declares; :class:`PairOutputsd` turns the network's
field ``pred`` into the outputs (``pred`` with the grid's geometry, ``warped``); :func:`name_pairs` and
:func:`pair_name_formatter` name each pair's output files.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Crop, InvertibleTransform, LoadImaged, MapTransform
from torch import nn

from rrn_lung_registration.io.landmarks import read_landmarks, world_to_voxel
from rrn_lung_registration.masking.lung_mask import (
    axial_axis_from_affine,
    check_ct_intensities,
    lung_bounding_box,
    lung_mask,
)
from rrn_lung_registration.warp import Warp3d

__all__ = [
    "IMAGE_KEYS",
    "LANDMARK_KEYS",
    "PAIR_IMAGE_KEY",
    "CheckSameShaped",
    "CheckVolumed",
    "CropToLungBoxd",
    "LandmarksToVoxeld",
    "LoadVolumed",
    "PairOutputsd",
    "PairToImaged",
    "load_datalist",
    "name_pairs",
    "pair_name_formatter",
]

IMAGE_KEYS = ("fixed", "moving")
LANDMARK_KEYS = ("fixed_landmarks", "moving_landmarks")
PAIR_IMAGE_KEY = "image"
NAME_KEY = "name"
PAIR_NAME = "pair_name"  # metadata entry of the pair image: the pair's output name


def load_datalist(
    path: str | os.PathLike,
    section: str | None = None,
    base_dir: str | os.PathLike | None = None,
    required_keys: Sequence[str] = IMAGE_KEYS,
    path_keys: Sequence[str] = IMAGE_KEYS + LANDMARK_KEYS,
) -> list[dict]:
    """Read a datalist and return its pairs with absolute paths, checking that every file exists.

    Args:
        path: the JSON datalist.
        section: key of the list to read when the file holds sections (``"training"``, ...); a file that is
            a plain list is returned whole whatever ``section`` says.
        base_dir: folder relative paths start from (default: the datalist's folder).
        required_keys: keys every pair must have.
        path_keys: keys holding file paths (resolved and checked when present).

    Raises:
        FileNotFoundError: the datalist, or a file one of its pairs names, does not exist (the message
            names the datalist, the pair and the file).
        ValueError: the file is not a datalist of pairs, lacks ``section``, lists no pairs (an empty training
            list would otherwise stop later with a bare ``num_samples=0``), or a pair lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    if isinstance(content, dict):
        if section is None or section not in content:
            raise ValueError(f"{path}: expected a section {section!r}; the datalist has {sorted(content)}.")
        content = content[section]
    if not isinstance(content, list) or not all(isinstance(item, dict) for item in content):
        raise ValueError(f"{path}: expected a list of pairs (JSON objects), got {type(content).__name__}.")
    if not content:
        where = f"section {section!r}" if isinstance(section, str) and section else "the datalist"
        raise ValueError(f"{path}: {where} lists no pairs.")
    base = Path(base_dir) if base_dir is not None else path.parent
    pairs = []
    for index, item in enumerate(content):
        missing = [key for key in required_keys if key not in item]
        if missing:
            raise ValueError(f"{path}: pair {index} lacks the key(s) {missing}; it has {sorted(item)}.")
        pair = dict(item)
        for key in path_keys:
            if key not in pair:
                continue
            file = Path(os.path.expanduser(str(pair[key])))
            file = file if file.is_absolute() else base / file
            if not file.exists():
                raise FileNotFoundError(f"{path}: pair {index} ({key!r}): file not found: {file}")
            pair[key] = str(file)
        pairs.append(pair)
    return pairs


def _source(data: Mapping, key: Hashable) -> str:
    """The file an item was read from, for error messages."""
    image = data[key]
    meta = getattr(image, "meta", {})
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if name else f"{key!r}"


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` (``image_only``) whose read errors name the file.

    A truncated ``.nii.gz`` otherwise stops with a bare ``EOFError: Compressed file ended before the
    end-of-stream marker was reached``, and other damaged files with messages of the reader library. Arguments
    as ``LoadImaged``; the images come without metadata dicts (``image_only=True``, the metadata is in the
    ``MetaTensor``).
    """

    def __init__(self, keys: KeysCollection, *args, **kwargs) -> None:
        if not kwargs.setdefault("image_only", True):
            raise ValueError("LoadVolumed reads images only (image_only=True): the metadata is in the MetaTensor.")
        super().__init__(keys, *args, **kwargs)

    def __call__(self, data: Mapping, reader=None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            try:
                d[key] = self._loader(source, reader)
            except Exception as error:
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
                raise ValueError(f"{source}: cannot read the image ({reason}); is the file complete?") from None
        return d


class CheckVolumed(MapTransform):
    """Reject images that are not single 3-D volumes of finite values, naming the file.

    Place it right after ``LoadImaged`` (before a channel dimension is added and before any intensity scaling):
    each image must then have exactly three dimensions.

    Args:
        keys: the image keys.
        hounsfield: also require CT in Hounsfield units, by the rule the command line's ``register`` applies
            (:func:`~rrn_lung_registration.masking.lung_mask.check_ct_intensities`): the 1st percentile below
            -500 HU (air, lung) and a range over 200 HU. Images already scaled to ``[0, 1]`` or ``[0, 255]``, or
            stored with an offset (DIR-Lab raw files hold HU + 1024), fail: clipped to the HU window they would
            silently become blank.
        allow_missing_keys: as ``MapTransform``.
    """

    def __init__(self, keys: KeysCollection, hounsfield: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.hounsfield = bool(hounsfield)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 3:
                raise ValueError(f"{_source(d, key)}: expected a 3-D volume, got shape {tuple(image.shape)}.")
            finite = torch.isfinite(torch.as_tensor(image))
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"{_source(d, key)}: {bad} voxel(s) are NaN or infinite.")
            if self.hounsfield:
                check_ct_intensities(image, _source(d, key))
        return d


class CheckSameShaped(MapTransform):
    """Require the same spatial shape for all ``keys`` (a pair the network reads voxel by voxel)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        shapes = {key: tuple(d[key].shape[1:]) for key in keys}
        if len(set(shapes.values())) > 1:
            described = ", ".join(f"{_source(d, key)} {shapes[key]}" for key in keys)
            raise ValueError(
                f"images of a pair must have the same size on the network grid, got {described}; "
                "resample them to one grid (the bundle's `image_size`)."
            )
        return d


class LandmarksToVoxeld(MapTransform):
    """Read landmark files and express the points in voxels of their (preprocessed) images.

    Run it after every spatial transform: the points are mapped with each image's final affine, so
    cropping, resampling and reorientation are taken into account. Voxel formats (DIR-Lab, elastix
    ``index``) are read against the image's original affine. ``keys[i]`` holds a landmark file path and
    ``image_keys[i]`` the image it belongs to; the result is a float32 tensor ``(N, 3)``. When several
    keys are given, the files must hold the same number of points.
    """

    def __init__(
        self,
        keys: KeysCollection = LANDMARK_KEYS,
        image_keys: Sequence[str] = IMAGE_KEYS,
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(image_keys) != len(self.keys):
            raise ValueError(f"one image key per landmark key expected, got {self.keys} and {tuple(image_keys)}.")
        self.image_keys = dict(zip(self.keys, image_keys, strict=True))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        counts = {}
        for key in self.key_iterator(d):
            source = str(d[key])
            image = d[self.image_keys[key]]
            points = world_to_voxel(read_landmarks(source, image=image), image.affine)
            d[key] = torch.as_tensor(points.astype(np.float32))
            counts[source] = len(points)
        if len(set(counts.values())) > 1:
            described = ", ".join(f"{name} ({n} points)" for name, n in counts.items())
            raise ValueError(f"landmark files of a pair must hold the same number of points: {described}.")
        return d


# ---------------------------------------------------------------------------------------------------------------
# The field of view: the fixed image's lung box
# ---------------------------------------------------------------------------------------------------------------


class CropToLungBoxd(MapTransform, InvertibleTransform):
    """Crop images on one grid to the lung box (+ ``margin_mm``) of one of them: the pipeline's field of view.

    The registration pipeline gives the network the fixed image's lung box plus 10 mm, resampled to the
    network grid; this transform takes the same box on the images as loaded, so that a network trained by the
    bundle sees that field of view. The box is :func:`~rrn_lung_registration.masking.lung_mask.lung_bounding_box`
    of the automatic lung mask (:func:`~rrn_lung_registration.masking.lung_mask.lung_mask`) of channel
    ``channel`` of ``data[source_key]``; every key is cropped with MONAI's :class:`~monai.transforms.Crop`, so
    the affines follow and ``inverse`` (``Invertd``) pads back to the former grid.

    Place it after the images are channel-first ``(C, I, J, K)`` on one grid (e.g. after ``ResampleToMatchd``)
    and before intensity scaling: the mask needs Hounsfield units.

    Args:
        keys: the images to crop, all on the grid of ``data[source_key]``.
        source_key: the image whose lungs give the box (default: the first key).
        channel: its channel holding the fixed CT (``0`` for a ``fixed`` image, ``1`` for the pair ``image``).
        margin_mm: margin around the lungs, mm (the pipeline's default, 10).
        allow_missing_keys: as ``MapTransform``.

    Raises:
        ValueError: no lungs found, an image without channel dimension, or not on the source's grid (the
            messages name the file).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str | None = None,
        channel: int = 0,
        margin_mm: float = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if margin_mm < 0:
            raise ValueError(f"CropToLungBoxd: margin_mm must be >= 0, got {margin_mm}.")
        self.source_key = source_key if source_key is not None else self.keys[0]
        self.channel = int(channel)
        self.margin_mm = float(margin_mm)
        self.cropper = Crop()

    def box_of(self, image: torch.Tensor, source: str) -> tuple[slice, slice, slice]:
        """The crop box of the lungs in channel ``channel`` of ``image`` ``(C, I, J, K)``."""
        if not isinstance(image, MetaTensor):
            raise ValueError(f"{source}: CropToLungBoxd needs a MetaTensor with an affine (load it with LoadImaged).")
        if image.ndim != 4 or not 0 <= self.channel < image.shape[0]:
            raise ValueError(
                f"{source}: CropToLungBoxd needs channel-first images (C, I, J, K) with channel {self.channel}, got "
                f"shape {tuple(image.shape)}."
            )
        affine = image.affine.detach().cpu().numpy().astype(np.float64)
        spacing = affine_to_spacing(affine, r=3)
        hu = image.as_tensor()[self.channel].detach().cpu().numpy()
        mask = lung_mask(hu, spacing, axial_axis=axial_axis_from_affine(affine), source=source)
        return lung_bounding_box(mask, spacing, self.margin_mm)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.source_key not in d:
            raise KeyError(f"CropToLungBoxd: the image {self.source_key!r} giving the lung box is not in the data.")
        source = d[self.source_key]
        box = self.box_of(source, _source(d, self.source_key))
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(source.shape[1:]):
                raise ValueError(
                    f"{_source(d, key)}: {key!r} of spatial shape {tuple(d[key].shape[1:])} is not on the grid of "
                    f"{self.source_key!r} {tuple(source.shape[1:])}; resample it first (ResampleToMatchd)."
                )
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key], box)
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper.inverse(d[key])
        return d


# ---------------------------------------------------------------------------------------------------------------
# The pair as one 2-channel image, and the outputs of the network
# ---------------------------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "pair"


def name_pairs(pairs: Sequence[Mapping], key: str = "moving") -> list[dict]:
    """The pairs with a unique output name each under ``name``.

    A pair's own ``name`` is kept; otherwise the name is the path of its ``key`` file relative to the folder
    holding all of them, without extension, separators turned into ``_`` (``case1/exhale.nii.gz`` ->
    ``case1_exhale``). Names taken earlier get ``_2``, ``_3``, ... Output files named after them never
    collide, and never depend on where the inputs are.
    """
    pairs = [dict(pair) for pair in pairs]
    folders = [os.path.dirname(os.path.abspath(str(p[key]))) for p in pairs if p.get(key) and not p.get(NAME_KEY)]
    root = os.path.commonpath(folders) if folders else ""
    taken: set[str] = set()
    for index, pair in enumerate(pairs):
        if pair.get(NAME_KEY):
            base = _safe_name(str(pair[NAME_KEY]))
        elif pair.get(key):
            relative = os.path.relpath(os.path.abspath(str(pair[key])), root)
            base = _safe_name(re.sub(r"(\.nii)?(\.gz)?$|\.[A-Za-z0-9]+$", "", relative).replace(os.sep, "_"))
        else:
            base = f"pair_{index}"
        name, suffix = base, 1
        while name in taken:
            suffix += 1
            name = f"{base}_{suffix}"
        taken.add(name)
        pair[NAME_KEY] = name
    return pairs


def pair_name_formatter(metadict: Mapping | None, saver: Any) -> dict:
    """``SaveImaged(output_name_formatter=...)``: files named after the pair (``PairToImaged`` records it).

    Falls back to MONAI's naming by ``filename_or_obj`` for images without a pair name.
    """
    from monai.data.folder_layout import default_name_formatter

    if metadict and metadict.get(PAIR_NAME):
        return {"subject": str(metadict[PAIR_NAME]), "idx": None}
    return default_name_formatter(metadict, saver)


class PairToImaged(MapTransform):
    """Stack a pair on one grid into the 2-channel ``image``: channel 0 moving, channel 1 fixed.

    ``image`` is the single network input the bundle metadata declares (what ``verify_net_in_out``,
    ``ckpt_export`` and MONAI Deploy feed the network). It carries the fixed image's metadata (affine, file name)
    and applied transforms, so that later transforms of ``image`` can be inverted onto the fixed image's grid;
    its metadata also records the moving file (``moving_filename_or_obj``) and the pair's output name
    (``pair_name``: the pair's ``name_key`` entry, else the moving file's stem).

    Args:
        fixed_key, moving_key: the two images, channel-first ``(1, I, J, K)`` on one grid (resample the moving
            image onto the fixed one first: ``ResampleToMatchd``).
        image_key: the output key.
        name_key: the pair's name (see :func:`name_pairs`).
        delete_pair: remove ``fixed_key`` and ``moving_key`` (default), keeping one copy of the voxels.
    """

    def __init__(
        self,
        fixed_key: str = IMAGE_KEYS[0],
        moving_key: str = IMAGE_KEYS[1],
        image_key: str = PAIR_IMAGE_KEY,
        name_key: str = NAME_KEY,
        delete_pair: bool = True,
    ) -> None:
        super().__init__((fixed_key, moving_key))
        self.fixed_key, self.moving_key, self.image_key = fixed_key, moving_key, image_key
        self.name_key, self.delete_pair = name_key, bool(delete_pair)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        fixed, moving = d[self.fixed_key], d[self.moving_key]
        if fixed.ndim != 4 or fixed.shape[0] != 1 or moving.shape != fixed.shape:
            raise ValueError(
                f"{_source(d, self.moving_key)}: the pair must be two single-channel images on one grid (1, I, J, K), "
                f"got fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)}; resample the moving image onto "
                "the fixed one first (ResampleToMatchd)."
            )
        values = torch.cat([torch.as_tensor(image).as_subclass(torch.Tensor) for image in (moving, fixed)])
        meta = copy.deepcopy(dict(fixed.meta)) if isinstance(fixed, MetaTensor) else {}
        moving_file = _source(d, self.moving_key)
        meta["moving_filename_or_obj"] = moving_file
        meta[PAIR_NAME] = str(d.get(self.name_key) or os.path.basename(moving_file).split(".")[0] or "pair")
        operations = copy.deepcopy(fixed.applied_operations) if isinstance(fixed, MetaTensor) else []
        d[self.image_key] = MetaTensor(values, meta=meta, applied_operations=operations)
        if self.delete_pair:
            del d[self.fixed_key], d[self.moving_key]
        return d


class PairOutputsd(MapTransform):
    """The outputs of one pair from the network's field: ``pred`` with the grid's geometry, and ``warped``.

    For one item (no batch dimension): ``image`` ``(2, D, H, W)`` (channel 0 moving, channel 1 fixed, as
    :class:`PairToImaged` and the preprocessing give it) and ``pred`` ``(3, D, H, W)``, the displacement in
    voxels of that grid. ``pred`` becomes a ``MetaTensor`` with the image's metadata (its affine places the
    field on the network grid; ``SaveImaged`` writes it with that geometry). ``warped`` is the moving channel
    warped by ``pred`` (``warp``, default trilinear with border padding), carrying the image's metadata and
    applied transforms so that ``Invertd(keys="warped", orig_keys="image")`` brings it onto the fixed image's
    own grid.

    Args:
        image_key, pred_key, warped_key: the keys.
        warp: the warping module (the config's ``warp``).
    """

    def __init__(
        self,
        image_key: str = PAIR_IMAGE_KEY,
        pred_key: str = "pred",
        warped_key: str = "warped",
        warp: nn.Module | None = None,
    ) -> None:
        super().__init__((image_key, pred_key))
        self.image_key, self.pred_key, self.warped_key = image_key, pred_key, warped_key
        self.warp = warp if warp is not None else Warp3d()

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image, pred = d[self.image_key], d[self.pred_key]
        if image.ndim != 4 or image.shape[0] != 2 or pred.ndim != 4 or pred.shape[0] != 3:
            raise ValueError(
                f"PairOutputsd expects {self.image_key!r} (2, D, H, W) and {self.pred_key!r} (3, D, H, W) of one "
                f"item, got {tuple(image.shape)} and {tuple(pred.shape)}."
            )
        if tuple(image.shape[1:]) != tuple(pred.shape[1:]):
            raise ValueError(
                f"{self.pred_key!r} {tuple(pred.shape)} is not on the grid of {self.image_key!r} {tuple(image.shape)}."
            )
        meta = copy.deepcopy(dict(image.meta)) if isinstance(image, MetaTensor) else {}
        operations = copy.deepcopy(image.applied_operations) if isinstance(image, MetaTensor) else []
        field = torch.as_tensor(pred).as_subclass(torch.Tensor).float()
        moving = torch.as_tensor(image).as_subclass(torch.Tensor)[:1].to(field)
        with torch.no_grad():
            warped = self.warp(moving[None], field[None])[0]
        d[self.pred_key] = MetaTensor(field, meta=copy.deepcopy(meta))
        d[self.warped_key] = MetaTensor(warped, meta=meta, applied_operations=operations)
        return d
