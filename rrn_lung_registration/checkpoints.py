"""Finding the checkpoint a run resumes from, and loading network weights safely."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["latest_checkpoint", "load_network_weights"]

_STEP = re.compile(r"=(\d+)\.pt$")


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the most advanced ``{prefix}_*=N.pt`` file in ``directory`` (largest N), or ``None``.

    MONAI's ``CheckpointSaver`` names its interval checkpoints ``checkpoint_epoch=N.pt`` or
    ``checkpoint_iteration=N.pt``; files are written atomically, so any file found is complete.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.glob(f"{prefix}_*.pt") if (m := _STEP.search(p.name))]
    return str(max(found)[1]) if found else None


def load_network_weights(network: nn.Module, path: str | os.PathLike, key: str = "network") -> nn.Module:
    """Load weights into ``network`` from a state dict file, or from the ``key`` entry of a checkpoint.

    Uses ``torch.load(..., weights_only=True)``; errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"{path}: weights do not fit {type(network).__name__}: {error}") from None
    return network
