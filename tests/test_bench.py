"""The numbers the benchmarks derive rather than measure."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import rrn_lung_registration.networks.rrn as rrn_module
from bench.rrn_bench import direct_conv_flops
from rrn_lung_registration.networks import RRN


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
