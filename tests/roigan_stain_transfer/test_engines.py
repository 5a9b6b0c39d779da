"""Tests of the RoI-CycleGAN trainer (one iteration updates every network, exact resume from a checkpoint,
learning-rate schedule, checkpoint discovery) and of the evaluation / inference handlers."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import CheckpointLoader
from PIL import Image

from roigan_stain_transfer.data import AnnotatedTileDataset, TileDataset, TileSampler, collate_tiles
from roigan_stain_transfer.engines import (
    LinearDecayLR,
    RoIGANTrainer,
    loss_terms,
    parameters_of,
)
from roigan_stain_transfer.evaluation import EvaluationReport, SaveTiles, StainTransferEvaluator, tile_grid
from roigan_stain_transfer.losses import ReplayBuffer
from roigan_stain_transfer.networks import PatchDiscriminator, ResnetGenerator, RoIDiscriminator
from shared_ops.checkpoints import AtomicCheckpointSaver, latest_checkpoint
from tests.roigan_stain_transfer.test_data import TINY, tiny_dataset, write_tiny_set

NETWORKS = ("g_xy", "g_yx", "d_x", "d_y", "roi_d_x", "roi_d_y")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run several times faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_set(tmp_path):
    return write_tiny_set(tmp_path / "data")


def build_trainer(
    paths,
    seed: int = 0,
    use_roi: bool = True,
    max_epochs: int = 2,
    roi_in_channels: int = 3,
    amp: bool = False,
    **kwargs,
) -> RoIGANTrainer:
    """A tiny trainer: widths 4, one residual block, 64 x 64 tiles, batches of 2 (3 tiles with boxes)."""
    torch.manual_seed(seed)
    dataset = tiny_dataset(paths, seed=seed)
    loader = DataLoader(
        dataset, batch_size=2, sampler=TileSampler(dataset, seed=seed), collate_fn=collate_tiles, num_workers=0
    )
    g_xy = ResnetGenerator(base_channels=4, num_blocks=1)
    g_yx = ResnetGenerator(base_channels=4, num_blocks=1, upsampling="resize")
    d_x = PatchDiscriminator.for_output_size(8, channels=[4] * 5)
    d_y = PatchDiscriminator.for_output_size(16, channels=[4] * 5)
    roi = [RoIDiscriminator(roi_in_channels, channels=[4] * 4) for _ in range(2)] if use_roi else [None, None]
    g_opt = torch.optim.Adam(parameters_of(g_xy, g_yx), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(parameters_of(d_x, d_y, *roi), lr=2e-4, betas=(0.5, 0.999))
    return RoIGANTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        g_xy=g_xy,
        g_yx=g_yx,
        d_x=d_x,
        d_y=d_y,
        g_optimizer=g_opt,
        d_optimizer=d_opt,
        roi_d_x=roi[0],
        roi_d_y=roi[1],
        g_scheduler=LinearDecayLR(g_opt, max_epochs, 0),
        d_scheduler=LinearDecayLR(d_opt, max_epochs, 0),
        buffer_x=ReplayBuffer(3, seed=seed + 1),
        buffer_y=ReplayBuffer(3, seed=seed + 2),
        amp=amp,
        **kwargs,
    )


def record_outputs(trainer: RoIGANTrainer) -> dict[int, dict[str, float]]:
    outputs: dict[int, dict[str, float]] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: outputs.__setitem__(engine.state.iteration, dict(engine.state.output)),
    )
    return outputs


# ------------------------------------------------------------------------------------------------------------
# Training iteration
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_roi", [True, False])
def test_one_iteration_updates_every_network(tiny_set, use_roi):
    trainer = build_trainer(tiny_set, use_roi=use_roi, max_epochs=1, epoch_length=1)
    names = NETWORKS if use_roi else NETWORKS[:4]
    before = {name: {k: v.detach().clone() for k, v in getattr(trainer, name).named_parameters()} for name in names}
    outputs = record_outputs(trainer)
    trainer.run()
    assert trainer.state.iteration == 1
    for name in names:
        network = getattr(trainer, name)
        for key, value in network.named_parameters():
            if key.endswith("weight"):
                assert not torch.equal(value, before[name][key]), f"{name}.{key} did not change"
    expected = {"loss_G", "loss_D", "gan_xy", "gan_yx", "cycle_x", "cycle_y", "identity_x", "identity_y", "d_x", "d_y"}
    if use_roi:
        expected |= {"roi_xy", "roi_yx", "roi_d_x", "roi_d_y"}
    assert set(outputs[1]) == expected
    assert all(isinstance(v, float) and math.isfinite(v) for v in outputs[1].values())
    assert loss_terms(outputs[1]) == outputs[1]
    # loss_G is the weighted sum of its terms (released weights 1, 1, 30, 5)
    out = outputs[1]
    terms = (out["gan_xy"] + out["gan_yx"]) / 2 + 30 * (out["cycle_x"] + out["cycle_y"]) / 2
    terms += 5 * (out["identity_x"] + out["identity_y"]) / 2
    if use_roi:
        terms += (out["roi_xy"] + out["roi_yx"]) / 2
    assert out["loss_G"] == pytest.approx(terms, rel=1e-5)


def test_five_channel_roi_discriminators_without_identity(tiny_set):
    trainer = build_trainer(tiny_set, max_epochs=1, epoch_length=1, roi_in_channels=5, lambda_id=0.0)
    outputs = record_outputs(trainer)
    trainer.run()
    assert "identity_x" not in outputs[1] and math.isfinite(outputs[1]["roi_d_y"])


def test_amp_on_cpu_runs(tiny_set):
    trainer = build_trainer(tiny_set, max_epochs=1, epoch_length=1, amp=True)
    outputs = record_outputs(trainer)
    trainer.run()
    assert all(math.isfinite(v) for v in outputs[1].values())


def test_roi_discriminators_come_in_pairs(tiny_set):
    trainer = build_trainer(tiny_set, max_epochs=1)
    with pytest.raises(ValueError, match="both RoI discriminators"):
        RoIGANTrainer(
            "cpu", 1, trainer.data_loader, trainer.g_xy, trainer.g_yx, trainer.d_x, trainer.d_y,
            trainer.g_optimizer, trainer.d_optimizer, roi_d_x=trainer.roi_d_x,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ------------------------------------------------------------------------------------------------------------


def test_exact_resume_from_a_checkpoint(tiny_set, tmp_path):
    """N + 1 iterations in one go == N iterations, checkpoint, restore into fresh objects, 1 more (N = 3: part-way
    through epoch 2, after a learning-rate step)."""
    reference = build_trainer(tiny_set)
    expected = record_outputs(reference)
    reference.run()
    assert reference.state.iteration == 4  # 2 epochs of 2 batches (3 tiles, batch 2)

    interrupted = build_trainer(tiny_set)
    first = record_outputs(interrupted)
    AtomicCheckpointSaver(
        str(tmp_path / "ckpt"), interrupted.checkpoint_objects(), save_interval=3, epoch_level=False, n_saved=1
    ).attach(interrupted)
    interrupted.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda engine: engine.terminate())
    interrupted.run()
    assert interrupted.state.iteration == 3
    for iteration in (1, 2, 3):
        assert first[iteration] == pytest.approx(expected[iteration], abs=1e-6)

    path = latest_checkpoint(tmp_path / "ckpt")
    assert path is not None and path.endswith("=3.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == set(interrupted.checkpoint_objects())

    resumed = build_trainer(tiny_set, seed=0)
    torch.manual_seed(1234)  # the global generator plays no part in training
    CheckpointLoader(path, resumed.checkpoint_objects()).attach(resumed)
    resumed_out = record_outputs(resumed)
    resumed.run()
    assert list(resumed_out) == [4]
    for key, value in expected[4].items():
        assert resumed_out[4][key] == pytest.approx(value, abs=1e-6), key
    for name in NETWORKS:
        for (key, a), (_, b) in zip(
            getattr(reference, name).state_dict().items(), getattr(resumed, name).state_dict().items(), strict=True
        ):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), f"{name}.{key}"
    assert resumed.g_optimizer.param_groups[0]["lr"] == pytest.approx(reference.g_optimizer.param_groups[0]["lr"])


def test_linear_decay_schedule():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler = LinearDecayLR(optimizer, total_epochs=25, decay_start_epoch=12)
    rates = []
    for _ in range(25):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:12] == [pytest.approx(2e-4)] * 12  # epochs 1-12 at the full rate
    assert rates[12] == pytest.approx(2e-4 * (1 - 1 / 14))
    assert rates[24] == pytest.approx(2e-4 * (1 - 13 / 14))
    assert all(a > b for a, b in zip(rates[11:], rates[12:], strict=False))
    constant = LinearDecayLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 20, None)
    assert constant.lr_lambdas[0](19) == 1.0
    # the state holds the position, not the schedule: a resumed run may train longer
    state = scheduler.state_dict()
    assert "lr_lambdas" not in state and state["last_epoch"] == 25
    longer = LinearDecayLR(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4), 50, 12)
    longer.load_state_dict(state)
    assert longer.last_epoch == 25 and longer.lr_lambdas[0].total_epochs == 50


# ------------------------------------------------------------------------------------------------------------
# Evaluation and inference
# ------------------------------------------------------------------------------------------------------------


def test_evaluation_report_files(tiny_set, tmp_path):
    dataset = AnnotatedTileDataset(tiny_set["test_he"], tiny_set["test_masks"], tiny_set["test_ihc"], tile_size=TINY)
    loader = DataLoader(dataset, batch_size=3, shuffle=False, num_workers=0)
    report = EvaluationReport(tmp_path / "eval", grid_tiles=2)
    evaluator = StainTransferEvaluator(
        "cpu", loader, ResnetGenerator(base_channels=4, num_blocks=1), val_handlers=[report]
    )
    evaluator.run()
    with open(tmp_path / "eval" / "per_tile.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["tile"] for row in rows] == ["t0.png", "t1.png", "t2.png", "t3.png"]
    assert all(0 <= float(row["dice"]) <= 1 and 0 <= float(row["bac"]) <= 1 for row in rows)
    assert all(float(row["annotation_coverage"]) == 0.5 and row["psnr"] and row["ssim"] for row in rows)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["tiles"] == 4 and summary["dice"]["count"] == 4
    assert summary["dice"]["mean"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert summary["psnr"]["count"] == 4
    with Image.open(tmp_path / "eval" / "grid.png") as grid:
        assert grid.size == (4 * TINY + 3 * 4, 2 * TINY + 4) and grid.mode == "RGB"
    assert not list((tmp_path / "eval").glob(".*"))  # no temporary file left


def test_evaluation_report_scores_known_masks(tmp_path):
    """An identity 'generator' on real IHC tiles: the DAB mask of the synthetic tile is the real one's."""
    from roigan_stain_transfer.box_library import dab_mask
    from tests.roigan_stain_transfer.test_data import tiny_tiles

    _, ihc = tiny_tiles(1, 128)
    report = EvaluationReport(tmp_path)
    mask, _ = dab_mask(ihc[0])
    row = report.score_tile("a", ihc[0], mask, ihc[0])
    assert row["dice"] == 1.0 and row["bac"] == 1.0 and row["psnr"] == math.inf and row["ssim"] == 1.0
    report.rows.append({k: v for k, v in row.items() if k != "_dab"})
    summary = report.summary()
    assert summary["psnr"]["count"] == 0 and summary["psnr"]["mean"] is None  # inf left out, NaN -> null
    paths = report.write()
    assert set(paths) == {"csv", "summary"}


def test_save_tiles_writes_pngs(tiny_set, tmp_path):
    loader = DataLoader(TileDataset(tiny_set["test_he"]), batch_size=3, num_workers=0)
    saver = SaveTiles(tmp_path / "out", suffix="_ihc")
    StainTransferEvaluator(
        "cpu", loader, ResnetGenerator(base_channels=4, num_blocks=1), image_key="image", val_handlers=[saver]
    ).run()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["t0_ihc.png", "t1_ihc.png", "t2_ihc.png", "t3_ihc.png"]
    with Image.open(tmp_path / "out" / "t0_ihc.png") as image:
        assert image.mode == "RGB" and image.size == (TINY, TINY)


def test_tile_grid_checks_shapes():
    a = np.zeros((4, 4, 3), np.uint8)
    assert tile_grid([[a, a], [a]], gap=1).shape == (9, 9, 3)
    with pytest.raises(ValueError, match="tile_grid: tile"):
        tile_grid([[a, np.zeros((5, 4, 3), np.uint8)]])
