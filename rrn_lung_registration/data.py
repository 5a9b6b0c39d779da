"""Datalists of image pairs and the MONAI transforms that check and prepare them.

A datalist is a JSON file holding either a list of pairs or sections of lists (``{"training": [...],
"validation": [...], "test": [...]}``). Each pair is a dict with ``fixed`` and ``moving`` image paths and,
optionally, ``fixed_landmarks`` and ``moving_landmarks`` paths (CSV in world LPS mm, DIR-Lab text or elastix
point files, see :mod:`rrn_lung_registration.landmarks`) and any other keys. Relative paths are resolved against the
datalist's folder (or ``base_dir``).

Every check names the file: a datalist that lists no pairs, a file it names that does not exist
(:func:`load_datalist`), an image that cannot be read, e.g. a truncated ``.nii.gz`` (:class:`LoadVolumed`), an
image that is not a single 3-D volume of finite values or, with ``hounsfield=True``, not CT in Hounsfield units
(:class:`CheckVolumed`), a pair of different sizes (:class:`CheckSameShaped`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

from rrn_lung_registration.landmarks import read_landmarks, world_to_voxel
from rrn_lung_registration.lung_mask import check_ct_intensities

__all__ = [
    "IMAGE_KEYS",
    "LANDMARK_KEYS",
    "CheckSameShaped",
    "CheckVolumed",
    "LandmarksToVoxeld",
    "LoadVolumed",
    "load_datalist",
]

IMAGE_KEYS = ("fixed", "moving")
LANDMARK_KEYS = ("fixed_landmarks", "moving_landmarks")


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
            (:func:`~rrn_lung_registration.lung_mask.check_ct_intensities`): the 1st percentile below -500 HU (air,
            lung) and a range over 200 HU. Images already scaled to ``[0, 1]`` or ``[0, 255]``, or stored with an
            offset (DIR-Lab raw files hold HU + 1024), fail: clipped to the HU window they would silently become
            blank.
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
