"""Datalists of image pairs and the MONAI transforms that check and prepare them.

A datalist is a JSON file holding either a list of pairs or sections of lists (``{"training": [...],
"validation": [...], "test": [...]}``). Each pair is a dict with ``fixed`` and ``moving`` image paths and,
optionally, ``fixed_landmarks`` and ``moving_landmarks`` paths (CSV in world LPS mm, DIR-Lab text or elastix
point files, see :mod:`rrn_lung_registration.landmarks`) and any other keys. Relative paths are resolved against the
datalist's folder (or ``base_dir``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from rrn_lung_registration.landmarks import read_landmarks, world_to_voxel

__all__ = ["IMAGE_KEYS", "LANDMARK_KEYS", "CheckSameShaped", "CheckVolumed", "LandmarksToVoxeld", "load_datalist"]

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
        ValueError: the file is not a datalist of pairs, lacks ``section``, or a pair lacks a required key.
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


class CheckVolumed(MapTransform):
    """Reject images that are not single 3-D volumes of finite values, naming the file.

    Place it right after ``LoadImaged`` (before a channel dimension is added): each image must then have
    exactly three dimensions.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

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
