"""What both methods share: the 3-D local cost correlation (PyTorch, plus a C kernel on CPU) and RoIAlign
layers, and, in :mod:`shared_ops.checkpoints` and :mod:`shared_ops.engines` (loaded on first use, they need
MONAI), atomic checkpointing and mixed precision for MONAI engines.

This package imports nothing from the two method packages, and nothing from torchvision.
"""

import importlib

from shared_ops.correlation import (
    NORMALIZE_MODES,
    LocalCostCorrelation3d,
    correlation_displacements,
    local_cost_correlation_3d,
    normalize_features,
)
from shared_ops.roi_align import RoIAlign, roi_align

__all__ = [
    "NORMALIZE_MODES",
    "LocalCostCorrelation3d",
    "RoIAlign",
    "correlation_displacements",
    "local_cost_correlation_3d",
    "normalize_features",
    "roi_align",
]


def __getattr__(name: str):
    """``shared_ops.checkpoints`` on first use, so that importing the layers does not import MONAI."""
    if name == "checkpoints":
        return importlib.import_module("shared_ops.checkpoints")
    raise AttributeError(f"module 'shared_ops' has no attribute {name!r}")
