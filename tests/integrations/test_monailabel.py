"""The MONAI Label apps of ``integrations/monailabel``: real servers answering real HTTP requests, and the tasks.

Each app runs as ``monailabel start_server`` (``python -m monailabel.main start_server``, what the ``monailabel``
script executes) on 127.0.0.1 and a free port, on a copy of the app folder (the server creates ``model/``, ``logs/``
... inside it) and a temporary studies folder. Requests are those the clients send: 3D Slicer's
``POST /infer/<model>?image=<id>`` with a ``params`` form field (multipart answer), QuPath's
``POST /infer/wsi/<model>?image=<id>&output=asap`` with a JSON body.

Data: a 48^3 synthetic breathing pair (``rrn_lung_registration.phantom``, known lung masks) and a synthetic
pyramidal H&E slide with known "nuclei" written here; the real CT crop and the CMU slide of the shared data are used
when present. MONAI Label is installed by ``integrations/monailabel/install.py`` when missing (skipped with the
reason when that fails).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from roigan_stain_transfer.networks import ResnetGenerator
from roigan_stain_transfer.wsi.annotations import Polygon, polygon_area, read_asap_xml, read_geojson
from roigan_stain_transfer.wsi.pyramid import write_pyramidal_tiff
from rrn_lung_registration import ct_io, phantom
from tests.conftest import REPO_ROOT, data_root, require_data

APPS = REPO_ROOT / "integrations" / "monailabel"
SERVER_START_S = 180
REQUEST_S = 300
#: Small, fast registration settings of the radiology server (the pipeline's defaults take minutes on CPU).
REGISTRATION_CONF = {
    "registration_grid": "32",
    "registration_steps": "10",
    "registration_factors": "1",
    "registration_prealign_iterations": "20",
}
SLIDE_MPP = 0.25  # level 0 of the synthetic slide; the model reads it at 0.5 um/px (its level 1)
NUCLEI = ((300.0, 300.0), (650.0, 420.0), (460.0, 700.0))  # level-0 (x, y) centres of the dark "nuclei"
NUCLEUS_RADIUS = 60.0  # level-0 px


# ------------------------------------------------------------------------------------------------- set-up


def _module(relative: str):
    """``integrations/monailabel/<relative>`` imported by path (the apps are folders, not packages)."""
    key = "_monailabel_" + relative.removesuffix(".py").replace("/", "_")
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, APPS / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def monailabel_installed() -> None:
    """MONAI Label's server importable here, installed by the integration's installer if needed (else skip)."""
    install = _module("install.py")
    if importlib.util.find_spec("monailabel") is not None and install.server_imports()[0]:
        return
    try:
        install.install()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as error:
        pytest.skip(f"MONAI Label 0.8.5 could not be installed by integrations/monailabel/install.py: {error}")
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def rrn_tasks(monailabel_installed):
    return _module("radiology/rrn_label_tasks.py")


@pytest.fixture(scope="module")
def roigan_tasks(monailabel_installed):
    return _module("pathology/roigan_label_tasks.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """``(status, content type, body bytes)`` of a request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_S) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def _infer(server: str, model: str, image: str, params: dict | None = None, output: str | None = None):
    """3D Slicer's request: ``POST /infer/<model>?image=<id>`` with the JSON ``params`` as a form field."""
    query = {"image": image, **({"output": output} if output else {})}
    form = urllib.parse.urlencode({"params": json.dumps(params or {})}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return _http(f"{server}/infer/{model}?{urllib.parse.urlencode(query)}", "POST", form, headers)


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Parts of a ``multipart/form-data`` answer by field name (what 3D Slicer's client reads)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


@contextlib.contextmanager
def _server(app: str, studies: Path, work: Path, conf: dict[str, str]) -> Iterator[str]:
    """``monailabel start_server`` for a copy of ``integrations/monailabel/<app>``; yields its URL."""
    app_dir = work / app
    shutil.copytree(
        APPS / app, app_dir, ignore=shutil.ignore_patterns("__pycache__", "model", "logs", "bin", "lib", "cache")
    )
    port = _free_port()
    command = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    env = {
        **os.environ,
        "MONAI_LABEL_SESSIONS": "false",  # no session store in the home folder
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",  # no file watcher thread
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    log_path = work / f"{app}-server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the {app} server exited ({process.returncode}):\n{log_path.read_text()[-4000:]}")
                with contextlib.suppress(OSError):
                    if _http(f"{url}/info/")[0] == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the {app} server did not answer in {SERVER_START_S} s:\n{log_path.read_text()[-4000:]}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ------------------------------------------------------------------------------------------- radiology


@pytest.fixture(scope="module")
def ct_studies(tmp_path_factory) -> dict[str, Path]:
    """A 48^3 breathing pair as studies ``case1_exhale`` (moving) / ``case1_inhale`` (fixed), a study without its
    pair (``case2_exhale``) and one whose name follows no pairing rule (``lonely``); truth in ``truth``."""
    truth = tmp_path_factory.mktemp("phantom")
    phantom.make_breathing_pair((48, 48, 48), seed=3, n_landmarks=5).save(truth)
    studies = tmp_path_factory.mktemp("ct_studies")
    for study, source in (
        ("case1_exhale", "moving"),
        ("case1_inhale", "fixed"),
        ("case2_exhale", "moving"),
        ("lonely", "fixed"),
    ):
        shutil.copyfile(truth / f"{source}.nii.gz", studies / f"{study}.nii.gz")
    return {"studies": studies, "truth": truth}


@pytest.fixture(scope="module")
def radiology(monailabel_installed, ct_studies, tmp_path_factory) -> Iterator[str]:
    with _server("radiology", ct_studies["studies"], tmp_path_factory.mktemp("radiology"), REGISTRATION_CONF) as url:
        yield url


def _nifti(tmp_path: Path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return ct_io.read_ct(path)


def test_radiology_info_lists_lung_and_registration(radiology):
    status, _, body = _http(f"{radiology}/info/")
    assert status == 200
    info = json.loads(body)
    assert set(info["models"]) == {"lung", "registration"}
    lung, registration = info["models"]["lung"], info["models"]["registration"]
    assert lung["type"] == "segmentation" and lung["labels"] == {"lung": 1} and lung["dimension"] == 3
    assert registration["pairing"] == {
        "moving_suffix": "_exhale",
        "fixed_suffix": "_inhale",
        "rule": "'<case>_exhale' is registered onto '<case>_inhale'",
    }
    assert info["datastore"]["total"] == 4


def test_lung_mask_over_http_as_3d_slicer_asks(radiology, ct_studies, tmp_path):
    status, content_type, body = _infer(radiology, "lung", "case1_inhale")
    assert status == 200, body[:500]
    parts = _multipart(content_type, body)
    params = json.loads(parts["params"])
    assert params["label_names"] == {"lung": 1}
    label = _nifti(tmp_path, "lung.nii.gz", parts["image"])
    image = ct_io.read_ct(ct_studies["studies"] / "case1_inhale.nii.gz")
    truth = ct_io.read_ct(ct_studies["truth"] / "fixed_lung_mask.nii.gz").numpy() > 0
    assert label.shape == image.shape == truth.shape
    np.testing.assert_allclose(label.affine.numpy(), image.affine.numpy(), atol=1e-4)
    values = label.numpy()
    assert set(np.unique(values).tolist()) <= {0, 1}
    mask = values > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85, f"Dice with the phantom's lungs {dice:.3f}"
    assert params["lung_volume_litres"] == pytest.approx(mask.sum() * 6.25**3 * 1e-6, rel=1e-3)


def test_registration_returns_warped_image_and_jacobian_on_the_fixed_grid(radiology, ct_studies, tmp_path):
    status, _, body = _infer(radiology, "registration", "case1_exhale", {"result": "jacobian"}, output="image")
    assert status == 200, body[:500]
    jacobian = _nifti(tmp_path, "jacobian.nii.gz", body)
    fixed = ct_io.read_ct(ct_studies["studies"] / "case1_inhale.nii.gz")
    moving = ct_io.read_ct(ct_studies["studies"] / "case1_exhale.nii.gz")
    lungs = ct_io.read_ct(ct_studies["truth"] / "fixed_lung_mask.nii.gz").numpy() > 0
    assert jacobian.shape == fixed.shape
    np.testing.assert_allclose(jacobian.affine.numpy(), fixed.affine.numpy(), atol=1e-4)
    det = jacobian.numpy()
    assert np.isfinite(det).all() and det.min() > 0, "folding"
    assert 0.5 < det[lungs].mean() < 1.0  # exhale onto inhale: the lungs are smaller at exhale

    # the warped image of the same pair comes from the cached registration; asked from the fixed study's side
    status, content_type, body = _infer(radiology, "registration", "case1_inhale", {"result": "warped"})
    assert status == 200, body[:500]
    parts = _multipart(content_type, body)
    params = json.loads(parts["params"])
    assert (params["moving"], params["fixed"], params["result"], params["cached"]) == (
        "case1_exhale",
        "case1_inhale",
        "warped",
        True,
    )
    warped = _nifti(tmp_path, "warped.nii.gz", parts["image"])
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine.numpy(), fixed.affine.numpy(), atol=1e-4)
    before = np.abs(moving.numpy() - fixed.numpy())[lungs].mean()
    after = np.abs(warped.numpy() - fixed.numpy())[lungs].mean()
    assert after < 0.8 * before, f"mean |difference| in the lungs {before:.1f} HU -> {after:.1f} HU"

    # the displacement field is the pipeline's uncompressed .nii: it must arrive as one, not renamed .nii.gz
    status, content_type, body = _infer(radiology, "registration", "case1_exhale", {"result": "displacement"})
    assert status == 200, body[:500]
    field = _multipart(content_type, body)["image"]
    assert field[:2] != b"\x1f\x8b"  # not gzip
    (tmp_path / "field.nii").write_bytes(field)
    vectors, affine = ct_io.read_displacement_field(tmp_path / "field.nii")
    assert vectors.shape == (*fixed.shape, 3) and torch.isfinite(vectors).all()
    np.testing.assert_allclose(affine.numpy(), fixed.affine.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("image", "params", "status", "words"),
    [
        ("lonely", {}, 400, ["'lonely'", "_exhale", "_inhale", "fixed"]),
        ("case2_exhale", {}, 404, ["'case2_exhale'", "'case2_inhale'", "not in the datastore"]),
        ("lonely", {"fixed": "case9_inhale"}, 404, ["'lonely'", "'case9_inhale'"]),
        ("nowhere", {}, 404, ["'nowhere'", "not in the datastore"]),
        ("case1_exhale", {"result": "overview"}, 400, ["'case1_exhale'", "'overview'", "jacobian"]),
    ],
)
def test_bad_registration_requests_name_the_study(radiology, image, params, status, words):
    got, _, body = _infer(radiology, "registration", image, params, output="json")
    assert got == status, body[:500]
    detail = json.loads(body)["detail"]
    for word in words:
        assert word in detail, detail


def test_pairing_rule_and_fixed_parameter(rrn_tasks):
    pairing = rrn_tasks.Pairing()
    assert pairing.pair("p7_exhale") == ("p7_exhale", "p7_inhale")
    assert pairing.pair("p7_inhale") == ("p7_exhale", "p7_inhale")
    assert pairing.pair("anything", fixed="other") == ("anything", "other")
    assert rrn_tasks.Pairing("_T50", "_T00").pair("case3_T00") == ("case3_T50", "case3_T00")
    with pytest.raises(rrn_tasks.RequestError, match="'_exhale'"):
        pairing.pair("_exhale")  # a suffix alone names no case
    with pytest.raises(rrn_tasks.RequestError, match="itself"):
        pairing.pair("a", fixed="a")
    with pytest.raises(ValueError, match="different"):
        rrn_tasks.Pairing("_x", "_x")


def test_registration_resolves_studies_through_the_datastore(rrn_tasks, ct_studies, tmp_path):
    studies = {path.name.removesuffix(".nii.gz"): str(path) for path in ct_studies["studies"].glob("*.nii.gz")}
    task = rrn_tasks.LungPairRegistration(studies.get, tmp_path, rrn_tasks.registration_settings(REGISTRATION_CONF))
    request = {"image": studies["lonely"], "study": "lonely", "fixed": "case1_inhale"}
    (moving, moving_path), (fixed, fixed_path) = task.resolve(request)
    assert (moving, fixed) == ("lonely", "case1_inhale")
    assert (str(moving_path), str(fixed_path)) == (studies["lonely"], studies["case1_inhale"])
    # without "study" the id comes from the file name
    assert task.resolve({"image": studies["case1_inhale"]})[0][0] == "case1_exhale"
    with pytest.raises(rrn_tasks.StudyNotFoundError, match="'case2_inhale'"):
        task.resolve({"image": studies["case2_exhale"]})
    folder = task.output_folder((moving, moving_path), (fixed, fixed_path))
    assert folder.parent == tmp_path and folder.name.startswith("lonely__onto__case1_inhale__")


def test_registration_settings_from_conf(rrn_tasks):
    settings = rrn_tasks.registration_settings(
        {"registration_grid": "64,64,48", "registration_factors": "4,2", "registration_prealign": "rigid"}
    )
    assert settings.grid_shape() == (64, 64, 48) and tuple(settings.instance_factors) == (4, 2)
    assert settings.prealign == "rigid"
    with pytest.raises(ValueError, match="registration_steps"):
        rrn_tasks.registration_settings({"registration_steps": "many"})
    with pytest.raises(ValueError, match="prealign"):
        rrn_tasks.registration_settings({"registration_prealign": "elastic"})


def test_lung_task_on_a_real_chest_ct(rrn_tasks):
    path = require_data("ct/chest_crops/chest_crop_a.nii.gz")
    output, params = rrn_tasks.LungSegmentation()({"image": str(path), "study": "chest_crop_a"})
    try:
        label, image = ct_io.read_ct(output), ct_io.read_ct(path)
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine.numpy(), image.affine.numpy(), atol=1e-4)
        assert 0.3 < params["lung_volume_litres"] < 8.0
    finally:
        Path(output).unlink(missing_ok=True)


def test_lung_task_refuses_an_image_that_is_not_ct(rrn_tasks, tmp_path):
    path = tmp_path / "scaled.nii.gz"
    ct_io.write_image(
        path, np.random.default_rng(0).random((32, 32, 32), dtype=np.float32), np.diag([8.0, 8.0, 8.0, 1.0])
    )
    with pytest.raises(ValueError, match="study 'scaled'.*Hounsfield"):
        rrn_tasks.LungSegmentation()({"image": str(path), "study": "scaled"})


# ------------------------------------------------------------------------------------------- pathology


class PixelStain(nn.Module):
    """A stand-in generator with a known answer: dark pixels -> DAB brown, other saturated (tissue) pixels -> a pale
    tan, glass -> white; pixel by pixel, so windows and blending cannot change it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x + 1) / 2
        high, low = rgb.max(dim=1, keepdim=True).values, rgb.min(dim=1, keepdim=True).values
        saturation = (high - low) / high.clamp_min(1e-6)
        brown = torch.tensor([130, 80, 40], dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1
        tan = torch.tensor([215, 195, 175], dtype=x.dtype).view(1, 3, 1, 1) / 127.5 - 1
        out = torch.where(saturation > 0.15, tan, torch.ones_like(x))
        return torch.where(rgb.mean(dim=1, keepdim=True) < 0.5, brown, out)


def _synthetic_he(size: int = 1024) -> np.ndarray:
    """RGB ``(size, size, 3)``: glass, a pink tissue block, dark purple disks at :data:`NUCLEI`."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    image[100:900, 120:880] = (232, 160, 200)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    for x, y in NUCLEI:
        image[(cols - x) ** 2 + (rows - y) ** 2 <= NUCLEUS_RADIUS**2] = (90, 40, 140)
    return image


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Studies ``synthetic`` (pyramidal TIFF: 0.25 um/px level 0, 0.5 um/px level 1) and the real ``cmu`` if present."""
    folder = tmp_path_factory.mktemp("slides")
    write_pyramidal_tiff(
        folder / "synthetic.tif", _synthetic_he(), SLIDE_MPP, compression="deflate", min_level_size=256
    )
    cmu = data_root() / "wsi" / "CMU-1-Small-Region.svs"
    if cmu.is_file():
        (folder / "cmu.svs").symlink_to(cmu)
    return folder


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    """A bundle-style checkpoint (``g_xy``) of a tiny, untrained ``ResnetGenerator``."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("generator") / "generator.pt"
    torch.save({"g_xy": ResnetGenerator(base_channels=4, num_blocks=1).state_dict()}, path)
    return path


GENERATOR_CONF = {"base_channels": "4", "num_blocks": "1", "tile_size": "128", "overlap": "16"}


@pytest.fixture(scope="module")
def pathology(monailabel_installed, slides, tiny_generator, tmp_path_factory) -> Iterator[str]:
    conf = {"generator": str(tiny_generator), **GENERATOR_CONF}
    with _server("pathology", slides, tmp_path_factory.mktemp("pathology"), conf) as url:
        yield url


def _qupath(server: str, image: str, location, size, tile_size: int = 1024):
    """QuPath's request (``MonaiLabelClient.infer`` for an image the server holds)."""
    body = {
        "level": 0,
        "location": list(location),
        "size": list(size),
        "tile_size": [tile_size, tile_size],
        "min_poly_area": 30,
        "params": {"foreground": [], "background": [], "max_workers": 1},
    }
    query = urllib.parse.urlencode({"output": "asap", "image": image})
    return _http(
        f"{server}/infer/wsi/virtual_dab?{query}",
        "POST",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )


def _asap_polygons(xml: bytes) -> list[np.ndarray]:
    """The polygons as QuPath reads them: each ``Annotation``'s ``Coordinate`` X / Y, in order."""
    root = ET.fromstring(xml)
    assert root.tag == "ASAP_Annotations"
    polygons = []
    for annotation in root.iter("Annotation"):
        assert annotation.get("Name") == "DAB positive" and annotation.get("Color") == "#964b00"
        points = [(float(c.get("X")), float(c.get("Y"))) for c in annotation.iter("Coordinate")]
        polygons.append(np.asarray(points))
    return polygons


def _centroid(ring: np.ndarray) -> np.ndarray:
    x, y = ring[:, 0], ring[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    area = cross.sum() / 2
    return np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)


def test_pathology_info_for_qupath(pathology):
    status, _, body = _http(f"{pathology}/info/")
    assert status == 200
    model = json.loads(body)["models"]["virtual_dab"]
    assert model["pathology"] is True and model["labels"] == {"DAB positive": 1} and model["dimension"] == 2
    # QuPath asks whether the server holds the open slide (HEAD /datastore/image) before sending its name
    assert _http(f"{pathology}/datastore/image?image=synthetic", "HEAD")[0] == 200
    assert _http(f"{pathology}/datastore/image?image=nowhere", "HEAD")[0] != 200


def test_qupath_request_returns_the_regions_of_the_task(pathology, roigan_tasks, slides, tiny_generator, tmp_path):
    location, size = (96, 128), (512, 512)
    status, content_type, body = _qupath(pathology, "synthetic", location, size)
    assert status == 200, body[:500]
    assert "xml" in content_type
    served = _asap_polygons(body)
    # the same region through the task directly, with the same checkpoint
    task = roigan_tasks.VirtualDabRegions(
        weights=tiny_generator,
        network={"base_channels": 4, "num_blocks": 1},
        settings=roigan_tasks.region_settings(GENERATOR_CONF),
    )
    request = {"image": str(slides / "synthetic.tif"), "location": location, "size": size, "min_poly_area": 30}
    _, params = task({**request, "result_write_to_file": False})
    contours = [np.asarray(c) for e in params["annotation"]["elements"] for c in e["contours"]]
    assert len(served) == len(contours)
    for got, expected in zip(served, contours, strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-3)
    for ring in served:  # inside the requested region (to a pixel of the 0.5 um/px raster, 2 level-0 px)
        assert len(ring) >= 3
        assert ring[:, 0].min() >= location[0] and ring[:, 0].max() <= location[0] + size[0]
        assert ring[:, 1].min() >= location[1] and ring[:, 1].max() <= location[1] + size[1]
    # the project's own ASAP reader takes the file as it is
    (tmp_path / "served.xml").write_bytes(body)
    assert len(read_asap_xml(tmp_path / "served.xml")) == len(served)


def test_qupath_request_on_a_real_slide(pathology, slides):
    if not (slides / "cmu.svs").exists():
        require_data("wsi/CMU-1-Small-Region.svs")
    location, size = (800, 1200), (256, 256)
    status, _, body = _qupath(pathology, "cmu", location, size, tile_size=128)  # four tiles
    assert status == 200, body[:500]
    for ring in _asap_polygons(body):
        assert location[0] <= ring[:, 0].min() and ring[:, 0].max() <= location[0] + size[0]
        assert location[1] <= ring[:, 1].min() and ring[:, 1].max() <= location[1] + size[1]


@pytest.mark.parametrize(
    ("image", "location", "status", "words"),
    [
        ("nowhere", (0, 0), 404, ["'nowhere'", "not in the datastore"]),
        ("synthetic", (5000, 0), 400, ["'synthetic'", "outside"]),
    ],
)
def test_bad_pathology_requests_name_the_study(pathology, image, location, status, words):
    got, _, body = _qupath(pathology, image, location, (256, 256))
    assert got == status, body[:500]
    detail = json.loads(body)["detail"]
    for word in words:
        assert word in detail, detail


def test_virtual_dab_regions_lie_on_the_nuclei_in_slide_coordinates(roigan_tasks, slides, tmp_path):
    task = roigan_tasks.VirtualDabRegions(
        generator=PixelStain(), settings=roigan_tasks.RegionSettings(tile_size=128, overlap=16)
    )
    assert task.is_valid() and task.info()["pathology"] is True
    request = {"image": str(slides / "synthetic.tif"), "location": (100, 120), "size": (800, 780), "study": "synthetic"}
    xml_path, params = task(request)
    try:
        assert params["downsample"] == 2.0 and params["dab"]["emptied"] is False
        (element,) = params["annotation"]["elements"]
        rings = [np.asarray(c) for c in element["contours"]]
        assert len(rings) == len(NUCLEI)
        for (x, y), ring in zip(
            sorted(NUCLEI, key=lambda c: (c[1], c[0])),
            sorted(rings, key=lambda r: tuple(_centroid(r)[::-1])),
            strict=True,
        ):
            np.testing.assert_allclose(_centroid(ring), (x, y), atol=2.0)  # level-0 px
            area = polygon_area(Polygon(ring))
            assert area == pytest.approx(np.pi * NUCLEUS_RADIUS**2, rel=0.1)
        assert params["dab"]["positive_area_um2"] == pytest.approx(
            3 * np.pi * (NUCLEUS_RADIUS * SLIDE_MPP) ** 2, rel=0.1
        )
        written = read_asap_xml(xml_path)  # the file the task writes for /infer/<model>
        assert len(written) == 3 and all(p.label == "DAB positive" for p in written)
    finally:
        Path(xml_path).unlink(missing_ok=True)
    # the same region asked at level 1 (size in level-1 px), answered as GeoJSON
    geojson_path, again = task({**request, "level": 1, "size": (400, 390), "output": "geojson"})
    try:
        assert again["annotation"]["elements"] == params["annotation"]["elements"]
        assert len(read_geojson(geojson_path)) == 3
    finally:
        Path(geojson_path).unlink(missing_ok=True)


def test_virtual_dab_refuses_regions_it_cannot_answer(roigan_tasks, slides):
    task = roigan_tasks.VirtualDabRegions(
        generator=PixelStain(), settings=roigan_tasks.RegionSettings(max_region_px=100 * 100)
    )
    image = str(slides / "synthetic.tif")
    with pytest.raises(roigan_tasks.RequestError, match="'synthetic'.*more than 10000 px"):
        task({"image": image, "study": "synthetic", "location": (0, 0), "size": (512, 512)})
    with pytest.raises(roigan_tasks.RequestError, match="'synthetic'.*level 5"):
        task({"image": image, "study": "synthetic", "location": (0, 0), "size": (64, 64), "level": 5})
    with pytest.raises(roigan_tasks.StudyNotFoundError, match="'gone'"):
        task({"image": str(slides / "gone.tif"), "study": "gone"})
