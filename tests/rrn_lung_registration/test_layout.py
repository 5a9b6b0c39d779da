"""The package's layered layout, and the module paths of its former flat layout that user code may still use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import rrn_lung_registration

FLAT = {
    "ct_io": "io.ct_io",
    "integrity": "io.integrity",
    "landmarks": "io.landmarks",
    "spatial": "io.spatial",
    "transform": "io.transform",
    "preflight": "io.preflight",
    "lung_mask": "masking.lung_mask",
    "prealign": "alignment.prealign",
    "instance": "alignment.instance",
    "overview": "outputs.overview",
    "data": "training.data",
    "engines": "training.engines",
    "metrics": "training.metrics",
    "phantom": "synthetic.phantom",
}


@pytest.mark.parametrize("old, new", sorted(FLAT.items()))
def test_a_flat_module_path_is_the_layered_module(old, new):
    assert importlib.import_module(f"rrn_lung_registration.{old}") is importlib.import_module(
        f"rrn_lung_registration.{new}"
    )
    assert getattr(rrn_lung_registration, old) is importlib.import_module(f"rrn_lung_registration.{new}")


def test_flat_imports_work_in_a_fresh_interpreter():
    """``from rrn_lung_registration.lung_mask import ...`` before anything else imported the package."""
    code = (
        "from rrn_lung_registration.lung_mask import lung_mask\n"
        "from rrn_lung_registration.ct_io import read_ct\n"
        "from rrn_lung_registration.synthetic import synthetic_breathing_pair, breathing\n"
        "assert synthetic_breathing_pair is breathing.synthetic_breathing_pair\n"
        "print(lung_mask.__module__, read_ct.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["rrn_lung_registration.masking.lung_mask", "rrn_lung_registration.io.ct_io"]


def test_layers_import_only_the_layers_below_them():
    """io knows nothing of masking, alignment or outputs; masking nothing of alignment or outputs."""
    import ast
    from pathlib import Path

    root = Path(rrn_lung_registration.__file__).parent
    below = {"io": {"io"}, "masking": {"io", "masking"}, "alignment": {"io", "masking", "alignment"}}
    layers = {"io", "masking", "alignment", "outputs", "training", "synthetic"}
    for layer, allowed in below.items():
        for path in (root / layer).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rrn_lung_registration."):
                    used = node.module.split(".")[1]
                    assert used not in layers or used in allowed, f"{path.name} imports {node.module}"
