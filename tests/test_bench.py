"""The numbers the benchmarks derive rather than measure, and a smoke run of the whole-slide benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rrn_lung_registration.networks.rrn as rrn_module
from bench.rrn_bench import direct_conv_flops
from rrn_lung_registration.networks import RRN
from tests.conftest import REPO_ROOT


def test_rrn_direct_conv_flops_match_pytorchs_flop_counter(monkeypatch):
    """The count behind the fp32 target's floor (3.72 TFLOP at 256^3) against torch.utils.flop_counter on
    the direct-convolution path (aten.convolution; the oneDNN and Winograd paths are invisible to it)."""
    monkeypatch.setattr(rrn_module, "_onednn_float32", lambda *args: False)
    net = RRN()
    x = torch.rand(1, 1, 32, 32, 32)
    with FlopCounterMode(display=False) as counter, torch.enable_grad():
        net(x, x)
    assert counter.get_total_flops() > 0
    assert direct_conv_flops(net, 32) == counter.get_total_flops()
    assert round(direct_conv_flops(net, 256) / 1e12, 2) == 3.72


@pytest.mark.slow
def test_wsi_bench_quick_smoke(tmp_path):
    """`python -m bench.wsi_bench --quick` runs every case end to end and writes its JSON and markdown (no timing
    asserted; the real slide is left out through an empty data folder, which also exercises that skip)."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    env = {**os.environ, "RRN_ROIGAN_DATA": str(empty), "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wsi_bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "wsi_cpu.json").read_text())
    assert (out / "wsi_cpu.md").read_text().startswith("# ")
    assert payload["quick"] and payload["torch"] and payload["cores"] >= 1
    assert any("CMU-1-Small-Region skipped" in note for note in payload["notes"])
    ((name, slide),) = payload["slides"].items()
    assert name == "synthetic 4096^2"
    assert 0 < slide["tissue_tiles"] < slide["grid_tiles"]
    auto = payload["autocast"]
    expected = {f"a_pure_{auto}", "b_naive", f"c_tile_{auto}", f"c_dense_{auto}", "d_identity"}
    if auto != "float32":
        expected |= {"a_pure_float32", "c_tile_float32"}
    assert set(slide["cases"]) == expected
    for key, case in slide["cases"].items():
        assert case["tiles_per_second"] > 0, key
        if key.startswith(("c_", "d_")):
            assert case["tiles"]["translated"] == slide["tissue_tiles"], key
            assert case["seconds"]["total"] > 0 and case["rss_peak_mb"] > 0, key
        else:
            assert case["seconds"] > 0, key
    assert slide["cases"]["b_naive"]["extrapolated"] and slide["cases"]["b_naive"]["tiles_run"] == 4
    assert all(value > 0 for value in slide["ratios"].values())
