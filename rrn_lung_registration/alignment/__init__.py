"""The alignment and optimisation layer, on voxel grids in the fixed image's lung box.

* ``prealign``: rigid then affine pre-alignment;
* ``instance``: deformable optimisation of the field on one pair (from zero or from the network's field).
"""
