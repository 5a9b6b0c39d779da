"""The I/O and geometry layer: everything that knows about files and physical space.

* ``ct_io``: CT readers and writers (DICOM series, NIfTI, MHA/MHD, NRRD, DIR-Lab raw ``.img``), fields;
* ``integrity``: truncated or corrupt image files, checked against their own headers;
* ``landmarks``: landmark files, world <-> voxel conversion, target registration error;
* ``spatial``: sampling volumes at world points, and the grids registration runs on;
* ``transform``: the fixed-to-moving transform a registration produces, in physical space;
* ``preflight``: checks made before a registration starts, and plausibility checks of its result.

Physical space enters and leaves the package here; the layers above work on voxel grids.
"""
