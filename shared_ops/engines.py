"""Helpers for MONAI engines shared by both bundles' trainers and evaluators."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["engine_autocast"]


def engine_autocast(engine) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a MONAI engine's iteration.

    Off unless ``engine.amp``; then ``torch.autocast`` on the engine's device with ``engine.amp_kwargs``:
    float16 on CUDA by default, bfloat16 on CPU (where float16 autocast is slow or unsupported).
    """
    if not engine.amp:
        return contextlib.nullcontext()
    device_type = torch.device(engine.state.device).type
    kwargs = dict(engine.amp_kwargs)
    if device_type == "cpu":
        kwargs.setdefault("dtype", torch.bfloat16)
    return torch.autocast(device_type, **kwargs)
