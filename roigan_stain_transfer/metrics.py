"""Evaluation metrics of the region-guided CycleGAN (Boyd et al., MICCAI 2022).

The paper synthesises IHC for held-out H&E tiles, binarises the synthetic DAB exactly as the IHC box library
does (:func:`synthetic_dab_mask`, which calls :func:`roigan_stain_transfer.box_library.dab_mask`) and compares the
mask with the expert tumour annotation by DICE and balanced accuracy (BAC), reported as mean +- std over tiles.
Paired datasets are also scored by PSNR and SSIM of the RGB tiles.

Masks are boolean (or 0/1) arrays ``(H, W)``; the prediction and the annotation of a tile have the same shape.
With ``TP, FP, FN, TN`` the pixel counts of the confusion matrix (positive = tumour / DAB):

* ``DICE = 2 TP / (2 TP + FP + FN)``; when both masks are empty (no positive pixel anywhere) DICE is 1.
* ``sensitivity = TP / (TP + FN)``, undefined (NaN) when the annotation has no positive pixel;
  ``specificity = TN / (TN + FP)``, undefined (NaN) when the annotation is all positive.
* ``BAC`` is the mean of the defined ones among sensitivity and specificity: on a tile without annotated tumour
  it is the specificity, on a tile that is all tumour the sensitivity (a non-empty mask always has one defined).

Summaries (:func:`summarize`) give the mean and standard deviation over tiles, ignoring NaN values, with the
population standard deviation (``ddof=0``, NumPy's default) unless asked otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from roigan_stain_transfer.box_library import RELEASED_CODE, BoxLibraryParams, dab_mask

__all__ = [
    "MaskScores",
    "Summary",
    "balanced_accuracy",
    "confusion_counts",
    "dice_score",
    "evaluate_masks",
    "mask_scores",
    "psnr",
    "ssim",
    "summarize",
    "synthetic_dab_mask",
    "tiles_to_uint8",
]


# ----------------------------------------------------------------------------------------------------------------
# Masks: DICE and balanced accuracy
# ----------------------------------------------------------------------------------------------------------------


def _as_mask(mask, name: str) -> np.ndarray:
    """``mask`` as a boolean ``(H, W)`` array; only bool or 0/1 values are accepted."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D mask (H, W), got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (bool or 0/1), got values beyond 0 and 1")
        mask = mask.astype(bool)
    return mask


def _mask_pair(prediction, annotation) -> tuple[np.ndarray, np.ndarray]:
    prediction = _as_mask(prediction, "prediction")
    annotation = _as_mask(annotation, "annotation")
    if prediction.shape != annotation.shape:
        raise ValueError(f"prediction mask {prediction.shape} and annotation mask {annotation.shape} differ in shape")
    return prediction, annotation


def confusion_counts(prediction, annotation) -> tuple[int, int, int, int]:
    """Pixel counts ``(TP, FP, FN, TN)`` of a predicted mask against an annotation mask, both ``(H, W)``."""
    prediction, annotation = _mask_pair(prediction, annotation)
    tp = int(np.count_nonzero(prediction & annotation))
    fp = int(np.count_nonzero(prediction & ~annotation))
    fn = int(np.count_nonzero(~prediction & annotation))
    return tp, fp, fn, prediction.size - tp - fp - fn


@dataclass(frozen=True)
class MaskScores:
    """Scores of one tile; ``sensitivity`` / ``specificity`` are NaN when undefined (see the module docstring)."""

    dice: float
    bac: float
    sensitivity: float
    specificity: float
    tp: int
    fp: int
    fn: int
    tn: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _scores_from_counts(tp: int, fp: int, fn: int, tn: int) -> MaskScores:
    denominator = 2 * tp + fp + fn
    dice = 1.0 if denominator == 0 else 2 * tp / denominator
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    defined = [v for v in (sensitivity, specificity) if not math.isnan(v)]
    bac = sum(defined) / len(defined)
    return MaskScores(dice, bac, sensitivity, specificity, tp, fp, fn, tn)


def mask_scores(prediction, annotation) -> MaskScores:
    """DICE, BAC, sensitivity and specificity of a predicted mask against an annotation, both ``(H, W)``."""
    return _scores_from_counts(*confusion_counts(prediction, annotation))


def dice_score(prediction, annotation) -> float:
    """``2 TP / (2 TP + FP + FN)`` of two masks ``(H, W)``; 1 when both are empty."""
    return mask_scores(prediction, annotation).dice


def balanced_accuracy(prediction, annotation) -> float:
    """Mean of sensitivity and specificity of two masks ``(H, W)``, only the defined one when the other is not."""
    return mask_scores(prediction, annotation).bac


@dataclass(frozen=True)
class Summary:
    """Mean and standard deviation of a score over ``count`` tiles (NaN values left out; NaN when none left)."""

    mean: float
    std: float
    count: int


def summarize(values: Iterable[float], ddof: int = 0) -> Summary:
    """Mean and standard deviation (``ddof`` 0: population) of ``values``, NaN values ignored."""
    array = np.asarray(list(values), dtype=np.float64).ravel()
    array = array[~np.isnan(array)]
    if array.size == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(array.std(ddof=ddof)) if array.size > ddof else math.nan
    return Summary(float(array.mean()), std, int(array.size))


def evaluate_masks(
    predictions: Sequence, annotations: Sequence, ddof: int = 0
) -> tuple[list[MaskScores], dict[str, Summary]]:
    """Per-tile :class:`MaskScores` of paired mask lists and their :class:`Summary` for ``dice``, ``bac``,
    ``sensitivity`` and ``specificity`` (mean +- std over tiles)."""
    if len(predictions) != len(annotations):
        raise ValueError(f"evaluate_masks: {len(predictions)} predicted masks for {len(annotations)} annotations")
    per_tile = []
    for index, (prediction, annotation) in enumerate(zip(predictions, annotations, strict=True)):
        try:
            per_tile.append(mask_scores(prediction, annotation))
        except ValueError as error:
            raise ValueError(f"tile {index}: {error}") from None
    keys = ("dice", "bac", "sensitivity", "specificity")
    return per_tile, {key: summarize((getattr(s, key) for s in per_tile), ddof) for key in keys}


# ----------------------------------------------------------------------------------------------------------------
# Tiles: conversion, DAB mask, PSNR and SSIM
# ----------------------------------------------------------------------------------------------------------------


def tiles_to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Network tiles in ``[-1, 1]`` back to RGB ``uint8``: ``(B, 3, H, W) -> (B, H, W, 3)``, ``(3, H, W) -> (H, W, 3)``.

    Inverse of the ``uint8 / 127.5 - 1`` scaling: ``round((x + 1) * 127.5)`` clipped to ``[0, 255]``.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"tiles_to_uint8: expected (3, H, W) or (B, 3, H, W) tiles, got shape {images.shape}")
    pixels = np.clip(np.rint((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)


def synthetic_dab_mask(
    tile: np.ndarray | torch.Tensor, params: BoxLibraryParams = RELEASED_CODE, name: str = "synthetic IHC tile"
) -> np.ndarray:
    """DAB-positive mask ``(H, W)`` bool of a (synthetic) IHC tile, exactly as the IHC box library computes it.

    ``tile`` is an RGB ``uint8`` array ``(H, W, 3)`` or a generator output ``(3, H, W)`` in ``[-1, 1]`` (converted
    by :func:`tiles_to_uint8`); the mask is :func:`roigan_stain_transfer.box_library.dab_mask` with ``params``.
    """
    if isinstance(tile, torch.Tensor) or (isinstance(tile, np.ndarray) and tile.dtype != np.uint8):
        tile = tiles_to_uint8(tile)
    mask, _ = dab_mask(tile, params, name)
    return mask


def _image_pair(image, reference, data_range: float | None, name: str) -> tuple[np.ndarray, np.ndarray, float]:
    image, reference = np.asarray(image), np.asarray(reference)
    if image.shape != reference.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{name}: expected two RGB tiles (H, W, 3) of one shape, got {image.shape} and {reference.shape}"
        )
    if data_range is None:
        if image.dtype != np.uint8 or reference.dtype != np.uint8:
            raise ValueError(f"{name}: pass data_range for {image.dtype}/{reference.dtype} tiles (uint8 implies 255)")
        data_range = 255.0
    return image.astype(np.float64), reference.astype(np.float64), float(data_range)


def psnr(image, reference, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB) of an RGB tile ``(H, W, 3)`` against its reference.

    ``data_range`` defaults to 255 for ``uint8`` tiles and must be given otherwise (2 for tiles in ``[-1, 1]``).
    Identical tiles give ``inf``.
    """
    image, reference, data_range = _image_pair(image, reference, data_range, "psnr")
    if np.array_equal(image, reference):
        return math.inf
    return float(peak_signal_noise_ratio(reference, image, data_range=data_range))


def ssim(image, reference, data_range: float | None = None) -> float:
    """Mean structural similarity of two RGB tiles ``(H, W, 3)`` (scikit-image defaults: 7 x 7 uniform window,
    channels scored separately and averaged); ``data_range`` as in :func:`psnr`. Identical tiles give 1."""
    image, reference, data_range = _image_pair(image, reference, data_range, "ssim")
    return float(structural_similarity(reference, image, data_range=data_range, channel_axis=-1))
