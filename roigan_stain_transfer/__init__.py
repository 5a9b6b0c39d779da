"""The region-guided CycleGAN (Boyd et al., MICCAI 2022) for H&E -> IHC stain transfer, as a library.

Submodules: ``networks`` (ResNet generator, PatchGAN and RoI discriminators), ``losses`` (LSGAN, cycle,
identity, replay buffer), ``box_library`` (automatic cell boxes), ``data`` (tile sources, training / evaluation
datasets, balanced box sampling, resumable sampler), ``engines`` (MONAI trainer and training helpers),
``evaluation`` (evaluator, DICE/BAC report, tile writer), ``metrics``, and the subpackage ``wsi`` (whole slides in
and out: tiling by microns per pixel, annotations, streaming inference to pyramidal TIFF, virtual DAB regions).

After ``import roigan_stain_transfer`` every submodule is reachable as an attribute, so bundle configs can write
``roigan_stain_transfer.<submodule>.<name>``. Submodules are imported on first access (PEP 562) rather than
eagerly, so that ``python -m roigan_stain_transfer.box_library`` does not import its own module twice.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUBMODULES = ("box_library", "data", "engines", "evaluation", "losses", "metrics", "networks", "wsi")

__all__ = list(SUBMODULES)


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
