"""The one atomic-write helper: complete file or previous file, never a half-written one or a leftover."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from PIL import Image

from shared_ops.atomic import atomic_write, atomic_write_bytes, atomic_write_text, temporary_sibling


def test_writes_the_content_and_returns_the_path(tmp_path):
    path = tmp_path / "out.json"
    assert atomic_write_text(path, '{"a": 1}\n') == path
    assert path.read_text() == '{"a": 1}\n'
    assert atomic_write_bytes(path, b"\x00\x01") == path and path.read_bytes() == b"\x00\x01"
    assert atomic_write(path, lambda tmp: tmp.write_text("again")) == path and path.read_text() == "again"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text("old\n")
    seen = []

    def broken(tmp):
        seen.append(tmp)
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old\n"
    assert seen and seen[0].parent == tmp_path and not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_the_temporary_file_keeps_the_suffixes(tmp_path):
    tmp = temporary_sibling(tmp_path / "image.nii.gz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".image-") and tmp.name.endswith(".partial.nii.gz")
    tmp.unlink()
    # a writer that picks the format from the name (PIL, from ".png") works through the temporary path
    path = tmp_path / "x.png"
    atomic_write(path, lambda tmp: Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(tmp))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (5, 4)


def test_the_file_mode_follows_the_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "out.txt", "x")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by everyone, as open() would make it
        os.umask(0o077)
        private = atomic_write_text(tmp_path / "private.txt", "x")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        with open(tmp_path / "plain.txt", "w"):
            pass
        assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_missing_parent_folder_is_created(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "b" / "out.bin", b"data")
    assert path.read_bytes() == b"data"


def test_the_old_names_are_the_shared_helper():
    from roigan_stain_transfer import evaluation

    assert evaluation.atomic_write_bytes is atomic_write_bytes
