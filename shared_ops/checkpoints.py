"""Checkpoints for MONAI engines, shared by both bundles: written atomically, found again on resume,
loaded safely.

Not a layer, but something both methods need in the same form: a run killed at any moment must resume
from a complete checkpoint.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from pathlib import Path

import torch
from monai.handlers import CheckpointSaver
from torch import nn

__all__ = ["AtomicCheckpointSaver", "latest_checkpoint", "load_network_weights"]

_STEP = re.compile(r"=(\d+)\.pt$")


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` with every file written to a temporary file first and then renamed.

    MONAI's saver writes in place, so a run killed while saving leaves a truncated checkpoint that the
    next run would try to resume from. Here a checkpoint file is either complete or absent (ignite's
    atomic saving; the files are then readable by their owner only). Arguments as ``CheckpointSaver``.

    Keep ``n_saved >= 2`` for interval checkpoints: ignite deletes the oldest file *before* writing the
    next one, so with ``n_saved=1`` a run killed during a save would leave no checkpoint at all.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """Path of the complete ``{prefix}_*=N.pt`` file with the largest ``N`` in ``directory``, or ``None``.

    ``CheckpointSaver`` names its interval checkpoints ``checkpoint_iteration=N.pt`` or
    ``checkpoint_epoch=N.pt``. :class:`AtomicCheckpointSaver` never leaves a partial file; files written
    otherwise count only when their zip directory (written last by ``torch.save``) is readable.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.glob(f"{prefix}_*.pt") if (m := _STEP.search(p.name))]
    for _, path in sorted(found, reverse=True):
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.namelist():
                    return str(path)
        except (zipfile.BadZipFile, OSError):
            warnings.warn(f"{path}: incomplete checkpoint skipped", stacklevel=2)
    return None


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
