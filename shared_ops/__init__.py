"""Layers shared by both methods: 3-D local cost correlation and RoIAlign, in pure PyTorch.

This package imports nothing from the two method packages, and nothing from torchvision.
"""

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
