"""What both methods share: the 3-D local cost correlation (PyTorch, plus a C kernel on CPU) and RoIAlign
layers, and, in :mod:`shared_ops.checkpoints` and :mod:`shared_ops.engines` (they need MONAI), atomic
checkpointing and mixed precision for MONAI engines; :mod:`shared_ops.atomic` is the one helper every output
file of the project is written through. Everything is loaded on first use.

This package imports nothing from the two method packages, and nothing from torchvision.
"""

import importlib

__all__ = [
    "NORMALIZE_MODES",
    "LocalCostCorrelation3d",
    "RoIAlign",
    "correlation_displacements",
    "local_cost_correlation_3d",
    "normalize_features",
    "roi_align",
]

#: Public names and the submodule that defines each; imported on first access, so that the torch-free helpers
#: (``shared_ops.atomic``) do not import torch.
_EXPORTS = {
    "NORMALIZE_MODES": "correlation",
    "LocalCostCorrelation3d": "correlation",
    "correlation_displacements": "correlation",
    "local_cost_correlation_3d": "correlation",
    "normalize_features": "correlation",
    "RoIAlign": "roi_align",
    "roi_align": "roi_align",
}
_SUBMODULES = ("atomic", "checkpoints", "correlation", "datasets", "distributed", "engines", "reference", "roi_align")


def __getattr__(name: str):
    """The layers and submodules on first use (``shared_ops.checkpoints`` needs MONAI, the layers torch)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"shared_ops.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"shared_ops.{name}")
    else:
        raise AttributeError(f"module 'shared_ops' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
