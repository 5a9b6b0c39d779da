"""`make bundles`: zips that `monai.bundle download` unpacks and that run from their own folder.

The zips hold no package code: the configs import the installed project (``tests/test_bundle_travel.py`` runs
the downloaded bundles from another folder, offline, with the checkout off the import path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rrn_lung_registration.synthetic.phantom import make_dataset
from tests.conftest import REPO_ROOT

BUNDLES = ("rrn_lung_registration", "roigan_stain_transfer")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "scripts/pack_bundles.py", "--out", str(out)], cwd=REPO_ROOT, check=True)
    return out


@pytest.mark.parametrize("name", BUNDLES)
def test_zip_holds_the_bundle_and_the_schema_and_no_package_code(packed, name):
    version = json.loads((REPO_ROOT / "bundles" / name / "configs" / "metadata.json").read_text())["version"]
    with zipfile.ZipFile(packed / f"{name}_v{version}.zip") as archive:
        names = set(archive.namelist())
        schema = archive.read(f"{name}/schema/meta_schema_20240725.json")
    assert {n.split("/")[0] for n in names} == {name}
    for required in ("configs/train.json", "configs/metadata.json", "docs/README.md", "LICENSE", "large_files.json"):
        assert f"{name}/{required}" in names
    assert schema == (REPO_ROOT / "bundles" / "schema" / "meta_schema_20240725.json").read_bytes()
    assert not any(n.endswith((".py", ".pyc", ".c")) or "__pycache__" in n for n in names)


@pytest.mark.slow
def test_downloaded_bundle_runs_from_its_own_folder(packed, tmp_path):
    zip_path = next(packed.glob("rrn_lung_registration_v*.zip"))
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "rrn_lung_registration",
         "--url", zip_path.as_uri(), "--bundle_dir", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = tmp_path / "rrn_lung_registration"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    assert not list(bundle.glob("**/*.py"))  # the installed project's code runs

    make_dataset(bundle / "data", n_pairs=2, shape=(32, 32, 32), seed=3, n_validation=1)
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         "--image_size", "[32,32,32]", "--num_workers", "0", "--max_epochs", "1",
         "--network_def#pyramid_channels", "[8,8,16,16]", "--network_def#estimator_channels", "[16,16,16,16,8]",
         "--network_def#refiner_channels", "[16,16,16,16,16,8,3]"],
        cwd=bundle, env={**env, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert (bundle / "models" / "model_final.pt").is_file()
