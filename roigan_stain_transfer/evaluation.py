"""Evaluation and inference engines of the region-guided CycleGAN (Boyd et al., MICCAI 2022).

* :class:`StainTransferEvaluator` (a MONAI ``Evaluator``) runs the generator ``G_XY`` over batches of H&E tiles
  ``(B, 3, H, W)`` in ``[-1, 1]`` and puts the synthetic IHC tiles ``(B, 3, H, W)`` under ``pred`` in its output,
  next to the batch entries.
* :class:`EvaluationReport` (a handler) scores every tile as the paper does: the synthetic DAB is binarised
  exactly as the IHC box library does (:func:`roigan_stain_transfer.metrics.synthetic_dab_mask`) and compared with
  the expert annotation by DICE and balanced accuracy; PSNR / SSIM against the real IHC tile when the dataset has
  pairs. At the end it writes ``per_tile.csv``, ``summary.json`` (mean +- std over tiles) and ``grid.png`` (rows of
  H&E, annotation, synthetic IHC, DAB mask for the first few tiles).
* :class:`SaveTiles` (a handler) writes every synthetic tile as an RGB PNG (inference).

Every file is written atomically, through the project's one helper :mod:`shared_ops.atomic` (a temporary file in the
destination folder, then ``os.replace``); :func:`atomic_write_bytes` is re-exported from there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from PIL import Image

from roigan_stain_transfer.box_library import RELEASED_CODE, BoxLibraryParams, resolve_preset
from roigan_stain_transfer.data import HE_KEY, IHC_KEY, MASK_KEY, NAME_KEY
from roigan_stain_transfer.metrics import mask_scores, psnr, ssim, summarize, synthetic_dab_mask, tiles_to_uint8
from shared_ops.atomic import atomic_write_bytes
from shared_ops.engines import engine_autocast

__all__ = [
    "CSV_FIELDS",
    "EvaluationReport",
    "SaveTiles",
    "StainTransferEvaluator",
    "atomic_write_bytes",
    "tile_grid",
]

CSV_FIELDS = (
    "tile",
    "dice",
    "bac",
    "sensitivity",
    "specificity",
    "tp",
    "fp",
    "fn",
    "tn",
    "dab_coverage",
    "annotation_coverage",
    "psnr",
    "ssim",
)
SUMMARY_FIELDS = ("dice", "bac", "sensitivity", "specificity", "dab_coverage", "psnr", "ssim")


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _json_value(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------------------------


class StainTransferEvaluator(Evaluator):
    """Runs ``network`` (``G_XY``) over the ``image_key`` tiles of each batch; no gradients.

    Args:
        device: device of the network and batches.
        val_data_loader: loader of dict batches holding ``image_key`` tiles ``(B, 3, H, W)`` in ``[-1, 1]``
            (e.g. :class:`roigan_stain_transfer.data.AnnotatedTileDataset` or ``TileDataset``).
        network: the generator.
        image_key: batch key of the input tiles (``"he"`` for evaluation, ``"image"`` for inference).
        pred_key: output key of the synthetic tiles ``(B, 3, H, W)`` float32 in ``[-1, 1]``.
        epoch_length, non_blocking, val_handlers, amp, amp_kwargs: as :class:`monai.engines.Evaluator`.
        inferer: called as ``inferer(tiles, network)`` (the bundle's ``inferer``); None calls the network.
        postprocessing: applied to each tile of the batch as ``{pred_key: tile, image_key: input tile}``, its
            ``pred_key`` result restacked (the bundle's ``postprocessing``, as MONAI Deploy applies it to
            one item); None keeps the network's output.

    The iteration output is the batch (tensors on their original device) plus ``pred`` on the CPU.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader,
        network: torch.nn.Module,
        image_key: str = HE_KEY,
        pred_key: str = CommonKeys.PRED,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        amp_kwargs: dict | None = None,
        inferer: Callable | None = None,
        postprocessing: Callable[[dict], dict] | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            val_handlers=val_handlers,
            amp=amp,
            decollate=False,
            amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.image_key, self.pred_key = image_key, pred_key
        self.inferer, self.item_postprocessing = inferer, postprocessing

    def _postprocess(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        items = [
            self.item_postprocessing({self.pred_key: tile, self.image_key: image})[self.pred_key]
            for tile, image in zip(pred, images.cpu(), strict=True)
        ]
        return torch.stack([torch.as_tensor(item).as_subclass(torch.Tensor) for item in items])

    def _autocast(self):
        return engine_autocast(self)

    def _iteration(self, engine: StainTransferEvaluator, batchdata: Mapping) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if engine.image_key not in batchdata:
            raise KeyError(f"the batch has no {engine.image_key!r} tiles; it has {sorted(batchdata)}")
        images = batchdata[engine.image_key]
        if hasattr(images, "as_tensor"):
            images = images.as_tensor()
        images = images.to(engine.state.device, non_blocking=engine.non_blocking)
        engine.network.eval()
        with engine.mode(engine.network), engine._autocast():
            pred = engine.network(images) if engine.inferer is None else engine.inferer(images, engine.network)
        output = dict(batchdata)
        output[engine.pred_key] = pred.detach().float().cpu()
        if engine.item_postprocessing is not None:
            output[engine.pred_key] = engine._postprocess(images, output[engine.pred_key])
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


# ----------------------------------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------------------------------


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` -> white-on-black RGB ``(H, W, 3)`` uint8."""
    return np.repeat((np.asarray(mask, dtype=np.uint8) * 255)[..., None], 3, axis=2)


def tile_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 4, gap_value: int = 128) -> np.ndarray:
    """RGB ``uint8`` image of ``rows`` of equally sized RGB tiles ``(H, W, 3)``, separated by ``gap`` px of grey
    ``gap_value`` (mid-grey, so that white masks stay distinguishable from the background)."""
    if not rows or not rows[0]:
        raise ValueError("tile_grid: no tiles")
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    canvas = np.full(
        (len(rows) * height + (len(rows) - 1) * gap, columns * width + (columns - 1) * gap, 3), gap_value, np.uint8
    )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile.shape != (height, width, 3):
                raise ValueError(f"tile_grid: tile ({r}, {c}) has shape {tile.shape}, expected {(height, width, 3)}")
            top, left = r * (height + gap), c * (width + gap)
            canvas[top : top + height, left : left + width] = tile
    return canvas


def _batch_list(value: Any, count: int) -> list:
    if isinstance(value, torch.Tensor):
        return list(value.detach().cpu().unbind(0))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count


class EvaluationReport:
    """Scores synthetic IHC tiles against annotation masks and writes the report files at the end of the run.

    Per tile: the synthetic DAB mask (:func:`~roigan_stain_transfer.metrics.synthetic_dab_mask` with ``dab_params``)
    against the annotation: DICE, BAC, sensitivity, specificity and the confusion counts; the DAB and annotation
    coverage; PSNR and SSIM of the synthetic against the real IHC tile when the batch holds ``ihc_key``.

    Files in ``output_dir``: ``per_tile.csv`` (columns :data:`CSV_FIELDS`, empty cells for undefined values),
    ``summary.json`` (``{"tiles": n, "<metric>": {"mean", "std", "count"}, ...}``, population std, NaN -> null)
    and ``grid.png`` (one row per tile for the first ``grid_tiles`` tiles: H&E, annotation, synthetic IHC,
    synthetic DAB mask). All three are written atomically.

    Args:
        output_dir: folder of the report files.
        grid_tiles: tiles shown in ``grid.png`` (0: no grid).
        dab_params: box-library parameters or preset name of the DAB binarisation.
        image_key, mask_key, ihc_key, pred_key, name_key: batch / output keys.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        grid_tiles: int = 4,
        dab_params: str | BoxLibraryParams = RELEASED_CODE,
        image_key: str = HE_KEY,
        mask_key: str = MASK_KEY,
        ihc_key: str = IHC_KEY,
        pred_key: str = CommonKeys.PRED,
        name_key: str = NAME_KEY,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.grid_tiles = int(grid_tiles)
        self.dab_params = resolve_preset(dab_params)
        self.image_key, self.mask_key, self.ihc_key = image_key, mask_key, ihc_key
        self.pred_key, self.name_key = pred_key, name_key
        self.rows: list[dict[str, Any]] = []
        self.grid_rows: list[list[np.ndarray]] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.rows, self.grid_rows = [], []

    def score_tile(self, name: str, synthetic: np.ndarray, annotation, real_ihc: np.ndarray | None) -> dict:
        """Scores of one tile (synthetic / real IHC as ``(H, W, 3)`` uint8, annotation ``(H, W)`` bool)."""
        dab = synthetic_dab_mask(synthetic, self.dab_params, name=f"synthetic IHC of {name}")
        annotation = np.asarray(annotation, dtype=bool)
        scores = mask_scores(dab, annotation).as_dict()
        row = {
            "tile": name,
            **scores,
            "dab_coverage": float(dab.mean()),
            "annotation_coverage": float(annotation.mean()),
        }
        row["psnr"] = psnr(synthetic, real_ihc) if real_ihc is not None else math.nan
        row["ssim"] = ssim(synthetic, real_ihc) if real_ihc is not None else math.nan
        row["_dab"] = dab
        return row

    def collect(self, engine) -> None:
        output = engine.state.output
        if self.pred_key not in output or self.mask_key not in output:
            raise KeyError(f"EvaluationReport needs {self.pred_key!r} and {self.mask_key!r} in the engine output")
        synthetic = tiles_to_uint8(output[self.pred_key])
        count = len(synthetic)
        masks = _batch_list(output[self.mask_key], count)
        names = _batch_list(output.get(self.name_key, None), count)
        he = tiles_to_uint8(output[self.image_key]) if self.image_key in output else None
        ihc = tiles_to_uint8(output[self.ihc_key]) if self.ihc_key in output else None
        for i in range(count):
            name = str(names[i]) if names[i] is not None else f"tile_{len(self.rows)}"
            mask = masks[i].numpy() if isinstance(masks[i], torch.Tensor) else np.asarray(masks[i])
            row = self.score_tile(name, synthetic[i], mask, None if ihc is None else ihc[i])
            dab = row.pop("_dab")
            self.rows.append(row)
            if len(self.grid_rows) < self.grid_tiles and he is not None:
                self.grid_rows.append([he[i], _mask_rgb(mask), synthetic[i], _mask_rgb(dab)])

    def summary(self) -> dict[str, Any]:
        """``{"tiles": n, metric: {"mean", "std", "count"}}`` over the collected tiles."""
        result: dict[str, Any] = {"tiles": len(self.rows)}
        for field in SUMMARY_FIELDS:
            stats = summarize(row[field] for row in self.rows if math.isfinite(row[field]))
            result[field] = {"mean": _json_value(stats.mean), "std": _json_value(stats.std), "count": stats.count}
        return result

    def write(self, engine=None) -> dict[str, Path]:
        """Write ``per_tile.csv``, ``summary.json`` and ``grid.png``; returns their paths by kind."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
        paths = {"csv": atomic_write_bytes(self.output_dir / "per_tile.csv", buffer.getvalue().encode())}
        summary = json.dumps(self.summary(), indent=2, allow_nan=False)
        paths["summary"] = atomic_write_bytes(self.output_dir / "summary.json", (summary + "\n").encode())
        if self.grid_rows:
            paths["grid"] = atomic_write_bytes(self.output_dir / "grid.png", _png_bytes(tile_grid(self.grid_rows)))
        if engine is not None and hasattr(engine, "logger"):
            engine.logger.info(f"evaluation of {len(self.rows)} tiles written to {self.output_dir}")
        return paths


class SaveTiles:
    """Writes every synthetic tile of the engine output as an RGB PNG (atomically) into ``output_dir``.

    File names come from the batch's ``name_key`` entries (``TileDataset`` gives the input PNG name, or
    ``"<HDF5 stem>_<index>.png"``), with ``suffix`` inserted before the extension. Tiles are network output
    ``(B, 3, H, W)`` in ``[-1, 1]``, or RGB ``(B, H, W, 3)`` uint8 already (the bundle's ``postprocessing``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = CommonKeys.PRED,
        name_key: str = NAME_KEY,
        suffix: str = "",
        output_transform: Callable | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.name_key, self.suffix = pred_key, name_key, suffix
        self.output_transform = output_transform
        self.written: list[Path] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        if self.output_transform is not None:
            output = self.output_transform(output)
        tiles = output[self.pred_key]
        if isinstance(tiles, torch.Tensor):
            tiles = tiles.detach().cpu().numpy()
        tiles = np.asarray(tiles)
        if not (tiles.dtype == np.uint8 and tiles.ndim == 4 and tiles.shape[-1] == 3):
            tiles = tiles_to_uint8(tiles)
        names = _batch_list(output.get(self.name_key), len(tiles))
        for tile, name in zip(tiles, names, strict=True):
            name = Path(str(name) if name is not None else f"tile_{len(self.written)}.png")
            self.written.append(atomic_write_bytes(self.output_dir / f"{name.stem}{self.suffix}.png", _png_bytes(tile)))
