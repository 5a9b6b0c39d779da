"""Registration networks sharing one interface: ``forward(moving, fixed) -> ddf`` (B, 3, D, H, W) in voxels."""

from rrn_lung_registration.networks.rrn import RRN, DenseFlowEstimator, DilatedRefiner, FeaturePyramid
from rrn_lung_registration.networks.voxelmorph import VoxelMorphBaseline

__all__ = ["RRN", "DenseFlowEstimator", "DilatedRefiner", "FeaturePyramid", "VoxelMorphBaseline"]
