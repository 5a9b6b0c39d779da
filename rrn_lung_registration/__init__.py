"""The Recursive Refinement Network for exhale-to-inhale lung CT registration, as a library.

Submodules: ``networks`` (RRN, VoxelMorph baseline), ``losses``, ``warp``, ``fields`` (Jacobian),
``ct_io`` (CT readers and writers, DIR-Lab raw files), ``data`` (datalists and checks), ``landmarks``
(files, world/voxel conversion, TRE), ``engines`` (MONAI trainer / evaluator), ``metrics``, ``overview``
(PNG) and ``phantom`` (synthetic breathing-lung pairs).
Bundle configs import this package and reach everything as ``rrn_lung_registration.<submodule>.<name>``.
"""

from rrn_lung_registration import (
    ct_io,
    data,
    engines,
    fields,
    landmarks,
    losses,
    metrics,
    networks,
    overview,
    phantom,
    warp,
)

__all__ = [
    "ct_io",
    "data",
    "engines",
    "fields",
    "landmarks",
    "losses",
    "metrics",
    "networks",
    "overview",
    "phantom",
    "warp",
]
