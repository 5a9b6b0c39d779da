"""The Recursive Refinement Network for exhale-to-inhale lung CT registration, as a library.

The package is layered; each layer uses only the ones listed before it:

* the method: ``networks`` (RRN, VoxelMorph baseline), ``losses``, ``warp`` (resampling by a field),
  ``fields`` (Jacobian and other field properties);
* ``io``, I/O and geometry: ``ct_io``, ``integrity``, ``landmarks``, ``spatial``, ``transform``, ``preflight``;
* ``masking``: ``lung_mask`` (automatic lung masks, lung boxes, the lung crop);
* ``alignment``, alignment and optimisation: ``prealign`` (rigid / affine), ``deformable`` (multi-level
  B-spline on MIND-SSC features, the registration without weights), ``instance`` (optimisation of a network's
  field on one pair);
* ``outputs``: ``overview`` (PNG); the output files themselves are written by ``pipeline``;
* ``pipeline`` (one pair, end to end: ``python -m rrn_lung_registration register``) and
  ``datalist_registration`` (a datalist of pairs, resumable: the bundle's ``register.json``);
* beside them: ``training`` (``data``, ``engines``, ``metrics``: MONAI training and evaluation) and
  ``synthetic`` (``phantom``, ``breathing``: pairs with exact correspondences).

Bundle configs import this package and reach everything as ``rrn_lung_registration.<layer>.<module>.<name>``.
The module paths of the former flat layout (``rrn_lung_registration.lung_mask``, ``...pipeline``, ...) remain
importable as aliases of the same module objects.
"""

import sys

from rrn_lung_registration import (  # noqa: I001  (after the layers it uses)
    alignment,
    datalist_registration,
    fields,
    io,
    losses,
    masking,
    networks,
    outputs,
    pipeline,
    synthetic,
    training,
    warp,
)
from rrn_lung_registration.alignment import instance, prealign
from rrn_lung_registration.io import ct_io, integrity, landmarks, preflight, spatial, transform
from rrn_lung_registration.masking import lung_mask
from rrn_lung_registration.outputs import overview
from rrn_lung_registration.synthetic import phantom
from rrn_lung_registration.training import data, engines, metrics

# Former flat module paths -> the same module objects, so that ``import rrn_lung_registration.lung_mask`` and
# ``from rrn_lung_registration.ct_io import read_ct`` keep working (``synthetic`` is now the package itself).
_FLAT_NAMES = {
    "ct_io": ct_io,
    "data": data,
    "engines": engines,
    "instance": instance,
    "integrity": integrity,
    "landmarks": landmarks,
    "lung_mask": lung_mask,
    "metrics": metrics,
    "overview": overview,
    "phantom": phantom,
    "prealign": prealign,
    "preflight": preflight,
    "spatial": spatial,
    "transform": transform,
}
for _name, _module in _FLAT_NAMES.items():
    sys.modules.setdefault(f"{__name__}.{_name}", _module)

__all__ = [
    "alignment",
    "datalist_registration",
    "fields",
    "io",
    "losses",
    "masking",
    "networks",
    "outputs",
    "pipeline",
    "synthetic",
    "training",
    "warp",
    *sorted(_FLAT_NAMES),
]
