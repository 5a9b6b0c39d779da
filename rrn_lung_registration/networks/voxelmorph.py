"""MONAI's VoxelMorph behind the RRN interface, the baseline of the paper's comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import VoxelMorph
from torch import nn

from rrn_lung_registration.networks.rrn import split_pair
from shared_ops.architecture import RecordsArchitecture

__all__ = ["VoxelMorphBaseline"]


class VoxelMorphBaseline(RecordsArchitecture, nn.Module):
    """``forward(moving, fixed) -> ddf`` (B, 3, D, H, W) in voxels from :class:`monai.networks.nets.VoxelMorph`.

    Inputs of any size are padded at the far end of each axis (edge values) to a multiple of
    ``size_multiple`` (the U-Net's downsampling factor) and the field is cropped back. With the defaults
    (MONAI's VoxelMorph U-Net, 7 scaling-and-squaring steps) the network has 244,323 parameters.
    ``forward(pair)`` with one (B, 2, D, H, W) tensor (channel 0 moving, channel 1 fixed) is the same as
    ``forward(pair[:, :1], pair[:, 1:])``, as for :class:`~rrn_lung_registration.networks.RRN`.

    Args:
        integration_steps: scaling-and-squaring steps turning the predicted velocity into a displacement
            (0: the U-Net output is the displacement itself).
        half_res: integrate at half resolution, as VoxelMorph's option of the same name.
        size_multiple: padding multiple of the input size.

    The three arguments are recorded in the state dict, as for the RRN (:mod:`shared_ops.architecture`).
    """

    def __init__(self, integration_steps: int = 7, half_res: bool = False, size_multiple: int = 8) -> None:
        super().__init__()
        self.record_architecture(integration_steps=integration_steps, half_res=half_res, size_multiple=size_multiple)
        self.net = VoxelMorph(integration_steps=integration_steps, half_res=half_res)
        self.size_multiple = 2 * size_multiple if half_res else size_multiple

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        """Field (B, 3, D, H, W) registering ``moving`` to ``fixed`` (B, 1, D, H, W), or the pair (B, 2, D, H, W)."""
        if fixed is None:
            moving, fixed = split_pair(moving, 1, type(self).__name__)
        if moving.ndim != 5 or moving.shape != fixed.shape or moving.shape[1] != 1:
            raise ValueError(
                "VoxelMorphBaseline expects moving and fixed of the same shape (B, 1, D, H, W), got "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}."
            )
        shape = fixed.shape[2:]
        pad = [(-size) % self.size_multiple for size in shape]
        if any(pad):
            padding = [0, pad[2], 0, pad[1], 0, pad[0]]
            moving, fixed = F.pad(moving, padding, mode="replicate"), F.pad(fixed, padding, mode="replicate")
        _, ddf = self.net(moving, fixed)
        return ddf[..., : shape[0], : shape[1], : shape[2]]
