"""MONAI engines for unsupervised pairwise registration.

Both engines read batches holding ``fixed`` and ``moving`` images ``(B, 1, D, H, W)`` on one voxel grid,
call ``network(moving, fixed)`` (through the inferer) for the displacement ``ddf (B, 3, D, H, W)`` in
voxels (MONAI ``Warp`` convention) and warp ``moving`` with it. Their iteration output is a dict with
``fixed``, ``moving``, ``pred`` (the ddf), ``warped`` and, for training, ``loss``; landmark entries of the
batch (``fixed_landmarks``, ``moving_landmarks``) are passed through for metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from rrn_lung_registration.training.data import IMAGE_KEYS, LANDMARK_KEYS
from rrn_lung_registration.warp import Warp3d
from shared_ops.engines import engine_autocast

__all__ = ["RegistrationEvaluator", "RegistrationTrainer"]

WARPED = "warped"


def _to_device(engine, value: torch.Tensor) -> torch.Tensor:
    if isinstance(value, MetaTensor):
        value = value.as_tensor()
    return value.to(engine.state.device, non_blocking=engine.non_blocking)


def _with_meta(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a MetaTensor carrying the metadata and applied transforms of ``like`` (for ``Invertd``)."""
    if isinstance(like, MetaTensor):
        return MetaTensor(value, meta=like.meta, applied_operations=like.applied_operations)
    return value


def _pair(engine, batchdata: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    missing = [key for key in (engine.fixed_key, engine.moving_key) if key not in batchdata]
    if missing:
        raise KeyError(f"a registration batch needs the keys {missing}; it has {sorted(batchdata)}.")
    return _to_device(engine, batchdata[engine.fixed_key]), _to_device(engine, batchdata[engine.moving_key])


def _output(engine, batchdata: Mapping, fixed, moving, ddf, warped) -> dict:
    out = {
        engine.fixed_key: _with_meta(fixed, batchdata[engine.fixed_key]),
        engine.moving_key: _with_meta(moving, batchdata[engine.moving_key]),
        CommonKeys.PRED: _with_meta(ddf, batchdata[engine.fixed_key]),
        WARPED: _with_meta(warped, batchdata[engine.fixed_key]),
    }
    for key in engine.passthrough_keys:
        if key in batchdata:
            out[key] = batchdata[key]
    return out


class _PairEngine:
    """What both registration engines add to their MONAI base: the warp and the batch keys."""

    def _setup_pair(self, warp: nn.Module | None, fixed_key: str, moving_key: str, passthrough_keys) -> None:
        self.warp = warp if warp is not None else Warp3d()
        self.fixed_key, self.moving_key = fixed_key, moving_key
        self.passthrough_keys = tuple(passthrough_keys)


class RegistrationTrainer(_PairEngine, SupervisedTrainer):
    """Unsupervised trainer: ``loss = loss_function(fixed, warp(moving, ddf), ddf)``.

    Takes every argument of :class:`monai.engines.SupervisedTrainer` (``loss_function`` is called with the
    three tensors above, e.g. :class:`rrn_lung_registration.losses.RegistrationLoss`), plus:

    Args:
        warp: the warping module (default :class:`rrn_lung_registration.warp.Warp3d`, trilinear, border).
        fixed_key, moving_key: batch keys of the two images.
        passthrough_keys: batch keys copied into the iteration output.

    """

    def __init__(
        self,
        *args,
        warp: nn.Module | None = None,
        fixed_key: str = IMAGE_KEYS[0],
        moving_key: str = IMAGE_KEYS[1],
        passthrough_keys: Sequence[str] = LANDMARK_KEYS,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._setup_pair(warp, fixed_key, moving_key, passthrough_keys)

    def _iteration(self, engine: RegistrationTrainer, batchdata: Mapping) -> dict:
        fixed, moving = _pair(engine, batchdata)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine_autocast(engine):
            ddf = engine.inferer(moving, engine.network, fixed)
            warped = engine.warp(moving, ddf)
            engine.state.output = _output(engine, batchdata, fixed, moving, ddf, warped)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(fixed, warped, ddf)
        engine.state.output[CommonKeys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.scaler is not None and torch.device(engine.state.device).type == "cuda":
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.state.output[CommonKeys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class RegistrationEvaluator(_PairEngine, SupervisedEvaluator):
    """Evaluator / inference engine for pairs: fields and warped images, no gradients.

    Takes every argument of :class:`monai.engines.SupervisedEvaluator`, plus ``warp``, ``fixed_key``,
    ``moving_key`` and ``passthrough_keys`` as :class:`RegistrationTrainer`. ``pred`` and ``warped`` carry
    the fixed image's geometry (they live on its grid), so ``SaveImaged`` writes them correctly.
    """

    def __init__(
        self,
        *args,
        warp: nn.Module | None = None,
        fixed_key: str = IMAGE_KEYS[0],
        moving_key: str = IMAGE_KEYS[1],
        passthrough_keys: Sequence[str] = LANDMARK_KEYS,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._setup_pair(warp, fixed_key, moving_key, passthrough_keys)

    def _iteration(self, engine: RegistrationEvaluator, batchdata: Mapping) -> dict:
        fixed, moving = _pair(engine, batchdata)
        engine.network.eval()
        with engine.mode(engine.network), engine_autocast(engine):
            ddf = engine.inferer(moving, engine.network, fixed)
        ddf = ddf.float()
        with engine.mode(engine.network):
            warped = engine.warp(moving, ddf)
        engine.state.output = _output(engine, batchdata, fixed, moving, ddf, warped)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
