"""Project-level promises: the shared layer stands alone, and `make demo` produces what it says."""

from __future__ import annotations

import subprocess
import sys

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


def test_demo_runs_and_writes_an_image(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "100.0 % of interior voxels" in proc.stdout
    with Image.open(tmp_path / "demo_output" / "roi_align_ihc_boxes.png") as image:
        assert image.size == (4 * 48 * 4, 48 * 4)
        assert image.mode == "RGB"
