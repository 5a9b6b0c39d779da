"""Slide-consistent instance normalisation: seamless tile-by-tile translation of whole slides without retraining.

The CycleGAN generator (:class:`roigan_stain_transfer.networks.ResnetGenerator`) follows every convolution but
the last by ``nn.InstanceNorm2d`` without affine parameters. Instance normalisation (IN) takes its mean and
standard deviation from the tile itself, so when a slide is translated tile by tile, neighbouring tiles that see
different tissue come out in different tones and the mosaic shows seams. :class:`SlideNormalization` swaps every
IN layer of a network, in place and without touching its weights, for a :class:`SlideInstanceNorm2d` that can
take its statistics from the whole slide instead. Three modes (:data:`NORMALIZATION_MODES`):

* ``"tile"``: plain IN, bit-identical to ``nn.InstanceNorm2d`` (the network as trained).
* ``"kernel"``: Kernelized Instance Normalization (Ho, Wu and Wu, ECCV 2022). Each tile is normalised with the
  slide statistics, smoothed over neighbouring tiles by a Gaussian kernel, interpolated at the tile's centre:
  one mean and one standard deviation per channel, constant over the tile.
* ``"dense"``: Dense Normalization (Ho et al., ECCV 2024). The smoothed statistics are interpolated bilinearly
  at the centre of every pixel of the feature map, so two overlapping tiles normalise a shared pixel with the
  same statistics (no seams) while the statistics still follow the tissue (local contrast is kept).

Two passes (``"kernel"`` and ``"dense"``)::

    norm = SlideNormalization(generator, mode="dense", grid_spacing=stride * k, grid_origin=first_centre,
                              grid_shape=(gy, gx), sigma=1.0)
    with torch.no_grad(), norm.collecting():          # 1. statistics of a subset of tiles (every k-th, say)
        for tiles, origins in subset:
            with norm.tiles(origins, tile_size):
                generator(tiles)                      #    outputs as in "tile" mode, discarded
    norm.finalize()                                   # 2. smoothed statistics grids, one per IN layer
    with torch.no_grad():
        for tiles, origins in all_tiles:              # 3. the translation itself
            with norm.tiles(origins, tile_size):
                translated = generator(tiles)

Coordinates follow :mod:`roigan_stain_transfer.wsi`: positions are continuous ``(row, col)`` in output-grid
pixels, pixel ``(r, c)`` covering ``[r, r + 1) x [c, c + 1)``. A tile of ``T`` px with top-left origin
``(r0, c0)`` covers ``[r0, r0 + T)`` and has its centre at ``(r0 + T / 2, c0 + T / 2)``. A feature map of spatial
size ``(h, w)`` computed from that tile covers it with stride ``(T / h, T / w)``: its pixel ``(p, q)`` sits at
``(r0 + (p + 1/2) T / h, c0 + (q + 1/2) T / w)`` (half an input pixel off for padded stride-2 convolutions,
negligible against the grid spacing). The statistics live on a regular grid of ``gy x gx`` nodes, node
``(i, j)`` at ``(y0 + i * spacing, x0 + j * spacing)``; slide inference takes ``spacing`` = tile stride times
an integer ``k`` and ``(y0, x0)`` = the centre of the first tile, so tile centres fall on nodes.

Collection attributes each tile's per-channel mean and standard deviation (biased, as IN) to the node nearest
to its centre; several tiles on one node are averaged. :meth:`SlideNormalization.finalize` then smooths every
layer's grid by normalised Gaussian convolution over the visited nodes (``sigma`` in nodes, truncated at
``ceil(3 sigma)`` nodes): a node never visited takes the kernel-weighted average of the visited nodes within
reach, or, with none in reach, the mean over all collected tiles. Normalisation is
``(x - mean) / sqrt(std ** 2 + eps)``, with the layer's own ``eps`` (``nn.InstanceNorm2d`` semantics).

Cost: one extra generator pass on the collected tiles (run them all for the most faithful statistics, or every
``k``-th tile of the grid); finalize is ``O(gy * gx * sum(C) * sigma)``. ``"kernel"`` costs as much as
``"tile"``; ``"dense"`` adds one bilinear lookup per IN layer, with a transient float32 tensor twice the size
of the feature map.

Memory: each node holds ``2 * C`` float32 values per IN layer (mean and std), i.e.
:attr:`SlideNormalization.bytes_per_node` ``= 8 * sum(C)`` bytes over the IN layers, on the generator's device
after finalize (:meth:`SlideNormalization.statistics_bytes` for the whole grid); the sparse collected
statistics take as much on the CPU per visited node (plus 16 bytes per layer). With the default ``ResnetGenerator``
(``c = 64``): 9 blocks, ``sum(C)`` = 5248, 41,984 bytes per node; 6 blocks, 3712, 29,696 bytes per node. A
200 x 200 grid of the 9-block generator thus takes 1.68 GB; choose the grid spacing (``k``) accordingly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMALIZATION_MODES", "SlideInstanceNorm2d", "SlideNormalization"]

NORMALIZATION_MODES = ("tile", "kernel", "dense")
#: Statistics per channel and node: mean and standard deviation, float32 each.
_BYTES_PER_CHANNEL = 2 * 4


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``(rows, cols)`` from an int or a pair of ints, all positive."""
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v <= 0 for v in pair):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``module`` (CPU when it has none)."""
    tensor = next(iter(module.parameters()), None)
    tensor = next(iter(module.buffers()), None) if tensor is None else tensor
    return torch.device("cpu") if tensor is None else tensor.device


def _gaussian_taps(sigma: float, limit: int) -> torch.Tensor:
    """Unnormalised Gaussian taps ``(2 r + 1,)`` float64, ``r = min(ceil(3 sigma), limit)`` (``[1]`` for 0)."""
    radius = min(math.ceil(3 * sigma), limit) if sigma > 0 else 0
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    if radius == 0:
        return torch.ones(1, dtype=torch.float64)
    return torch.exp(-(offsets**2) / (2 * sigma**2))


def _separable_blur(planes: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Correlate ``planes`` ``(P, gy, gx)`` with ``taps`` along both grid axes, zero outside the grid.

    Shifted sums rather than a convolution routine: deterministic on every device, and a node with no non-zero
    input within reach gets exactly 0 (reach is read off the weight plane).
    """
    radius = (taps.numel() - 1) // 2
    _, rows, cols = planes.shape
    padded = F.pad(planes, (0, 0, radius, radius))
    along_rows = sum(tap * padded[:, k : k + rows, :] for k, tap in enumerate(taps.tolist()))
    padded = F.pad(along_rows, (radius, radius))
    return sum(tap * padded[:, :, k : k + cols] for k, tap in enumerate(taps.tolist()))


class _NodeAccumulator:
    """Sparse per-node sums of one layer's tile statistics, on the CPU in float32.

    ``nodes`` ``(N,)`` flat node indices ``i * gx + j`` (sorted), ``count`` ``(N,)`` tiles per node,
    ``mean_sum`` and ``std_sum`` ``(N, C)``.
    """

    def __init__(self, channels: int) -> None:
        self.nodes = torch.zeros(0, dtype=torch.long)
        self.count = torch.zeros(0, dtype=torch.long)
        self.mean_sum = torch.zeros(0, channels)
        self.std_sum = torch.zeros(0, channels)

    def add(self, nodes: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Add the statistics ``(B, C)`` of ``B`` tiles attributed to ``nodes`` ``(B,)``."""
        merged, inverse = torch.unique(torch.cat([self.nodes, nodes]), return_inverse=True)
        size = merged.numel()
        ones = torch.ones_like(nodes)
        self.count = torch.zeros(size, dtype=torch.long).index_add_(0, inverse, torch.cat([self.count, ones]))
        channels = self.mean_sum.shape[1]
        self.mean_sum = torch.zeros(size, channels).index_add_(0, inverse, torch.cat([self.mean_sum, mean]))
        self.std_sum = torch.zeros(size, channels).index_add_(0, inverse, torch.cat([self.std_sum, std]))
        self.nodes = merged

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.nodes, self.count, self.mean_sum, self.std_sum))


class _TileBatch:
    """Placement of the batch being run: ``origins`` ``(B, 2)`` float64 CPU top-left ``(row, col)``, tile size.

    Values derived from it (sampling grids per feature size and device, nearest nodes) are cached, as every IN
    layer of one forward pass asks for them.
    """

    def __init__(self, origins: torch.Tensor, tile_size: tuple[int, int]) -> None:
        self.origins = origins
        self.tile_size = tile_size
        self._cache: dict[Any, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.origins.shape[0]

    def centres(self) -> torch.Tensor:
        """Tile centres ``(B, 2)`` float64 ``(row, col)``."""
        return self.origins + torch.tensor(self.tile_size, dtype=torch.float64) / 2

    def cached(self, key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


# ----------------------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------------------


class SlideInstanceNorm2d(nn.InstanceNorm2d):
    """Drop-in for ``nn.InstanceNorm2d(affine=False)`` whose statistics :class:`SlideNormalization` controls.

    Holds no parameters or buffers (the state dict of the network is unchanged) and a reference to its
    controller, whose mode decides the forward pass on ``(B, C, H, W)`` (or ``(C, H, W)``) -> same shape:
    ``"tile"`` and collection run ``nn.InstanceNorm2d.forward`` itself (bit-identical); ``"kernel"`` and
    ``"dense"`` normalise with the controller's smoothed slide statistics, in float32, and return the input
    dtype (also under autocast). Built by :class:`SlideNormalization`, not by hand.

    Args:
        num_features, eps, momentum: as for ``nn.InstanceNorm2d`` (copied from the layer replaced).
        controller: the :class:`SlideNormalization` in charge.
        name: the layer's qualified name in the network, which keys its statistics.
        slide_eps: ``eps`` of ``"kernel"`` and ``"dense"`` normalisation; None uses ``eps``.
    """

    def __init__(
        self,
        num_features: int,
        controller: SlideNormalization,
        name: str,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        slide_eps: float | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False, track_running_stats=False)
        self.controller = controller
        self.layer_name = name
        self.slide_eps = float(eps if slide_eps is None else slide_eps)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        controller = self.controller
        if controller.is_collecting:
            output = super().forward(input)
            controller._record(self, input)
            return output
        if controller.mode == "tile":
            return super().forward(input)
        if input.dim() == 3:
            return self._slide_forward(input.unsqueeze(0)).squeeze(0)
        self._check_input_dim(input)
        return self._slide_forward(input)

    def _slide_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``(B, C, h, w)`` with the slide statistics at the tile centres or at every pixel."""
        if self.controller.mode == "dense":
            scale, shift = self.controller._dense_affine(self, x)  # (B, C, h, w) float32 each
        else:
            mean, std = self.controller._lookup(self, x)  # (B, C, 1, 1) float32 each, fresh tensors
            scale = std.mul_(std).add_(self.slide_eps).rsqrt_()  # 1 / sqrt(std^2 + eps)
            shift = mean.mul_(scale).neg_()  # -mean / sqrt(std^2 + eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            normalised = torch.addcmul(shift, x.float(), scale)  # (x - mean) / sqrt(std^2 + eps)
        return normalised.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer_name={self.layer_name!r}, slide_eps={self.slide_eps}"


# ----------------------------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------------------------


class SlideNormalization:
    """Replaces the instance normalisation of ``generator`` by slide-consistent normalisation (module docstring).

    Every ``nn.InstanceNorm2d`` of ``generator`` is replaced, in place, by a :class:`SlideInstanceNorm2d` with the
    same ``eps`` (``generator.state_dict()`` keeps its keys and values). Layers with affine parameters or
    running statistics are refused, as are shared instances (one module at two places of the tree), subclasses
    with their own ``forward`` and networks already converted. Hooks registered on the old layers are not moved.

    Args:
        generator: any module tree containing ``nn.InstanceNorm2d`` (not itself an ``nn.InstanceNorm2d``).
        mode: one of :data:`NORMALIZATION_MODES`; settable later through :attr:`mode`.
        grid_spacing: distance between statistics nodes in output-grid px (tile stride times ``k``).
        grid_origin: ``(y0, x0)``, position of node ``(0, 0)`` in output-grid px (the first tile's centre).
        grid_shape: ``(gy, gx)`` nodes.
        sigma: standard deviation of the smoothing kernel, in nodes (0: no smoothing; unvisited nodes then take
            the mean over all collected tiles).
        eps: ``eps`` of ``"kernel"`` and ``"dense"`` normalisation for every layer; None (default) keeps each
            layer's own. ``"tile"`` always uses the layer's own, to stay bit-identical.

    The arguments after ``mode`` are keyword-only; the grid ones have no defaults, so that it is always stated.
    Attributes: ``generator``, ``grid_spacing``, ``grid_origin``, ``grid_shape``, ``sigma`` and ``layers``
    (qualified name -> :class:`SlideInstanceNorm2d`, in network order).
    """

    def __init__(
        self,
        generator: nn.Module,
        mode: str = "dense",
        *,
        grid_spacing: float,
        grid_origin: Sequence[float],
        grid_shape: Sequence[int],
        sigma: float = 1.0,
        eps: float | None = None,
    ) -> None:
        if not isinstance(generator, nn.Module):
            raise TypeError(f"SlideNormalization: generator must be an nn.Module, got {type(generator).__name__}")
        if not (math.isfinite(float(grid_spacing)) and float(grid_spacing) > 0):
            raise ValueError(f"SlideNormalization: grid_spacing must be a positive number, got {grid_spacing!r}")
        origin = tuple(float(v) for v in grid_origin)
        if len(origin) != 2 or not all(math.isfinite(v) for v in origin):
            raise ValueError(f"SlideNormalization: grid_origin must be two finite numbers (y0, x0), got {grid_origin}")
        if not (math.isfinite(float(sigma)) and float(sigma) >= 0):
            raise ValueError(f"SlideNormalization: sigma must be a number >= 0 (in grid nodes), got {sigma!r}")
        if eps is not None and not eps > 0:
            raise ValueError(f"SlideNormalization: eps must be positive (or None for each layer's own), got {eps}")
        self.generator = generator
        self.grid_spacing = float(grid_spacing)
        self.grid_origin = origin
        self.grid_shape = _pair(grid_shape, "SlideNormalization grid_shape")
        self.sigma = float(sigma)
        self.mode = mode
        self.layers = self._replace_instance_norms(generator, eps)
        self._collecting = False
        self._tile_batch: _TileBatch | None = None
        self._collected: dict[str, _NodeAccumulator] = {}
        self._grids: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ setup

    def _replace_instance_norms(self, generator: nn.Module, eps: float | None) -> dict[str, SlideInstanceNorm2d]:
        """Swap every ``nn.InstanceNorm2d`` of ``generator`` for a :class:`SlideInstanceNorm2d`; name -> layer."""
        if isinstance(generator, nn.InstanceNorm2d):
            raise TypeError("SlideNormalization: generator is itself an InstanceNorm2d; wrap it in a container")
        places: dict[int, list[str]] = {}
        found: dict[int, nn.InstanceNorm2d] = {}
        for name, module in generator.named_modules(remove_duplicate=False):
            if isinstance(module, SlideInstanceNorm2d):
                raise ValueError(
                    f"SlideNormalization: layer {name!r} is already a SlideInstanceNorm2d; the network is already "
                    "controlled by a SlideNormalization (use that one)"
                )
            if isinstance(module, nn.InstanceNorm2d):
                places.setdefault(id(module), []).append(name)
                found[id(module)] = module
        if not found:
            raise ValueError("SlideNormalization: the network contains no nn.InstanceNorm2d to replace")
        for key, module in found.items():
            _check_replaceable(module, places[key])
        layers: dict[str, SlideInstanceNorm2d] = {}
        for key, module in found.items():
            name = places[key][0]
            layer = SlideInstanceNorm2d(module.num_features, self, name, module.eps, module.momentum, eps)
            layer.train(module.training)
            parent_name, _, attribute = name.rpartition(".")
            setattr(generator.get_submodule(parent_name), attribute, layer)
            layers[name] = layer
        return layers

    @property
    def mode(self) -> str:
        """``"tile"``, ``"kernel"`` or ``"dense"`` (module docstring)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in NORMALIZATION_MODES:
            raise ValueError(f"SlideNormalization: unknown mode {value!r}, expected one of {NORMALIZATION_MODES}")
        self._mode = value

    @property
    def is_collecting(self) -> bool:
        """Whether a :meth:`collecting` block is open."""
        return self._collecting

    @property
    def is_finalized(self) -> bool:
        """Whether smoothed statistics are available (:meth:`finalize` ran since the last :meth:`reset`)."""
        return bool(self._grids)

    @property
    def bytes_per_node(self) -> int:
        """Bytes of the statistics of one grid node: ``8 * sum(C)`` over the IN layers (float32 mean and std)."""
        return _BYTES_PER_CHANNEL * sum(layer.num_features for layer in self.layers.values())

    def statistics_bytes(self) -> int:
        """Bytes of the finalized statistics grids: ``gy * gx * bytes_per_node`` (known before collecting)."""
        return self.grid_shape[0] * self.grid_shape[1] * self.bytes_per_node

    def collected_bytes(self) -> int:
        """Bytes held on the CPU by the sparse collected statistics (visited nodes only)."""
        return sum(accumulator.nbytes for accumulator in self._collected.values())

    def visited_nodes(self) -> torch.Tensor:
        """``(N, 2)`` long ``(i, j)`` of the nodes that received at least one tile (first layer's record)."""
        if not self._collected:
            return torch.zeros(0, 2, dtype=torch.long)
        nodes = next(iter(self._collected.values())).nodes
        return torch.stack([nodes // self.grid_shape[1], nodes % self.grid_shape[1]], dim=1)

    def smoothed_statistics(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Finalized ``(mean, std)`` of layer ``name``, each ``(gy, gx, C)`` float32 (views of the stored grid)."""
        if name not in self.layers:
            raise KeyError(f"SlideNormalization: no layer {name!r}; layers are {list(self.layers)}")
        if not self.is_finalized:
            raise RuntimeError("SlideNormalization: no smoothed statistics yet; collect, then call finalize()")
        grid = self._grids[name][0].permute(1, 2, 0)  # (gy, gx, 2C)
        channels = self.layers[name].num_features
        return grid[..., :channels], grid[..., channels:]

    # ------------------------------------------------------------------------------------------------ passes

    @contextmanager
    def tiles(
        self, origins: torch.Tensor | Sequence[Sequence[float]], tile_size: int | Sequence[int]
    ) -> Iterator[None]:
        """Declare where the tiles of the batch about to be run lie.

        Args:
            origins: ``(B, 2)`` float or int ``(row, col)`` of each tile's top-left corner in output-grid px, in
                batch order; tiles may come from anywhere on the slide.
            tile_size: tile side ``T`` in output-grid px (or ``(rows, cols)``); a feature map of size ``(h, w)``
                covers the tile with stride ``(T / h, T / w)``.
        """
        origins = torch.as_tensor(origins).detach().to("cpu", torch.float64)
        if origins.ndim != 2 or origins.shape[0] == 0 or origins.shape[1] != 2:
            raise ValueError(f"SlideNormalization.tiles: origins must be (B, 2) (row, col), got {tuple(origins.shape)}")
        if not bool(torch.isfinite(origins).all()):
            raise ValueError("SlideNormalization.tiles: origins must be finite")
        previous = self._tile_batch
        self._tile_batch = _TileBatch(origins, _pair(tile_size, "SlideNormalization.tiles tile_size"))
        try:
            yield
        finally:
            self._tile_batch = previous

    @contextmanager
    def collecting(self) -> Iterator[None]:
        """Record statistics of the forward passes run inside (each inside :meth:`tiles`); outputs as ``"tile"``.

        Each tile's per-channel mean and std of every layer go to the node nearest to its centre (clamped to the
        grid); records accumulate over blocks until :meth:`reset`. Call :meth:`finalize` afterwards.
        """
        previous = self._collecting
        self._collecting = True
        try:
            yield
        finally:
            self._collecting = previous

    def finalize(self) -> None:
        """Build every layer's smoothed statistics grid from the collected ones (module docstring).

        Normalised Gaussian convolution over the visited nodes, computed layer by layer in float64 on the CPU
        (transient memory about three times ``gy * gx * (2C + 1) * 8`` bytes for the widest layer) and kept as
        one float32 ``(1, 2C, gy, gx)`` tensor per layer (mean channels, then std) on the generator's device.
        Raises RuntimeError when nothing was collected or a layer never ran while collecting.
        """
        if not self._collected:
            raise RuntimeError(
                "SlideNormalization.finalize: no statistics collected; run tiles through the generator inside "
                "`with norm.collecting(), norm.tiles(origins, tile_size):` first"
            )
        missing = [name for name in self.layers if name not in self._collected]
        if missing:
            raise RuntimeError(f"SlideNormalization.finalize: layers never run while collecting: {missing}")
        device = _module_device(self.generator)
        taps = _gaussian_taps(self.sigma, max(self.grid_shape) - 1)
        self._grids = {
            name: self._smooth(self._collected[name], taps).to(device=device, dtype=torch.float32)
            for name in self.layers
        }

    def _smooth(self, accumulator: _NodeAccumulator, taps: torch.Tensor) -> torch.Tensor:
        """Smoothed ``(1, 2C, gy, gx)`` float64 statistics of one layer."""
        rows, cols = self.grid_shape
        count = accumulator.count.to(torch.float64)
        sums = torch.cat([accumulator.mean_sum, accumulator.std_sum], dim=1).to(torch.float64)  # (N, 2C)
        channels = sums.shape[1]
        planes = torch.zeros(channels + 1, rows * cols, dtype=torch.float64)
        planes[:channels, accumulator.nodes] = (sums / count[:, None]).T
        planes[channels, accumulator.nodes] = 1.0
        blurred = _separable_blur(planes.view(channels + 1, rows, cols), taps)
        weight = blurred[channels:]
        fallback = (sums.sum(0) / count.sum()).view(channels, 1, 1)  # mean over all collected tiles
        smoothed = torch.where(weight > 0, blurred[:channels] / weight.clamp_min(1e-300), fallback)
        return smoothed.unsqueeze(0)

    def reset(self) -> None:
        """Forget the collected and the finalized statistics (the mode is kept)."""
        self._collected = {}
        self._grids = {}

    def to(self, device: torch.device | str) -> SlideNormalization:
        """Move the finalized statistics to ``device`` (after moving the generator) and return ``self``."""
        self._grids = {name: grid.to(device) for name, grid in self._grids.items()}
        return self

    # ------------------------------------------------------------------------------------------------ layer side

    def _current_tiles(self, layer: SlideInstanceNorm2d, batch: int) -> _TileBatch:
        tile_batch = self._tile_batch
        if tile_batch is None:
            raise RuntimeError(
                f"SlideInstanceNorm2d {layer.layer_name!r}: mode {self.mode!r} and collection need the tiles' "
                "positions; run the generator inside `with norm.tiles(origins, tile_size):`"
            )
        if len(tile_batch) != batch:
            raise ValueError(
                f"SlideInstanceNorm2d {layer.layer_name!r}: batch of {batch} feature maps but tiles() was given "
                f"{len(tile_batch)} origins"
            )
        return tile_batch

    def _check_channels(self, layer: SlideInstanceNorm2d, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != layer.num_features:
            raise ValueError(
                f"SlideInstanceNorm2d {layer.layer_name!r}: expected (B, {layer.num_features}, H, W), got "
                f"{tuple(x.shape)}"
            )

    def _nearest_nodes(self, tile_batch: _TileBatch) -> torch.Tensor:
        """Flat index ``i * gx + j`` ``(B,)`` of the node nearest to each tile centre, clamped to the grid."""
        centres = tile_batch.centres()
        index = torch.round((centres - torch.tensor(self.grid_origin, dtype=torch.float64)) / self.grid_spacing)
        rows = index[:, 0].clamp(0, self.grid_shape[0] - 1).long()
        cols = index[:, 1].clamp(0, self.grid_shape[1] - 1).long()
        return rows * self.grid_shape[1] + cols

    def _record(self, layer: SlideInstanceNorm2d, x: torch.Tensor) -> None:
        """Add the per-tile, per-channel mean and (biased) std of ``x`` ``(B, C, h, w)`` to the layer's nodes."""
        x = x.unsqueeze(0) if x.dim() == 3 else x
        self._check_channels(layer, x)
        tile_batch = self._current_tiles(layer, x.shape[0])
        nodes = tile_batch.cached("nodes", lambda: self._nearest_nodes(tile_batch))
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            var, mean = torch.var_mean(x.detach().float(), dim=(2, 3), correction=0)
            std = var.sqrt()
        accumulator = self._collected.setdefault(layer.layer_name, _NodeAccumulator(layer.num_features))
        accumulator.add(nodes, mean.cpu(), std.cpu())

    def _normalised_axis(self, positions: torch.Tensor, axis: int) -> torch.Tensor:
        """``grid_sample`` coordinates (``align_corners=True``) of output-grid ``positions`` along rows (0)/cols (1)."""
        size = self.grid_shape[axis]
        if size == 1:
            return torch.zeros_like(positions)
        nodes = (positions - self.grid_origin[axis]) / self.grid_spacing
        return 2 * nodes / (size - 1) - 1

    def _centre_grid(self, tile_batch: _TileBatch) -> torch.Tensor:
        """``grid_sample`` grid ``(1, 1, B, 2)`` float64 of the tile centres, last axis ``(x, y)``."""
        centres = tile_batch.centres()
        grid = torch.stack([self._normalised_axis(centres[:, 1], 1), self._normalised_axis(centres[:, 0], 0)], -1)
        return grid.view(1, 1, -1, 2)

    def _axis_weights(
        self, starts: torch.Tensor, tile: float, size: int, axis: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear weights of the statistics nodes along one axis for ``size`` feature pixels of each tile.

        ``starts`` ``(B,)`` float64: the tiles' first output-grid row (axis 0) or column (axis 1); the feature map
        covers ``tile`` px with ``size`` pixels. Returns the first node of each tile's window ``(B,)`` int64 and the
        weights ``(B, size, k)`` float64 of the ``k`` nodes from there (hat functions of the node coordinate,
        clamped to the grid, so each row sums to 1).
        """
        nodes = self.grid_shape[axis]
        positions = starts[:, None] + (torch.arange(size, dtype=torch.float64) + 0.5) * (tile / size)  # (B, size)
        u = ((positions - self.grid_origin[axis]) / self.grid_spacing).clamp(0, nodes - 1)
        window = min(nodes, math.ceil(tile / self.grid_spacing) + 2)
        first = u.min(dim=1).values.floor().long().clamp(0, nodes - window)
        offsets = first[:, None, None] + torch.arange(window)  # (B, 1, k)
        weights = (1.0 - (u[:, :, None] - offsets).abs()).clamp(min=0.0)
        return first, weights

    def _dense_affine(self, layer: SlideInstanceNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense mode: per-pixel ``(scale, shift)``, ``(B, C, h, w)`` float32 each; ``x * scale + shift`` normalises.

        At every node the smoothed statistics give ``scale = 1 / sqrt(std^2 + eps)`` and ``shift = -mean * scale``;
        both are interpolated bilinearly at every feature pixel's centre, as two small matrix products per tile
        (a tile touches a few nodes per axis). Interpolating the node's normalisation rather than its statistics
        keeps the per-pixel work to one multiply-add on the features; the two agree at the nodes and differ by
        second-order terms between them.
        """
        self._check_channels(layer, x)
        self._check_finalized(layer)
        batch, channels, height, width = x.shape
        tile_batch = self._current_tiles(layer, batch)
        tile_rows, tile_cols = tile_batch.tile_size

        def weights():
            (y0, wy), (x0, wx) = (
                self._axis_weights(tile_batch.origins[:, 0], tile_rows, height, 0),
                self._axis_weights(tile_batch.origins[:, 1], tile_cols, width, 1),
            )
            return y0, x0, wy.to(x.device, torch.float32), wx.to(x.device, torch.float32)

        y0, x0, wy, wx = tile_batch.cached(("dense", height, width, x.device), weights)
        statistics = self._grids[layer.layer_name].to(x.device)[0]  # (2C, gy, gx)
        ky, kx = wy.shape[-1], wx.shape[-1]
        corners = zip(y0.tolist(), x0.tolist(), strict=True)
        local = torch.stack([statistics[:, r : r + ky, c : c + kx] for r, c in corners])  # (B, 2C, ky, kx)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            scale = local[:, channels:].square().add_(layer.slide_eps).rsqrt_()
            affine = torch.cat([scale, -local[:, :channels] * scale], dim=1)
            maps = torch.matmul(torch.matmul(wy[:, None], affine), wx[:, None].transpose(-1, -2))  # (B, 2C, h, w)
        return maps[:, :channels], maps[:, channels:]

    def _check_finalized(self, layer: SlideInstanceNorm2d) -> None:
        if not self.is_finalized:
            raise RuntimeError(
                f"SlideInstanceNorm2d {layer.layer_name!r}: mode {self.mode!r} needs slide statistics; collect them "
                "(`with norm.collecting(): ...`) and call norm.finalize() first, or set norm.mode = 'tile'"
            )

    def _lookup(self, layer: SlideInstanceNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide ``(mean, std)`` at the tile centres for ``x`` ``(B, C, h, w)``: float32 ``(B, C, 1, 1)`` each, new
        tensors the caller may modify (``"kernel"`` mode)."""
        self._check_channels(layer, x)
        self._check_finalized(layer)
        channels = x.shape[1]
        tile_batch = self._current_tiles(layer, x.shape[0])
        grid = tile_batch.cached(
            ("centres", x.device), lambda: self._centre_grid(tile_batch).to(x.device, torch.float32)
        )
        statistics = self._grids[layer.layer_name].to(x.device)
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            sampled = F.grid_sample(statistics, grid, mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled.view(2 * channels, x.shape[0]).T[:, :, None, None]  # (B, 2C, 1, 1)
        return sampled[:, :channels].clone(), sampled[:, channels:].clone()


def _check_replaceable(module: nn.InstanceNorm2d, names: list[str]) -> None:
    """Raise a clear error unless ``module`` (found at ``names``) can become a :class:`SlideInstanceNorm2d`."""
    where = names[0]
    if module.affine:
        raise ValueError(
            f"SlideNormalization: InstanceNorm2d {where!r} has affine parameters; only affine=False layers can "
            "take slide statistics"
        )
    if module.track_running_stats:
        raise ValueError(
            f"SlideNormalization: InstanceNorm2d {where!r} tracks running statistics; only "
            "track_running_stats=False layers can take slide statistics"
        )
    if len(names) > 1:
        raise ValueError(
            f"SlideNormalization: one InstanceNorm2d instance is used at several places {names}; its statistics "
            "would mix, give each place its own layer"
        )
    if type(module).forward is not nn.InstanceNorm2d.forward:
        raise TypeError(
            f"SlideNormalization: {where!r} is a {type(module).__name__} with its own forward; only plain "
            "nn.InstanceNorm2d layers are replaced"
        )
