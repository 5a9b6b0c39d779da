"""Project-level promises: the shared layer stands alone, and `make demo` produces what it says."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

BLOCK_TORCHVISION = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'torchvision':
            raise ImportError('torchvision is blocked in this test')
sys.meta_path.insert(0, Block())
"""


def test_shared_ops_imports_without_torchvision_or_method_packages():
    code = BLOCK_TORCHVISION + (
        "import shared_ops, sys\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torchvision', 'rrn_lung_registration', 'roigan_stain_transfer')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.slow
def test_demo_runs_and_writes_its_outputs(tmp_path):
    """The demo end to end, on a smaller grid and one epoch (``make demo`` uses 64^3 and 15 epochs)."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "demo.py"),
            "--grid",
            "32",
            "--epochs",
            "1",
            "--stain-iterations",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "100.0 % of interior voxels" in proc.stdout
    assert re.search(r"held-out pair TRE over 300 landmarks: [\d.]+ mm before -> [\d.]+ mm after", proc.stdout)
    summary = json.loads((tmp_path / "demo_output" / "rrn" / "eval" / "tre_summary.json").read_text())
    assert summary["pairs"] == 1
    with Image.open(tmp_path / "demo_output" / "rrn_overview.png") as image:
        assert image.mode == "L" and image.size[0] >= 4 * 32
    with Image.open(tmp_path / "demo_output" / "roi_align_ihc_boxes.png") as image:
        assert image.size == (4 * 48 * 4, 48 * 4)
        assert image.mode == "RGB"
    slide = tmp_path / "demo_output" / "roigan" / "slides" / "cmu_small_region_virtual_ihc.tiff"
    assert re.search(r"whole slide at [\d.]+ um/px: \d+ of \d+ tiles", proc.stdout)
    import openslide

    with openslide.OpenSlide(str(slide)) as virtual:
        assert virtual.dimensions == (2220, 2967)
