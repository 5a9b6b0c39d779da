"""The RoI-CycleGAN bundle through ``python -m monai.bundle``: training, exact resume after a kill, evaluation,
inference, presets, metadata and the distributed run under torchrun (CPU, gloo).

Every run uses the real configs with command-line overrides for 64 x 64 tiles and networks of width 4, on the
tiny tile set of ``test_data.py`` (4 tiles per stain, 3 with library boxes).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from PIL import Image

from tests.bundle_cli import TIMEOUT, BundleCLI, run_checked, subprocess_env
from tests.conftest import REPO_ROOT
from tests.roigan_stain_transfer.test_data import TINY, write_tiny_set

BUNDLE = REPO_ROOT / "bundles" / "roigan_stain_transfer"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO_ROOT / "bundles" / "schema" / "meta_schema_20240725.json"
NARROW = [
    "--num_workers", "0",
    "--generator_channels", "4",
    "--generator_blocks", "1",
    "--patch_channels", "[4,4,4,4,4]",
    "--roi_channels", "[4,4,4,4]",
]  # fmt: skip
SMALL = ["--tile_size", str(TINY), "--batch_size", "2", *NARROW]


CLI = BundleCLI("roigan_stain_transfer")
_config, _command, _env, _run = CLI.config, CLI.command, subprocess_env, run_checked


def _train_command(root: Path, *extra: str) -> list[str]:
    return _command(_config("train"), root, *SMALL, "--max_epochs", "4", "--save_interval", "1", *extra)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roigan_bundle")
    write_tiny_set(root / "data")
    return root


@pytest.fixture(scope="module")
def trained(bundle_root) -> subprocess.CompletedProcess:
    """4 epochs of 2 iterations in one go."""
    return _run(_train_command(bundle_root), bundle_root)


# ------------------------------------------------------------------------------------------------------------
# Files, metadata, presets
# ------------------------------------------------------------------------------------------------------------


def test_bundle_folder_has_the_model_zoo_files():
    for name in ("train", "inference", "evaluate", "multi_gpu_train", "metadata"):
        json.loads((CONFIGS / f"{name}.json").read_text())
    for name in ("configs/logging.conf", "docs/README.md", "LICENSE", "large_files.json"):
        assert (BUNDLE / name).is_file(), name
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    assert "large_files" in json.loads((BUNDLE / "large_files.json").read_text())


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_validates_against_the_shipped_schema():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_network_input_and_output_match_the_metadata():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        device="cpu",
        generator_channels=4,
        generator_blocks=1,
    )


@pytest.mark.parametrize(
    ("preset", "use_roi", "patch_size", "roi_channels", "sampling"),
    [
        (None, True, 8, 3, (8, 8, (4, 4))),
        ("proposed", True, 8, 3, (8, 8, (4, 4))),
        ("cyclegan_8x8", False, 8, None, None),
        ("cyclegan_16x16", False, 16, None, None),
        ("cyclegan_32x32", False, 32, None, None),
        ("released_code", True, 8, 5, (6, 10, (8, 2))),
    ],
)
def test_presets_build_the_documented_models(bundle_root, preset, use_roi, patch_size, roi_channels, sampling):
    parser = ConfigParser()
    files = [str(CONFIGS / "train.json")] + ([str(CONFIGS / "presets" / f"{preset}.json")] if preset else [])
    parser.read_config(files)
    parser.update({"bundle_root": str(bundle_root), "tile_size": TINY, "device": "$torch.device('cpu')"})
    parser.update({k.lstrip("-"): json.loads(v) for k, v in zip(NARROW[::2], NARROW[1::2], strict=True)})
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.uses_roi is use_roi
    assert trainer.d_x.output_size(256) == (patch_size, patch_size)
    if use_roi:
        assert trainer.roi_d_x.in_channels == roi_channels
        dataset = parser.get_parsed_content("train#dataset")
        got = dataset.sampling
        assert (got.negative_only, got.positive_only, got.mixed) == sampling
    assert "roi_d_x" in trainer.checkpoint_objects() if use_roi else "roi_d_x" not in trainer.checkpoint_objects()
    if preset == "released_code":
        assert trainer.g_xy.upsampling == "resize" and trainer.state.max_epochs == 25
        assert trainer.g_scheduler.lr_lambdas[0].decay_start == 13  # factor 1 up to epoch 12 (0-based)
        assert (trainer.lambda_roi, trainer.lambda_cyc, trainer.lambda_id) == (1.0, 30.0, 5.0)


# ------------------------------------------------------------------------------------------------------------
# Training, resume, evaluation, inference
# ------------------------------------------------------------------------------------------------------------


def test_training_saves_resumable_checkpoints_and_the_generator(trained, bundle_root):
    models = bundle_root / "models"
    names = {p.name for p in models.iterdir()}
    assert {"model.pt", "checkpoint_iteration=7.pt", "checkpoint_iteration=8.pt"} <= names
    checkpoint = torch.load(models / "checkpoint_iteration=8.pt", weights_only=True)
    expected = {"g_xy", "g_yx", "d_x", "d_y", "roi_d_x", "roi_d_y", "g_optimizer", "d_optimizer"}
    expected |= {"g_scheduler", "d_scheduler", "buffer_x", "buffer_y", "trainer", "settings"}
    assert set(checkpoint) == expected and checkpoint["trainer"]["iteration"] == 8
    generator = torch.load(models / "model.pt", weights_only=True)
    assert set(generator) == set(checkpoint["g_xy"])
    log = trained.stdout + trained.stderr
    assert "loss_G:" in log and "roi_d_y:" in log
    assert list((bundle_root / "eval" / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_training_resumes_exactly(trained, bundle_root, tmp_path):
    """Killed part-way and started again, the run ends with the same generator as the run made in one go."""
    root = tmp_path / "resume"
    root.mkdir()
    (root / "data").symlink_to(bundle_root / "data")
    command = _train_command(root)
    process = subprocess.Popen(command, cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = root / "models" / "checkpoint_iteration=3.pt"
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (root / "models" / "model.pt").exists(), "the run was not interrupted mid-way"

    resumed = _run(command, root)
    assert "Restored all variables from" in resumed.stdout + resumed.stderr
    final = torch.load(root / "models" / "checkpoint_iteration=8.pt", weights_only=True)
    reference = torch.load(bundle_root / "models" / "checkpoint_iteration=8.pt", weights_only=True)
    for name in ("g_xy", "g_yx", "d_x", "d_y", "roi_d_x", "roi_d_y"):
        for key, value in reference[name].items():
            assert torch.allclose(final[name][key].float(), value.float(), atol=1e-6), f"{name}.{key}"
    assert torch.equal(final["buffer_y"]["images"], reference["buffer_y"]["images"])


def test_evaluate_writes_the_report(trained, bundle_root):
    out = bundle_root / "report"
    extra = [*SMALL, "--eval_output_dir", str(out), "--eval_ihc_tiles", str(bundle_root / "data" / "test" / "ihc")]
    _run(_command(_config("train", "evaluate"), bundle_root, *extra), bundle_root)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == 4 and 0 <= summary["dice"]["mean"] <= 1 and summary["psnr"]["count"] == 4
    assert len((out / "per_tile.csv").read_text().splitlines()) == 5
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * TINY + 3 * 4, 4 * TINY + 3 * 4)


def test_inference_writes_synthetic_ihc_tiles(trained, bundle_root):
    out = bundle_root / "synthetic"
    extra = [*NARROW, "--input_tiles", str(bundle_root / "data" / "test" / "he"), "--output_dir", str(out)]
    _run(_command(_config("inference"), bundle_root, *extra), bundle_root)
    assert sorted(p.name for p in out.iterdir()) == [f"t{i}.png" for i in range(4)]
    with Image.open(out / "t0.png") as tile:
        assert tile.mode == "RGB" and tile.size == (TINY, TINY)


def test_distributed_training_with_torchrun_on_cpu(bundle_root, tmp_path):
    root = tmp_path / "ddp"
    root.mkdir()
    (root / "data").symlink_to(bundle_root / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle"]
    extra = [*SMALL, "--batch_size", "1", "--max_epochs", "1", "--save_interval", "1"]
    result = _run(_command(_config("train", "multi_gpu_train"), root, *extra, launcher=launcher), root)
    log = result.stdout + result.stderr
    assert log.count("Epoch: 1/1, Iter: 2/2") == 1  # handlers on rank 0 only; 3 tiles over 2 ranks: 2 iterations
    checkpoint = torch.load(root / "models" / "checkpoint_iteration=2.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 2
    assert not any(key.startswith("module.") for key in checkpoint["g_xy"])
    assert (root / "models" / "model.pt").is_file()
