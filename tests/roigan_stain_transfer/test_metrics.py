"""Tests of the evaluation metrics: DICE / BAC with their edge cases, PSNR / SSIM, the synthetic DAB mask."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from skimage.data import immunohistochemistry

from roigan_stain_transfer import box_library as bl
from roigan_stain_transfer.metrics import (
    balanced_accuracy,
    confusion_counts,
    dice_score,
    evaluate_masks,
    mask_scores,
    psnr,
    ssim,
    summarize,
    synthetic_dab_mask,
    tiles_to_uint8,
)
from tests.conftest import require_data

# ------------------------------------------------------------------------------------------------------------
# DICE and BAC
# ------------------------------------------------------------------------------------------------------------


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """4 x 4 prediction = top row, annotation = top-left 2 x 2: TP 2, FP 2, FN 2, TN 10."""
    prediction = np.zeros((4, 4), bool)
    prediction[0] = True
    annotation = np.zeros((4, 4), bool)
    annotation[:2, :2] = True
    return prediction, annotation


def test_dice_and_bac_hand_computed():
    prediction, annotation = _masks()
    assert confusion_counts(prediction, annotation) == (2, 2, 2, 10)
    scores = mask_scores(prediction, annotation)
    assert scores.dice == pytest.approx(4 / 8)
    assert scores.sensitivity == pytest.approx(2 / 4)
    assert scores.specificity == pytest.approx(10 / 12)
    assert scores.bac == pytest.approx((0.5 + 10 / 12) / 2)
    assert dice_score(prediction, annotation) == scores.dice
    assert balanced_accuracy(prediction, annotation) == scores.bac


def test_perfect_prediction():
    _, annotation = _masks()
    scores = mask_scores(annotation, annotation)
    assert (scores.dice, scores.bac, scores.sensitivity, scores.specificity) == (1.0, 1.0, 1.0, 1.0)


def test_both_empty():
    empty = np.zeros((3, 5), bool)
    scores = mask_scores(empty, empty)
    assert scores.dice == 1.0 and scores.bac == 1.0 and scores.specificity == 1.0
    assert math.isnan(scores.sensitivity)


def test_empty_prediction_of_annotated_tumour():
    _, annotation = _masks()
    scores = mask_scores(np.zeros_like(annotation), annotation)
    assert scores.dice == 0.0 and scores.sensitivity == 0.0 and scores.specificity == 1.0 and scores.bac == 0.5


def test_prediction_on_tile_without_tumour_scores_specificity():
    prediction, _ = _masks()
    scores = mask_scores(prediction, np.zeros_like(prediction))
    assert scores.dice == 0.0 and math.isnan(scores.sensitivity)
    assert scores.specificity == pytest.approx(12 / 16) and scores.bac == pytest.approx(12 / 16)


def test_all_tumour_annotation_scores_sensitivity():
    prediction, _ = _masks()
    scores = mask_scores(prediction, np.ones_like(prediction))
    assert math.isnan(scores.specificity) and scores.bac == pytest.approx(4 / 16)
    assert scores.dice == pytest.approx(8 / (8 + 12))


def test_mask_inputs_accepted_and_rejected():
    prediction, annotation = _masks()
    as_int = mask_scores(prediction.astype(np.uint8), torch.from_numpy(annotation.astype(np.int64)))
    assert as_int == mask_scores(prediction, annotation)
    with pytest.raises(ValueError, match="binary"):
        dice_score(prediction * 2.5, annotation)
    with pytest.raises(ValueError, match="differ in shape"):
        dice_score(prediction, annotation[:3])
    with pytest.raises(ValueError, match="2-D"):
        dice_score(prediction[None], annotation[None])


def test_summary_and_evaluate_masks():
    summary = summarize([0.5, 1.0, math.nan])
    assert (summary.mean, summary.std, summary.count) == (0.75, 0.25, 2)
    assert summarize([0.5, 1.0], ddof=1).std == pytest.approx(math.sqrt(0.125))
    assert summarize([math.nan]).count == 0 and math.isnan(summarize([]).mean)

    prediction, annotation = _masks()
    empty = np.zeros_like(annotation)
    per_tile, summaries = evaluate_masks([prediction, empty], [annotation, empty])
    assert [s.dice for s in per_tile] == [0.5, 1.0]
    assert summaries["dice"].mean == 0.75 and summaries["dice"].std == 0.25
    assert summaries["sensitivity"].count == 1 and summaries["specificity"].count == 2
    assert summaries["bac"].mean == pytest.approx(((0.5 + 10 / 12) / 2 + 1.0) / 2)
    with pytest.raises(ValueError, match="tile 1"):
        evaluate_masks([prediction, empty], [annotation, empty[:2]])
    with pytest.raises(ValueError, match="2 predicted masks for 1"):
        evaluate_masks([prediction, empty], [annotation])


# ------------------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ------------------------------------------------------------------------------------------------------------


def test_psnr_and_ssim_sanity():
    rng = np.random.default_rng(0)
    reference = immunohistochemistry()[:128, :128]
    assert psnr(reference, reference) == math.inf and ssim(reference, reference) == pytest.approx(1.0)

    shifted = (reference.astype(np.int64) + 10).clip(0, 255).astype(np.uint8)
    error = ((shifted.astype(float) - reference) ** 2).mean()
    assert psnr(shifted, reference) == pytest.approx(10 * math.log10(255**2 / error))

    def noisy(sigma: float) -> np.ndarray:
        return (reference + rng.normal(0, sigma, reference.shape)).clip(0, 255).astype(np.uint8)

    slight, strong = noisy(5), noisy(40)
    assert psnr(slight, reference) > psnr(strong, reference) > 10
    assert 1 > ssim(slight, reference) > ssim(strong, reference) > 0
    # float tiles need their data range; rescaling tiles and range together leaves both scores unchanged
    assert ssim(slight / 255, reference / 255, data_range=1) == pytest.approx(ssim(slight, reference), abs=1e-9)
    assert psnr(slight / 127.5 - 1, reference / 127.5 - 1, data_range=2) == pytest.approx(psnr(slight, reference))


def test_psnr_ssim_input_checks():
    tile = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="data_range"):
        psnr(tile.astype(float), tile.astype(float))
    with pytest.raises(ValueError, match="RGB tiles"):
        ssim(tile, tile[:4])


# ------------------------------------------------------------------------------------------------------------
# Synthetic DAB mask
# ------------------------------------------------------------------------------------------------------------


def test_tiles_to_uint8_inverts_network_scaling():
    tile = immunohistochemistry()[:64, :32]
    scaled = torch.from_numpy(tile).permute(2, 0, 1).float() / 127.5 - 1
    np.testing.assert_array_equal(tiles_to_uint8(scaled), tile)
    np.testing.assert_array_equal(tiles_to_uint8(scaled[None].repeat(2, 1, 1, 1)), np.stack([tile, tile]))
    assert tiles_to_uint8(torch.full((3, 2, 2), 5.0)).max() == 255
    with pytest.raises(ValueError, match="3, H, W"):
        tiles_to_uint8(torch.zeros(4, 8, 8))


def test_synthetic_dab_mask_is_the_library_mask():
    tile = immunohistochemistry()[:256, :256]
    expected, info = bl.dab_mask(tile)
    assert not info.emptied and 0 < expected.mean() < 1
    np.testing.assert_array_equal(synthetic_dab_mask(tile), expected)
    generated = torch.from_numpy(tile).permute(2, 0, 1).float() / 127.5 - 1
    np.testing.assert_array_equal(synthetic_dab_mask(generated), expected)
    paper = bl.BoxLibraryParams(dab_closing_radius=2)
    np.testing.assert_array_equal(synthetic_dab_mask(tile, paper), bl.dab_mask(tile, paper)[0])


def test_synthetic_dab_mask_on_sample_ihc_tiles():
    with h5py.File(require_data("tiles/camelyon_gr_samples/IHC_patches.h5"), "r") as handle:
        tiles = handle["x"][:]
    coverage = synthetic_dab_mask(tiles[0]).mean()
    assert coverage == pytest.approx(0.485, abs=0.001)
    assert not synthetic_dab_mask(tiles[1]).any()  # mean DAB grey 0.898 > 0.85: emptied
