"""Losses of the region-guided CycleGAN (Boyd et al., MICCAI 2022) and the discriminators' replay buffer.

* Least-squares GAN (LSGAN) losses: the mean squared distance of discriminator outputs to 1 (real) or 0
  (fake). They take any output shape: PatchGAN maps ``(B, 1, h, w)`` and RoI logits ``(K,)`` alike.
* Cycle and identity losses: mean absolute (L1) difference of two tile batches ``(B, C, H, W)``.
* :class:`ReplayBuffer`: the CycleGAN image pool of generated tiles shown to the image discriminators.

Weights and the averaging over the two translation directions belong to the trainer (released code:
``loss_G = GAN + 1 * RoI + 30 * cycle + 5 * identity``, each term averaged over both directions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ReplayBuffer",
    "cycle_loss",
    "identity_loss",
    "lsgan_discriminator_loss",
    "lsgan_generator_loss",
    "lsgan_loss",
]


def lsgan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: ``mean((prediction - t) ** 2)`` with ``t`` = 1 when ``real`` else 0.

    ``prediction`` is any tensor of raw discriminator outputs (no sigmoid). An empty ``prediction`` (e.g. a RoI
    discriminator given no boxes) gives a zero loss that stays connected to the graph, instead of NaN.
    """
    if not isinstance(prediction, torch.Tensor) or not prediction.is_floating_point():
        raise TypeError(f"lsgan_loss: expected a floating-point tensor of discriminator outputs, got {prediction!r}")
    if prediction.numel() == 0:
        return prediction.sum() * 0.0
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def lsgan_generator_loss(fake_prediction: torch.Tensor) -> torch.Tensor:
    """Generator side of LSGAN: the discriminator's outputs on generated tiles pulled to 1 (real)."""
    return lsgan_loss(fake_prediction, real=True)


def lsgan_discriminator_loss(real_prediction: torch.Tensor, fake_prediction: torch.Tensor) -> torch.Tensor:
    """Discriminator side of LSGAN: ``(lsgan(real, 1) + lsgan(fake, 0)) / 2``.

    The halving (as in CycleGAN and the released code) slows the discriminator relative to the generator.
    """
    return 0.5 * (lsgan_loss(real_prediction, real=True) + lsgan_loss(fake_prediction, real=False))


def _l1(output: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{name}: expected two tensors, got {type(output).__name__} and {type(target).__name__}")
    if output.shape != target.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(output.shape)} vs {tuple(target.shape)}")
    return F.l1_loss(output, target)


def cycle_loss(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Cycle consistency: ``mean |G_YX(G_XY(x)) - x|`` of tiles ``(B, C, H, W)`` of the same shape."""
    return _l1(reconstructed, original, "cycle_loss")


def identity_loss(mapped: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Identity: ``mean |G_XY(y) - y|``, a generator fed a tile of its own target domain should keep it."""
    return _l1(mapped, original, "identity_loss")


class ReplayBuffer:
    """Pool of previously generated tiles shown to the image discriminators (the CycleGAN image pool).

    :meth:`query` takes a batch ``(B, C, H, W)`` and returns a batch of the same shape, tile by tile: while the
    pool holds fewer than ``capacity`` tiles, the incoming tile is stored and returned; once full, with
    probability 1/2 a uniformly chosen stored tile is returned and replaced by the incoming one, otherwise the
    incoming tile is returned and the pool is unchanged. ``capacity = 0`` returns every batch unchanged. Stored
    and returned tiles are detached copies (the pool feeds discriminator updates only).

    Randomness comes from the buffer's own CPU ``torch.Generator`` (seeded with ``seed``, or from torch's global
    generator when ``seed`` is None, so ``torch.manual_seed`` makes runs repeatable). :meth:`state_dict` holds
    the stored tiles and the generator state, so a buffer restored by :meth:`load_state_dict` makes exactly the
    same choices as the original from then on.
    """

    def __init__(self, capacity: int = 50, seed: int | None = None) -> None:
        if int(capacity) < 0:
            raise ValueError(f"ReplayBuffer: capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._images: list[torch.Tensor] = []
        self._generator = torch.Generator()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        self._generator.manual_seed(int(seed))

    def __len__(self) -> int:
        return len(self._images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch ``(B, C, H, W)`` mixing ``images`` with stored tiles, updating the pool."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ReplayBuffer.query: expected a batch of tiles (B, C, H, W), got {shape}")
        images = images.detach()
        if self.capacity == 0:
            return images
        if self._images and images.shape[1:] != self._images[0].shape:
            raise ValueError(
                f"ReplayBuffer.query: tiles of shape {tuple(images.shape[1:])} do not match the stored tiles "
                f"{tuple(self._images[0].shape)}"
            )
        returned = []
        for image in images:
            if len(self._images) < self.capacity:
                self._images.append(image.clone())
                returned.append(image)
            elif float(torch.rand((), generator=self._generator)) > 0.5:
                slot = int(torch.randint(0, self.capacity, (), generator=self._generator))
                returned.append(self._images[slot].to(device=image.device, dtype=image.dtype))
                self._images[slot] = image.clone()
            else:
                returned.append(image)
        return torch.stack(returned)

    def state_dict(self) -> dict[str, Any]:
        """``{"capacity": int, "images": (N, C, H, W) or (0,), "rng_state": ByteTensor}``, copies of the state."""
        images = torch.stack(self._images) if self._images else torch.zeros(0)
        return {"capacity": self.capacity, "images": images.clone(), "rng_state": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` (same capacity) exactly."""
        missing = [key for key in ("capacity", "images", "rng_state") if key not in state]
        if missing:
            raise KeyError(f"ReplayBuffer.load_state_dict: missing keys {missing}")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"ReplayBuffer.load_state_dict: state of a buffer of capacity {state['capacity']}, "
                f"this buffer holds {self.capacity}"
            )
        images = state["images"]
        if not isinstance(images, torch.Tensor) or (images.numel() > 0 and images.ndim != 4):
            raise ValueError("ReplayBuffer.load_state_dict: 'images' must be a (N, C, H, W) tensor or empty")
        stored = list(images.clone().unbind(0)) if images.numel() > 0 else []
        if len(stored) > self.capacity:
            raise ValueError(f"ReplayBuffer.load_state_dict: {len(stored)} tiles for a capacity of {self.capacity}")
        self._generator.set_state(state["rng_state"].clone())
        self._images = stored
