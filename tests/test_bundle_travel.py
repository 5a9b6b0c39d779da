"""Bundles that travel: ``make bundles`` zips, downloaded with ``monai.bundle download`` into an empty folder and
run from another working directory, offline, with the project installed and the checkout off the import path
(``tests/bundle_travel.py`` says how): the zip's content, ``verify_metadata`` with the shipped schema,
``verify_net_in_out``, ``ckpt_export`` (RRN traced, generator scripted), the inference config writing into its
``output_dir`` from absolute input paths, and the error for a checkpoint of another network.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from tests.bundle_travel import GRID, SCHEMA_MD5, TILE, Travelled, bundle_command, run, travelled

pytestmark = pytest.mark.slow
BUNDLES = ("rrn_lung_registration", "roigan_stain_transfer")


@pytest.fixture(scope="module", params=BUNDLES)
def bundle(request, tmp_path_factory) -> Travelled:
    return travelled(request.param, tmp_path_factory.getbasetemp())


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_zip_holds_the_bundle_and_the_schema_but_no_code(bundle):
    with zipfile.ZipFile(bundle.zip) as archive:
        names = set(archive.namelist())
    name = bundle.name
    assert {n.split("/")[0] for n in names} == {name}
    for required in ("configs/inference.json", "configs/metadata.json", "configs/train.json", "docs/README.md",
                     "LICENSE", "large_files.json", "schema/meta_schema_20240725.json"):  # fmt: skip
        assert f"{name}/{required}" in names
    assert not any(n.endswith(".py") or "__pycache__" in n for n in names), "the code comes from the installed project"
    metadata = json.loads((bundle.configs / "metadata.json").read_text())
    assert "monai-rrn-roigan" not in metadata["required_packages_version"]
    assert metadata["project_package"]["name"] == "monai-rrn-roigan"


def test_commands_see_the_installed_project_not_the_checkout(bundle):
    """The packages import from the installed distribution; the checkout's other folders do not import."""
    probe = (
        "import importlib.metadata, importlib.util, json, sys\n"
        "def where(name):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    return [] if spec is None else [str(p) for p in (spec.submodule_search_locations or [spec.origin])]\n"
        "names = ['tests', 'bench', 'scripts', 'rrn_lung_registration', 'roigan_stain_transfer', 'shared_ops']\n"
        "print(json.dumps({'path': sys.path, 'where': {n: where(n) for n in names},"
        " 'version': importlib.metadata.version('monai-rrn-roigan')}))"
    )
    seen = json.loads(run([sys.executable, "-c", probe], cwd=bundle.work).stdout)
    repo = Path(__file__).resolve().parents[1]
    assert str(repo) not in seen["path"] and "" not in seen["path"][1:]
    for folder in ("tests", "bench", "scripts"):  # on the path only if the checkout were
        assert str(repo / folder) not in seen["where"][folder], seen["where"][folder]
    for package in ("rrn_lung_registration", "roigan_stain_transfer", "shared_ops"):
        assert seen["where"][package], f"{package} is not installed"
    assert seen["version"]
    assert not list(bundle.work.iterdir()), "commands wrote into their working directory"


def test_verify_metadata_runs_offline_with_the_shipped_schema(bundle):
    schema = bundle.bundle / "schema" / "meta_schema_20240725.json"
    result = run(
        bundle_command(
            "verify_metadata", "--meta_file", str(bundle.configs / "metadata.json"),
            "--filepath", str(schema), "--hash_val", SCHEMA_MD5, "--hash_type", "md5",
        ),
        cwd=bundle.work,
    )  # fmt: skip
    assert "metadata is verified with no error" in result.stdout + result.stderr
    # the same command without the shipped schema has to download it, which fails here: the check is offline
    missing = bundle.root / "no_schema" / "meta_schema_20240725.json"
    refused = run(
        bundle_command(
            "verify_metadata", "--meta_file", str(bundle.configs / "metadata.json"), "--filepath", str(missing)
        ),
        cwd=bundle.work,
        check=False,
    )
    assert refused.returncode != 0


def test_verify_net_in_out_feeds_the_metadata_input(bundle):
    spatial = f"[{GRID},{GRID},{GRID}]" if bundle.name == "rrn_lung_registration" else f"[{TILE},{TILE}]"
    result = run(
        bundle_command(
            "verify_net_in_out", "network_def", "--config_file", str(bundle.configs / "inference.json"),
            *bundle.common(), "--device", "cpu", "--_meta_#network_data_format#inputs#image#spatial_shape", spatial,
        ),
        cwd=bundle.work,
    )  # fmt: skip
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_ckpt_export_wrote_torchscript_with_metadata_and_config(bundle):
    with zipfile.ZipFile(bundle.model_ts) as archive:
        names = set(archive.namelist())
        meta = json.loads(archive.read("model/extra/metadata.json"))
        config = json.loads(archive.read("model/extra/inference.json"))
    assert {"model/extra/metadata.json", "model/extra/inference.json"} <= names  # what MONAI Deploy reads
    assert meta["version"] == json.loads((bundle.configs / "metadata.json").read_text())["version"]
    assert {"preprocessing", "inferer", "postprocessing"} <= set(config)
    module = torch.jit.load(str(bundle.model_ts))
    if bundle.name == "roigan_stain_transfer":  # scripted: any tile size, not only the one of an example input
        assert module(torch.zeros(1, 3, 2 * TILE, TILE)).shape == (1, 3, 2 * TILE, TILE)


def test_inference_writes_into_its_output_dir_from_absolute_input_paths(bundle):
    assert not (bundle.bundle / "eval").exists() and not list(bundle.work.iterdir())
    inputs_before = {p for p in _files(bundle.inputs)}
    if bundle.name == "rrn_lung_registration":
        pairs = json.loads((bundle.inputs / "datalist.json").read_text())["test"]
        assert all(Path(pair["fixed"]).is_absolute() for pair in pairs)
        written = _files(bundle.out)
        assert written == {f"pair_{i:03d}_moving_{kind}.nii.gz" for i in range(2) for kind in ("warped", "ddf")}
        fixed = nib.load(pairs[0]["fixed"])
        warped = nib.load(bundle.out / "pair_000_moving_warped.nii.gz")
        ddf = nib.load(bundle.out / "pair_000_moving_ddf.nii.gz")
        assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine, atol=1e-4)
        assert ddf.shape == (GRID, GRID, GRID, 3) and np.isfinite(np.asarray(ddf.dataobj)).all()
        assert np.abs(np.asarray(ddf.dataobj)).max() > 0.01  # the network moved something
    else:
        assert _files(bundle.out) == {f"tile_{i}.png" for i in range(3)}
        with Image.open(bundle.out / "tile_0.png") as tile:
            assert tile.mode == "RGB" and tile.size == (TILE, TILE)
    assert _files(bundle.inputs) == inputs_before  # nothing next to the inputs


MISMATCH = {
    "rrn_lung_registration": (
        ["--network_def#pyramid_channels", "[8,8,16,32]"],
        "the weights were trained with other RRN settings than this configuration builds: pyramid_channels: "
        "checkpoint [8, 8, 16, 16], configuration [8, 8, 16, 32]. To use this checkpoint, run with: "
        "--network_def#pyramid_channels '[8,8,16,16]'.",
    ),
    "roigan_stain_transfer": (
        ["--generator_blocks", "2", "--upsampling", "resize"],
        "the weights were trained with other ResnetGenerator settings than this configuration builds: num_blocks: "
        'checkpoint 1, configuration 2; upsampling: checkpoint "transposed", configuration "resize". To use this '
        "checkpoint, run with: --generator_blocks 1 --upsampling transposed.",
    ),
}


def test_a_checkpoint_of_another_network_is_refused_naming_both_values(bundle, tmp_path):
    overrides, message = MISMATCH[bundle.name]
    inputs = ["--datalist", str(bundle.inputs / "datalist.json")] if bundle.name == "rrn_lung_registration" else []
    inputs += ["--input_tiles", str(bundle.inputs / "tiles")] if bundle.name == "roigan_stain_transfer" else []
    result = run(
        bundle_command(
            "run", "--config_file", str(bundle.configs / "inference.json"), *bundle.common(),
            "--output_dir", str(tmp_path / "out"), *inputs, *overrides,
        ),
        cwd=bundle.work,
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    model = bundle.bundle / "models" / "model.pt"
    key = "network" if bundle.name == "rrn_lung_registration" else "g_xy"
    assert f"CheckpointError: {model}: {key!r}: {message}" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()
