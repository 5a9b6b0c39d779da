"""MONAI Deploy: both bundles meet the contract of the SDK's ``MonaiBundleInferenceOperator``.

``replay_bundle_operator`` repeats, step by step, what the operator does with a bundle (read from the SDK source,
releases 0.5.1, 3.5.0 and 4.0.0, which agree on these steps): read ``extra/metadata.json`` and ``extra/inference.json``
from the TorchScript file's archive (``<file stem>/extra/...``), parse them with MONAI's ``ConfigParser``, take
``device``, ``inferer``, ``preprocessing`` and ``postprocessing`` (the last two without transforms whose class
name contains ``LoadImage`` or ``SaveImage``), turn the input ``image`` (array and metadata dict, as an SDK
``Image`` gives them) into a ``MetaTensor``, run the preprocessing on ``{"image": ...}``, the inferer on the
batched image with the TorchScript module, and the postprocessing on ``{"pred": first item, **preprocessed
inputs}``. Its outputs must equal those of the bundle's own ``inference.json`` run (``tests/bundle_travel.py``).

The example applications in ``integrations/monai_deploy`` run with SDK 4.0.0, the newest release, which
installs here without replacing torch and runs on Holoscan without a GPU, in an overlay that leaves the venv alone
(``sdk_overlay.py``); the tests are skipped, with the reason, when pip cannot fetch it. The RoI-GAN application
runs with the project's packages hidden (the editable install's import hook removed before the app starts): its
bundle entries are MONAI transforms and its model is scripted TorchScript, so a deployment needs none of the
project's code, as its README says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_dst_type, ensure_tuple, first
from PIL import Image

from tests.bundle_travel import Travelled, offline_env, run, travelled
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
BUNDLES = ("rrn_lung_registration", "roigan_stain_transfer")
APPS = REPO_ROOT / "integrations" / "monai_deploy"
DISALLOW_LOAD_SAVE = ("LoadImage", "SaveImage")
HOLOSCAN_STACK = 32 * 2**20
#: Runs ``sys.argv[1]`` as ``__main__`` (with the remaining arguments) without the editable install's import hook:
#: the project's packages cannot be imported.
WITHOUT_PROJECT = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
import importlib.util
assert importlib.util.find_spec("roigan_stain_transfer") is None and importlib.util.find_spec("shared_ops") is None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module", params=BUNDLES)
def bundle(request, tmp_path_factory) -> Travelled:
    return travelled(request.param, tmp_path_factory.getbasetemp())


def _filter(compose: Compose) -> Compose:
    compose.transforms = tuple(
        t for t in compose.transforms if not any(name in type(t).__name__ for name in DISALLOW_LOAD_SAVE)
    )
    return compose


def bundle_parser(model_ts: Path) -> ConfigParser:
    """The operator's ``get_bundle_config(model_ts, ["inference"])``."""
    name = model_ts.stem
    parser = ConfigParser()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(model_ts) as archive:
        parser.read_meta(f=json.loads(archive.read(f"{name}/extra/metadata.json")))
        member = f"{name}/extra/inference.json"
        archive.extractall(path=tmp, members=[member])
        parser.read_config([Path(tmp, member)])
    parser.parse()
    return parser


def replay_bundle_operator(model_ts: Path, value: np.ndarray, metadata: dict) -> dict:
    """``MonaiBundleInferenceOperator.compute`` on one input, without the SDK (see the module notes)."""
    parser = bundle_parser(model_ts)
    device = parser.get_parsed_content("device") if parser.get("device") is not None else torch.device("cpu")
    inferer = parser.get_parsed_content("inferer")
    preprocessing = _filter(parser.get_parsed_content("preprocessing"))
    postprocessing = _filter(parser.get_parsed_content("postprocessing"))
    assert isinstance(first(preprocessing.transforms), MapTransform)  # dict transforms: keyed on the input name
    meta = parser["_meta_"]["network_data_format"]
    input_name, output_name = first(meta["inputs"]), first(meta["outputs"])
    assert (input_name, output_name) == ("image", "pred")
    network = torch.jit.load(str(model_ts), map_location=device).eval()
    with torch.no_grad():
        value = convert_to_dst_type(value, dst=value)[0]
        inputs = preprocessing({input_name: MetaTensor.ensure_torch_and_prune_meta(value, dict(metadata))})
        image = inputs[input_name]
        batch = inputs.pop(input_name)[None].to(device)
        outputs = inferer(inputs=batch, network=network)
        inputs[input_name] = image
        return postprocessing({output_name: ensure_tuple(outputs)[0], **inputs})


def _rrn_input(bundle: Travelled, pair: dict) -> tuple[np.ndarray, dict]:
    """The 2-channel ``image`` as the example app builds it: the bundle's ``loading`` entry, as an SDK Image."""
    image = bundle_parser(bundle.model_ts).get_parsed_content("loading")(pair)["image"]
    meta = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in image.meta.items()}
    return image.numpy(), meta


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_replaying_the_operator_gives_the_bundle_run_outputs(bundle):
    if bundle.name == "rrn_lung_registration":
        pair = json.loads((bundle.inputs / "datalist.json").read_text())["test"][0]
        out = replay_bundle_operator(bundle.model_ts, *_rrn_input(bundle, pair))
        pred, warped = out["pred"], out["warped"]
        assert pred.shape == (3, 32, 32, 32) and pred.dtype == torch.float32
        saved = np.asarray(nib.load(bundle.out / "pair_000_moving_ddf.nii.gz").dataobj)
        got = np.moveaxis(pred.numpy(), 0, -1)
        assert np.abs(got - saved).max() <= 1e-4 * np.abs(saved).max() + 1e-6
        fixed = nib.load(pair["fixed"])
        assert warped.shape == (1, *fixed.shape)  # back on the fixed image's own grid
        assert np.allclose(warped.affine.numpy(), fixed.affine, atol=1e-4)
        saved = np.asarray(nib.load(bundle.out / "pair_000_moving_warped.nii.gz").dataobj)
        assert np.abs(warped[0].numpy() - saved).max() <= 1e-4
    else:
        path = bundle.inputs / "tiles" / "tile_0.png"
        pixels = np.array(Image.open(path))
        out = replay_bundle_operator(bundle.model_ts, pixels, {"filename_or_obj": str(path)})
        pred = out["pred"]
        assert pred.shape == pixels.shape and pred.dtype == torch.uint8  # RGB (H, W, 3) like the input
        saved = np.array(Image.open(bundle.out / "tile_0.png"))
        assert np.abs(pred.numpy().astype(int) - saved).max() <= 1


# ------------------------------------------------------------------------------------------------------------
# The example applications with MONAI Deploy App SDK 4.0.0
# ------------------------------------------------------------------------------------------------------------


def _sdk_version() -> str:
    spec = importlib.util.spec_from_file_location("sdk_overlay", APPS / "sdk_overlay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SDK_VERSION


def _holoscan_stack() -> None:
    """In the application's process before it starts: the 32 MiB main-thread stack Holoscan asks for."""
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    soft = HOLOSCAN_STACK if hard == resource.RLIM_INFINITY else min(HOLOSCAN_STACK, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


@pytest.fixture(scope="session")
def sdk_pythonpath() -> str:
    """PYTHONPATH of the SDK overlay, built once in the user cache (pip reads the registry the first time)."""
    version = _sdk_version()
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = cache_home / "monai-rrn-roigan" / f"deploy-sdk-{version}"
    command = [sys.executable, str(APPS / "sdk_overlay.py"), str(cache)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        pytest.skip(f"MONAI Deploy App SDK {version} could not be installed: pip timed out")
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"MONAI Deploy App SDK {version} could not be installed with pip ({reason})")
    return result.stdout.strip()


def _run_app(bundle: Travelled, source: Path, output: Path, sdk_pythonpath: str, work: Path, check: bool = True):
    """The bundle's example application on ``source``, as a user runs it: ``python app.py -i -o -m`` (RRN) or
    ``python <app folder> -i -o -m`` (RoI-GAN: the folder's ``__main__.py``, what a MAP runs)."""
    env = {**offline_env(), "PYTHONPATH": sdk_pythonpath}
    rrn = bundle.name == "rrn_lung_registration"
    entry = APPS / bundle.name / "app.py" if rrn else APPS / bundle.name
    app = [str(entry), "-i", str(source), "-o", str(output), "-m", str(bundle.model_ts)]
    python = [sys.executable] if rrn else [sys.executable, "-c", WITHOUT_PROJECT]
    return run([*python, *app], work, env, check=check, preexec_fn=_holoscan_stack)


def test_example_app_runs_with_the_newest_sdk(bundle, sdk_pythonpath, tmp_path):
    work, output = tmp_path / "work", tmp_path / "output"
    work.mkdir()
    if bundle.name == "rrn_lung_registration":
        pair = json.loads((bundle.inputs / "datalist.json").read_text())["test"][0]
        source = tmp_path / "case"
        source.mkdir()
        for key in ("fixed", "moving"):
            shutil.copy(pair[key], source / f"{key}.nii.gz")
    else:
        source = bundle.inputs / "tiles" / "tile_1.png"
    result = _run_app(bundle, source, output, sdk_pythonpath, work)
    assert "Graph execution finished" in result.stdout + result.stderr  # Holoscan ran the operators' graph
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in output.iterdir()} == {0o666 & ~umask}  # staged, yet as umask says
    if bundle.name == "rrn_lung_registration":
        assert {p.name for p in output.iterdir()} == {"case_ddf.nii.gz", "case_warped.nii.gz"}
        for kind in ("ddf", "warped"):
            got = np.asarray(nib.load(output / f"case_{kind}.nii.gz").dataobj)
            saved = np.asarray(nib.load(bundle.out / f"pair_000_moving_{kind}.nii.gz").dataobj)
            assert got.shape == saved.shape and np.abs(got - saved).max() <= 1e-4 * max(np.abs(saved).max(), 1)
    else:
        assert {p.name for p in output.iterdir()} == {"tile_1.png"}
        got, saved = (np.array(Image.open(folder / "tile_1.png")) for folder in (output, bundle.out))
        assert np.abs(got.astype(int) - saved).max() <= 1


BAD_INPUTS = {
    "rrn_lung_registration": ("no moving image",),
    "roigan_stain_transfer": ("greyscale tile", "tile of 66 x 70"),
}


def _bad_input(bundle: Travelled, case: str, folder: Path) -> tuple[Path, str]:
    """Input ``case`` written into ``folder``; the error the app must give."""
    if case == "no moving image":
        pair = json.loads((bundle.inputs / "datalist.json").read_text())["test"][0]
        source = folder / "case"
        source.mkdir()
        shutil.copy(pair["fixed"], source / "fixed.nii.gz")
        return source, f"{source}: expected one moving.* image"
    source = folder / "tile.png"
    if case == "greyscale tile":
        Image.fromarray(np.full((64, 64), 128, np.uint8)).save(source)
        return source, f"{source}: expected an RGB tile, got mode L."
    Image.fromarray(np.full((66, 70, 3), 128, np.uint8)).save(source)  # the generator would return 68 x 72
    refused = "tile height and width must be multiples of 4 (the generator halves them twice), got 66 x 70"
    return source, f"{source}: {refused}"


def test_example_app_fails_on_bad_input_and_writes_nothing(bundle, sdk_pythonpath, tmp_path):
    for index, case in enumerate(BAD_INPUTS[bundle.name]):
        folder = tmp_path / f"case{index}"
        (folder / "work").mkdir(parents=True)
        source, expected = _bad_input(bundle, case, folder)
        output = folder / "output"
        result = _run_app(bundle, source, output, sdk_pythonpath, folder / "work", check=False)
        assert result.returncode != 0, case
        assert expected in result.stderr, (case, result.stderr[-3000:])
        assert not output.exists() or not list(output.iterdir()), case


@pytest.mark.parametrize("name", BUNDLES)
def test_app_manifest_has_what_the_packager_reads_and_the_bundle_version(name):
    """``app.yaml``: ``application`` with ``title`` and ``version`` and a ``resources`` block, the keys holoscan-cli
    4.2's ``monai-deploy package`` requires; the version is the bundle's."""
    text = (APPS / name / "app.yaml").read_text()
    sections = dict(re.findall(r"^(\w+):\n((?:[ \t]+.*\n|#.*\n|\n)*)", text, flags=re.MULTILINE))
    assert {"application", "resources"} <= set(sections), sorted(sections)
    application = dict(re.findall(r"^\s+(\w+):\s*(.+)$", sections["application"], flags=re.MULTILINE))
    assert application.get("title")
    bundle_version = json.loads((REPO_ROOT / "bundles" / name / "configs" / "metadata.json").read_text())["version"]
    assert application.get("version") == bundle_version
    resources = dict(re.findall(r"^\s+(\w+):\s*(.+)$", sections["resources"], flags=re.MULTILINE))
    assert {"cpu", "gpu", "memory", "gpuMemory"} <= set(resources)
