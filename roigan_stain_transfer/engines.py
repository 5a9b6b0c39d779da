"""MONAI trainer of the region-guided CycleGAN (Boyd et al., MICCAI 2022) and its training helpers.

Domains: ``X`` = H&E, ``Y`` = IHC. ``G_XY`` translates H&E to IHC, ``G_YX`` back. ``D_X`` and ``D_Y`` are the
PatchGAN discriminators of each domain; the optional RoI discriminators ``R_X`` and ``R_Y`` score cell boxes.

One iteration (:meth:`RoIGANTrainer._iteration`) on a batch of :func:`roigan_stain_transfer.data.collate_tiles`
(``he``, ``ihc`` ``(B, 3, H, W)`` in ``[-1, 1]``, per-tile box / class lists):

1. generators, discriminators frozen::

       fake_y = G_XY(x), fake_x = G_YX(y), rec_x = G_YX(fake_y), rec_y = G_XY(fake_x)
       GAN      = (lsgan(D_Y(fake_y), 1) + lsgan(D_X(fake_x), 1)) / 2
       RoI      = (lsgan(R_Y(fake_y, boxes_x), 1) + lsgan(R_X(fake_x, boxes_y), 1)) / 2
       cycle    = (|rec_x - x| + |rec_y - y|) / 2
       identity = (|G_YX(x) - x| + |G_XY(y) - y|) / 2
       loss_G   = lambda_gan GAN + lambda_roi RoI + lambda_cyc cycle + lambda_id identity

   A generated image is judged with the boxes (and classes) of its source image.
2. discriminators: ``D_Y`` sees real ``y`` (-> 1) and a replay-buffer mix of ``fake_y`` (-> 0), likewise ``D_X``;
   ``R_Y`` sees the boxes of real ``y`` (-> 1) and the boxes of ``x`` on ``fake_y`` (-> 0), without buffer;
   ``loss_D`` is the sum of the four halved LSGAN losses
   (:func:`~roigan_stain_transfer.losses.lsgan_discriminator_loss`).

The iteration output is a dict of floats (every loss term), ready for ``StatsHandler`` and
``TensorBoardStatsHandler`` with ``output_transform=loss_terms``.

Checkpoints: :meth:`RoIGANTrainer.checkpoint_objects` lists every stateful object (networks, optimizers,
schedulers, replay buffers, AMP scalers and the trainer itself) for MONAI's ``CheckpointSaver`` /
``CheckpointLoader``; all states load with ``torch.load(weights_only=True)``. Resuming is exact: learning-rate
schedules follow the epoch count, the replay buffers restore their generators, and a :class:`TileSampler`
replays the interrupted epoch from the first batch not yet trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from roigan_stain_transfer.data import HE_KEY, IHC_KEY
from roigan_stain_transfer.losses import (
    ReplayBuffer,
    cycle_loss,
    identity_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
)
from shared_ops.engines import engine_autocast

__all__ = [
    "LinearDecayLR",
    "RoIGANTrainer",
    "loss_terms",
    "parameters_of",
    "unwrap",
    "wrap_ddp",
]


# ----------------------------------------------------------------------------------------------------------------
# Helpers used by the bundle configs
# ----------------------------------------------------------------------------------------------------------------


def unwrap(module: nn.Module | None) -> nn.Module | None:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``module`` itself)."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return module


def parameters_of(*modules: nn.Module | None) -> list[nn.Parameter]:
    """Parameters of all given modules (None entries skipped, wrappers unwrapped), for one optimizer."""
    params: list[nn.Parameter] = []
    for module in modules:
        if module is not None:
            params += list(unwrap(module).parameters())
    if not params:
        raise ValueError("parameters_of: no parameters (all modules are None or empty)")
    return params


def wrap_ddp(module: nn.Module | None, device: torch.device | str) -> nn.Module | None:
    """``module`` moved to ``device`` and wrapped in ``DistributedDataParallel`` (None stays None).

    On CUDA the wrapper gets ``device_ids=[device]``; on CPU (gloo) none.
    """
    if module is None:
        return None
    device = torch.device(device)
    module = module.to(device)
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def loss_terms(output: Any) -> dict[str, float] | None:
    """``output_transform`` for ``StatsHandler`` / ``TensorBoardStatsHandler``: the float entries of the output."""
    if not isinstance(output, Mapping):
        return None
    return {key: value for key, value in output.items() if isinstance(value, float)}


class _LinearDecay:
    """Learning-rate factor of epoch ``e`` (0-based): 1 before ``decay_start``, then linear towards 0.

    ``factor(e) = 1 - (e - decay_start + 1) / (total_epochs - decay_start + 1)`` for ``e >= decay_start``
    (the CycleGAN schedule). A plain object, so ``LambdaLR.state_dict`` stores its two ints.
    """

    def __init__(self, total_epochs: int, decay_start: int) -> None:
        self.total_epochs = int(total_epochs)
        self.decay_start = int(decay_start)

    def __call__(self, epoch: int) -> float:
        if epoch < self.decay_start:
            return 1.0
        return max(0.0, 1.0 - (epoch - self.decay_start + 1) / (self.total_epochs - self.decay_start + 1))


class LinearDecayLR(LambdaLR):
    """Constant learning rate for ``decay_start_epoch`` epochs, then linear decay to 0 at ``total_epochs``.

    Stepped once per epoch (:class:`RoIGANTrainer` does it at each epoch start, from the epoch count, so a resumed
    run follows the same schedule). Released code: 25 epochs and ``decay_start_epoch=13``, i.e. the factor
    ``1 - max(0, e - 12) / 13`` of its scheduler stepped after each epoch: 1 for the 0-based epochs 0-12, 12/13 at
    epoch 13, 1/13 at epoch 24. ``decay_start_epoch`` None (or ``>= total_epochs``) keeps the rate constant.

    The state (``last_epoch``, base rates) leaves out the schedule itself: a run resumed with a larger
    ``total_epochs`` (to train longer) follows the schedule it is constructed with.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, decay_start_epoch: int | None = None):
        total_epochs = int(total_epochs)
        if total_epochs < 1:
            raise ValueError(f"LinearDecayLR: total_epochs must be >= 1, got {total_epochs}")
        start = total_epochs if decay_start_epoch is None else int(decay_start_epoch)
        if start < 0:
            raise ValueError(f"LinearDecayLR: decay_start_epoch must be >= 0, got {decay_start_epoch}")
        super().__init__(optimizer, _LinearDecay(total_epochs, min(start, total_epochs)))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {key: value for key, value in state_dict.items() if key != "lr_lambdas"}
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        super().load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


def _set_requires_grad(modules: Sequence[nn.Module | None], flag: bool) -> None:
    for module in modules:
        if module is not None:
            for parameter in module.parameters():
                parameter.requires_grad_(flag)


def _float(value: torch.Tensor) -> float:
    return float(value.detach().float().item())


class RoIGANTrainer(Trainer):
    """Region-guided CycleGAN trainer (plain CycleGAN when the RoI discriminators are None).

    Args:
        device: device of the networks and batches.
        max_epochs: epochs to train.
        train_data_loader: loader of :class:`roigan_stain_transfer.data.UnpairedTileDataset` batches collated by
            :func:`roigan_stain_transfer.data.collate_tiles` (boxes as lists of ``(k, 4)``, or ``(B, k, 4)``).
        g_xy, g_yx: generators H&E -> IHC and IHC -> H&E (``(B, 3, H, W) -> (B, 3, H, W)``).
        d_x, d_y: PatchGAN discriminators of H&E and IHC tiles.
        g_optimizer: optimizer of both generators; d_optimizer: of all discriminators (Adam 2e-4, (0.5, 0.999)).
        roi_d_x, roi_d_y: RoI discriminators of H&E and IHC boxes (both or neither).
        g_scheduler, d_scheduler: learning-rate schedulers stepped per epoch (e.g. :class:`LinearDecayLR`).
        buffer_x, buffer_y: replay buffers of generated H&E / IHC tiles for ``D_X`` / ``D_Y`` (default capacity 50,
            seeded from torch's global generator).
        lambda_gan, lambda_roi, lambda_cyc, lambda_id: loss weights (released code 1, 1, 30, 5; the paper's
            proposed model uses lambda_cyc 30). ``lambda_id = 0`` skips the identity passes.
        epoch_length: iterations per epoch (default ``len(train_data_loader)``; exact resume needs the default: set
            the epoch's length through :class:`~roigan_stain_transfer.data.TileSampler` ``samples_per_epoch``, as
            the bundle's ``epoch_length`` does).
        non_blocking: non-blocking host-to-device copies.
        amp: mixed precision (float16 + gradient scalers on CUDA, bfloat16 on CPU).
        amp_kwargs: extra arguments of ``torch.autocast``.
        train_handlers: MONAI / ignite handlers to attach.
        x_key, y_key: batch keys of the H&E and IHC tiles (boxes under ``<key>_boxes``, classes ``<key>_classes``).

    Networks may be wrapped in ``DistributedDataParallel``; discriminators are then called through their inner
    module in the generator step (no gradient for them there, so no reduction is expected).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        g_xy: nn.Module,
        g_yx: nn.Module,
        d_x: nn.Module,
        d_y: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        roi_d_x: nn.Module | None = None,
        roi_d_y: nn.Module | None = None,
        g_scheduler: Any | None = None,
        d_scheduler: Any | None = None,
        buffer_x: ReplayBuffer | None = None,
        buffer_y: ReplayBuffer | None = None,
        lambda_gan: float = 1.0,
        lambda_roi: float = 1.0,
        lambda_cyc: float = 30.0,
        lambda_id: float = 5.0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        train_handlers: Sequence | None = None,
        x_key: str = HE_KEY,
        y_key: str = IHC_KEY,
    ) -> None:
        if (roi_d_x is None) != (roi_d_y is None):
            raise ValueError("RoIGANTrainer: give both RoI discriminators (proposed model) or neither (CycleGAN)")
        for name, weight in (("lambda_gan", lambda_gan), ("lambda_roi", lambda_roi), ("lambda_cyc", lambda_cyc)):
            if float(weight) < 0:
                raise ValueError(f"RoIGANTrainer: {name} must be >= 0, got {weight}")
        if float(lambda_id) < 0:
            raise ValueError(f"RoIGANTrainer: lambda_id must be >= 0, got {lambda_id}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=None,
            amp=amp,
            decollate=False,
            amp_kwargs=amp_kwargs,
        )
        self.g_xy, self.g_yx, self.d_x, self.d_y = g_xy, g_yx, d_x, d_y
        self.roi_d_x, self.roi_d_y = roi_d_x, roi_d_y
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.g_scheduler, self.d_scheduler = g_scheduler, d_scheduler
        self.buffer_x = buffer_x if buffer_x is not None else ReplayBuffer(50)
        self.buffer_y = buffer_y if buffer_y is not None else ReplayBuffer(50)
        self.lambda_gan, self.lambda_roi = float(lambda_gan), float(lambda_roi)
        self.lambda_cyc, self.lambda_id = float(lambda_cyc), float(lambda_id)
        self.x_key, self.y_key = x_key, y_key
        cuda_amp = bool(amp) and torch.device(device).type == "cuda"
        self.g_scaler = torch.amp.GradScaler("cuda") if cuda_amp else None
        self.d_scaler = torch.amp.GradScaler("cuda") if cuda_amp else None
        # Registered before any user handler, so the epoch is prepared before e.g. a checkpoint loader acts on it.
        self.add_event_handler(Events.EPOCH_STARTED, self._prepare_epoch)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    # -- properties -----------------------------------------------------------------------------------------------

    @property
    def uses_roi(self) -> bool:
        """Whether the RoI discriminators take part (proposed model) or not (CycleGAN baseline)."""
        return self.roi_d_x is not None

    @property
    def generators(self) -> tuple[nn.Module, nn.Module]:
        return self.g_xy, self.g_yx

    @property
    def discriminators(self) -> tuple[nn.Module, ...]:
        """``(D_X, D_Y)`` plus ``(R_X, R_Y)`` when the RoI discriminators take part."""
        extra = (self.roi_d_x, self.roi_d_y) if self.uses_roi else ()
        return (self.d_x, self.d_y, *extra)

    def checkpoint_objects(self) -> dict[str, Any]:
        """Every stateful object by name, for ``CheckpointSaver(save_dict=...)`` / ``CheckpointLoader(load_dict=...)``.

        Networks are given unwrapped (no ``module.`` prefix under DDP); missing optional objects are left out.
        """
        objects: dict[str, Any] = {
            "g_xy": unwrap(self.g_xy),
            "g_yx": unwrap(self.g_yx),
            "d_x": unwrap(self.d_x),
            "d_y": unwrap(self.d_y),
            "roi_d_x": unwrap(self.roi_d_x),
            "roi_d_y": unwrap(self.roi_d_y),
            "g_optimizer": self.g_optimizer,
            "d_optimizer": self.d_optimizer,
            "g_scheduler": self.g_scheduler,
            "d_scheduler": self.d_scheduler,
            "buffer_x": self.buffer_x,
            "buffer_y": self.buffer_y,
            "g_scaler": self.g_scaler,
            "d_scaler": self.d_scaler,
            "trainer": self,
        }
        return {name: obj for name, obj in objects.items() if obj is not None}

    # -- engine ---------------------------------------------------------------------------------------------------

    def run(self) -> None:  # type: ignore[override]
        """Train (or resume) until ``max_epochs``.

        Skips :meth:`monai.engines.Trainer.run`, which would create its own (single) AMP scaler: this trainer has
        one per optimizer (``g_scaler``, ``d_scaler``).
        """
        Workflow.run(self)

    def _prepare_epoch(self, engine: RoIGANTrainer) -> None:
        """At each epoch start: schedules follow the epoch count; the sampler gets its epoch and, when a resumed run
        starts part-way through an epoch, skips the samples already trained on."""
        completed_epochs = engine.state.epoch - 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            for scheduler in (self.g_scheduler, self.d_scheduler):
                if scheduler is not None:
                    while scheduler.last_epoch < completed_epochs:
                        scheduler.step()
        sampler = getattr(self.data_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(engine.state.epoch)
        done = engine.state.iteration - completed_epochs * (engine.state.epoch_length or 0)
        if done > 0:
            if hasattr(sampler, "set_start"):
                sampler.set_start(done * int(getattr(self.data_loader, "batch_size", 1) or 1))
            else:
                warnings.warn(
                    f"resuming part-way through epoch {engine.state.epoch}: the data loader's sampler cannot skip the "
                    f"{done} batches already trained on (use roigan_stain_transfer.data.TileSampler for exact resume)",
                    stacklevel=2,
                )

    def _autocast(self):
        return engine_autocast(self)

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.state.device, non_blocking=self.non_blocking)
        if isinstance(value, (list, tuple)):
            return [self._to_device(v) for v in value]
        return value

    def _domain(self, batchdata: Mapping, key: str):
        """``(tiles (B, 3, H, W), boxes, classes)`` of one domain; boxes/classes None without RoI training."""
        if key not in batchdata:
            raise KeyError(f"RoIGANTrainer: the batch has no {key!r} tiles; it has {sorted(batchdata)}")
        tiles = self._to_device(batchdata[key])
        if isinstance(tiles, torch.Tensor) and hasattr(tiles, "as_tensor"):
            tiles = tiles.as_tensor()
        if not self.uses_roi:
            return tiles, None, None
        missing = [k for k in (f"{key}_boxes", f"{key}_classes") if k not in batchdata]
        if missing:
            raise KeyError(f"RoIGANTrainer: RoI training needs the batch keys {missing}; it has {sorted(batchdata)}")
        boxes = self._to_device(batchdata[f"{key}_boxes"])
        classes = self._to_device(batchdata[f"{key}_classes"])
        if isinstance(boxes, torch.Tensor) and boxes.ndim == 3:  # (B, k, 4) from a default collate
            boxes, classes = list(boxes.float().unbind(0)), list(classes.long().unbind(0))
        return tiles, boxes, classes

    def _step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def _iteration(self, engine: RoIGANTrainer, batchdata: Mapping) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        x, boxes_x, classes_x = engine._domain(batchdata, engine.x_key)
        y, boxes_y, classes_y = engine._domain(batchdata, engine.y_key)
        for network in (*engine.generators, *engine.discriminators):
            network.train()
        out: dict[str, float] = {}

        # ---- generators -------------------------------------------------------------------------------------
        inner = [unwrap(d) for d in engine.discriminators]
        _set_requires_grad(inner, False)
        engine.g_optimizer.zero_grad(set_to_none=True)
        with engine._autocast():
            fake_y = engine.g_xy(x)
            fake_x = engine.g_yx(y)
            rec_x = engine.g_yx(fake_y)
            rec_y = engine.g_xy(fake_x)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            gan_xy = lsgan_generator_loss(unwrap(engine.d_y)(fake_y).float())
            gan_yx = lsgan_generator_loss(unwrap(engine.d_x)(fake_x).float())
            cyc_x = cycle_loss(rec_x.float(), x)
            cyc_y = cycle_loss(rec_y.float(), y)
            loss_g = engine.lambda_gan * (gan_xy + gan_yx) / 2 + engine.lambda_cyc * (cyc_x + cyc_y) / 2
            out.update(gan_xy=_float(gan_xy), gan_yx=_float(gan_yx), cycle_x=_float(cyc_x), cycle_y=_float(cyc_y))
            if engine.lambda_id > 0:
                id_x = identity_loss(engine.g_yx(x).float(), x)
                id_y = identity_loss(engine.g_xy(y).float(), y)
                loss_g = loss_g + engine.lambda_id * (id_x + id_y) / 2
                out.update(identity_x=_float(id_x), identity_y=_float(id_y))
            if engine.uses_roi:
                roi_xy = lsgan_generator_loss(unwrap(engine.roi_d_y)(fake_y, boxes_x, classes_x).float())
                roi_yx = lsgan_generator_loss(unwrap(engine.roi_d_x)(fake_x, boxes_y, classes_y).float())
                loss_g = loss_g + engine.lambda_roi * (roi_xy + roi_yx) / 2
                out.update(roi_xy=_float(roi_xy), roi_yx=_float(roi_yx))
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine._step(loss_g, engine.g_optimizer, engine.g_scaler)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        _set_requires_grad(inner, True)

        # ---- discriminators ---------------------------------------------------------------------------------
        fake_y, fake_x = fake_y.detach().float(), fake_x.detach().float()
        pooled_y = engine.buffer_y.query(fake_y)
        pooled_x = engine.buffer_x.query(fake_x)
        engine.d_optimizer.zero_grad(set_to_none=True)
        with engine._autocast():
            d_y = lsgan_discriminator_loss(engine.d_y(y).float(), engine.d_y(pooled_y).float())
            d_x = lsgan_discriminator_loss(engine.d_x(x).float(), engine.d_x(pooled_x).float())
            loss_d = d_x + d_y
            out.update(d_x=_float(d_x), d_y=_float(d_y))
            if engine.uses_roi:
                real_y = engine.roi_d_y(y, boxes_y, classes_y).float()
                roi_d_y = lsgan_discriminator_loss(real_y, engine.roi_d_y(fake_y, boxes_x, classes_x).float())
                real_x = engine.roi_d_x(x, boxes_x, classes_x).float()
                roi_d_x = lsgan_discriminator_loss(real_x, engine.roi_d_x(fake_x, boxes_y, classes_y).float())
                loss_d = loss_d + roi_d_x + roi_d_y
                out.update(roi_d_x=_float(roi_d_x), roi_d_y=_float(roi_d_y))
        engine._step(loss_d, engine.d_optimizer, engine.d_scaler)

        out["loss_G"] = _float(loss_g)
        out["loss_D"] = _float(loss_d)
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out
