"""The Recursive Refinement Network for exhale-to-inhale lung CT registration, as a library.

Submodules:

* the method: ``networks`` (RRN, VoxelMorph baseline), ``losses``, ``warp``, ``fields`` (Jacobian),
  ``engines`` (MONAI trainer / evaluator), ``metrics``;
* data: ``ct_io`` (CT readers and writers, DIR-Lab raw files, displacement fields), ``integrity``
  (truncated / corrupt image files), ``data`` (datalists and checks), ``landmarks`` (files, world/voxel
  conversion, TRE), ``lung_mask`` (automatic lung masks, lung crop), ``phantom`` (synthetic breathing-lung
  pairs), ``synthetic`` (synthetic breathing pairs from a real CT);
* registering real scans: ``spatial`` (world-space sampling, grids), ``prealign`` (rigid / affine),
  ``instance`` (instance optimisation), ``transform`` (the physical-space transform), ``pipeline`` (the
  whole registration of a pair and its outputs; ``python -m rrn_lung_registration register``),
  ``datalist_registration`` (a datalist of pairs, resumable, keyed by input paths: the bundle's ``register.json``),
  ``preflight`` (the checks made before a registration starts, and of its result), ``overview`` (PNG).

Bundle configs import this package and reach everything as ``rrn_lung_registration.<submodule>.<name>``.
"""

from rrn_lung_registration import (
    ct_io,
    data,
    datalist_registration,
    engines,
    fields,
    instance,
    integrity,
    landmarks,
    losses,
    lung_mask,
    metrics,
    networks,
    overview,
    phantom,
    pipeline,
    prealign,
    preflight,
    spatial,
    synthetic,
    transform,
    warp,
)

__all__ = [
    "ct_io",
    "data",
    "datalist_registration",
    "engines",
    "fields",
    "instance",
    "integrity",
    "landmarks",
    "losses",
    "lung_mask",
    "metrics",
    "networks",
    "overview",
    "phantom",
    "pipeline",
    "prealign",
    "preflight",
    "spatial",
    "synthetic",
    "transform",
    "warp",
]
