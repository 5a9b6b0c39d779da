"""The ways users start whole-slide work: the command line, torchrun over a folder, the bundle config."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys

import numpy as np
import openslide
import pytest
import torch

from roigan_stain_transfer.__main__ import check_options
from roigan_stain_transfer.networks import ResnetGenerator
from tests.bundle_cli import BundleCLI, run_checked, subprocess_env
from tests.roigan_stain_transfer.wsi.conftest import write_slide

QUIET = ["--num_workers", "0", "--progress", "False"]
TINY = ["--generator_blocks", "1", "--generator_channels", "8", *QUIET]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save({"g_xy": ResnetGenerator(base_channels=8, num_blocks=1).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory, cmu_region):
    folder = tmp_path_factory.mktemp("slides")
    write_slide(folder / "a.tif", [np.ascontiguousarray(cmu_region[:640, :768])], mpp=0.5)
    write_slide(folder / "b.tif", [np.ascontiguousarray(cmu_region[1600:2240, 900:1668])], mpp=0.5)
    return folder


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "roigan_stain_transfer", *args]
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_infer_slide_command(cmu_slide, weights, tmp_path):
    out = tmp_path / "virtual.tiff"
    # no generator sizes given: those the checkpoint records (1 block, 8 channels), not the paper's 9 and 64
    result = _cli(
        "infer-slide", "--input", str(cmu_slide), "--output", str(out), "--weights", weights, *QUIET, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"-> {out}" in result.stdout and "tiles" in result.stdout
    with openslide.OpenSlide(str(out)) as slide:
        assert slide.dimensions == (2220, 2967)
    again = _cli(
        "infer-slide", "--input", str(cmu_slide), "--output", str(out), "--weights", weights, *TINY, cwd=tmp_path
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_unknown_options_and_missing_weights_fail_before_any_work(cmu_slide, tmp_path):
    out = tmp_path / "never.tiff"
    mistyped = _cli("infer-slide", "--input", str(cmu_slide), "--output", str(out), "--gridsize", "3", cwd=tmp_path)
    assert mistyped.returncode == 2 and "unknown option --gridsize" in mistyped.stderr
    no_weights = _cli("infer-slide", "--input", str(cmu_slide), "--output", str(out), cwd=tmp_path)
    assert no_weights.returncode != 0 and "--weights is required" in no_weights.stderr
    assert list(tmp_path.iterdir()) == []
    assert check_options(["infer-slide", "--tile-size", "128", "--nooverwrite"]) is None
    assert "unknown command" in check_options(["infer-slides"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_splits_slides_across_processes(slide_folder, weights, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "roigan_stain_transfer", "infer-slide", "--input", str(slide_folder), "--output", str(out),
        "--weights", weights, "--tile_size", "128", "--normalization", "dense", *TINY,
    ]  # fmt: skip
    run_checked(command, cwd=tmp_path)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {(out / "a.tiff").is_file(), (out / "b.tiff").is_file()} == {True}

    ranks = {r["rank"] for r in json.loads((out / "summary.json").read_text())}
    assert ranks == {0, 1}  # each process translated its own slide


def test_bundle_config_over_a_folder_reports_failed_slides(slide_folder, weights, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tif", "b.tif"):
        (folder / name).write_bytes((slide_folder / name).read_bytes())
    (folder / "broken.svs").write_bytes(b"II*\x00 not a slide")
    bundle = BundleCLI("roigan_stain_transfer")
    out = tmp_path / "out"
    overrides = [
        "--slides", str(folder), "--output_dir", str(out), "--ckpt_path", weights, "--generator_blocks", "1",
        "--generator_channels", "8", "--num_workers", "0", "--progress", "false", "--tile_size", "128",
    ]  # fmt: skip
    command = bundle.command(bundle.config("infer_slides"), tmp_path, *overrides)
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "broken.svs" in result.stderr
    rows = {r["slide"].rsplit("/", 1)[-1]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["broken.svs"]["status"] == "failed" and "broken.svs" in rows["broken.svs"]["error"]
    assert rows["a.tif"]["status"] == rows["b.tif"]["status"] == "ok"
    with openslide.OpenSlide(str(out / "a.tiff")) as slide:
        assert slide.dimensions == (768, 640)


def test_extract_tiles_command(cmu_slide, tmp_path):
    result = _cli(
        "extract-tiles", "--slides", str(cmu_slide), "--output", str(tmp_path / "data"), "--stain", "ihc",
        "--tiles_per_class", "2", "--library", "False", "--progress", "False", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["tiles"] == 2
    assert len(list((tmp_path / "data" / "train" / "ihc").glob("*.png"))) == 2
