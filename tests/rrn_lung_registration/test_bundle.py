"""The RRN bundle through ``python -m monai.bundle``: training, resume, inference, evaluation, torchrun,
``verify_net_in_out`` and ``ckpt_export`` (TorchScript) on the metadata's two-channel ``image`` input.

Every run uses the real configs with command-line overrides for a small grid and a narrow network, on
phantom pairs written by the test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata
from monai.data import load_net_with_metadata

from rrn_lung_registration.synthetic.phantom import make_dataset
from tests.bundle_cli import TIMEOUT, BundleCLI, run_checked, subprocess_env
from tests.conftest import REPO_ROOT

BUNDLE = REPO_ROOT / "bundles" / "rrn_lung_registration"
CONFIGS = BUNDLE / "configs"
SCHEMA = REPO_ROOT / "bundles" / "schema" / "meta_schema_20240725.json"
GRID = 32
SMALL = [
    "--image_size", f"[{GRID},{GRID},{GRID}]",
    "--num_workers", "0",
    "--network_def#pyramid_channels", "[8,8,16,16]",
    "--network_def#estimator_channels", "[16,16,16,16,8]",
    "--network_def#refiner_channels", "[16,16,16,16,16,8,3]",
]  # fmt: skip


CLI = BundleCLI("rrn_lung_registration")
_config, _env, _run = CLI.config, subprocess_env, run_checked


def _command(config: str, root: Path, *extra: str) -> list[str]:
    return CLI.command(config, root, *SMALL, *extra)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory) -> Path:
    """A bundle root with phantom data (2 training pairs, 1 validation pair, which is also the test pair)."""
    root = tmp_path_factory.mktemp("rrn_bundle")
    datalist = make_dataset(root / "data", n_pairs=3, shape=(GRID, GRID, GRID), seed=11, n_validation=1)
    content = json.loads(datalist.read_text())
    content["test"] = content["validation"]
    datalist.write_text(json.dumps(content, indent=2))
    return root


@pytest.fixture(scope="module")
def trained(bundle_root) -> subprocess.CompletedProcess:
    return _run(_command(_config("train"), bundle_root, "--max_epochs", "2", "--save_interval", "1"), bundle_root)


@pytest.mark.filterwarnings("ignore:No hash value provided")
def test_metadata_validates_against_the_shipped_schema():
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))


def test_bundle_folder_has_the_model_zoo_files():
    for name in ("train", "inference", "evaluate", "multi_gpu_train", "metadata"):
        json.loads((CONFIGS / f"{name}.json").read_text())
    for name in ("configs/logging.conf", "docs/README.md", "LICENSE", "large_files.json"):
        assert (BUNDLE / name).is_file(), name


def test_training_saves_checkpoints_and_reports_tre(trained, bundle_root):
    models = bundle_root / "models"
    assert {"model.pt", "model_final.pt", "checkpoint_iteration=4.pt"} <= {p.name for p in models.iterdir()}
    final = torch.load(models / "model_final.pt", weights_only=True)
    assert set(final) == {"network", "optimizer", "trainer", "best_model", "settings"}
    assert final["trainer"]["iteration"] == 4
    best = torch.load(models / "model.pt", weights_only=True)
    assert set(best) == set(final["network"])
    assert "val_mean_tre" in trained.stdout + trained.stderr


def test_killed_training_resumes_where_it_stopped(bundle_root, tmp_path):
    root = tmp_path / "resume"
    root.mkdir()
    (root / "data").symlink_to(bundle_root / "data")
    command = _command(_config("train"), root, "--max_epochs", "4", "--save_interval", "1", "--val_interval", "10")
    process = subprocess.Popen(command, cwd=root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = root / "models" / "checkpoint_iteration=3.pt"
    deadline = time.monotonic() + TIMEOUT
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = sorted(root.glob("models/checkpoint_iteration=*.pt"))
    assert saved and not (root / "models" / "model_final.pt").exists(), "the run was not interrupted mid-way"
    stopped_at = torch.load(saved[-1], weights_only=True)["trainer"]["iteration"]
    assert 3 <= stopped_at < 8

    resumed = _run(command, root)
    log = resumed.stdout + resumed.stderr
    assert f"Restored all variables from {saved[-1]}" in log
    first_saved = [int(line.rsplit(":", 1)[1]) for line in log.splitlines() if "Saved checkpoint at iteration" in line]
    assert first_saved[0] == stopped_at + 1  # it went on from the next iteration, not from the start
    final = torch.load(root / "models" / "model_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 8 and final["trainer"]["epoch_length"] == 2


def test_inference_writes_outputs_on_the_fixed_grid(trained, bundle_root):
    _run(_command(_config("inference"), bundle_root, "--output_dir", str(bundle_root / "infer")), bundle_root)
    fixed = nib.load(bundle_root / "data" / "pair_002" / "fixed.nii.gz")
    # one pair in the section: named after its moving file (tests/test_bundle_travel.py: several, absolute paths)
    assert {p.name for p in (bundle_root / "infer").iterdir()} == {"moving_warped.nii.gz", "moving_ddf.nii.gz"}
    warped = nib.load(bundle_root / "infer" / "moving_warped.nii.gz")
    ddf = nib.load(bundle_root / "infer" / "moving_ddf.nii.gz")
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine, atol=1e-4)
    assert ddf.shape == (GRID, GRID, GRID, 3)
    assert np.isfinite(np.asarray(warped.dataobj)).all() and np.isfinite(np.asarray(ddf.dataobj)).all()


def test_evaluate_writes_a_tre_report(trained, bundle_root):
    out = bundle_root / "evaluation"
    _run(_command(_config("train", "evaluate"), bundle_root, "--output_dir", str(out)), bundle_root)
    summary = json.loads((out / "tre_summary.json").read_text())
    rows = (out / "tre_per_pair.csv").read_text().splitlines()
    assert summary["pairs"] == 1 and len(rows) == 2
    pair = bundle_root / "data" / "pair_002"
    fixed_points, moving_points = (
        np.loadtxt(pair / f"{k}_landmarks.csv", delimiter=",", skiprows=1) for k in ("fixed", "moving")
    )
    world = np.linalg.norm(fixed_points - moving_points, axis=1).mean()
    assert summary["before"]["mean_of_pair_means"] == pytest.approx(world, abs=1e-3)
    assert np.isfinite(summary["after"]["landmarks"]["mean"])


def _absolute_datalist(bundle_root: Path) -> dict:
    content = json.loads((bundle_root / "data" / "datalist.json").read_text())
    for section in content.values():
        for pair in section:
            pair.update({key: str(bundle_root / "data" / value) for key, value in pair.items()})
    return content


def _write_datalist(root: Path, content: dict) -> None:
    (root / "data").mkdir(parents=True)
    (root / "data" / "datalist.json").write_text(json.dumps(content))


def test_missing_file_in_the_datalist_is_named(bundle_root, tmp_path):
    content = _absolute_datalist(bundle_root)
    content["training"][0]["moving"] = str(tmp_path / "missing_moving.nii.gz")
    root = tmp_path / "broken"
    _write_datalist(root, content)
    command = _command(_config("train"), root, "--max_epochs", "1")
    result = subprocess.run(command, cwd=root, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert f"pair 0 ('moving'): file not found: {tmp_path / 'missing_moving.nii.gz'}" in result.stderr


def test_distributed_training_with_gloo(bundle_root, tmp_path):
    content = _absolute_datalist(bundle_root)
    content["validation"] = content["validation"] + content["training"][:1]  # one validation pair per rank
    root = tmp_path / "ddp"
    _write_datalist(root, content)
    command = _command(_config("train", "multi_gpu_train"), root, "--max_epochs", "1", "--save_interval", "1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        *command[1:],
    ]
    result = _run(command, root)
    final = torch.load(root / "models" / "model_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 1  # two training pairs shared by two ranks: one iteration each
    assert not any(key.startswith("module.") for key in final["network"])
    assert "val_mean_tre" in result.stdout + result.stderr


def _bundle_script(script: str, *args: str) -> list[str]:
    """``python -m monai.bundle <script> network_def`` on the inference config, the small grid and network."""
    return [
        sys.executable, "-m", "monai.bundle", script, "network_def",
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--config_file", _config("inference"),
        *args,
        *SMALL,
    ]  # fmt: skip


def _narrow_network() -> torch.nn.Module:
    """The inference config's ``network_def`` with the overrides of ``SMALL``."""
    parser = ConfigParser()
    parser.read_config(_config("inference"))
    for key, value in zip(SMALL[::2], SMALL[1::2], strict=True):
        parser[key.lstrip("-")] = json.loads(value)
    return parser.get_parsed_content("network_def")


def test_verify_net_in_out_feeds_the_two_channel_image(tmp_path):
    spatial = f"[{GRID},{GRID},{GRID}]"  # the metadata's 256^3 grid is the bundle's, not needed here
    command = _bundle_script(
        "verify_net_in_out", "--device", "cpu", "--_meta_#network_data_format#inputs#image#spatial_shape", spatial
    )
    result = _run(command, tmp_path)
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_ckpt_export_traces_a_torchscript_model_of_the_trained_weights(trained, bundle_root, tmp_path):
    exported = tmp_path / "model.ts"
    checkpoint = bundle_root / "models" / "model.pt"
    shape = f"[1,2,{GRID},{GRID},{GRID}]"
    command = _bundle_script(
        "ckpt_export", "--filepath", str(exported), "--ckpt_file", str(checkpoint),
        "--use_trace", "True", "--input_shape", shape,
    )  # fmt: skip
    _run(command, tmp_path)

    scripted, meta, _ = load_net_with_metadata(str(exported))
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    eager = _narrow_network().eval()
    eager.load_state_dict(torch.load(checkpoint, weights_only=True))
    pair = torch.rand(1, 2, GRID, GRID, GRID, generator=torch.Generator().manual_seed(3))  # not the traced input
    with torch.no_grad():
        expected = eager(pair[:, :1], pair[:, 1:])
        got = scripted(pair)
    assert got.shape == (1, 3, GRID, GRID, GRID)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    with torch.no_grad():  # a batch of two pairs: the batch size stays free
        batch = torch.cat([pair, pair.flip(2)])
        torch.testing.assert_close(scripted(batch)[1:], eager(batch[1:, :1], batch[1:, 1:]), rtol=0, atol=1e-5)
    # any other grid is refused: the trace holds its grid's sizes as constants and would return a wrong field
    for other in ((GRID + 16,) * 3, (GRID, GRID, GRID + 8)):
        with torch.no_grad(), pytest.raises(RuntimeError, match=rf"expanded size of the tensor \({GRID}\) must match"):
            scripted(torch.rand(1, 2, *other))


def test_register_config_runs_the_physical_space_pipeline_over_the_datalist(trained, bundle_root):
    """configs/register.json: lung masks, pre-alignment, the trained network (models/model.pt) and a few
    instance-optimisation steps per pair, outputs on each fixed image's own grid, and a summary table."""
    out = bundle_root / "registrations"
    command = CLI.command(
        _config("register"), bundle_root,
        "--output_dir", str(out),
        "--network_kwargs#pyramid_channels", "[8,8,16,16]",
        "--network_kwargs#estimator_channels", "[16,16,16,16,8]",
        "--network_kwargs#refiner_channels", "[16,16,16,16,16,8,3]",
        "--settings#grid_size", str(GRID),
        "--settings#prealign", "rigid",
        "--settings#instance_steps", "2",
    )  # fmt: skip
    _run(command, bundle_root)
    fixed = nib.load(bundle_root / "data" / "pair_002" / "fixed.nii.gz")
    folder = out / "moving"  # named after the moving file when the pair has no "name"
    field = nib.load(folder / "displacement_field.nii")
    assert field.shape[:3] == fixed.shape and np.allclose(field.affine, fixed.affine, atol=1e-4)
    report = json.loads((folder / "registration.json").read_text())
    assert report["settings"]["weights"].endswith("model.pt") and "network" in report["timings_s"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("pair,tre_before_mm") and len(rows) == 2
    # a second run finds the finished pair and only rewrites the summary
    before = (folder / "registration.json").stat().st_mtime_ns
    _run(command, bundle_root)
    assert (folder / "registration.json").stat().st_mtime_ns == before
