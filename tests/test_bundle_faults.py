"""Catalogue of the faults of re-running and resuming the two bundles: one case per item, each with the fault, the
exit code and message, and what the files look like afterwards.

====  =================================================================  ==========================================
item  fault                                                              expected
====  =================================================================  ==========================================
1     resume with other settings (RoI-GAN: another preset and loss       exit 1 before training; one message naming
      weight; RRN: learning rate, correlation normalisation)             the checkpoint, each key old -> new, how to
                                                                         start anew; ``models/`` untouched;
                                                                         ``--ckpt_dir`` starts a new run
2     interval checkpoints after a resume                                at most ``n_saved`` (2) on disk
3     RRN: the first validation after a resume is worse than the best    ``models/model.pt`` unchanged; the best
                                                                         score travels in the checkpoints
4     RRN: an image already scaled to [0, 1] in the datalist             exit 1, message naming the file; nothing
                                                                         written
5     RRN ``register.json``: datalist reordered; folders recording       pairs found by their input files; no
      other inputs                                                       other pair's folder taken or reported
6     garbage / truncated checkpoints (resume, ``models/model.pt``),     exit 1, one line naming the file; no
      empty training list or tile folder, truncated NIfTI                output written
7     ``presets/released_code.json`` against the released config         6 blocks, 25 epochs of 200 steps, batch 8,
                                                                         64 RoIs per batch, decay factors
====  =================================================================  ==========================================

Tiny tiles and phantom volumes with narrow networks, as in the bundle tests; every run goes through the real
configs with ``python -m monai.bundle run`` in a subprocess.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import zipfile
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from rrn_lung_registration import datalist_registration
from rrn_lung_registration.pipeline import RegistrationSettings
from rrn_lung_registration.synthetic.phantom import make_dataset
from shared_ops.checkpoints import CheckpointError, latest_checkpoint
from tests.bundle_cli import TIMEOUT, BundleCLI, run_checked, subprocess_env
from tests.roigan_stain_transfer.test_data import TINY, write_tiny_set

ROIGAN, RRN = BundleCLI("roigan_stain_transfer"), BundleCLI("rrn_lung_registration")
ROIGAN_NARROW = [
    "--num_workers", "0",
    "--generator_channels", "4",
    "--generator_blocks", "1",
    "--patch_channels", "[4,4,4,4,4]",
    "--roi_channels", "[4,4,4,4]",
]  # fmt: skip
ROIGAN_SMALL = ["--tile_size", str(TINY), "--batch_size", "2", "--save_interval", "1", *ROIGAN_NARROW]
GRID = 32
RRN_SMALL = [
    "--image_size", f"[{GRID},{GRID},{GRID}]",
    "--num_workers", "0",
    "--save_interval", "1",
    "--network_def#pyramid_channels", "[8,8,16,16]",
    "--network_def#estimator_channels", "[16,16,16,16,8]",
    "--network_def#refiner_channels", "[16,16,16,16,16,8,3]",
]  # fmt: skip
PATH_KEYS = ("fixed", "moving", "fixed_landmarks", "moving_landmarks")


# ------------------------------------------------------------------------------------------------------------
# Runs and files
# ------------------------------------------------------------------------------------------------------------


def _roigan(root: Path, *extra: str, configs: tuple[str, ...] = ("train",)) -> list[str]:
    return ROIGAN.command(ROIGAN.config(*configs), root, *ROIGAN_SMALL, *extra)


def _rrn(root: Path, *extra: str, configs: tuple[str, ...] = ("train",)) -> list[str]:
    return RRN.command(RRN.config(*configs), root, *RRN_SMALL, *extra)


def _failed(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command that must stop with exit code 1 (an uncaught error)."""
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _line(text: str, *parts: str) -> str:
    """The one line of ``text`` that holds every part (the error message)."""
    lines = [line for line in text.splitlines() if all(part in line for part in parts)]
    assert lines, f"no line holds {parts}:\n{text[-3000:]}"
    return lines[-1]


def _files(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 of every file in ``folder``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy_of(run: Path, tmp_path: Path) -> Path:
    """A bundle root with the data of ``run`` and a copy of its ``models/``."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "data").symlink_to(run / "data")
    shutil.copytree(run / "models", root / "models")
    return root


def _datalist(run: Path) -> dict:
    """The phantom datalist of ``run`` with absolute paths, image and landmark keys only."""
    content = json.loads((run / "data" / "datalist.json").read_text())
    return {
        section: [{key: str(run / "data" / pair[key]) for key in PATH_KEYS if key in pair} for pair in pairs]
        for section, pairs in content.items()
    }


def _write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))
    return path


@pytest.fixture(scope="module")
def roigan_run(tmp_path_factory) -> Path:
    """One epoch of 2 iterations: models/checkpoint_iteration=1.pt, =2.pt and model.pt."""
    root = tmp_path_factory.mktemp("roigan_run")
    write_tiny_set(root / "data")
    run_checked(_roigan(root, "--max_epochs", "1"), root)
    return root


@pytest.fixture(scope="module")
def rrn_run(tmp_path_factory) -> Path:
    """Phantom pairs (2 training, 1 validation), one epoch of 2 iterations validated at its end:
    models/checkpoint_iteration=1.pt, =2.pt, model.pt (best validation TRE), model_final.pt."""
    root = tmp_path_factory.mktemp("rrn_run")
    make_dataset(root / "data", n_pairs=3, shape=(GRID, GRID, GRID), seed=11, n_validation=1)
    run_checked(_rrn(root, "--max_epochs", "1"), root)
    return root


# ------------------------------------------------------------------------------------------------------------
# 1. Resume with other settings
# ------------------------------------------------------------------------------------------------------------


def test_1_roigan_resume_with_other_settings_stops_before_training(roigan_run, tmp_path):
    root = _copy_of(roigan_run, tmp_path)
    before = _files(root / "models")
    # another preset (the baseline has no RoI discriminators) and another cycle weight
    command = _roigan(root, "--max_epochs", "2", "--lambda_cyc", "10", configs=("train", "presets/cyclegan_8x8"))
    result = _failed(command, root)
    line = _line(result.stderr, "RunSettingsError", f"{root / 'models' / 'checkpoint_iteration=2.pt'}: cannot resume")
    assert "use_roi: True -> False" in line and "lambda_cyc: 30.0 -> 10" in line
    assert f"move or delete {root / 'models'}, or pass --ckpt_dir with a new folder" in line
    assert "max_epochs" in line  # named among the settings that may change
    log = result.stdout + result.stderr
    assert "Restored" not in log and "Iter:" not in log  # nothing loaded, nothing trained
    assert _files(root / "models") == before


def test_1_rrn_resume_with_other_settings_stops_before_training(rrn_run, tmp_path):
    root = _copy_of(rrn_run, tmp_path)
    before = _files(root / "models")
    command = _rrn(root, "--max_epochs", "2", "--learning_rate", "0.001", "--network_def#normalize", "global")
    result = _failed(command, root)
    line = _line(result.stderr, "RunSettingsError", f"{root / 'models' / 'checkpoint_iteration=2.pt'}: cannot resume")
    assert "learning_rate: 0.0001 -> 0.001" in line
    assert (
        "network_def.correlation: LocalCostCorrelation3d(eps=1e-05, normalize='channel', radius=2) -> "
        "LocalCostCorrelation3d(eps=1e-05, normalize='global', radius=2)"
    ) in line
    assert "Restored" not in result.stdout + result.stderr and _files(root / "models") == before


# ------------------------------------------------------------------------------------------------------------
# 2. Interval checkpoints over resumes
# ------------------------------------------------------------------------------------------------------------


def test_2_interval_checkpoints_stay_within_n_saved_after_a_resume(roigan_run, tmp_path):
    root = _copy_of(roigan_run, tmp_path)
    result = run_checked(_roigan(root, "--max_epochs", "3"), root)  # extending a finished run is allowed
    assert f"Restored all variables from {root / 'models' / 'checkpoint_iteration=2.pt'}" in result.stdout
    # before: ignite's saver knew only its own files, and 1 and 2 of the first run stayed next to 5 and 6
    assert set(_files(root / "models")) == {"checkpoint_iteration=5.pt", "checkpoint_iteration=6.pt", "model.pt"}
    assert torch.load(root / "models" / "checkpoint_iteration=6.pt", weights_only=True)["trainer"]["iteration"] == 6


# ------------------------------------------------------------------------------------------------------------
# 3. The best model over a resume
# ------------------------------------------------------------------------------------------------------------


def test_3_rrn_model_pt_stays_the_best_of_the_whole_run(rrn_run, tmp_path):
    root = _copy_of(rrn_run, tmp_path)
    (best,) = torch.load(root / "models" / "checkpoint_iteration=2.pt", weights_only=True)["best_model"]["_saved"]
    model = _files(root / "models")["model.pt"]
    # the same validation pair with its moving landmarks 40 mm off: every later validation is worse
    content = _datalist(rrn_run)
    pair = content["validation"][0]
    points = np.loadtxt(pair["moving_landmarks"], delimiter=",", skiprows=1) + [40.0, 0.0, 0.0]
    pair["moving_landmarks"] = str(tmp_path / "shifted_moving_landmarks.csv")
    np.savetxt(pair["moving_landmarks"], points, delimiter=",", header="x,y,z", comments="", fmt="%.6f")
    datalist = _write_json(tmp_path / "hard" / "datalist.json", content)

    result = run_checked(_rrn(root, "--max_epochs", "2", "--datalist", str(datalist)), root)
    log = result.stdout + result.stderr
    assert f"Restored all variables from {root / 'models' / 'checkpoint_iteration=2.pt'}" in log
    worse = float(re.search(r"Epoch\[2\] Metrics -- val_mean_tre: ([0-9.]+)", log).group(1))
    assert worse > -best[0] + 10
    assert _files(root / "models")["model.pt"] == model  # the epoch-1 model stays the best
    final = torch.load(root / "models" / "checkpoint_iteration=4.pt", weights_only=True)
    assert [tuple(item) for item in final["best_model"]["_saved"]] == [tuple(best)]
    assert set(_files(root / "models")) == {
        "checkpoint_iteration=3.pt", "checkpoint_iteration=4.pt", "model.pt", "model_final.pt",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# 4. Images already scaled to [0, 1]
# ------------------------------------------------------------------------------------------------------------


def test_4_rrn_refuses_images_already_scaled_to_the_unit_range(rrn_run, tmp_path):
    content = _datalist(rrn_run)
    source = nib.load(content["training"][0]["fixed"])
    hu = np.asarray(source.dataobj, dtype=np.float32)
    scaled = tmp_path / "scaled_fixed.nii.gz"
    nib.save(nib.Nifti1Image(np.clip((hu + 1000.0) / 900.0, 0.0, 1.0), source.affine), scaled)
    content["training"][0]["fixed"] = str(scaled)
    root = tmp_path / "run"
    _write_json(root / "data" / "datalist.json", content)
    result = _failed(_rrn(root, "--max_epochs", "1"), root)
    line = _line(result.stderr, f"{scaled}: expected CT in Hounsfield units")
    assert "Is the image normalised" in line
    assert not (root / "models").exists() and not (root / "eval").exists()


# ------------------------------------------------------------------------------------------------------------
# 5. register.json resumes by the pairs' input files
# ------------------------------------------------------------------------------------------------------------


def _register(root: Path, output: Path) -> list[str]:
    """register.json without weights, one instance-optimisation step per level on a 32^3 grid."""
    return RRN.command(
        RRN.config("register"), root,
        "--output_dir", str(output),
        "--ckpt_path", str(root / "no_weights.pt"),
        "--settings#grid_size", str(GRID),
        "--settings#prealign", "none",
        "--settings#instance_steps", "1",
    )  # fmt: skip


def test_5_register_finds_finished_pairs_by_their_input_files(rrn_run, tmp_path):
    content = _datalist(rrn_run)
    first, second = content["training"]  # both moving files are called moving.nii.gz: folders moving, moving_2
    root, output = tmp_path / "run", tmp_path / "registrations"
    _write_json(root / "data" / "datalist.json", {"test": [first, second]})
    run_checked(_register(root, output), root)
    reports = {name: json.loads((output / name / "registration.json").read_text()) for name in ("moving", "moving_2")}
    assert reports["moving"]["inputs"]["moving"] == first["moving"]
    assert reports["moving_2"]["inputs"]["moving"] == second["moving"]
    stamps = {name: (output / name / "registration.json").stat().st_mtime_ns for name in reports}

    _write_json(root / "data" / "datalist.json", {"test": [second, first]})  # reordered
    run_checked(_register(root, output), root)
    assert {name: (output / name / "registration.json").stat().st_mtime_ns for name in reports} == stamps
    with open(output / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["pair"], row["moving"]) for row in rows] == [
        ("moving_2", second["moving"]),
        ("moving", first["moving"]),
    ]
    for row in rows:  # each row reports its own pair's TRE
        assert float(row["tre_after_mm"]) == pytest.approx(reports[row["pair"]]["tre_mm"]["after"]["mean"])


def test_5_register_never_takes_a_folder_recording_other_inputs(rrn_run, tmp_path, monkeypatch):
    """The folder rules, with a stand-in for the registration itself."""
    registered = []

    def fake_register_files(fixed, moving, output, fixed_landmarks=None, moving_landmarks=None, settings=None):
        registered.append((Path(output).name, moving))
        summary = {"settings": asdict(settings), "timings_s": {"all": 1.0}, "jacobian": {"folding_percent_in_lungs": 0}}
        (Path(output) / "registration.json").write_text(json.dumps(summary, default=str))
        return json.loads(json.dumps(summary, default=str))

    monkeypatch.setattr(datalist_registration, "register_files", fake_register_files)
    pair = _datalist(rrn_run)["training"][0]
    output = tmp_path / "registrations"
    other = dict(datalist_registration.pair_inputs(pair), moving="/elsewhere/moving.nii.gz")
    _write_json(output / "moving" / "registration.json", {"inputs": other, "settings": {}})  # another pair's result
    _write_json(output / "moving_2" / "registration.json", {"settings": {}})  # an earlier version's: no inputs
    settings = RegistrationSettings(grid_size=GRID, instance_steps=1)

    rows = datalist_registration.register_pairs([pair], output, settings)
    assert [row["pair"] for row in rows] == ["moving_3"] and len(registered) == 1
    assert json.loads((output / "moving" / "registration.json").read_text())["inputs"] == other
    assert "inputs" not in json.loads((output / "moving_2" / "registration.json").read_text())
    recorded = json.loads((output / "moving_3" / "registration.json").read_text())
    assert recorded["inputs"] == datalist_registration.pair_inputs(pair)

    datalist_registration.register_pairs([pair], output, settings)
    assert len(registered) == 1  # done: same inputs, same settings
    datalist_registration.register_pairs([pair], output, RegistrationSettings(grid_size=GRID, instance_steps=2))
    assert registered[-1][0].startswith(".moving_3") and len(registered) == 2  # other settings: again, in place
    assert sorted(p.name for p in output.iterdir()) == ["moving", "moving_2", "moving_3", "summary.csv"]
    assert json.loads((output / "moving_3" / "registration.json").read_text())["settings"]["instance_steps"] == 2


# ------------------------------------------------------------------------------------------------------------
# 6. One line naming the file
# ------------------------------------------------------------------------------------------------------------


def test_6_roigan_garbage_resume_checkpoint_is_named_and_nothing_is_written(roigan_run, tmp_path):
    root = _copy_of(roigan_run, tmp_path)
    newest = root / "models" / "checkpoint_iteration=2.pt"
    with zipfile.ZipFile(newest, "w") as archive:  # a zip, so it passes for complete, but not a checkpoint
        archive.writestr("junk.txt", "not a checkpoint")
    before = _files(root / "models")
    result = _failed(_roigan(root, "--max_epochs", "2"), root)
    _line(result.stderr, "CheckpointError", f"{newest}: not a readable PyTorch checkpoint")
    assert _files(root / "models") == before  # model.pt not rewritten from a half-loaded run

    for path in (root / "models").glob("checkpoint_*.pt"):  # only unreadable files left: no silent new run
        path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="no complete checkpoint to resume from"):
        latest_checkpoint(root / "models")


def test_6_roigan_garbage_model_is_named_by_inference(roigan_run, tmp_path):
    root = tmp_path / "run"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(b"garbage, not a checkpoint\n" * 10)
    output = root / "synthetic"
    command = ROIGAN.command(
        ROIGAN.config("inference"), root, *ROIGAN_NARROW,
        "--input_tiles", str(roigan_run / "data" / "test" / "he"), "--output_dir", str(output),
    )  # fmt: skip
    result = _failed(command, root)
    _line(result.stderr, "CheckpointError", f"{root / 'models' / 'model.pt'}: not a readable PyTorch checkpoint")
    assert not output.exists() or not any(output.iterdir())


def test_6_roigan_empty_tile_folder_is_named(roigan_run, tmp_path):
    data = tmp_path / "run" / "data"
    shutil.copytree(roigan_run / "data", data)
    for tile in (data / "train" / "he").iterdir():
        tile.unlink()
    result = _failed(_roigan(tmp_path / "run", "--max_epochs", "1"), tmp_path / "run")
    _line(result.stderr, f"tile folder {data / 'train' / 'he'} holds no PNG files")
    assert not (tmp_path / "run" / "models").exists()


def test_6_rrn_truncated_model_is_named_by_evaluate(rrn_run, tmp_path):
    root = _copy_of(rrn_run, tmp_path)
    model = root / "models" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    output = root / "evaluation"
    result = _failed(_rrn(root, "--output_dir", str(output), configs=("train", "evaluate")), root)
    _line(result.stderr, "CheckpointError", f"{model}: not a readable PyTorch checkpoint", "failed finding central")
    assert not output.exists() or not any(output.iterdir())


def test_6_rrn_empty_training_datalist_is_named(rrn_run, tmp_path):
    content = _datalist(rrn_run)
    content["training"] = []
    root = tmp_path / "run"
    datalist = _write_json(root / "data" / "datalist.json", content)
    result = _failed(_rrn(root, "--max_epochs", "1"), root)
    _line(result.stderr, f"{datalist}: section 'training' lists no pairs.")
    assert "num_samples" not in result.stderr and not (root / "models").exists()


def test_6_rrn_truncated_nifti_is_named(rrn_run, tmp_path):
    content = _datalist(rrn_run)
    whole = Path(content["training"][1]["moving"]).read_bytes()
    assert gzip.decompress(whole)  # a complete .nii.gz; cut in half below
    truncated = tmp_path / "truncated_moving.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    content["training"][1]["moving"] = str(truncated)
    root = tmp_path / "run"
    _write_json(root / "data" / "datalist.json", content)
    result = _failed(_rrn(root, "--max_epochs", "1"), root)
    line = _line(result.stderr, f"{truncated}: cannot read the image")
    assert "EOFError" in line and "is the file complete?" in line
    assert not (root / "models").exists()


# ------------------------------------------------------------------------------------------------------------
# 7. The released-code preset
# ------------------------------------------------------------------------------------------------------------


def test_7_released_code_preset_matches_the_released_config(roigan_run):
    """Released config: 6 residual blocks, 25 epochs of 200 steps, batches of 8 tiles (4 with cancer boxes, 4
    without) with 64 RoIs, and a learning-rate factor ``1 - max(0, e - 12) / 13`` in 0-based epoch ``e``
    (the scheduler stepped once after each epoch)."""
    parser = ConfigParser()
    parser.read_config([ROIGAN.config("train"), ROIGAN.config("presets/released_code")])
    parser.update({"bundle_root": str(roigan_run), "tile_size": TINY, "device": "$torch.device('cpu')"})
    narrow = dict(zip(ROIGAN_NARROW[::2], ROIGAN_NARROW[1::2], strict=True))
    parser.update({k.lstrip("-"): json.loads(v) for k, v in narrow.items() if k != "--generator_blocks"})
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.g_xy.num_blocks == 6 and trainer.g_yx.num_blocks == 6
    assert trainer.state.max_epochs == 25
    assert parser.get_parsed_content("train#dataloader").batch_size == 8
    assert len(parser.get_parsed_content("train#dataloader")) == 200  # 200 steps, whatever the number of tiles
    assert trainer.state.epoch_length == 200

    sampling = parser.get_parsed_content("train#dataset").sampling
    with_cancer = {sampling.positive_only, sum(sampling.mixed)}  # a cancer-only or a mixed tile
    assert with_cancer == {10} and 4 * 10 + 4 * sampling.negative_only == 64

    base = parser.get_parsed_content("learning_rate")
    factors = []
    for epoch in range(25):  # what the trainer does at each epoch start
        trainer.state.epoch, trainer.state.iteration = epoch + 1, epoch * 200
        trainer._prepare_epoch(trainer)
        factors.append(trainer.g_optimizer.param_groups[0]["lr"] / base)
    assert factors == pytest.approx([1 - max(0, e - 12) / 13 for e in range(25)])
    assert factors[12] == 1.0 and factors[13] == pytest.approx(0.923, abs=1e-3)
    assert factors[24] == pytest.approx(0.0769, abs=1e-4)
    assert trainer.d_optimizer.param_groups[0]["lr"] == pytest.approx(base * factors[24])
