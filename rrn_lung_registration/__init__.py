"""The Recursive Refinement Network for exhale-to-inhale lung CT registration, as a library.

Submodules: ``networks`` (RRN, VoxelMorph baseline), ``losses``, ``warp``, ``data`` (datalists and checks),
``landmarks`` (files, world/voxel conversion, TRE), ``engines`` (MONAI trainer / evaluator), ``metrics``,
``checkpoints`` and ``phantom`` (synthetic breathing-lung pairs). Bundle configs import this package and
reach everything as ``rrn_lung_registration.<submodule>.<name>``.
"""

from rrn_lung_registration import checkpoints, data, engines, landmarks, losses, metrics, networks, phantom, warp

__all__ = ["checkpoints", "data", "engines", "landmarks", "losses", "metrics", "networks", "phantom", "warp"]
