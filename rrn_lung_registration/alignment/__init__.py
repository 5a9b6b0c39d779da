"""The alignment and optimisation layer, on grids over the fixed image's lung box.

* ``prealign``: rigid then affine pre-alignment;
* ``deformable``: the registration without weights: a multi-level cubic B-spline (``bspline``) fitted to
  MIND-SSC features at the images' own resolution;
* ``instance``: optimisation of a network's field, or fine-tuning of the network, on one pair;
* ``threads``: the CPU resources of the optimisers' steps.
"""
