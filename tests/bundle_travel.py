"""A bundle as a new user gets it: packed by ``make bundles``, downloaded into an empty folder, run from elsewhere.

:func:`travelled` does, once per bundle and test session (the result is reused by ``tests/test_bundle_travel.py``
and ``tests/integrations/test_deploy.py``):

1. ``scripts/pack_bundles.py`` writes the zips;
2. ``python -m monai.bundle download --name NAME --url file://...zip --bundle_dir EMPTY`` unpacks one;
3. the user's own settings go into the downloaded ``configs/inference.json`` (a small grid and a narrow network:
   what a user who trained such a network writes there; ``ckpt_export`` embeds the config file as it is on
   disk, not command-line overrides, so MONAI Deploy runs these values);
4. a checkpoint of that network is written to ``models/model.pt`` (random weights: no weights were published);
5. ``ckpt_export`` writes ``models/model.ts``;
6. the bundle's ``inference.json`` runs on inputs kept outside the bundle (absolute paths), into ``out/``.

Every command runs in a subprocess whose working directory is an empty folder (``work/``) and whose environment
has no ``PYTHONPATH``: the repository checkout is not on its import path, the project's packages come from
the installed distribution (an editable install here: a path hook for the three packages, not the checkout on
``sys.path``). Downloads are made to fail (an unreachable proxy), so nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from PIL import Image

from rrn_lung_registration.synthetic.phantom import make_dataset
from tests.conftest import REPO_ROOT

TIMEOUT = 600
GRID = 32
TILE = 64
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"  # bundles/schema/meta_schema_20240725.json
UNREACHABLE_PROXY = "http://127.0.0.1:9"

#: The user's own settings written into the downloaded configs/inference.json, per bundle.
SETTINGS = {
    "rrn_lung_registration": {
        "image_size": [GRID, GRID, GRID],
        "num_workers": 0,
        "network_def#pyramid_channels": [8, 8, 16, 16],
        "network_def#estimator_channels": [16, 16, 16, 16, 8],
        "network_def#refiner_channels": [16, 16, 16, 16, 16, 8, 3],
    },
    "roigan_stain_transfer": {"num_workers": 0, "batch_size": 2, "generator_channels": 4, "generator_blocks": 1},
}
#: ckpt_export arguments: the RRN is traced (its forward does not script), the generator scripted.
EXPORT = {
    "rrn_lung_registration": [
        "--use_trace", "True", "--input_shape", f"[1,2,{GRID},{GRID},{GRID}]",
        # torch's own re-run check of the trace; the Deploy replay test compares the module with the network instead
        "--converter_kwargs", "{'check_trace': False}",
    ],
    "roigan_stain_transfer": [],
}  # fmt: skip


def offline_env() -> dict[str, str]:
    """The environment of every bundle command: no PYTHONPATH, one thread, downloads fail."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"OMP_NUM_THREADS": "1", "NO_PROXY": "", "no_proxy": ""})
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[key] = UNREACHABLE_PROXY
    return env


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True, **kwargs):
    """Run ``command`` (``kwargs`` go to ``subprocess.run``); with ``check``, a failure shows the command and the end
    of its output."""
    result = subprocess.run(
        command, cwd=cwd, env=env or offline_env(), capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    if check:
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def bundle_command(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", script, *args]


@dataclass(frozen=True)
class Travelled:
    """One downloaded bundle and where things are."""

    name: str
    root: Path  # everything of this bundle's run
    dist: Path  # the packed zips
    zip: Path
    bundle: Path  # the downloaded bundle folder
    work: Path  # the (empty) working directory of every command
    inputs: Path  # input data, outside the bundle
    out: Path  # output_dir of the inference run

    @property
    def configs(self) -> Path:
        return self.bundle / "configs"

    @property
    def model_ts(self) -> Path:
        return self.bundle / "models" / "model.ts"

    def common(self) -> list[str]:
        """Arguments every bundle command of this bundle takes."""
        return ["--meta_file", str(self.configs / "metadata.json"), "--bundle_root", str(self.bundle)]


def _write_settings(config: Path, settings: dict) -> None:
    content = json.loads(config.read_text())
    for key, value in settings.items():
        node = content
        *parents, last = key.split("#")
        for part in parents:
            node = node[part]
        node[last] = value
    config.write_text(json.dumps(content, indent=4) + "\n")


def network_of(config: Path) -> torch.nn.Module:
    """``network_def`` of a bundle config file, as the file states it."""
    parser = ConfigParser()
    parser.read_config(str(config))
    return parser.get_parsed_content("network_def")


def _write_checkpoint(travelled: Travelled) -> None:
    torch.manual_seed(7)
    network = network_of(travelled.configs / "inference.json")
    if travelled.name == "rrn_lung_registration":
        for parameter in network.parameters():  # fields of a few voxels, not the near-zero start of training
            torch.nn.init.normal_(parameter, std=0.02)
    (travelled.bundle / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), travelled.bundle / "models" / "model.pt")


def _write_inputs(travelled: Travelled) -> list[str]:
    """Input data outside the bundle; the inference arguments that name it (absolute paths)."""
    if travelled.name == "rrn_lung_registration":
        datalist = make_dataset(travelled.inputs, n_pairs=2, shape=(GRID, GRID, GRID), seed=5)
        content = json.loads(datalist.read_text())
        pairs = [
            {k: str(travelled.inputs / v) for k, v in p.items() if k in ("fixed", "moving")}
            for p in content["training"]
        ]
        datalist.write_text(json.dumps({"test": pairs}, indent=2))
        return ["--datalist", str(datalist), "--datalist_section", "test"]
    tiles = travelled.inputs / "tiles"
    tiles.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for index in range(3):
        pixels = rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8)
        pixels[: TILE // 2] = pixels[: TILE // 2] // 2 + 100  # some structure: two halves of different tone
        Image.fromarray(pixels).save(tiles / f"tile_{index}.png")
    return ["--input_tiles", str(tiles)]


def travelled(name: str, base: Path) -> Travelled:
    """The bundle ``name`` packed, downloaded, configured, exported and run once (see the module notes)."""
    root = base / f"travel_{name}"
    item = Travelled(
        name=name, root=root, dist=root / "dist", zip=root / "dist", bundle=root / "downloads" / name,
        work=root / "work", inputs=root / "inputs", out=root / "out",
    )  # fmt: skip
    ready = root / "ready.json"
    if ready.is_file():
        recorded = json.loads(ready.read_text())
        return Travelled(**{**item.__dict__, "zip": Path(recorded["zip"])})

    for folder in (item.dist, item.work, item.inputs, item.bundle.parent):
        folder.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "scripts/pack_bundles.py", "--out", str(item.dist)], cwd=REPO_ROOT, env=os.environ.copy())
    version = json.loads((REPO_ROOT / "bundles" / name / "configs" / "metadata.json").read_text())["version"]
    zip_path = item.dist / f"{name}_v{version}.zip"
    assert not any(item.bundle.parent.iterdir()), "the download folder must start empty"
    run(
        bundle_command("download", "--name", name, "--url", zip_path.as_uri(), "--bundle_dir", str(item.bundle.parent)),
        cwd=item.work,
    )
    item = Travelled(**{**item.__dict__, "zip": zip_path})

    _write_settings(item.configs / "inference.json", SETTINGS[name])
    _write_checkpoint(item)
    inference_args = _write_inputs(item)
    run(
        bundle_command(
            "ckpt_export", "network_def", "--filepath", str(item.model_ts),
            "--ckpt_file", str(item.bundle / "models" / "model.pt"),
            "--config_file", str(item.configs / "inference.json"), *item.common(), *EXPORT[name],
        ),
        cwd=item.work,
    )  # fmt: skip
    result = run(
        bundle_command(
            "run", "--config_file", str(item.configs / "inference.json"),
            "--logging_file", str(item.configs / "logging.conf"), *item.common(),
            "--output_dir", str(item.out), *inference_args,
        ),
        cwd=item.work,
    )  # fmt: skip
    (root / "inference.log").write_text(result.stdout + result.stderr)
    ready.write_text(json.dumps({"zip": str(zip_path)}))
    return item
